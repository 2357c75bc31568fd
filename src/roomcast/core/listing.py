"""The rooms people are in, read for many callers at once.

``rooms {occupied: true}`` is what a page showing its rooms asks for, every few seconds
while it is open; each answer is a read of the cluster's memberships (on Redis, every
node's set of entries: ~19 ms for 5,000 connections in 10,000 memberships), so a thousand
open pages would cost a node seconds of work a second. :class:`OccupiedRooms` answers them
from one read shared by every caller for up to ``OCCUPIED_FRESH`` seconds, and reads again
at once after this node changed a membership: a client sees its own joins and leaves in
the next answer; another node's, within a second.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .models import ConnId, Member, NodeId, RoomId, UserId
from .ports import Presence

OCCUPIED_FRESH = 1.0
"""Seconds one read of the occupied rooms answers every caller (see the module docstring)."""


@dataclass(frozen=True, slots=True)
class _Read:
    started: float
    version: int
    task: asyncio.Task[dict[RoomId, int]]

    def failed(self) -> bool:
        return self.task.done() and (self.task.cancelled() or self.task.exception() is not None)


class OccupiedRooms:
    """:meth:`Presence.occupied`, one read shared by the callers of about a second."""

    def __init__(
        self, presence: Presence, *, fresh: float = OCCUPIED_FRESH, clock: Callable[[], float]
    ) -> None:
        self._presence = presence
        self._fresh = fresh
        self._clock = clock
        self._version = 0
        self._read: _Read | None = None
        self.reads = 0
        """Reads of the presence engine made (the rest of the calls shared one)."""

    def changed(self) -> None:
        """This node changed a membership: the next call reads again."""
        self._version += 1

    async def get(self) -> dict[RoomId, int]:
        """Every room with members and how many, as of a read started less than
        ``fresh`` seconds ago and after this node's last change of a membership."""
        now = self._clock()
        read = self._read
        if (
            read is None
            or read.version != self._version
            or not 0 <= now - read.started < self._fresh
            or read.failed()
        ):
            task = asyncio.get_running_loop().create_task(self._presence.occupied())
            # A caller cancelled while it waits leaves the read to the others; a failure
            # is seen by every waiter, and the next call reads again.
            task.add_done_callback(_retrieve)
            read = self._read = _Read(now, self._version, task)
            self.reads += 1
        return dict(await asyncio.shield(read.task))


def _retrieve(task: asyncio.Task[dict[RoomId, int]]) -> None:
    if not task.cancelled():
        task.exception()


class WatchedPresence:
    """A :class:`~roomcast.core.ports.Presence` that calls ``changed`` after each
    membership this node adds or removes (its reads go straight through)."""

    def __init__(self, presence: Presence, changed: Callable[[], None]) -> None:
        self.inner = presence
        self._changed = changed

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def add(self, room: RoomId, member: Member) -> None:
        try:
            await self.inner.add(room, member)
        finally:
            self._changed()

    async def remove(self, room: RoomId, conn: ConnId) -> None:
        try:
            await self.inner.remove(room, conn)
        finally:
            self._changed()

    async def members(self, room: RoomId) -> list[Member]:
        return await self.inner.members(room)

    async def counts(self, rooms: Sequence[RoomId]) -> dict[RoomId, int]:
        return await self.inner.counts(rooms)

    async def occupied(self) -> dict[RoomId, int]:
        return await self.inner.occupied()

    async def register(self, member: Member) -> None:
        await self.inner.register(member)

    async def unregister(self, conn: ConnId) -> None:
        await self.inner.unregister(conn)

    async def locate(self, user: UserId) -> list[Member]:
        return await self.inner.locate(user)

    async def heartbeat(self, node: NodeId, ttl: float) -> bool:
        return await self.inner.heartbeat(node, ttl)

    async def reap(self) -> list[tuple[RoomId, Member]]:
        removed = await self.inner.reap()
        if removed:
            self._changed()
        return removed

    async def drop_node(self, node: NodeId) -> list[tuple[RoomId, Member]]:
        removed = await self.inner.drop_node(node)
        if removed:
            self._changed()
        return removed
