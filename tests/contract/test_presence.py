"""One contract for every Presence engine: memory, Redis, SQLite, PostgreSQL.

Two instances on one URL are two nodes' views of one cluster.
"""

from __future__ import annotations

import asyncio

import pytest

from roomcast.adapters import open_presence
from roomcast.core.models import ConnId, Member, NodeId, RoomId, User, UserId

from .engines import PRESENCES, engine_url


@pytest.fixture(params=PRESENCES)
async def views(request, tmp_path):
    async with engine_url(request.param, tmp_path) as url:
        opened = []

        async def view():
            presence = open_presence(url)
            await presence.start()
            opened.append(presence)
            return presence

        yield view
        for presence in opened:
            await presence.close()


def member(user: int, node: str, conn: int | None = None, name: str | None = None) -> Member:
    return Member(
        User(UserId(user), name or f"user{user}"), ConnId(f"{node}.{conn or user}"), NodeId(node)
    )


async def test_members_and_counts_span_nodes(views):
    one, two = await views(), await views()
    await one.heartbeat(NodeId("n1"), 30)
    await two.heartbeat(NodeId("n2"), 30)
    await one.add(RoomId(1), member(1, "n1", name="민지"))
    await two.add(RoomId(1), member(2, "n2"))
    await two.add(RoomId(2), member(2, "n2"))
    assert {m.user.id for m in await one.members(RoomId(1))} == {1, 2}
    assert {m.user.name for m in await two.members(RoomId(1))} == {"민지", "user2"}
    assert await one.counts([RoomId(1), RoomId(2), RoomId(3)]) == {1: 2, 2: 1, 3: 0}
    await one.remove(RoomId(1), ConnId("n2.2"))
    assert [m.user.id for m in await two.members(RoomId(1))] == [1]
    assert await two.members(RoomId(3)) == []


async def test_occupied_lists_the_rooms_with_members_and_how_many(views):
    one, two = await views(), await views()
    await one.heartbeat(NodeId("n1"), 30)
    await two.heartbeat(NodeId("n2"), 30)
    assert await one.occupied() == {}
    await one.add(RoomId(1), member(1, "n1"))
    await two.add(RoomId(1), member(2, "n2"))
    await two.add(RoomId(2), member(2, "n2"))
    await two.add(RoomId(3), member(3, "n2"))
    await one.add(RoomId(3), member(1, "n1"))
    assert await two.occupied() == {1: 2, 2: 1, 3: 2}
    # Left rooms and a dropped node's rooms are not listed; other rooms stay as they are.
    await two.remove(RoomId(2), ConnId("n2.2"))
    await one.drop_node(NodeId("n2"))
    assert await one.occupied() == {1: 1, 3: 1}
    await one.remove(RoomId(1), ConnId("n1.1"))
    await one.remove(RoomId(3), ConnId("n1.1"))
    assert await two.occupied() == {}


async def test_members_keep_node_and_connection(views):
    one = await views()
    await one.heartbeat(NodeId("n1"), 30)
    entry = member(7, "n1", conn=3)
    await one.add(RoomId(4), entry)
    assert await one.members(RoomId(4)) == [entry]


async def test_register_and_locate_connections(views):
    one, two = await views(), await views()
    await one.heartbeat(NodeId("n1"), 30)
    await two.heartbeat(NodeId("n2"), 30)
    await one.register(member(5, "n1", conn=1))
    await two.register(member(5, "n2", conn=2))
    assert {m.node for m in await two.locate(UserId(5))} == {"n1", "n2"}
    await one.unregister(ConnId("n1.1"))
    assert [m.conn for m in await one.locate(UserId(5))] == ["n2.2"]
    assert await one.locate(UserId(99)) == []


async def test_a_dead_node_is_reaped_once_and_its_entries_reported(views):
    one, two, three = await views(), await views(), await views()
    await one.heartbeat(NodeId("n1"), 30)
    await two.heartbeat(NodeId("n2"), 0.2)
    await one.add(RoomId(1), member(1, "n1"))
    await two.add(RoomId(1), member(2, "n2"))
    await two.add(RoomId(2), member(2, "n2"))
    await two.register(member(2, "n2"))
    # Within its ttl nothing is reaped.
    assert await one.reap() == []
    await asyncio.sleep(0.4)  # the ttl lapses: n2 has stopped heartbeating
    results = await asyncio.gather(one.reap(), three.reap())
    removed = sorted(results[0] + results[1], key=lambda rm: rm[0])
    assert removed == [(RoomId(1), member(2, "n2")), (RoomId(2), member(2, "n2"))]
    assert [m.user.id for m in await one.members(RoomId(1))] == [1]
    assert await one.locate(UserId(2)) == []
    assert await one.reap() == []


async def test_drop_node_removes_everything_of_that_node(views):
    one = await views()
    await one.heartbeat(NodeId("n1"), 30)
    await one.heartbeat(NodeId("n2"), 30)
    await one.add(RoomId(1), member(1, "n1"))
    await one.add(RoomId(1), member(2, "n2"))
    await one.register(member(1, "n1"))
    removed = await one.drop_node(NodeId("n1"))
    assert removed == [(RoomId(1), member(1, "n1"))]
    assert [m.user.id for m in await one.members(RoomId(1))] == [2]
    assert await one.locate(UserId(1)) == []


async def test_heartbeat_tells_a_node_whose_entries_may_be_gone(views):
    one, two = await views(), await views()
    assert await one.heartbeat(NodeId("n1"), 30) is True  # unknown until now
    assert await one.heartbeat(NodeId("n1"), 30) is False
    await one.heartbeat(NodeId("n2"), 0.2)
    await asyncio.sleep(0.4)  # n2 pauses past its ttl
    await two.reap()
    assert await one.heartbeat(NodeId("n2"), 30) is True  # it must write its entries again
    assert await one.heartbeat(NodeId("n1"), 30) is False


async def test_members_read_again_follow_every_leave_and_rejoin(views):
    """A storm of joins reads a room's members again and again: each read lists the room
    as it is now, in join order — a connection that left and came back is listed once, at
    the end, and one that left is gone, whichever node reads."""
    one, two = await views(), await views()
    await one.heartbeat(NodeId("n1"), 30)
    room = RoomId(9)
    joined = [member(user, "n1") for user in range(1, 6)]
    for entry in joined:
        await one.add(room, entry)
        assert await one.members(room) == await two.members(room)
    assert await one.members(room) == joined
    await one.remove(room, joined[1].conn)
    await one.add(room, joined[1])
    await one.remove(room, joined[3].conn)
    expected = [joined[0], joined[2], joined[4], joined[1]]
    for _ in range(3):
        assert await one.members(room) == expected
        assert await two.members(room) == expected


async def test_a_connection_added_again_with_another_name_is_listed_by_it(views):
    """``add`` of a connection already in the room replaces its entry: a read after it
    lists the new name (and the user it now belongs to), not the one read before."""
    one, two = await views(), await views()
    await one.heartbeat(NodeId("n1"), 30)
    room = RoomId(4)
    await one.add(room, member(1, "n1", conn=7, name="ada"))
    assert [m.user.name for m in await one.members(room)] == ["ada"]
    assert [m.user.name for m in await two.members(room)] == ["ada"]
    await one.add(room, member(2, "n1", conn=7, name="ada lovelace"))
    for view in (one, two):
        assert await view.members(room) == [member(2, "n1", conn=7, name="ada lovelace")]


async def test_a_thousand_members_joining_and_leaving_at_once_all_count(views):
    """A deploy or a network blip: a thousand connections of one node join a room at
    once, then all drop at once. Every join and every leave takes effect — none is lost
    to a busy engine — so the room lists all of them, then no one."""
    one = await views()
    await one.heartbeat(NodeId("n1"), 30)
    room = RoomId(5)
    crowd = [member(user, "n1") for user in range(1, 1001)]
    await asyncio.gather(*(one.add(room, entry) for entry in crowd))
    assert len(await one.members(room)) == 1000
    assert await one.counts([room]) == {room: 1000}
    await asyncio.gather(*(one.remove(room, entry.conn) for entry in crowd))
    assert await one.members(room) == []
    assert await one.counts([room]) == {room: 0}


async def test_redis_commands_beyond_the_urls_connections_wait_for_one(tmp_path):
    """``max_connections=2`` on the Redis URL: presence and the broker each open two
    connections at most, and two hundred updates at once wait their turn instead of
    failing; the broker starts with the same URL and its frames arrive."""
    from roomcast.adapters.redis import RedisBroker

    async with engine_url("redis", tmp_path) as base:
        url = f"{base}&max_connections=2"
        presence = open_presence(url)
        await presence.start()
        broker = RedisBroker(url)
        got: list[bytes] = []
        all_in = asyncio.Event()

        async def on_room(data: bytes) -> None:
            got.append(data)
            if len(got) == 50:
                all_in.set()

        async def ignore(*_: object) -> None:
            return None

        try:
            await presence.heartbeat(NodeId("n1"), 30)
            crowd = [member(user, "n1") for user in range(1, 201)]
            await asyncio.gather(*(presence.add(RoomId(3), entry) for entry in crowd))
            assert await presence.counts([RoomId(3)]) == {RoomId(3): 200}
            await asyncio.gather(*(presence.remove(RoomId(3), e.conn) for e in crowd))
            assert await presence.members(RoomId(3)) == []
            await broker.start(NodeId("n1"), on_room, ignore, ignore)
            await broker.subscribe(RoomId(3))
            await asyncio.gather(*(broker.publish(RoomId(3), b"f%d" % i) for i in range(50)))
            await asyncio.wait_for(all_in.wait(), 5)
            assert sorted(got) == sorted(b"f%d" % i for i in range(50))
        finally:
            await broker.close()
            await presence.close()
