"""The Redis broker survives a Redis restart: it reports the outage, refuses to publish
while Redis is gone, and when Redis is back restores every subscription by itself and tells
the node (``on_reconnect``) so it can fetch what it missed.

Runs a private ``redis-server`` on a free port, so killing it disturbs nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as redis

from roomcast.adapters.redis import RedisBroker, broker
from roomcast.core.models import NodeId, RoomId
from roomcast.exceptions import UnavailableError

from .engines import unique

pytestmark = pytest.mark.service

WAIT = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)


class RedisServer:
    """A throw-away ``redis-server`` that keeps nothing on disk."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        with (self.directory / "redis.log").open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                self.binary,
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.directory)),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            deadline = time.monotonic() + WAIT
            while True:
                if self.process.returncode is not None:
                    raise RuntimeError(f"redis-server exited:\n{self.log()}")
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    if await client.ping():
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer PING:\n{self.log()}")
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    async def kill(self) -> None:
        """SIGKILL: Redis vanishes without closing anything, as in a crash."""
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGKILL)
            await asyncio.wait_for(process.wait(), WAIT)

    def pause(self, paused: bool) -> None:
        """SIGSTOP / SIGCONT: connections stay open but nothing answers (a hung server)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)

    def log(self) -> str:
        return (self.directory / "redis.log").read_text(errors="replace")


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        reason = "redis-server is not installed (needed to restart Redis under the broker)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    srv = RedisServer(binary, tmp_path)
    try:
        await srv.start()
        yield srv
    finally:
        await srv.kill()


class Node:
    """A started RedisBroker recording what it receives and how often it reconnected."""

    def __init__(self, url: str) -> None:
        self.id = NodeId(unique("n"))
        self.broker = RedisBroker(url)
        self.frames: list[bytes] = []
        self.inbox: list[bytes] = []
        self.reconnects = 0

    async def start(self) -> Node:
        async def on_room(data: bytes) -> None:
            self.frames.append(data)

        async def on_inbox(data: bytes) -> None:
            self.inbox.append(data)

        async def on_reconnect() -> None:
            # Called once the subscriptions are back: the broker must say so by then.
            assert self.broker.healthy
            self.reconnects += 1

        await self.broker.start(self.id, on_room, on_inbox, on_reconnect)
        return self


@pytest.fixture
async def nodes(server: RedisServer) -> AsyncIterator[Callable[[], Node]]:
    url = f"{server.url}?prefix={unique()}"
    made: list[Node] = []

    def make() -> Node:
        node = Node(url)
        made.append(node)
        return node

    yield make
    for node in made:
        await node.broker.close()


async def test_subscriptions_survive_a_redis_restart(
    server: RedisServer, nodes: Callable[[], Node]
) -> None:
    a, b = await nodes().start(), await nodes().start()
    await a.broker.subscribe(RoomId(1))
    await a.broker.subscribe(RoomId(3))
    await b.broker.publish(RoomId(1), b"before")
    await eventually(lambda: a.frames == [b"before"], "the first frame")

    await server.kill()
    with pytest.raises(UnavailableError):
        await b.broker.publish(RoomId(1), b"lost")
    await eventually(lambda: not a.broker.healthy and not b.broker.healthy, "unhealthy")
    with pytest.raises(UnavailableError):
        await b.broker.send(a.id, b"lost")
    # What the node asks for during the outage is what it gets afterwards.
    await a.broker.unsubscribe(RoomId(3))
    joining = asyncio.ensure_future(a.broker.subscribe(RoomId(2)))
    assert a.reconnects == 0

    await server.start()
    await eventually(lambda: a.broker.healthy and b.broker.healthy, "healthy again")
    await eventually(lambda: a.reconnects == 1 and b.reconnects == 1, "on_reconnect")
    await asyncio.wait_for(joining, WAIT)

    await b.broker.publish(RoomId(3), b"unsubscribed")
    await b.broker.publish(RoomId(2), b"joined during the outage")
    await b.broker.publish(RoomId(1), b"after")
    await b.broker.send(a.id, b"direct")
    await eventually(lambda: len(a.frames) == 3 and a.inbox == [b"direct"], "frames after")
    assert a.frames == [b"before", b"joined during the outage", b"after"]
    assert a.broker.received == 3
    assert b.frames == []


async def test_a_broker_started_without_redis_is_unavailable(server: RedisServer) -> None:
    await server.kill()
    node = Node(f"{server.url}?prefix={unique()}")
    try:
        with pytest.raises(UnavailableError):
            await node.start()
        assert not node.broker.healthy
    finally:
        await node.broker.close()


async def test_a_redis_that_stops_answering_is_noticed(
    server: RedisServer, nodes: Callable[[], Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(broker, "IDLE_PING", 0.2)
    a, b = await nodes().start(), await nodes().start()
    await a.broker.subscribe(RoomId(1))
    server.pause(True)
    try:
        # No reset, no EOF: only the missing PONG tells.
        await eventually(lambda: not a.broker.healthy, "unhealthy while Redis hangs")
    finally:
        server.pause(False)
    await eventually(lambda: a.broker.healthy and a.reconnects == 1, "reconnected")
    await b.broker.publish(RoomId(1), b"after")
    await eventually(lambda: a.frames == [b"after"], "frames after")
