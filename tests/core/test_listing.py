"""The occupied rooms as a node answers them: one read of presence for every caller of about
a second, read again after this node changes a membership."""

from __future__ import annotations

import asyncio

import pytest

from roomcast.adapters.memory import MemoryPresence
from roomcast.core.listing import OccupiedRooms, WatchedPresence
from roomcast.core.models import ConnId, Member, NodeId, RoomId, User, UserId
from roomcast.exceptions import UnavailableError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def member(n: int, node: str = "a") -> Member:
    return Member(User(UserId(n), f"u{n}"), ConnId(f"{node}.{n}"), NodeId(node))


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def test_callers_within_a_second_share_one_read_and_later_ones_see_the_cluster(
    clock: Clock,
) -> None:
    cluster = MemoryPresence()  # what every node writes
    listing = OccupiedRooms(cluster, fresh=1.0, clock=clock)
    mine = WatchedPresence(cluster, listing.changed)
    await mine.add(RoomId(1), member(1))

    answers = await asyncio.gather(*(listing.get() for _ in range(50)))
    assert answers == [{RoomId(1): 1}] * 50
    assert listing.reads == 1
    # Another node's join: not read again within the second...
    await cluster.add(RoomId(1), member(2, "b"))
    await cluster.add(RoomId(2), member(3, "b"))
    clock.now += 0.9
    assert await listing.get() == {RoomId(1): 1}
    assert listing.reads == 1
    # ...and read once it has passed.
    clock.now += 0.2
    assert await listing.get() == {RoomId(1): 2, RoomId(2): 1}
    assert listing.reads == 2


async def test_this_node_s_own_joins_and_leaves_show_at_once(clock: Clock) -> None:
    cluster = MemoryPresence()
    listing = OccupiedRooms(cluster, fresh=1.0, clock=clock)
    mine = WatchedPresence(cluster, listing.changed)
    assert await listing.get() == {}
    await mine.add(RoomId(7), member(1))
    assert await listing.get() == {RoomId(7): 1}
    await mine.remove(RoomId(7), ConnId("a.1"))
    assert await listing.get() == {}
    assert listing.reads == 3


async def test_a_clock_that_went_back_does_not_keep_an_old_read(clock: Clock) -> None:
    cluster = MemoryPresence()
    listing = OccupiedRooms(cluster, fresh=1.0, clock=clock)
    assert await listing.get() == {}
    await cluster.add(RoomId(3), member(1, "b"))
    clock.now -= 5
    assert await listing.get() == {RoomId(3): 1}


class Flaky(MemoryPresence):
    """Presence whose engine is out of reach for its first read of the occupied rooms."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 1

    async def occupied(self) -> dict[RoomId, int]:
        if self.failures:
            self.failures -= 1
            raise UnavailableError("presence is out of reach")
        return await super().occupied()


async def test_a_failed_read_is_not_kept(clock: Clock) -> None:
    cluster = Flaky()
    listing = OccupiedRooms(cluster, fresh=1.0, clock=clock)
    await cluster.add(RoomId(4), member(1))
    results = await asyncio.gather(listing.get(), listing.get(), return_exceptions=True)
    assert all(isinstance(r, UnavailableError) for r in results)  # both waited on the one
    assert await listing.get() == {RoomId(4): 1}  # within the second: read again
    assert listing.reads == 2


async def test_a_caller_cancelled_while_waiting_leaves_the_read_to_the_others(
    clock: Clock,
) -> None:
    cluster = MemoryPresence()
    listing = OccupiedRooms(cluster, fresh=1.0, clock=clock)
    await cluster.add(RoomId(5), member(1))
    first = asyncio.ensure_future(listing.get())
    second = asyncio.ensure_future(listing.get())
    await asyncio.sleep(0)
    first.cancel()
    assert await second == {RoomId(5): 1}
    assert first.cancelled() and listing.reads == 1
