"""The hub: which local connections are in which room, and local fan-out.

The hub keeps a node's broker subscriptions ref-counted: the first local member of a room
subscribes the node to the room's channel, and the channel is dropped a short grace after
the last one leaves, so a node with no member of a room receives none of its traffic.

Delivery does nothing per recipient but the write: a frame is handed to each transport once
with the set of that transport's connections in the room, and the transport encodes it once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Protocol

from .events import Frame
from .models import ConnId, RoomId
from .ports import Broker

log = logging.getLogger(__name__)


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
    groups: dict[Transport, dict[ConnId, Connection]] = field(default_factory=dict)
    pending: dict[ConnId, list[Frame]] = field(default_factory=dict)
    drop: asyncio.TimerHandle | None = None

    def empty(self) -> bool:
        return not self.pending and not any(self.groups.values())


class Hub:
    """Local membership and fan-out for one node."""

    def __init__(self, broker: Broker, *, unsubscribe_grace: float = 2.0) -> None:
        self._broker = broker
        self._grace = unsubscribe_grace
        self._rooms: dict[RoomId, _LocalRoom] = {}
        self.frames_received = 0
        self.deliveries = 0

    def local_rooms(self) -> list[RoomId]:
        """Rooms this node is subscribed to."""
        return list(self._rooms)

    async def on_frame(self, data: bytes) -> None:
        """The broker's room handler: fan a frame out to this node's members of the room."""
        try:
            frame = Frame.decode(data)
        except (ValueError, KeyError):
            log.warning("dropped a malformed frame (%d bytes)", len(data))
            return
        self.frames_received += 1
        room = self._rooms.get(frame.room)
        if room is None:
            return
        for frames in room.pending.values():
            frames.append(frame)
        for transport, conns in room.groups.items():
            if conns:
                self.deliveries += len(conns)
                await transport.deliver(frame, conns.values())

    async def begin_join(self, room_id: RoomId, conn: Connection) -> None:
        """Start holding the room's frames for ``conn`` and make sure the node is
        subscribed. Frames that arrive until :meth:`activate` are kept for it."""
        room = self._rooms.get(room_id)
        if room is None:
            room = _LocalRoom(asyncio.get_running_loop().create_future())
            self._rooms[room_id] = room
            try:
                await self._broker.subscribe(room_id)
            except BaseException as exc:
                del self._rooms[room_id]
                room.ready.set_exception(exc)
                room.ready.exception()  # mark retrieved: waiters re-raise their own copy
                raise
            room.ready.set_result(None)
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
        return [f for f in held if f.seq == 0 or f.seq > after]

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
                self._grace, lambda: loop.create_task(self._unsubscribe_if_empty(room_id))
            )

    async def _unsubscribe_if_empty(self, room_id: RoomId) -> None:
        room = self._rooms.get(room_id)
        if room is None or not room.empty():
            return
        del self._rooms[room_id]
        try:
            await self._broker.unsubscribe(room_id)
        except Exception:  # the broker reconnect logic resubscribes only what is local
            log.warning("unsubscribe from room %s failed", room_id, exc_info=True)

    async def close(self) -> None:
        for room_id, room in list(self._rooms.items()):
            if room.drop is not None:
                room.drop.cancel()
            del self._rooms[room_id]
