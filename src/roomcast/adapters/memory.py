"""In-memory Broker, History and Presence: the embedded default and the reference
implementations of the ports.

They behave like the real engines within one process: frames go only to subscribed nodes,
``seq`` is gapless per room, presence entries expire with their node's heartbeat. Nodes in
one process that open the same ``memory://NAME`` URL share one bus, which is how the
contract tests run a cluster without a network.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..core.models import ConnId, Draft, Member, Message, NodeId, Room, RoomId, UserId
from ..core.ports import (
    FIND_WINDOW,
    TRIM_BATCH,
    TRIM_ROOMS_PAGE,
    BatchHandler,
    FrameHandler,
    Oldest,
    ReconnectHandler,
)
from ..exceptions import ChatError, ErrorCode, UnavailableError


@dataclass
class _Bus:
    """What every MemoryBroker opened on the same name shares."""

    rooms: defaultdict[RoomId, dict[NodeId, FrameHandler]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    inboxes: dict[NodeId, FrameHandler] = field(default_factory=dict)
    batches: dict[NodeId, BatchHandler] = field(default_factory=dict)
    """Nodes that take a published batch's frames in one call (see
    :meth:`MemoryBroker.hand_batches_to`)."""


_buses: dict[str, _Bus] = {}


class MemoryBroker:
    """A broker inside one process. Publishing awaits delivery on every subscribed node,
    so frames of one room arrive in publish order. A node that asked for it
    (:meth:`hand_batches_to`) gets the frames of a :meth:`publish_many` in one call."""

    def __init__(self, name: str = "") -> None:
        self._bus = _buses.setdefault(name, _Bus()) if name else _Bus()
        self._node: NodeId | None = None
        self._on_room: FrameHandler | None = None
        self.received = 0
        """Room frames this node received (the per-node counter the metrics export)."""

    async def start(
        self,
        node: NodeId,
        on_room: FrameHandler,
        on_inbox: FrameHandler,
        on_reconnect: ReconnectHandler,
    ) -> None:
        self._node = node
        self._on_room = on_room
        self._bus.inboxes[node] = on_inbox

    def _require_node(self) -> NodeId:
        if self._node is None:
            raise UnavailableError("broker not started")
        return self._node

    async def subscribe(self, room: RoomId) -> None:
        node = self._require_node()
        assert self._on_room is not None
        on_room = self._on_room

        async def counted(frame: bytes) -> None:
            self.received += 1
            await on_room(frame)

        self._bus.rooms[room][node] = counted

    def hand_batches_to(self, on_rooms: BatchHandler) -> None:
        """Hand this node the frames of each published batch that reach it in one call of
        ``on_rooms`` (in publish order) instead of one ``on_room`` call per frame: within
        one process the whole batch is there at once."""

        async def counted(frames: list[bytes]) -> None:
            self.received += len(frames)
            await on_rooms(frames)

        self._bus.batches[self._require_node()] = counted

    async def unsubscribe(self, room: RoomId) -> None:
        subscribers = self._bus.rooms.get(room)
        if subscribers is not None:
            subscribers.pop(self._require_node(), None)
            if not subscribers:
                del self._bus.rooms[room]

    async def publish(self, room: RoomId, frame: bytes) -> None:
        self._require_node()
        for handler in list(self._bus.rooms.get(room, {}).values()):
            await handler(frame)

    async def publish_many(self, frames: Sequence[tuple[RoomId, bytes]]) -> None:
        self._require_node()
        bus = self._bus
        if len(frames) < 2 or not bus.batches:
            for room, frame in frames:
                await self.publish(room, frame)
            return
        # Each subscribed node's share of the batch, in publish order.
        shares: dict[NodeId, list[tuple[RoomId, bytes]]] = {}
        for room, frame in frames:
            for node in bus.rooms.get(room, ()):
                if node in shares:
                    shares[node].append((room, frame))
                else:
                    shares[node] = [(room, frame)]
        for node, share in shares.items():
            batch = bus.batches.get(node)
            if batch is not None:
                await batch([frame for _, frame in share])
                continue
            for room, frame in share:
                handler = bus.rooms.get(room, {}).get(node)
                if handler is not None:
                    await handler(frame)

    async def send(self, node: NodeId, frame: bytes) -> None:
        handler = self._bus.inboxes.get(node)
        if handler is not None:
            await handler(frame)

    @property
    def healthy(self) -> bool:
        return self._node is not None

    async def close(self) -> None:
        if self._node is None:
            return
        for room in [r for r, subs in self._bus.rooms.items() if self._node in subs]:
            await self.unsubscribe(room)
        self._bus.inboxes.pop(self._node, None)
        self._bus.batches.pop(self._node, None)
        self._node = None


def _following(log: list[Message], seq: int) -> int:
    """The index in a room's log (ascending, gapless) of its first message after ``seq``."""
    if not log:
        return 0
    return max(min(seq - log[0].seq + 1, len(log)), 0)


class MemoryHistory:
    """History kept in dictionaries; lost when the process ends."""

    def __init__(self) -> None:
        self._rooms: dict[RoomId, Room] = {}
        self._by_name: dict[str, RoomId] = {}
        self._messages: defaultdict[RoomId, list[Message]] = defaultdict(list)
        """Each room's messages, ascending and gapless: its newest, after a trim."""
        self._seqs: dict[RoomId, int] = {}
        """Each room's last seq (its messages may have been trimmed)."""
        self._chosen: defaultdict[RoomId, dict[str, Message]] = defaultdict(dict)
        """Messages whose ids their senders chose, by room and id."""
        self._room_ids = itertools.count(1)
        self._user_ids = itertools.count(1)
        self._subjects: dict[str, UserId] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def room_by_name(self, name: str, *, create: bool = False) -> Room | None:
        room_id = self._by_name.get(name)
        if room_id is not None:
            return self._rooms[room_id]
        if not create:
            return None
        room = Room(RoomId(next(self._room_ids)), name, secrets.token_hex(4))
        self._rooms[room.id] = room
        self._by_name[name] = room.id
        return room

    async def room_by_id(self, room: RoomId) -> Room | None:
        return self._rooms.get(room)

    async def rooms(
        self,
        ids: Sequence[RoomId] | None = None,
        *,
        after: RoomId | None = None,
        limit: int | None = None,
    ) -> list[Room]:
        if ids is None:
            found = sorted(self._rooms.values(), key=lambda r: r.id)
            if after is not None:
                found = [room for room in found if room.id > after]
            return found if limit is None else found[:limit]
        return [self._rooms[room] for room in sorted(set(ids)) if room in self._rooms]

    async def latest(self, room: RoomId) -> int:
        return self._seqs.get(room, 0)

    async def append(self, drafts: Sequence[Draft]) -> list[Message]:
        # Check every room first so a bad batch stores nothing.
        for draft in drafts:
            if draft.room not in self._rooms:
                raise ChatError(ErrorCode.NOT_FOUND, f"room {draft.room} does not exist")
        out = []
        for draft in drafts:
            log = self._messages[draft.room]
            if draft.chosen:
                stored = self._chosen[draft.room].get(draft.id)
                if stored is not None:
                    out.append(stored)
                    continue
            seq = self._seqs[draft.room] = self._seqs.get(draft.room, 0) + 1
            message = Message.from_draft(draft, seq, self._rooms[draft.room].epoch)
            log.append(message)
            out.append(message)
            if draft.chosen:
                self._chosen[draft.room][draft.id] = message
        return out

    async def after(self, room: RoomId, seq: int, limit: int) -> list[Message]:
        log = self._messages.get(room, [])
        start = _following(log, seq)
        return log[start : start + limit]

    async def find(self, room: RoomId, message_id: str) -> Message | None:
        for message in reversed(self._messages.get(room, [])[-FIND_WINDOW:]):
            if message.id == message_id:
                return message
        return None

    async def before(self, room: RoomId, seq: int | None, limit: int) -> list[Message]:
        log = self._messages.get(room, [])
        end = len(log) if seq is None else _following(log, seq - 1)
        return log[max(end - limit, 0) : end]

    async def get(self, room: RoomId, seq: int) -> Message | None:
        log = self._messages.get(room, [])
        index = _following(log, seq - 1)
        return log[index] if index < len(log) and log[index].seq == seq else None

    async def delete(self, room: RoomId, seq: int, when: int) -> Message | None:
        log = self._messages.get(room, [])
        index = _following(log, seq - 1)
        if index >= len(log) or log[index].seq != seq:
            return None
        message = log[index]
        if message.deleted:
            return message
        return self._replace(message, message.erased(when))

    async def changed(self, room: RoomId, upto: int, since_ms: int, limit: int) -> list[Message]:
        log = self._messages.get(room, [])
        held = log[: _following(log, upto)]
        found = [m for m in held if m.edited is not None and m.edited >= since_ms]
        return found[: max(limit, 0)]

    def _replace(self, message: Message, new: Message) -> Message:
        """Put ``new`` in the place of a stored message (its room's log, its chosen id)."""
        log = self._messages[message.room]
        log[_following(log, message.seq - 1)] = new
        chosen = self._chosen.get(message.room, {})
        if chosen.get(message.id) is message:
            chosen[message.id] = new
        return new

    async def edit(self, room: RoomId, seq: int, text: str, when: int) -> Message | None:
        found = await self.get(room, seq)
        if found is None or found.deleted:
            return None
        return self._replace(found, found.revised(text, when))

    async def reset(self, room: RoomId) -> Room:
        old = self._rooms.get(room)
        if old is None:
            raise ChatError(ErrorCode.NOT_FOUND, f"room {room} does not exist")
        new = Room(old.id, old.name, secrets.token_hex(4))
        self._rooms[room] = new
        self._messages.pop(room, None)
        self._chosen.pop(room, None)
        self._seqs.pop(room, None)
        return new

    async def oldest(
        self, *, after: RoomId | None = None, limit: int = TRIM_ROOMS_PAGE
    ) -> list[Oldest]:
        found = sorted(
            Oldest(room, self._seqs[room], log[0].seq, log[0].ts)
            for room, log in self._messages.items()
            if log and (after is None or room > after)
        )
        return found[: max(limit, 0)]

    async def trim(
        self,
        room: RoomId,
        *,
        keep: int | None = None,
        before_ms: int | None = None,
        limit: int = TRIM_BATCH,
    ) -> int:
        log = self._messages.get(room, [])
        below = None if keep is None else self._seqs.get(room, 0) - keep + 1
        count = 0
        for message in log[: max(limit, 0)]:
            if keep is None and before_ms is None:
                break
            if (below is None or message.seq >= below) and (
                before_ms is None or message.ts >= before_ms
            ):
                break
            count += 1
        chosen = self._chosen.get(room, {})
        for message in log[:count]:
            if chosen.get(message.id) is message:
                del chosen[message.id]
        del log[:count]
        return count

    async def next_user_id(self) -> UserId:
        return UserId(next(self._user_ids))

    async def user_id_for(self, subject: str) -> UserId:
        found = self._subjects.get(subject)
        if found is None:
            found = self._subjects[subject] = UserId(next(self._user_ids))
        return found


class MemoryPresence:
    """Presence kept in dictionaries, with node heartbeats on the monotonic clock."""

    def __init__(self) -> None:
        self._rooms: defaultdict[RoomId, dict[ConnId, Member]] = defaultdict(dict)
        self._conns: dict[ConnId, Member] = {}
        self._expiry: dict[NodeId, float] = {}
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def add(self, room: RoomId, member: Member) -> None:
        self._rooms[room][member.conn] = member

    async def remove(self, room: RoomId, conn: ConnId) -> None:
        members = self._rooms.get(room)
        if members is not None:
            members.pop(conn, None)
            if not members:
                del self._rooms[room]

    async def members(self, room: RoomId) -> list[Member]:
        return list(self._rooms.get(room, {}).values())

    async def counts(self, rooms: Sequence[RoomId]) -> dict[RoomId, int]:
        return {room: len(self._rooms.get(room, {})) for room in rooms}

    async def occupied(self) -> dict[RoomId, int]:
        return {room: len(entries) for room, entries in self._rooms.items() if entries}

    async def register(self, member: Member) -> None:
        self._conns[member.conn] = member

    async def unregister(self, conn: ConnId) -> None:
        self._conns.pop(conn, None)

    async def locate(self, user: UserId) -> list[Member]:
        return [m for m in self._conns.values() if m.user.id == user]

    async def heartbeat(self, node: NodeId, ttl: float) -> bool:
        now = time.monotonic()
        previous = self._expiry.get(node)
        self._expiry[node] = now + ttl
        return previous is None or previous < now

    async def reap(self) -> list[tuple[RoomId, Member]]:
        now = time.monotonic()
        dead = [node for node, until in self._expiry.items() if until < now]
        removed: list[tuple[RoomId, Member]] = []
        for node in dead:
            removed += await self.drop_node(node)
        return removed

    async def drop_node(self, node: NodeId) -> list[tuple[RoomId, Member]]:
        async with self._lock:
            self._expiry.pop(node, None)
            for conn in [c for c, m in self._conns.items() if m.node == node]:
                del self._conns[conn]
            removed = []
            for room, members in list(self._rooms.items()):
                for conn, member in list(members.items()):
                    if member.node == node:
                        removed.append((room, member))
                        await self.remove(room, conn)
            return removed
