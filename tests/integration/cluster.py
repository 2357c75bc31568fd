"""Clusters of real roomcast nodes (separate processes, separate ports) for tests."""

from __future__ import annotations

import contextlib
import re
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from tests import services

from .servers import Server, start_server

BROKERS = ["redis", "redis-cluster", "redis-sentinel", "amqp", "nats"]

# Fast failure detection, so the tests of node death finish in seconds.
FAST = ("--heartbeat-interval", "0.5", "--node-ttl", "3", "--rate-limit", "0")


@contextlib.asynccontextmanager
async def postgres_schema() -> AsyncIterator[str]:
    """A store URL on the machine's PostgreSQL with a schema of its own, dropped after."""
    import asyncpg

    services.require("PostgreSQL", services.POSTGRES_HOST, services.POSTGRES_PORT)
    schema = f"c{uuid.uuid4().hex[:12]}"
    try:
        yield f"{services.POSTGRES_URL}?schema={schema}"
    finally:
        conn = await asyncpg.connect(services.POSTGRES_URL)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


class Cluster:
    """Nodes sharing one broker and one store; stopped (or killed) in teardown."""

    def __init__(self, broker: str, store: str, log_dir: Path, *extra: str) -> None:
        self.broker = broker
        self.store = store
        self.log_dir = log_dir
        self.extra = extra
        self.nodes: list[Server] = []

    def start(self, count: int = 1) -> list[Server]:
        started = []
        for _ in range(count):
            name = f"node{len(self.nodes) + 1}"
            node = start_server(
                "--broker-url", self.broker, "--node-id", name, *FAST, *self.extra,
                store_url=self.store, log_dir=self.log_dir,
            )  # fmt: skip
            self.nodes.append(node)
            started.append(node)
        return started

    def restart(self, node: Server) -> Server:
        """Start a node again, with its node id and port (once it has stopped or died)."""
        index = self.nodes.index(node)
        again = start_server(
            "--broker-url", self.broker, "--node-id", f"node{index + 1}", *FAST, *self.extra,
            store_url=self.store, log_dir=self.log_dir, port=node.port,
        )  # fmt: skip
        self.nodes[index] = again
        return again

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@contextlib.contextmanager
def cluster(broker: str, store: str, log_dir: Path, *extra: str) -> Iterator[Cluster]:
    c = Cluster(broker, store, log_dir, *extra)
    try:
        yield c
    finally:
        c.stop()


def _metrics(node: Server) -> str:
    with urllib.request.urlopen(node.url + "/metrics", timeout=5) as response:
        return str(response.read().decode())


def room_frames(node: Server) -> dict[int, float]:
    """Per room it is subscribed to, the frames this node received from the broker (from
    /metrics; the node runs with ``--metrics-rooms true``)."""
    pattern = r'^roomcast_broker_room_frames_received_total\{node="[^"]*",room="(\d+)"\} (\S+)$'
    return {int(m[1]): float(m[2]) for m in re.finditer(pattern, _metrics(node), re.MULTILINE)}


def stray_frames(node: Server) -> float:
    """Frames this node received for rooms it is not subscribed to (from /metrics)."""
    pattern = r'^roomcast_broker_stray_frames_received_total\{node="[^"]*"\} (\S+)$'
    found = re.search(pattern, _metrics(node), re.MULTILINE)
    assert found is not None, "no roomcast_broker_stray_frames_received_total"
    return float(found[1])
