"""The hub: which local connections are in which room, and local fan-out in seq order.

Subscriptions are ref-counted: the first local member of a room subscribes the node to the
room's channel, and the channel is dropped a short grace after the last one leaves, so a
node with no member of a room receives none of its traffic.

Messages of a room are delivered strictly in ``seq`` order, each once. Nodes append to the
store independently, so frames of one room can reach a node out of order (two senders on
two nodes) or not at all (a broker outage): the hub drops what it has delivered already,
holds a frame that arrives early, and when a gap does not close by itself within
``gap_wait`` it reads the missing messages from history. After a broker reconnect it does
the same for every local room.

Delivery does nothing per recipient but the write: a frame is handed to each transport once
with that transport's connections in the room, and the transport encodes it once.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Protocol

from .events import Frame, Kind, message_frame
from .models import ConnId, RoomId
from .ports import Broker, History

log = logging.getLogger(__name__)

GAP_FETCH_LIMIT = 1000


class Connection(Protocol):
    """A client connection on this node, as a transport represents it."""

    @property
    def id(self) -> ConnId: ...

    @property
    def transport(self) -> Transport: ...


class Transport(Protocol):
    """A front door (Socket.IO, gRPC) that can write frames to its connections."""

    async def deliver(self, frame: Frame, conns: Collection[Connection]) -> None:
        """Encode the frame once and write it to every connection given."""
        ...

    async def deliver_one(self, frame: Frame, conn: Connection) -> None:
        """Write one frame to one connection."""
        ...


@dataclass(eq=False)
class _LocalRoom:
    ready: asyncio.Future[None]
    next_seq: int | None = None
    """The seq this node delivers next; None until the room's position is known."""
    early: dict[int, Frame] = field(default_factory=dict)
    groups: dict[Transport, dict[ConnId, Connection]] = field(default_factory=dict)
    pending: dict[ConnId, list[Frame]] = field(default_factory=dict)
    drop: asyncio.TimerHandle | None = None
    gap: asyncio.TimerHandle | None = None

    def empty(self) -> bool:
        return not self.pending and not any(self.groups.values())


class Hub:
    """Local membership, ordering and fan-out for one node."""

    def __init__(
        self,
        broker: Broker,
        history: History,
        *,
        unsubscribe_grace: float = 2.0,
        gap_wait: float = 0.25,
    ) -> None:
        self._broker = broker
        self._history = history
        self._grace = unsubscribe_grace
        self._gap_wait = gap_wait
        self._rooms: dict[RoomId, _LocalRoom] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.frames_received = 0
        self.frames_by_room: Counter[RoomId] = Counter()
        """Frames received per room: with ref-counted subscriptions, only rooms that have
        (or just had) local members ever appear here."""
        self.deliveries = 0
        self.duplicates_dropped = 0
        self.gaps_filled = 0

    def local_rooms(self) -> list[RoomId]:
        """Rooms this node is subscribed to."""
        return list(self._rooms)

    # -- receiving ---------------------------------------------------------------------

    async def on_frame(self, data: bytes) -> None:
        """The broker's room handler."""
        try:
            frame = Frame.decode(data)
        except (ValueError, KeyError):
            log.warning("dropped a malformed frame (%d bytes)", len(data))
            return
        self.frames_received += 1
        self.frames_by_room[frame.room] += 1
        await self._route(frame)

    async def deliver_stored(self, frame: Frame) -> None:
        """Hand a message this node has just stored to its local members, without waiting
        for the broker to bring it back.

        It takes the same path as a frame from the broker — in seq order, each seq once —
        so the broker's copy, when it arrives, is dropped as a duplicate, and a message
        stored here before an earlier one from another node has arrived waits for it.
        """
        await self._route(frame)

    async def _route(self, frame: Frame) -> None:
        room = self._rooms.get(frame.room)
        if room is None:
            return
        if frame.kind is not Kind.MESSAGE:
            await self._fan_out(room, frame)
            return
        expected = room.next_seq
        if expected is None or frame.seq > expected:
            room.early[frame.seq] = frame
            if expected is not None:
                self._schedule_gap_fill(frame.room, room)
        elif frame.seq == expected:
            room.next_seq = expected + 1
            await self._fan_out(room, frame)
            if room.early:
                await self._drain_early(room)
        else:
            self.duplicates_dropped += 1

    async def _fan_out(self, room: _LocalRoom, frame: Frame) -> None:
        for frames in room.pending.values():
            frames.append(frame)
        for transport, conns in room.groups.items():
            if conns:
                self.deliveries += len(conns)
                await transport.deliver(frame, conns.values())

    async def _drain_early(self, room: _LocalRoom) -> None:
        assert room.next_seq is not None
        for seq in [s for s in room.early if s < room.next_seq]:
            del room.early[seq]
            self.duplicates_dropped += 1
        while room.next_seq in room.early:
            frame = room.early.pop(room.next_seq)
            room.next_seq += 1
            await self._fan_out(room, frame)
        if not room.early and room.gap is not None:
            room.gap.cancel()
            room.gap = None

    def _schedule_gap_fill(self, room_id: RoomId, room: _LocalRoom) -> None:
        if room.gap is None:
            loop = asyncio.get_running_loop()
            room.gap = loop.call_later(
                self._gap_wait, lambda: self._spawn(self._fill_gap(room_id, room))
            )

    async def _fill_gap(self, room_id: RoomId, room: _LocalRoom, upto: int | None = None) -> None:
        """Deliver from history what is missing between ``next_seq`` and the first early
        frame (or ``upto``)."""
        room.gap = None
        if self._rooms.get(room_id) is not room or room.next_seq is None:
            return
        target = upto if upto is not None else (min(room.early) - 1 if room.early else 0)
        while room.next_seq <= target:
            start = room.next_seq
            try:
                missing = await self._history.after(
                    room_id, start - 1, min(target - start + 1, GAP_FETCH_LIMIT)
                )
            except Exception:
                log.warning("filling a gap in room %s failed; retrying", room_id, exc_info=True)
                self._schedule_gap_fill(room_id, room)
                return
            if not missing:
                break
            for message in missing:
                if message.seq == room.next_seq:
                    room.next_seq += 1
                    room.early.pop(message.seq, None)
                    self.gaps_filled += 1
                    await self._fan_out(room, message_frame(message))
        await self._drain_early(room)
        if room.early:
            self._schedule_gap_fill(room_id, room)

    async def resync(self) -> None:
        """After a broker outage: deliver, from history, every message a local room missed."""
        for room_id, room in list(self._rooms.items()):
            if room.next_seq is None:
                continue
            try:
                latest = await self._history.latest(room_id)
            except Exception:
                log.warning("resync of room %s failed", room_id, exc_info=True)
                continue
            await self._fill_gap(room_id, room, upto=latest)

    # -- membership --------------------------------------------------------------------

    async def begin_join(self, room_id: RoomId, conn: Connection) -> None:
        """Start holding the room's frames for ``conn`` and make sure the node is
        subscribed and knows the room's position. Frames that arrive until
        :meth:`activate` are kept for it."""
        room = self._rooms.get(room_id)
        if room is None:
            room = _LocalRoom(asyncio.get_running_loop().create_future())
            self._rooms[room_id] = room
            try:
                await self._broker.subscribe(room_id)
                # Read after subscribing: every later message arrives by the broker.
                latest = await self._history.latest(room_id)
            except BaseException as exc:
                del self._rooms[room_id]
                room.ready.set_exception(exc)
                room.ready.exception()  # retrieved here; concurrent joiners re-raise it
                raise
            room.next_seq = latest + 1
            for seq in [s for s in room.early if s <= latest]:
                del room.early[seq]
            room.ready.set_result(None)
            await self._drain_early(room)
        else:
            if room.drop is not None:
                room.drop.cancel()
                room.drop = None
            await asyncio.shield(room.ready)
        room.pending[conn.id] = []

    def activate(self, room_id: RoomId, conn: Connection, after: int) -> list[Frame]:
        """Make ``conn`` a live member; return the held frames it has not seen
        (history messages with ``seq`` above ``after``, and every other frame)."""
        room = self._rooms.get(room_id)
        if room is None or conn.id not in room.pending:
            return []
        held = room.pending.pop(conn.id)
        room.groups.setdefault(conn.transport, {})[conn.id] = conn
        return [f for f in held if f.kind is not Kind.MESSAGE or f.seq > after]

    def detach(self, room_id: RoomId, conn: Connection) -> None:
        """Remove ``conn`` from the room; drop the subscription after the grace."""
        room = self._rooms.get(room_id)
        if room is None:
            return
        room.pending.pop(conn.id, None)
        group = room.groups.get(conn.transport)
        if group is not None:
            group.pop(conn.id, None)
        if room.empty() and room.drop is None:
            loop = asyncio.get_running_loop()
            room.drop = loop.call_later(
                self._grace, lambda: self._spawn(self._unsubscribe_if_empty(room_id))
            )

    async def _unsubscribe_if_empty(self, room_id: RoomId) -> None:
        room = self._rooms.get(room_id)
        if room is None or not room.empty():
            return
        del self._rooms[room_id]
        if room.gap is not None:
            room.gap.cancel()
        try:
            await self._broker.unsubscribe(room_id)
        except Exception:  # the broker's reconnect restores only what is still local
            log.warning("unsubscribe from room %s failed", room_id, exc_info=True)

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for room_id, room in list(self._rooms.items()):
            for handle in (room.drop, room.gap):
                if handle is not None:
                    handle.cancel()
            del self._rooms[room_id]
        for task in list(self._tasks):
            task.cancel()
