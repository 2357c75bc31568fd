"""Prometheus metrics of a node, read from its counters at scrape time (nothing is
counted twice on the hot path)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .node import Node


class NodeCollector(Collector):
    def __init__(self, node: Node) -> None:
        self._node = node

    def collect(self) -> Iterator[Metric]:
        node, hub = self._node, self._node.hub
        labels = ["node"]
        frames = CounterMetricFamily(
            "roomcast_broker_frames_received",
            "Room frames this node received from the broker",
            labels=labels,
        )
        frames.add_metric([node.id], hub.frames_received)
        yield frames
        by_room = CounterMetricFamily(
            "roomcast_broker_room_frames_received",
            "Room frames this node received from the broker, per room",
            labels=["node", "room"],
        )
        for room, count in sorted(hub.frames_by_room.items()):
            by_room.add_metric([node.id, str(room)], count)
        yield by_room
        deliveries = CounterMetricFamily(
            "roomcast_deliveries", "Frames written to local connections", labels=labels
        )
        deliveries.add_metric([node.id], hub.deliveries)
        yield deliveries
        rooms = GaugeMetricFamily(
            "roomcast_subscribed_rooms", "Rooms this node is subscribed to", labels=labels
        )
        rooms.add_metric([node.id], len(hub.local_rooms()))
        yield rooms
        conns = GaugeMetricFamily(
            "roomcast_connections", "Client connections on this node", labels=labels
        )
        conns.add_metric([node.id], len(node.service.sessions()))
        yield conns


class Metrics:
    """The registry a node's ``/metrics`` serves."""

    def __init__(self, node: Node) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(NodeCollector(node))
