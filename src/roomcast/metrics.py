"""Prometheus metrics of a node, read from its counters at scrape time (nothing is
counted twice on the hot path)."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from .core.timing import Durations
from .exceptions import ErrorCode

if TYPE_CHECKING:
    from .node import Node
    from .transports.handoff import HandoffReceiver, HandoffSender
    from .transports.socketio import SocketIOTransport


class NodeCollector(Collector):
    def __init__(self, node: Node) -> None:
        self._node = node
        self.socketio: SocketIOTransport | None = None
        self.grpc_refused: collections.Counter[str] | None = None
        """The gRPC door's refusals by status name (see ``GrpcDoor.refused``), once it runs."""
        self.handoff_sender: HandoffSender | None = None
        self.handoff_receiver: HandoffReceiver | None = None

    def collect(self) -> Iterator[Metric]:
        node, hub = self._node, self._node.hub
        yield _single(
            CounterMetricFamily,
            "roomcast_broker_frames_received",
            "Room frames this node received from the broker",
            node.id,
            hub.frames_received,
        )
        yield _single(
            CounterMetricFamily,
            "roomcast_broker_stray_frames_received",
            "Room frames this node received from the broker for rooms it is not subscribed "
            "to (late ones of a room it has just left), dropped",
            node.id,
            hub.frames_stray,
        )
        if node.settings.metrics_rooms:
            by_room = CounterMetricFamily(
                "roomcast_broker_room_frames_received",
                "Room frames this node received from the broker, per room it is subscribed "
                "to, since it subscribed",
                labels=["node", "room"],
            )
            for room, count in sorted(hub.frames_by_room().items()):
                by_room.add_metric([node.id, str(room)], count)
            yield by_room
        yield _single(
            CounterMetricFamily,
            "roomcast_deliveries",
            "Frames written to local connections",
            node.id,
            hub.deliveries,
        )
        yield _single(
            GaugeMetricFamily,
            "roomcast_subscribed_rooms",
            "Rooms this node is subscribed to",
            node.id,
            len(hub.local_rooms()),
        )
        yield _single(
            GaugeMetricFamily,
            "roomcast_connections",
            "Client connections on this node",
            node.id,
            len(node.service.sessions()),
        )
        try:
            tasks = len(asyncio.all_tasks())
        except RuntimeError:  # not scraped from the node's event loop
            pass
        else:
            yield _single(
                GaugeMetricFamily,
                "roomcast_event_loop_tasks",
                "asyncio tasks not yet done on this node's event loop (an idle connection "
                "served by roomcast's own WebSocket path keeps none)",
                node.id,
                tasks,
            )
        keys = None if node.service.auth is None else node.service.auth.public_keys
        if keys is not None:
            yield _single(
                GaugeMetricFamily,
                "roomcast_auth_public_keys",
                "Public keys this node checks tokens with (a PEM file's and the fetched set's)",
                node.id,
                len(keys),
            )
            yield _single(
                GaugeMetricFamily,
                "roomcast_auth_key_set_fetch_failures",
                "Fetches of the identity provider's key set that failed in a row (0: the last "
                "one succeeded; the keys of the last good one are kept)",
                node.id,
                keys.failures,
            )
        sequencer = node.service.sequencer
        yield _single(
            CounterMetricFamily,
            "roomcast_messages_stored",
            "Messages this node sequenced and stored (acknowledged to their senders)",
            node.id,
            sequencer.messages_stored,
        )
        yield _single(
            CounterMetricFamily,
            "roomcast_messages_trimmed",
            "Messages this node deleted from history for retention (--history-max-messages, "
            "--history-max-days)",
            node.id,
            node.service.messages_trimmed,
        )
        yield _single(
            CounterMetricFamily,
            "roomcast_messages_deleted",
            "Messages deleted through this node by their senders or moderators",
            node.id,
            node.service.messages_deleted,
        )
        yield _single(
            CounterMetricFamily,
            "roomcast_messages_edited",
            "Edits of messages made through this node by their senders",
            node.id,
            node.service.messages_edited,
        )
        yield _histogram(
            "roomcast_store_append_seconds",
            "Time to append one batch of messages to the store (seqs given, durably written)",
            node.id,
            sequencer.append_seconds,
        )
        yield _histogram(
            "roomcast_broker_publish_seconds",
            "Time to publish one stored batch to the broker, its reply awaited",
            node.id,
            sequencer.publish_seconds,
        )
        if self.socketio is not None:
            writes = CounterMetricFamily(
                "roomcast_socketio_writes",
                "Room frames written to Socket.IO clients, by path: direct (the WebSocket "
                "fast path) or queued (Engine.IO's per-socket queue)",
                labels=["node", "path"],
            )
            writes.add_metric([node.id, "direct"], self.socketio.direct_writes)
            writes.add_metric([node.id, "queued"], self.socketio.queued_writes)
            yield writes
            events = CounterMetricFamily(
                "roomcast_socketio_events",
                "Client events handled, by path: direct (read straight off a fast-path "
                "WebSocket) or queued (through the ASGI app, Engine.IO and Socket.IO)",
                labels=["node", "path"],
            )
            direct_events = self.socketio.direct_events
            events.add_metric([node.id, "direct"], direct_events)
            events.add_metric([node.id, "queued"], self.socketio.events - direct_events)
            yield events
            refused = CounterMetricFamily(
                "roomcast_socketio_refused",
                "Client events and connects answered with an error, by its code (rate_limited: "
                "a client past its rate; unavailable: an engine out of reach; unauthorized: a "
                "connect without a valid token; the rest: requests refused for what they asked)",
                labels=["node", "code"],
            )
            for code in ErrorCode:
                refused.add_metric([node.id, code.value], self.socketio.refused[code])
            yield refused
            yield _single(
                CounterMetricFamily,
                "roomcast_socketio_upgrades",
                "Long-polling sessions that upgraded to a WebSocket served by roomcast's own "
                "Engine.IO path",
                node.id,
                self.socketio.upgrades_served,
            )
            yield _single(
                CounterMetricFamily,
                "roomcast_socketio_expired",
                "Connections ended because their token expired (and no newer one was sent)",
                node.id,
                self.socketio.expired,
            )
        if self.grpc_refused is not None:
            statuses = CounterMetricFamily(
                "roomcast_grpc_refused",
                "gRPC calls ended with a status other than OK, by status (RESOURCE_EXHAUSTED: "
                "a user past its rate or its streams; UNAVAILABLE: an engine out of reach; the "
                "rest: calls refused for what they asked)",
                labels=["node", "status"],
            )
            for status, count in sorted(self.grpc_refused.items()):
                statuses.add_metric([node.id, status], count)
            yield statuses
        if self.handoff_sender is not None:
            handoffs = CounterMetricFamily(
                "roomcast_worker_handoffs",
                "WebSocket upgrades of a long-polling session passed between sibling workers "
                "with their TCP connection, by direction: sent (this worker accepted it, "
                "another owns the session) or taken (this worker owns it)",
                labels=["node", "direction"],
            )
            handoffs.add_metric([node.id, "sent"], self.handoff_sender.handed)
            receiver = self.handoff_receiver
            handoffs.add_metric([node.id, "taken"], receiver.adopted if receiver else 0)
            yield handoffs


def _single(
    family: type[CounterMetricFamily | GaugeMetricFamily],
    name: str,
    documentation: str,
    node: str,
    value: float,
) -> Metric:
    """A counter or gauge with one sample, labelled by node."""
    metric = family(name, documentation, labels=["node"])
    metric.add_metric([node], value)
    return metric


def _histogram(name: str, documentation: str, node: str, durations: Durations) -> Metric:
    family = HistogramMetricFamily(name, documentation, labels=["node"])
    buckets = [(_bound(bound), count) for bound, count in durations.cumulative()]
    family.add_metric([node], buckets, durations.total)
    return family


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class Metrics:
    """The registry a node's ``/metrics`` serves."""

    def __init__(self, node: Node) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.collector = NodeCollector(node)
        self.registry.register(self.collector)
