"""roomcast on the primary that Redis Sentinel names: the primary dies, Sentinel promotes
its replica, and the broker reconnects to the new primary by itself (its subscriptions
restored, the node told through ``on_reconnect``); presence reads and writes go on there.

Runs a private primary, replica and Sentinel on free ports.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from roomcast.adapters import open_broker, open_presence
from roomcast.core.models import ConnId, Member, NodeId, RoomId, User, UserId
from roomcast.exceptions import ConfigError, UnavailableError
from tests.redis_server import RedisSentinelServers, eventually

from .engines import unique
from .test_redis_cluster import FAILOVER, Node, _publish_until_received, until_available

pytestmark = pytest.mark.service


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[RedisSentinelServers]:
    sentinel = RedisSentinelServers(tmp_path)
    try:
        sentinel.start()
        yield sentinel
    finally:
        sentinel.stop()


async def test_the_primary_dies_and_the_broker_follows_sentinel_to_the_new_one(servers):
    url = f"{servers.url}?prefix={unique()}"
    sender = await Node(url, NodeId(unique("s"))).start()
    receiver = await Node(url, NodeId(unique("r"))).start()
    try:
        await receiver.broker.subscribe(RoomId(3))
        await sender.broker.publish(RoomId(3), b"before")
        await eventually(lambda: b"before" in receiver.frames, "the frame before")
        old = servers.primary()
        servers.kill(old)
        await eventually(lambda: not receiver.broker.healthy, "the receiver unhealthy")

        await _publish_until_received(sender, receiver, 3, b"after")
        assert servers.primary() == servers.replica_port
        await eventually(lambda: receiver.broker.healthy, "the receiver healthy", FAILOVER)
        assert receiver.reconnects >= 1
        await sender.broker.send(receiver.id, b"inbox after")
        await eventually(lambda: b"inbox after" in receiver.inbox, "the inbox frame after")
    finally:
        await sender.broker.close()
        await receiver.broker.close()


async def test_presence_goes_on_at_the_new_primary(servers):
    presence = open_presence(f"{servers.url}?prefix={unique()}")
    await presence.start()
    try:
        ada = Member(User(UserId(1), "ada"), ConnId("n1.1"), NodeId("n1"))
        bob = Member(User(UserId(2), "bob"), ConnId("n1.2"), NodeId("n1"))
        await presence.add(RoomId(5), ada)
        servers.replicated()  # an acknowledged write a failover would not lose
        servers.kill(servers.primary())

        await until_available(lambda: presence.add(RoomId(5), bob))
        assert [m.user.name for m in await presence.members(RoomId(5))] == ["ada", "bob"]
    finally:
        await presence.close()


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://127.0.0.1:26379",
        "redis+sentinel://127.0.0.1:26379/service/0/extra",
        "redis+sentinel://127.0.0.1:x/service",
    ],
)
def test_a_sentinel_url_without_a_service_or_with_a_bad_address_is_refused(url):
    with pytest.raises(ConfigError):
        open_broker(url)


async def test_sentinels_with_a_password_of_their_own(tmp_path):
    """Sentinels that require a password: ``sentinel_password`` in the URL is theirs; the
    server's password (none here) stays the URL's own."""
    servers = RedisSentinelServers(tmp_path, sentinel_password="s3cret")
    try:
        servers.start()
        base = f"{servers.url}?prefix={unique()}"
        node = await Node(f"{base}&sentinel_password=s3cret", NodeId(unique("n"))).start()
        try:
            await node.broker.subscribe(RoomId(1))
            await node.broker.publish(RoomId(1), b"through")
            await eventually(lambda: b"through" in node.frames, "the frame")
        finally:
            await node.broker.close()
        refused = open_broker(base)
        try:
            with pytest.raises(UnavailableError):
                await refused.start(NodeId(unique("n")), _ignore, _ignore, _nothing)
        finally:
            await refused.close()
    finally:
        servers.stop()


async def _ignore(data: bytes) -> None:
    return None


async def _nothing() -> None:
    return None
