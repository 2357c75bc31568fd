"""The gRPC door on two nodes sharing Redis, one server or a cluster (broker and presence),
and one store: a client's calls may land on any node, and its user is the same everywhere."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from roomcast.grpc import client_to_agent_pb2 as pb2
from tests.contract.engines import engine_url

from .clients import ChatClient
from .servers import Server, free_port, run_server
from .test_grpc import LIVENESS, Command, GrpcClient, mark

pytestmark = pytest.mark.service


@pytest.fixture(params=["redis", "redis-cluster"])
async def redis_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    async with engine_url(request.param, tmp_path) as url:
        yield url


@pytest.fixture
def nodes(tmp_path: Path, redis_url: str) -> Iterator[tuple[tuple[Server, str], ...]]:
    """Two nodes: (server, gRPC address) each."""
    store = f"sqlite:///{tmp_path}/shared.db"
    ports = free_port(), free_port()
    common = ("--broker-url", redis_url, "--liveness-timeout", str(LIVENESS))
    with (
        run_server(*common, "--grpc-port", str(ports[0]), store_url=store, log_dir=tmp_path) as one,
        run_server(*common, "--grpc-port", str(ports[1]), store_url=store, log_dir=tmp_path) as two,
    ):
        yield (one, f"127.0.0.1:{ports[0]}"), (two, f"127.0.0.1:{ports[1]}")


async def test_a_user_spread_over_two_nodes_chats_with_users_of_both(nodes):
    (_, at_one), (two, at_two) = nodes
    # Alice logs in and beats on node 1, but her lobby and channel calls land on node 2;
    # Bob the other way round; Carol does everything on node 1.
    alice = GrpcClient(at_one, heartbeat_at=at_one, lobby_at=at_two, channel_at=at_two)
    bob = GrpcClient(at_two, heartbeat_at=at_two, lobby_at=at_one, channel_at=at_one)
    carol = GrpcClient(at_one)
    sam = ChatClient(two.url, "sam")
    try:
        for client in (alice, bob, carol):
            await client.login()
        assert len({alice.index, bob.index, carol.index}) == 3
        await sam.connect()

        channel = await alice.make_channel()
        assert (await bob.join_channel(channel)).status == pb2.CommandReply.SUCCESS
        assert (await carol.join_channel(channel)).status == pb2.CommandReply.SUCCESS
        await sam.ok("join", {"room": channel})
        for client in (alice, bob):
            await client.wait_for(
                lambda c=client: ("JOIN_USER", carol.index, channel) in c.channel_status
            )

        # A chat from a user on node 1 reaches a channel member whose stream is on node 2.
        hello = mark("from node 1")
        await carol.say_in_channel(hello)
        await alice.wait_for(lambda: (carol.index, hello) in alice.channel_chats)
        await bob.wait_for(lambda: (carol.index, hello) in bob.channel_chats)
        assert await sam.wait_messages(channel, 1) == [hello]
        back = mark("from node 2")
        await sam.ok("send", {"room": channel, "text": back})
        await carol.wait_for(lambda: (sam.user["id"], back) in carol.channel_chats)

        lobby_hello = mark("lobby via node 1")
        await bob.say(lobby_hello)
        await alice.wait_for(lambda: (bob.index, lobby_hello) in alice.lobby_chats)
        await carol.wait_for(lambda: (bob.index, lobby_hello) in carol.lobby_chats)

        # Both nodes see the same users, in the same channel.
        expected = {alice.index: channel, bob.index: channel, carol.index: channel}
        assert (await alice.users()).items() >= expected.items()
        assert (await carol.users()).items() >= expected.items()
        # A node's list of occupied rooms may be a second behind the other nodes' joins.
        deadline = time.monotonic() + 5
        while channel not in (await bob.command(Command.LIST_CHANNELS)).channels:
            assert time.monotonic() < deadline, f"channel {channel} not listed"
            await asyncio.sleep(0.1)

        # Logging Alice out on node 1 ends her streams on node 2 and tells the others.
        await carol.lobby.TryUserExit(pb2.UserRequest(index=alice.index), timeout=10)
        await alice.wait_for(lambda: ("QUIT", alice.index, None) in alice.lobby_status)
        await alice.wait_for(
            lambda: {"lobby chat", "channel chat", "heartbeat"} <= set(alice.ended)
        )
        await bob.wait_for(lambda: ("LEAVE_USER", alice.index, channel) in bob.channel_status)
        assert alice.ended["channel chat"] == grpc.StatusCode.OK
        assert alice.index not in await carol.users()
    finally:
        for client in (alice, bob, carol):
            await client.close()
        await sam.close()


async def test_a_user_beating_on_a_killed_node_is_removed(nodes):
    """Its beats lapse: nobody refreshes its liveness, the survivors reap it."""
    (one, at_one), (_, at_two) = nodes
    watcher = GrpcClient(at_two)
    doomed = GrpcClient(at_two, heartbeat_at=at_one, lobby_at=at_two)
    try:
        await watcher.login()
        await doomed.login()
        await watcher.wait_for(lambda: ("JOIN_USER", doomed.index, None) in watcher.lobby_status)
        await doomed.wait_for(lambda: doomed.beats)
        one.kill()
        await watcher.wait_for(
            lambda: ("LEAVE_USER", doomed.index, None) in watcher.lobby_status,
            timeout=LIVENESS + 2,
        )
        assert doomed.index not in await watcher.users()
    finally:
        await watcher.close()
        await doomed.close()
