"""roomcast on a Redis Cluster whose layout changes under it: a primary dies and its replica
takes the slots over. The broker moves its subscriptions (a room's and the node's inbox) to
the new primary by itself, says it is unhealthy meanwhile and tells the node
(``on_reconnect``) once they are back; presence reads and writes go on, with the scripts
loaded again on a primary that lacks them.

Runs a private cluster of three primaries with a replica each, on free ports.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from roomcast.adapters import open_broker, open_presence
from roomcast.adapters.redis import RedisClusterBroker
from roomcast.core.models import ConnId, Member, NodeId, RoomId, User, UserId
from roomcast.exceptions import ConfigError, UnavailableError
from tests.redis_server import RedisClusterServers, eventually, shared_redis_cluster

from .engines import unique
from .test_redis_reconnect import Node

pytestmark = pytest.mark.service

FAILOVER = 30.0
"""Bound on the cluster's failover plus the broker's move (node timeout 1 s here)."""


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[RedisClusterServers]:
    cluster = RedisClusterServers(tmp_path, primaries=3, replicas=1)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _same_shard(servers: RedisClusterServers, prefix: str, room: int) -> Callable[[str], bool]:
    """Whether a node id's inbox lives on the shard of ``room``'s channel."""
    owner = servers.primary_of(b"%s:room:{r%d}" % (prefix.encode(), room))

    def test(node: str) -> bool:
        return servers.primary_of(b"%s:inbox:{n%s}" % (prefix.encode(), node.encode())) == owner

    return test


async def _publish_until_received(sender: Node, receiver: Node, room: int, data: bytes) -> None:
    """Publish ``data`` every 0.2 s until ``receiver`` has it (while the cluster fails
    over, a publish may be refused or reach a subscriber not yet moved)."""

    async def keep_publishing() -> None:
        while data not in receiver.frames:
            try:
                await sender.broker.publish(RoomId(room), data)
            except UnavailableError:
                pass
            await asyncio.sleep(0.2)

    await asyncio.wait_for(keep_publishing(), FAILOVER)


async def test_a_primary_dies_and_rooms_and_inbox_follow_its_replica(servers):
    prefix = unique()
    url = f"{servers.url}&prefix={prefix}"
    room = 12
    on_shard = _same_shard(servers, prefix, room)
    node_id = next(f"n{i}" for i in range(1000) if on_shard(f"n{i}"))
    sender = await Node(url, NodeId(unique("s"))).start()
    receiver = await Node(url, NodeId(node_id)).start()
    try:
        await receiver.broker.subscribe(RoomId(room))
        await sender.broker.publish(RoomId(room), b"before")
        await sender.broker.send(receiver.id, b"inbox before")
        await eventually(lambda: b"before" in receiver.frames, "the frame before")
        await eventually(lambda: b"inbox before" in receiver.inbox, "the inbox frame before")
        assert receiver.broker.healthy and receiver.reconnects == 0

        dead = servers.primary_of(b"%s:room:{r%d}" % (prefix.encode(), room))
        servers.kill(dead)
        await eventually(lambda: not receiver.broker.healthy, "the receiver unhealthy")

        await _publish_until_received(sender, receiver, room, b"after")
        assert servers.primary_of(b"%s:room:{r%d}" % (prefix.encode(), room)) != dead
        await eventually(lambda: receiver.broker.healthy, "the receiver healthy", FAILOVER)
        assert receiver.reconnects >= 1
        await sender.broker.send(receiver.id, b"inbox after")
        await eventually(lambda: b"inbox after" in receiver.inbox, "the inbox frame after")
        # Still one subscription: a frame arrives once.
        await sender.broker.publish(RoomId(room), b"once")
        await eventually(lambda: b"once" in receiver.frames, "the last frame")
        await asyncio.sleep(0.2)  # a second copy would arrive within this
        assert receiver.frames.count(b"once") == 1
        await receiver.broker.unsubscribe(RoomId(room))
        await sender.broker.publish(RoomId(room), b"gone")
        await sender.broker.send(receiver.id, b"inbox last")
        await eventually(lambda: b"inbox last" in receiver.inbox, "the inbox frame last")
        assert b"gone" not in receiver.frames
    finally:
        await sender.broker.close()
        await receiver.broker.close()


async def test_presence_goes_on_when_a_primary_dies(servers):
    prefix = unique()
    url = f"{servers.url}&prefix={prefix}"
    presence = open_presence(url)
    await presence.start()
    try:
        ada = Member(User(UserId(1), "ada"), ConnId("n1.1"), NodeId("n1"))
        bob = Member(User(UserId(2), "bob"), ConnId("n1.2"), NodeId("n1"))
        await presence.heartbeat(NodeId("n1"), 60)
        await presence.add(RoomId(5), ada)
        await presence.register(ada)
        servers.replicated()  # an acknowledged write a failover would not lose
        servers.kill(servers.primary_of(f"{prefix}:members:{{r5}}".encode()))

        await until_available(lambda: presence.add(RoomId(5), bob))
        members = await presence.members(RoomId(5))
        assert [m.user.name for m in members] == ["ada", "bob"]
        assert [m.conn for m in await presence.locate(UserId(1))] == ["n1.1"]
        assert await presence.occupied() == {RoomId(5): 2}
    finally:
        await presence.close()


async def until_available(call: Callable[[], Awaitable[None]]) -> None:
    """``call()`` again every 0.2 s while it answers unavailable (a failover under way)."""

    async def keep_trying() -> None:
        while True:
            try:
                return await call()
            except UnavailableError:
                await asyncio.sleep(0.2)

    await asyncio.wait_for(keep_trying(), FAILOVER)


def test_a_cluster_url_with_a_database_other_than_0_is_refused():
    with pytest.raises(ConfigError, match="only database 0"):
        RedisClusterBroker("redis://127.0.0.1:7000/3?cluster=true")
    with pytest.raises(ConfigError, match="cluster="):
        open_broker("redis://127.0.0.1:7000/0?cluster=maybe")


async def test_a_cluster_node_named_without_cluster_true_is_refused_with_the_fix():
    url = shared_redis_cluster().url.replace("?cluster=true", "")
    broker = open_broker(url)
    try:
        with pytest.raises(ConfigError, match=r"add \?cluster=true"):
            await broker.start(NodeId("n1"), _ignore, _ignore, _nothing)
    finally:
        await broker.close()


async def _ignore(data: bytes) -> None:
    return None


async def _nothing() -> None:
    return None


async def test_a_room_whose_slot_moves_to_another_shard_follows_it(tmp_path):
    """A resharding moves a room's slot to another primary: the server ends the
    subscription there, and the broker subscribes the room on the new primary."""
    servers = RedisClusterServers(tmp_path, primaries=3)
    try:
        servers.start()
        prefix = unique()
        url = f"{servers.url}&prefix={prefix}"
        sender = await Node(url, NodeId(unique("s"))).start()
        receiver = await Node(url, NodeId(unique("r"))).start()
        try:
            await receiver.broker.subscribe(RoomId(12))
            await sender.broker.publish(RoomId(12), b"before")
            await eventually(lambda: b"before" in receiver.frames, "the frame before")
            channel = b"%s:room:{r12}" % prefix.encode()
            old = servers.primary_of(channel)
            new = next(port for port in servers.ports if port != old)
            servers.move_slot(channel, new)
            assert servers.primary_of(channel) == new

            await _publish_until_received(sender, receiver, 12, b"after")
            await eventually(lambda: receiver.broker.healthy, "the receiver healthy")
            assert receiver.reconnects >= 1
            await sender.broker.publish(RoomId(12), b"once")
            await eventually(lambda: b"once" in receiver.frames, "the last frame")
            await asyncio.sleep(0.2)  # a second copy would arrive within this
            assert receiver.frames.count(b"once") == 1
        finally:
            await sender.broker.close()
            await receiver.broker.close()
    finally:
        servers.stop()
