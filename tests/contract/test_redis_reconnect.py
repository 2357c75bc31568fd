"""The Redis broker survives a Redis restart: it reports the outage, refuses to publish
while Redis is gone, and when Redis is back restores every subscription by itself and tells
the node (``on_reconnect``) so it can fetch what it missed.

Runs a private ``redis-server`` on a free port, so killing it disturbs nothing else.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from roomcast.adapters import open_broker
from roomcast.adapters.redis import broker
from roomcast.core.models import NodeId, RoomId
from roomcast.exceptions import UnavailableError
from tests.redis_server import RedisServer, eventually, private_redis
from tests.relay import TcpRelay

from .engines import unique

pytestmark = pytest.mark.service

WAIT = 15.0


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with private_redis(tmp_path) as srv:
        yield srv


class Node:
    """A started Redis broker (one server, a cluster or Sentinel's primary, by the URL)
    recording what it receives and how often it reconnected."""

    def __init__(self, url: str, node: NodeId | None = None) -> None:
        self.id = node or NodeId(unique("n"))
        self.broker = open_broker(url)
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


async def test_members_who_leave_while_redis_is_out_of_reach_are_removed_once_it_is_back(
    server: RedisServer,
) -> None:
    """A client that disconnects while the network to Redis is down cannot be taken out of
    presence then; once Redis is reachable again the node's next heartbeat retries, and
    the room stops listing it. A client that left and came back meanwhile stays listed."""
    from roomcast.adapters.memory import MemoryBroker, MemoryHistory
    from roomcast.adapters.redis import RedisPresence
    from roomcast.core.hub import Hub
    from roomcast.core.service import ChatService
    from tests.core.test_service import Recorder, connect, join

    relay = TcpRelay("127.0.0.1", server.port)
    await relay.start()
    presence = RedisPresence(f"redis://127.0.0.1:{relay.port}/0?prefix={unique()}")
    await presence.start()
    history, broker = MemoryHistory(), MemoryBroker(unique("bus"))
    hub = Hub(broker, history, unsubscribe_grace=0)
    service = ChatService(
        node=NodeId("n1"), history=history, broker=broker, presence=presence, hub=hub
    )

    async def ignore(*_: object) -> None:
        return None

    await broker.start(NodeId("n1"), hub.on_frame, service.on_inbox, ignore)
    try:
        rec = Recorder()
        alice, bob, carol = [
            await connect(service, rec, name) for name in ("alice", "bob", "carol")
        ]
        for session in (alice, bob, carol):
            await join(service, session, "hall")
        room = next(iter(alice.rooms))
        await relay.cut()
        await service.disconnect(bob.conn.id)  # its removals fail
        await service.leave(carol, "hall")
        assert await service.retry_removals() == 3  # still out of reach: all kept
        await relay.start()
        await join(service, carol, "hall")  # back in before the retry
        listed = {m.user.name for m in await presence.members(room)}
        assert listed == {"alice", "bob", "carol"}  # bob is listed until the retry
        assert await service.retry_removals(budget=0) == 2  # a spent budget stops it
        assert await service.retry_removals() == 0
        assert {m.user.name for m in await presence.members(room)} == {"alice", "carol"}
        assert await presence.locate(bob.user.id) == []
    finally:
        await broker.close()
        await presence.close()
        await relay.cut()


async def test_a_redis_that_has_become_a_replica_makes_presence_unavailable(
    tmp_path: Path,
) -> None:
    """After a failover that the URL's address did not follow, that address leads to a
    replica: presence writes are refused, and that is an engine out of use (``unavailable``
    to the client, a warning in the log), not an internal error."""
    import redis.asyncio as redis

    from roomcast.adapters.redis import RedisPresence
    from roomcast.core.models import ConnId, Member, User, UserId

    (tmp_path / "primary").mkdir()
    (tmp_path / "old").mkdir()
    async with (
        private_redis(tmp_path / "primary") as primary,
        private_redis(tmp_path / "old") as old,
    ):
        presence = RedisPresence(f"{old.url}?prefix={unique()}")
        await presence.start()
        client = redis.Redis(host="127.0.0.1", port=old.port)
        try:
            ada = Member(User(UserId(1), "ada"), ConnId("n1.1"), NodeId("n1"))
            await presence.add(RoomId(1), ada)
            await client.replicaof("127.0.0.1", str(primary.port))
            for _ in range(500):  # 5 s at most: until it has synced with its primary
                if (await client.info("replication")).get("master_link_status") == "up":
                    break
                await asyncio.sleep(0.01)
            bob = Member(User(UserId(2), "bob"), ConnId("n1.2"), NodeId("n1"))
            with pytest.raises(UnavailableError, match="read only replica"):
                await presence.add(RoomId(1), bob)
        finally:
            await client.aclose()
            await presence.close()
