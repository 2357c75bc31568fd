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
with that transport's connections in the room, and the transport encodes it once. Frames
that come in a batch (a stored batch on its way to this node's own members, a batch the
in-process broker hands over) go out as runs: every run of a room's frames is handed over
at once, and a transport writes it to each member in one write. A busy room's members then
cost one write per batch instead of one per message, which is what lets a node catch up
when it falls behind.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from .events import Frame, Kind, deleted_frame, edited_frame, message_frame, presence_frame
from .models import ConnId, RoomId, User, UserId
from .ports import CHANGE_SKEW, CHANGES_MAX, Broker, History

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

    async def deliver_many(self, frames: Sequence[Frame], conns: Collection[Connection]) -> None:
        """Write several frames of one room, in order, to every connection given: each
        frame encoded once, and all of them in one write per connection where the
        transport can."""
        ...

    async def deliver_one(self, frame: Frame, conn: Connection) -> None:
        """Write one frame to one connection."""
        ...


@dataclass(eq=False)
class _Roster:
    """Who this node's members of a room were last told is in it: a read of presence, then
    the room's presence frames. After a broker outage (or frames a broker dropped), a new
    read compared with it says which joins and leaves the members missed."""

    users: dict[UserId, User] | None = None
    """None until a read of presence has told."""
    reads: dict[int, list[tuple[str, User]]] = field(default_factory=dict)
    """The presence events seen during each read under way (by read number): they are newer
    than what the read may return, so they are applied to its result."""
    settled: int = 0
    """The newest read whose result was taken: an older one ending later is stale."""

    def saw(self, event: str, user: User) -> None:
        for seen in self.reads.values():
            seen.append((event, user))
        if self.users is not None:
            _apply(self.users, event, user)


def _apply(users: dict[UserId, User], event: str, user: User) -> None:
    if event == "join":
        users[user.id] = user
    elif event == "leave":
        users.pop(user.id, None)


def _presence_of(frame: Frame) -> tuple[str, User] | None:
    """The event and user of a presence frame; None if its body is not one."""
    try:
        data = frame.data()
        user = data["user"]
        return str(data["event"]), User(UserId(int(user["id"])), str(user["name"]))
    except (ValueError, KeyError, TypeError):
        return None


@dataclass(eq=False)
class _LocalRoom:
    ready: asyncio.Future[None]
    next_seq: int | None = None
    """The seq this node delivers next; None until the room's position is known."""
    early: dict[int, Frame] = field(default_factory=dict)
    groups: dict[Transport, dict[ConnId, Connection]] = field(default_factory=dict)
    pending: dict[ConnId, list[Frame]] = field(default_factory=dict)
    behind: dict[ConnId, tuple[Connection, int]] = field(default_factory=dict)
    """Members whose join answered a seq this node has not delivered yet, with that seq:
    they get only the messages after it, until the room's order here passes it."""
    drop: asyncio.TimerHandle | None = None
    gap: asyncio.TimerHandle | None = None
    roster: _Roster = field(default_factory=_Roster)
    frames: int = 0
    """Frames of this room received from the broker since this node subscribed to it."""

    def empty(self) -> bool:
        return not self.pending and not self.behind and not any(self.groups.values())


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
        self._reads = itertools.count(1)
        """Numbers of reads of presence (see :meth:`begin_roster_read`), across rooms."""
        self.frames_received = 0
        self.frames_stray = 0
        """Frames received of rooms this node is not subscribed to (late ones of a room it
        has just left, or a broker's mistake), dropped."""
        self.deliveries = 0
        self.duplicates_dropped = 0
        self.gaps_filled = 0
        self.changes_resent = 0
        """Edits and deletions delivered again from history after a broker outage."""

    def local_rooms(self) -> list[RoomId]:
        """Rooms this node is subscribed to."""
        return list(self._rooms)

    def frames_by_room(self) -> dict[RoomId, int]:
        """Frames received per room this node is subscribed to, since it subscribed (only
        rooms with at least one): a room's count goes when its subscription does, so this
        stays as small as the node's rooms, however many rooms it has ever served."""
        return {room_id: room.frames for room_id, room in self._rooms.items() if room.frames}

    # -- receiving ---------------------------------------------------------------------

    async def on_frame(self, data: bytes) -> None:
        """The broker's room handler."""
        frame = self._received(data)
        if frame is not None:
            await self._route(frame)

    async def on_frames(self, data: Sequence[bytes]) -> None:
        """The broker's handler for room frames that arrived together, in arrival order
        (the in-process broker's, Redis's and NATS's: see ``hand_batches_to``)."""
        frames = [frame for one in data if (frame := self._received(one)) is not None]
        await self._route_many(frames)

    def _received(self, data: bytes) -> Frame | None:
        """A frame from the broker, decoded and counted; None (logged) if malformed."""
        try:
            frame = Frame.decode(data)
        except (ValueError, KeyError):
            log.warning("dropped a malformed frame (%d bytes)", len(data))
            return None
        self.frames_received += 1
        room = self._rooms.get(frame.room)
        if room is None:
            self.frames_stray += 1
        else:
            room.frames += 1
        return frame

    async def deliver_stored(self, frames: Sequence[Frame]) -> None:
        """Hand a batch of messages this node has just stored, in seq order, to its local
        members, without waiting for the broker to bring them back.

        They take the same path as frames from the broker — in seq order, each seq once —
        so the broker's copies, when they arrive, are dropped as duplicates, and a message
        stored here before an earlier one from another node has arrived waits for it.
        """
        await self._route_many(frames)

    async def _route(self, frame: Frame) -> None:
        room = self._rooms.get(frame.room)
        if room is None:
            return
        run: list[Frame] = []
        self._accept(room, frame, run)
        await self._fan_out(room, run)

    async def _route_many(self, frames: Sequence[Frame]) -> None:
        """Route a batch: each room's frames in their order, each room's deliverable ones
        handed over as one run."""
        if len(frames) == 1:
            await self._route(frames[0])
            return
        by_room: dict[RoomId, list[Frame]] = {}
        for frame in frames:
            if frame.room in by_room:
                by_room[frame.room].append(frame)
            else:
                by_room[frame.room] = [frame]
        for room_id, frames_of_room in by_room.items():
            room = self._rooms.get(room_id)
            if room is None:
                continue
            run: list[Frame] = []
            for frame in frames_of_room:
                self._accept(room, frame, run)
            await self._fan_out(room, run)

    def _accept(self, room: _LocalRoom, frame: Frame, run: list[Frame]) -> None:
        """Add ``frame`` to ``run`` if it is next in the room's order (with the early frames
        it lets through after it); hold it if it is early; drop it if it was delivered."""
        if frame.kind is not Kind.MESSAGE:
            if frame.kind is Kind.PRESENCE and (room.roster.users is not None or room.roster.reads):
                seen = _presence_of(frame)
                if seen is not None:
                    room.roster.saw(*seen)
            run.append(frame)
            return
        expected = room.next_seq
        if expected is None or frame.seq > expected:
            room.early[frame.seq] = frame
            if expected is not None:
                self._schedule_gap_fill(frame.room, room)
        elif frame.seq == expected:
            room.next_seq = expected + 1
            run.append(frame)
            if room.early:
                self._take_early(room, run)
        else:
            self.duplicates_dropped += 1

    async def _fan_out(self, room: _LocalRoom, run: list[Frame]) -> None:
        """Hand a run of the room's frames, in order, to every transport with members in
        it, to every member whose join is ahead of this node's order (what comes after
        it), and to every joiner whose frames are being held."""
        if not run:
            return
        for held in room.pending.values():
            held.extend(run)
        if room.behind:
            for conn, frames in self._catch_up(room, run):
                self.deliveries += len(frames)
                await conn.transport.deliver_many(frames, (conn,))
        single = run[0] if len(run) == 1 else None
        # A copy of the (one or two) groups: a delivery may wait, and a member of a new
        # transport may join meanwhile.
        for transport, conns in list(room.groups.items()):
            if conns:
                self.deliveries += len(conns) * len(run)
                if single is not None:
                    await transport.deliver(single, conns.values())
                else:
                    await transport.deliver_many(run, conns.values())

    @staticmethod
    def _catch_up(room: _LocalRoom, run: list[Frame]) -> list[tuple[Connection, list[Frame]]]:
        """What of ``run`` each member still behind its join's seq gets: the frames after
        that seq. Once a run starts after it, so does every later one: the member becomes
        an ordinary one, and gets that run with them."""
        assert room.next_seq is not None
        start = next((f.seq for f in run if f.kind is Kind.MESSAGE), room.next_seq)
        out: list[tuple[Connection, list[Frame]]] = []
        for conn_id, (conn, after) in list(room.behind.items()):
            if start > after:
                del room.behind[conn_id]
                room.groups.setdefault(conn.transport, {})[conn_id] = conn
            elif frames := [f for f in run if f.kind is not Kind.MESSAGE or f.seq > after]:
                out.append((conn, frames))
        return out

    def _take_early(self, room: _LocalRoom, run: list[Frame]) -> None:
        """Move the held frames that are now next in order onto ``run``; drop those that
        were delivered meanwhile."""
        assert room.next_seq is not None
        for seq in [s for s in room.early if s < room.next_seq]:
            del room.early[seq]
            self.duplicates_dropped += 1
        while room.next_seq in room.early:
            run.append(room.early.pop(room.next_seq))
            room.next_seq += 1
        if not room.early and room.gap is not None:
            room.gap.cancel()
            room.gap = None

    async def _drain_early(self, room: _LocalRoom) -> None:
        run: list[Frame] = []
        self._take_early(room, run)
        await self._fan_out(room, run)

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
            if missing[0].seq > room.next_seq:
                # The store holds a gapless run of the room's newest messages: what is
                # before it was deleted by retention before its frames reached this node.
                log.warning(
                    "room %s: messages %d-%d were deleted (retention) before this node "
                    "delivered them",
                    room_id,
                    room.next_seq,
                    missing[0].seq - 1,
                )
                for seq in [s for s in room.early if s < missing[0].seq]:
                    del room.early[seq]
                room.next_seq = missing[0].seq
            for message in missing:
                if message.seq == room.next_seq:
                    room.next_seq += 1
                    room.early.pop(message.seq, None)
                    self.gaps_filled += 1
                    await self._fan_out(room, [message_frame(message)])
        await self._drain_early(room)
        if room.early:
            self._schedule_gap_fill(room_id, room)

    async def resync(self) -> None:
        """After a broker outage: deliver, from history, every message a local room missed,
        and the edits and deletions of the messages it had (as ``edited`` and ``deleted``
        frames; who deleted is not known then)."""
        for room_id, room in list(self._rooms.items()):
            if room.next_seq is None:
                continue
            had = room.next_seq - 1
            try:
                last = await self._history.get(room_id, had) if had > 0 else None
                latest = await self._history.latest(room_id)
            except Exception:
                log.warning("resync of room %s failed", room_id, exc_info=True)
                continue
            await self._fill_gap(room_id, room, upto=latest)
            if last is not None:
                # Its members had every change made before this node had its last message.
                await self._resend_changes(room_id, room, had, last.ts - CHANGE_SKEW)

    async def _resend_changes(
        self, room_id: RoomId, room: _LocalRoom, upto: int, since_ms: int
    ) -> None:
        try:
            changed = await self._history.changed(room_id, upto, since_ms, CHANGES_MAX)
        except Exception:
            log.warning("reading the changes of room %s failed", room_id, exc_info=True)
            return
        if changed and self._rooms.get(room_id) is room:
            self.changes_resent += len(changed)
            frames = [deleted_frame(m, None) if m.deleted else edited_frame(m) for m in changed]
            await self._fan_out(room, frames)

    # -- who is in the room, as this node's members were told -------------------------

    def rooms_with_members(self) -> list[RoomId]:
        """The rooms this node has members in. A room kept only for its grace forgets its
        roster: nobody here is told of its joins and leaves, so it is read again if
        someone joins."""
        out: list[RoomId] = []
        for room_id, room in self._rooms.items():
            if room.empty():
                room.roster.users = None
            else:
                out.append(room_id)
        return out

    def knows_roster(self, room_id: RoomId) -> bool:
        room = self._rooms.get(room_id)
        return room is not None and room.roster.users is not None

    def begin_roster_read(self, room_id: RoomId) -> int | None:
        """A read of the room's members in presence is about to start: from now on the
        room's presence events are kept for it. Returns the read's number (None: the room
        has no members here)."""
        room = self._rooms.get(room_id)
        if room is None:
            return None
        read = next(self._reads)
        room.roster.reads[read] = []
        return read

    def end_roster_read(
        self, room_id: RoomId, read: int, users: Sequence[User] | None
    ) -> list[Frame]:
        """The read ended with ``users`` (None: it failed). The first read of a room is
        what its members were told; after that, returns the presence frames that tell
        them what they missed (a leave for each user gone, a join for each new one) —
        hand them over with :meth:`deliver_presence`."""
        room = self._rooms.get(room_id)
        if room is None:
            return []
        roster = room.roster
        seen = roster.reads.pop(read, None)
        if users is None or seen is None or read < roster.settled:
            return []
        roster.settled = read
        now = {user.id: user for user in users}
        for event, user in seen:
            _apply(now, event, user)
        if roster.users is None:
            roster.users = now
            return []
        told = roster.users
        frames = [presence_frame(room_id, "leave", u) for i, u in told.items() if i not in now]
        frames += [presence_frame(room_id, "join", u) for i, u in now.items() if i not in told]
        return frames

    async def deliver_presence(self, frames: Sequence[Frame]) -> None:
        """Hand presence frames made on this node to its members, as if they had come
        from the broker (the roster follows them)."""
        await self._route_many(frames)

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
        if room.next_seq is not None and room.next_seq <= after:
            # The join read the room's position from the store, which has messages whose
            # frames have not reached this node yet: when they come, this member has them.
            room.behind[conn.id] = (conn, after)
        else:
            room.groups.setdefault(conn.transport, {})[conn.id] = conn
        return [f for f in held if f.kind is not Kind.MESSAGE or f.seq > after]

    def detach(self, room_id: RoomId, conn: Connection) -> None:
        """Remove ``conn`` from the room; drop the subscription after the grace."""
        room = self._rooms.get(room_id)
        if room is None:
            return
        room.pending.pop(conn.id, None)
        room.behind.pop(conn.id, None)
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
