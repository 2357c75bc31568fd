"""ChatService: the rules of the chat, independent of any transport or engine.

Transports translate the wire into calls on this class and its results back into the wire;
engines are reached only through the ports. The flow of a message::

    send -> validate -> Sequencer (History.append: seq, durable) -> Broker.publish_many(frames)
         -> every node with local members: Hub.on_frame -> Transport.deliver (encode once)
    (with ``local_first``, the sending node's own members: Hub.deliver_stored, meanwhile,
    the whole batch at once)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..exceptions import ChatError, ErrorCode, UnavailableError
from . import validation
from .auth import Authenticator, Identity
from .events import (
    DeliverAnswer,
    DeliverRequest,
    Frame,
    RunBeacon,
    decode_envelope,
    deleted_frame,
    dm_frame,
    edited_frame,
    message_frame,
    presence_frame,
    typing_frame,
)
from .hub import Connection, Hub
from .listing import OccupiedRooms, WatchedPresence
from .models import (
    ConnId,
    Draft,
    Member,
    Message,
    NodeId,
    Position,
    Room,
    RoomId,
    User,
    UserId,
)
from .ports import (
    CHANGE_SKEW,
    CHANGES_MAX,
    TRIM_BATCH,
    TRIM_ROOMS_PAGE,
    Broker,
    History,
    Presence,
)
from .ratelimit import Buckets, TokenBucket
from .timing import Durations

PRESENCE_GATHER_FROM = 0.001
"""Seconds: a presence batch whose publish took at least this long (a big room's hand-over,
a write to each member) makes the announcer wait as long before the next one."""
PRESENCE_GATHER_MAX = 0.05
"""Seconds: the longest the announcer waits between two publishes."""
UNREMOVED_MAX = 100_000
"""Failed presence removals kept for the heartbeat to retry, at most."""
REDO_WINDOW = 60.0
"""Seconds for which a node remembers the presence removals it made, to make them again
after its engine comes back (see :meth:`ChatService.redo_removals`): a failover takes
``cluster-node-timeout`` (15 s by default) or Sentinel's ``down-after-milliseconds``
(30 s) to start."""
REDO_MAX = 100_000
"""Recent presence removals remembered, at most."""

log = logging.getLogger(__name__)

ROOM_CACHE = 100_000
"""Room ids and names a node remembers (they never change); the cache starts over when full."""

CALLERS_MAX = 10_000
"""Callers without a connection (senders of :meth:`ChatService.post`, readers of the REST
API) whose rates a node keeps, of each kind (the least recently seen are forgotten first)."""

RECOVERY_LIMIT = 1000
"""The most missed messages a join with ``since`` returns; beyond it (or past
:data:`~roomcast.core.ports.CHANGES_MAX` changed ones) the client reloads."""


DM_TIMEOUT = 5.0
"""How long a direct message waits for the nodes of its recipient to confirm delivery."""

SETTLE_WAIT = 1.0
"""Seconds a node keeps asking a store that failed an append whether it stored the batch
all the same, before answering its senders that it cannot tell."""

LATE_SETTLE_WAIT = 60.0
"""Seconds it goes on asking after that, to publish the batch if the store had it."""

ROSTER_READS = 16
"""Rooms whose members a node reads at once when it corrects its members' lists after a
broker outage (one presence read per room: a node in thousands of rooms would otherwise
wait a round trip for each, one after another)."""


@dataclass(eq=False)
class Session:
    """One connected client on this node."""

    conn: Connection
    user: User
    rooms: set[RoomId] = field(default_factory=set)
    bucket: TokenBucket | None = None
    """The connection's rate of ``send``, ``typing`` and ``dm``."""
    requests: TokenBucket | None = None
    """Its rate of the other requests: ``join``, ``leave``, ``history``, ``rooms``,
    ``members`` (see :meth:`ChatService.spend_request`)."""
    identity: Identity | None = None
    """Who the connection's token proved it is (None: the server checks no tokens)."""
    sending: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while one of the connection's messages is being sequenced: a connection's
    messages get seqs in the order it sent them, even when its requests are handled
    concurrently."""


@dataclass(frozen=True, slots=True)
class JoinResult:
    room: Room
    seq: int
    members: list[User] | None
    """None when the join asked not to list them (see ``count``)."""
    recovered: bool | None
    """None when the join had no ``since``."""
    missed: list[Message]
    count: int | None = None
    """Instead of ``members``: how many the room has across the cluster (as ``rooms``)."""
    changed: list[Message] = field(default_factory=list)
    """With ``missed``: the messages up to ``since`` edited or deleted since the client
    had them (see :meth:`ChatService._recover`), as they are now."""


@dataclass(frozen=True, slots=True)
class RoomInfo:
    room: Room
    members: int

    def to_wire(self) -> dict[str, Any]:
        return {**self.room.to_wire(), "members": self.members}


def rooms_wire(infos: Sequence[RoomInfo], following: RoomId | None = None) -> dict[str, Any]:
    """The fields of a ``rooms`` answer; ``following``: where the next page of every room
    starts (``next``: the id to pass as ``after``), when more rooms follow this one."""
    wire: dict[str, Any] = {"rooms": [info.to_wire() for info in infos]}
    if following is not None:
        wire["next"] = following
    return wire


def members_wire(users: Sequence[User], following: UserId | None = None) -> dict[str, Any]:
    """The fields of a ``members`` answer; ``following``: the ``after`` of the next page
    (``next``), when more members follow this one."""
    wire: dict[str, Any] = {"members": [user.to_wire() for user in users]}
    if following is not None:
        wire["next"] = following
    return wire


class Sequencer:
    """Batches concurrent appends into one History call, then publishes in seq order.

    While one batch is being stored, new drafts queue up and form the next batch, so the
    store sees one transaction per batch instead of one per message. Storing and
    publishing overlap: the next batch is stored while the previous one is on its way to
    the broker, so a message that arrives during a publish waits for no broker round trip
    before its own append. Publishes themselves go one at a time, in the order the batches
    were stored, so this node publishes each room's messages in seq order. A sender is
    acknowledged once its batch is stored and handed to the broker. With ``local``, each
    stored batch also goes to that handler while its publish is on its way.
    """

    def __init__(
        self,
        history: History,
        broker: Broker,
        *,
        max_batch: int = 256,
        clock: Callable[[], float] = time.perf_counter,
        local: Callable[[list[Frame]], Awaitable[None]] | None = None,
    ) -> None:
        self._history = history
        self._broker = broker
        self._local = local
        """Given: each stored batch is also handed to this node's own members here, while
        its publish is on its way (see :meth:`~roomcast.core.hub.Hub.deliver_stored`)."""
        self._max_batch = max_batch
        self._clock = clock
        self._queue: list[tuple[Draft, asyncio.Future[Message]]] = []
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Future[None] | None = None
        """Set while the drain task waits for a publish with nothing to store: a new draft
        wakes it, to be stored while that publish is still in flight."""
        self.append_seconds = Durations()
        """How long each stored batch took to append (seq given and durably written)."""
        self.publish_seconds = Durations()
        """How long each published batch took to reach the broker (its reply awaited)."""
        self.messages_stored = 0
        self._later: set[asyncio.Task[None]] = set()
        """Batches whose senders were told the store could not say: being asked after."""
        self._inline_stored: asyncio.Future[None] | None = None
        self._inline_published: asyncio.Future[None] | None = None
        """Set while a message is appended in its sender's task (see :meth:`_append_inline`):
        done once it is stored, and once it is published."""

    async def append(self, draft: Draft) -> Message:
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        if self._task is None and not self._queue and self._inline_published is None:
            return await self._append_inline(draft, future)
        self._queue.append((draft, future))
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        elif self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)
        return await future

    async def _append_inline(self, draft: Draft, future: asyncio.Future[Message]) -> Message:
        """The sequencer is idle: the draft is stored and published in its sender's own
        task, a batch of one, without the drain task's two task switches — each a turn
        of the event loop, which costs a wake-up on a machine that was idle.

        Drafts that arrive meanwhile start the drain as usual; it stores their batch once
        this one is stored, while this one is published, and publishes it after this one.
        """
        loop = asyncio.get_running_loop()
        batch = [(draft, future)]
        stored_gate = self._inline_stored = loop.create_future()
        published_gate = self._inline_published = loop.create_future()
        try:
            try:
                stored = await self._store(batch)
            finally:
                stored_gate.set_result(None)
            if stored is not None:
                await self._publish(batch, *stored)
        finally:
            published_gate.set_result(None)
            self._inline_stored = self._inline_published = None
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        # A message being appended inline (see _append_inline) is stored and published
        # before this drain's first batch.
        publishing: asyncio.Future[None] | None = self._inline_published
        inline_stored = self._inline_stored
        try:
            if inline_stored is not None and not inline_stored.done():
                await inline_stored
            while self._queue or publishing is not None:
                if not self._queue:
                    assert publishing is not None
                    self._wakeup = loop.create_future()
                    await asyncio.wait(
                        (publishing, self._wakeup), return_when=asyncio.FIRST_COMPLETED
                    )
                    self._wakeup = None
                    if publishing.done():
                        publishing = None
                    continue
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                stored = await self._store(batch)
                if publishing is not None:
                    await publishing  # one publish at a time: the node's frames in seq order
                    publishing = None
                if stored is not None:
                    messages, at = stored
                    publishing = loop.create_task(self._publish(batch, messages, at))
                    # Let the publish write its frames before the next append holds the loop.
                    await asyncio.sleep(0)
        finally:
            try:
                if publishing is not None and not publishing.done():
                    # Cancelled mid-publish (shutdown): the stored batch still gets its answers.
                    await asyncio.shield(publishing)
            finally:
                self._task = self._wakeup = None

    async def _store(
        self, batch: list[tuple[Draft, asyncio.Future[Message]]]
    ) -> tuple[list[Message], float] | None:
        """Append the batch; on failure answer its senders with the error and return None."""
        started = self._clock()
        drafts = [draft for draft, _ in batch]
        try:
            messages = await self._history.append(drafts)
        except UnavailableError as exc:
            # The store may have committed the batch and lost its answer on the way back.
            settled = await self._settle(drafts)
            if not settled:
                error = _as_chat_error(exc) if settled is not None else _unsettled()
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                if settled is None:
                    self._spawn(self._publish_if_stored(drafts))
                return None
            log.warning("an append failed (%s) after storing its batch of %d", exc, len(drafts))
            messages = settled
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(_as_chat_error(exc))
            return None
        stored = self._clock()
        self.append_seconds.observe(stored - started)
        self.messages_stored += len(messages)
        return messages, stored

    async def _settle(self, drafts: list[Draft]) -> list[Message] | None:
        """After an append that failed with the store out of reach: the batch's messages
        if it was stored all the same, [] if it was not, None if the store did not say
        within :data:`SETTLE_WAIT`."""
        deadline = time.monotonic() + SETTLE_WAIT
        pause = 0.05
        while True:
            try:
                return await self._lookup(drafts)
            except UnavailableError:
                if time.monotonic() + pause > deadline:
                    return None
                await asyncio.sleep(pause)
                pause = min(pause * 2, 0.4)

    async def _lookup(self, drafts: list[Draft]) -> list[Message] | None:
        """The batch's messages if the store holds them, [] if it holds none; None if it
        holds some but not all (a batch is one transaction: it should not be)."""
        first = await self._history.find(drafts[0].room, drafts[0].id)
        if first is None:
            return []
        found = [first, *[await self._history.find(d.room, d.id) for d in drafts[1:]]]
        messages = [message for message in found if message is not None]
        if len(messages) != len(drafts):
            log.error("an append stored %d of its %d messages", len(messages), len(drafts))
            return None
        return messages

    async def _publish_if_stored(self, drafts: list[Draft]) -> None:
        """After its senders were told the store could not say whether it stored their
        batch: keep asking (up to :data:`LATE_SETTLE_WAIT`), and if it did, publish the
        batch, so members get it without waiting for the room's next message to show the
        gap. A member that has it already drops the copy."""
        async for _ in _late_tries():
            try:
                messages = await self._lookup(drafts)
            except UnavailableError:
                continue
            if not messages:
                return
            log.warning("a batch of %d its senders could not be told of was stored", len(drafts))
            frames = [message_frame(message) for message in messages]
            try:
                await self._broker.publish_many([(f.room, f.encode()) for f in frames])
            except Exception:  # the room's next message shows the gap to every node
                log.warning("publish of a batch of %d failed", len(frames), exc_info=True)
            if self._local is not None:
                try:
                    await self._local(frames)
                except Exception:
                    log.warning("local delivery of %d frames failed", len(frames), exc_info=True)
            return

    async def _publish_later(self, frames: list[Frame]) -> None:
        """Publish a stored batch whose publish failed, until the broker takes it (for up
        to :data:`LATE_SETTLE_WAIT`): in a room that stays quiet no later message would
        show the other nodes the gap. A node that has filled it from history meanwhile
        drops the copy."""
        async for _ in _late_tries():
            try:
                await self._broker.publish_many([(f.room, f.encode()) for f in frames])
            except Exception as exc:
                log.debug("publishing a batch of %d again failed: %s", len(frames), exc)
                continue
            log.info("a batch of %d whose publish had failed is published", len(frames))
            return
        log.warning("a batch of %d stored messages could not be published", len(frames))

    async def close(self) -> None:
        """Stop asking after and publishing again batches that failed (the node stops)."""
        later = list(self._later)
        for task in later:
            task.cancel()
        await asyncio.gather(*later, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    async def _publish(
        self,
        batch: list[tuple[Draft, asyncio.Future[Message]]],
        messages: list[Message],
        stored: float,
    ) -> None:
        if any(draft.chosen for draft, _ in batch):
            frames = _retried_frames(batch, messages)
        else:
            frames = [message_frame(message) for message in messages]
        try:
            # The whole batch in one round trip to the broker, in seq order.
            publish = self._broker.publish_many([(frame.room, frame.encode()) for frame in frames])
            if self._local is None:
                await publish
            else:
                # The publish goes first, up to its first wait for the broker; this node's
                # own members get the batch meanwhile instead of after a broker round trip.
                sending = asyncio.ensure_future(publish)
                await asyncio.sleep(0)
                try:
                    await self._local(frames)
                except Exception:
                    log.warning(
                        "local delivery of a batch of %d failed", len(frames), exc_info=True
                    )
                await sending
        except Exception:
            # Stored, so acknowledged; the other nodes' members get it once a publish goes
            # through, or from history once the room's next message shows them the gap.
            log.warning("publish of a batch of %d failed", len(messages), exc_info=True)
            self._spawn(self._publish_later(frames))
        else:
            self.publish_seconds.observe(self._clock() - stored)
        finally:
            for message, (draft, future) in zip(messages, batch, strict=True):
                if future.done():
                    continue
                if draft.chosen and not _same_message(draft, message):
                    future.set_exception(_conflict(draft))
                else:
                    future.set_result(message)


def _visible(identity: Identity | None, rooms: list[Room]) -> list[Room]:
    """The rooms an identity may enter (all of them on an open server)."""
    if identity is None or identity.rooms is None:
        return rooms
    return [room for room in rooms if identity.may_enter(room.name)]


async def _late_tries() -> AsyncIterator[None]:
    """Turns of a retry after a failure: 0.25 s, then twice as long each time up to 5 s,
    for :data:`LATE_SETTLE_WAIT` in all."""
    deadline = time.monotonic() + LATE_SETTLE_WAIT
    pause = 0.25
    while time.monotonic() + pause < deadline:
        await asyncio.sleep(pause)
        pause = min(pause * 2, 5.0)
        yield


def _same_message(draft: Draft, message: Message) -> bool:
    """Whether a stored message with the draft's id is the draft sent again (a deleted or
    edited message has not its first text to compare: its sender's retry gets it as it
    is now)."""
    changed = message.deleted or message.edited is not None
    return (changed or message.text == draft.text) and message.user.name == draft.user.name


def _conflict(draft: Draft) -> ChatError:
    return ChatError(
        ErrorCode.CONFLICT,
        f"the message id {draft.id!r} is the id of another message in this room: choose a"
        " new id for a new message",
    )


def _retried_frames(
    batch: list[tuple[Draft, asyncio.Future[Message]]], messages: list[Message]
) -> list[Frame]:
    """The frames of a batch with drafts whose ids their senders chose: each stored message
    once, in seq order. A retry's message, stored before, goes out again — its first
    sender's node may have died before publishing it, and a member that has it drops the
    copy — but not another message that merely has the id."""
    unique: dict[tuple[RoomId, int], Message] = {}
    for message, (draft, _) in zip(messages, batch, strict=True):
        if not draft.chosen or _same_message(draft, message):
            unique[(message.room, message.seq)] = message
    return [message_frame(unique[key]) for key in sorted(unique)]


def _unsettled() -> ChatError:
    return ChatError(
        ErrorCode.UNAVAILABLE,
        "the message store did not confirm the message: it may have been stored, so send"
        " it again with the same id, or without one look for it in the room's history first",
    )


def _as_chat_error(exc: Exception) -> Exception:
    if isinstance(exc, ChatError):
        return exc
    if isinstance(exc, UnavailableError):
        return ChatError(ErrorCode.UNAVAILABLE, "the message store is unavailable, try again")
    log.error("history append failed", exc_info=exc)
    return ChatError(ErrorCode.UNAVAILABLE, "the message could not be stored, try again")


class ChatService:
    """Rooms, presence and history for the connections of one node."""

    def __init__(
        self,
        *,
        node: NodeId,
        history: History,
        broker: Broker,
        presence: Presence,
        hub: Hub,
        rate_limit: float = 0.0,
        rate_burst: int = 1,
        request_rate_limit: float = 0.0,
        request_rate_burst: int = 1,
        clock: Callable[[], float] = time.time,
        local_first: bool = False,
        auth: Authenticator | None = None,
    ) -> None:
        """``auth``: check every client's token (see :mod:`roomcast.core.auth`); None: an
        open server, where clients name themselves.

        ``local_first``: a message this node stores goes to its own members at once, not
        after the broker has brought it back — for a broker in another process, where
        that round trip is the longest step between a ``send`` and its delivery.

        ``rate_limit`` (a second, bursts of ``rate_burst``) bounds each connection's
        messages (``send``, ``typing``, ``dm``); ``request_rate_limit`` and
        ``request_rate_burst`` its other requests. 0: no limit."""
        self.node = node
        self.auth = auth
        self.history = history
        self.broker = broker
        self._occupied = OccupiedRooms(presence, clock=time.monotonic)
        self.presence: Presence = WatchedPresence(presence, self._occupied.changed)
        """The presence engine; a membership changed through it makes the next
        ``rooms {occupied}`` read the cluster again (see :mod:`roomcast.core.listing`)."""
        self.hub = hub
        self._clock = clock
        self._rate = rate_limit
        self._burst = max(rate_burst, 1)
        self._request_rate = request_rate_limit
        self._request_burst = max(request_rate_burst, 1)
        self.sequencer = Sequencer(
            history, broker, local=hub.deliver_stored if local_first else None
        )
        self._sessions: dict[ConnId, Session] = {}
        self._posters = Buckets(rate_limit, rate_burst, CALLERS_MAX)
        """The rate of each sender of :meth:`post`."""
        self._readers = Buckets(request_rate_limit, request_rate_burst, CALLERS_MAX)
        """The rate of each reader of the REST API (see :meth:`spend_read`)."""
        self.messages_trimmed = 0
        """Messages this node deleted for retention (see :meth:`trim_history`)."""
        self.messages_deleted = 0
        """Messages deleted through this node by their senders or moderators (see
        :meth:`delete`)."""
        self.messages_edited = 0
        """Edits of messages made through this node (see :meth:`edit`)."""
        self.run = secrets.token_hex(8)
        """This process's token among those that may share its node id (see :meth:`beacon`)."""
        self.shared_id: set[str] = set()
        """The runs of other processes seen with this node id: should be empty."""
        self._id_prefix = secrets.token_hex(6)
        self._message_ids = itertools.count(1)
        self._room_ids: dict[str, RoomId] = {}
        self._room_names: dict[RoomId, str] = {}
        self._by_user: dict[UserId, dict[ConnId, Session]] = {}
        self._ids = itertools.count(1)
        self._requests = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[int]] = {}
        self._announcing: list[tuple[RoomId, bytes, asyncio.Future[None]]] = []
        """Presence events waiting for the announcer's next publish."""
        self._announcer: asyncio.Task[None] | None = None
        self._unremoved: dict[tuple[RoomId | None, ConnId], None] = {}
        """Presence removals that failed (the engine out of reach), in order: (room, conn)
        for a membership, (None, conn) for a registration. Until one is retried (see
        :meth:`retry_removals`), its connection is still listed."""
        self._removed_lately: OrderedDict[tuple[RoomId | None, ConnId], float] = OrderedDict()
        """Presence removals made in the last :data:`REDO_WINDOW` seconds (at most
        :data:`REDO_MAX`), as above, oldest first, with when (monotonic): what
        :meth:`redo_removals` makes again. Older ones are dropped as new ones come, so a
        node that has seen millions of leaves keeps only its last minute's."""

    # -- connections -------------------------------------------------------------------

    def new_conn_id(self) -> ConnId:
        """A connection id unique across the cluster: this node's id and a counter."""
        return ConnId(f"{self.node}.{next(self._ids)}")

    async def connect(self, conn: Connection, name: object, token: object = None) -> Session:
        """Register a connection. On an open server under the nickname ``name``, as a new
        user with a cluster-wide id; on a server that checks tokens as the user ``token``
        proves (``name`` is not read): its id the same on every connect, on every node."""
        identity = None if self.auth is None else await self.auth.check(token)
        if identity is None:
            user = User(await self.history.next_user_id(), validation.nickname(name))
        else:
            try:
                user = User(await self.history.user_id_for(identity.subject), identity.name)
            except UnavailableError as exc:
                raise ChatError(ErrorCode.UNAVAILABLE, "the store is unavailable") from exc
        bucket = TokenBucket(self._rate, self._burst) if self._rate > 0 else None
        requests = (
            TokenBucket(self._request_rate, self._request_burst) if self._request_rate > 0 else None
        )
        session = Session(conn, user, identity=identity, bucket=bucket, requests=requests)
        try:
            await self.presence.register(Member(user, conn.id, self.node))
        except UnavailableError as exc:
            raise ChatError(ErrorCode.UNAVAILABLE, "presence is unavailable, try again") from exc
        self._sessions[conn.id] = session
        self._by_user.setdefault(user.id, {})[conn.id] = session
        return session

    async def refresh(self, session: Session, token: object) -> tuple[Identity, list[Room]]:
        """Give a connection a newer token of its user, before its own expires: the
        connection lives until the new one's ``exp``, and may enter the rooms the new one
        names — it leaves (announced) those of its rooms the new token no longer names.
        The new identity and the rooms left. A token of another user is ``forbidden``
        (connect again with it), an invalid one ``unauthorized``: nothing changes."""
        if self.auth is None or session.identity is None:
            raise ChatError(ErrorCode.BAD_REQUEST, "this server checks no tokens")
        identity = await self.auth.check(token)
        if identity.subject != session.identity.subject:
            raise ChatError(
                ErrorCode.FORBIDDEN, "the token is another user's: connect again with it"
            )
        session.identity = identity
        left: list[Room] = []
        for room_id in list(session.rooms):
            room = await self.resolve(room_id)
            if not identity.may_enter(room.name):
                await self._leave(session, room_id)
                left.append(room)
        return identity, left

    @staticmethod
    def check_entry(identity: Identity | None, room: Room) -> None:
        """``forbidden`` unless the identity may enter the room (anyone may on an open
        server): what a join, and a read of a room's history or members, checks."""
        if identity is not None and not identity.may_enter(room.name):
            raise ChatError(ErrorCode.FORBIDDEN, f"your token does not let you into {room.name!r}")

    def sessions(self) -> list[ConnId]:
        """The connections of this node."""
        return list(self._sessions)

    def session(self, conn_id: ConnId) -> Session:
        session = self._sessions.get(conn_id)
        if session is None:
            raise ChatError(ErrorCode.BAD_REQUEST, "not connected")
        return session

    async def disconnect(self, conn_id: ConnId) -> None:
        """A disconnect is a leave of every room, for presence."""
        session = self._sessions.pop(conn_id, None)
        if session is None:
            return
        same_user = self._by_user.get(session.user.id, {})
        same_user.pop(conn_id, None)
        if not same_user:
            self._by_user.pop(session.user.id, None)
        for room_id in list(session.rooms):
            await self._leave(session, room_id)
        await self._remove_presence(None, conn_id)

    # -- rooms -------------------------------------------------------------------------

    async def resolve(self, ref: RoomId | str, *, create: bool = False) -> Room:
        """The room a ``room`` field names: a numeric id, or a name (created on join).

        Read from the store, so the room's epoch is current."""
        try:
            if isinstance(ref, str):
                room = await self.history.room_by_name(ref, create=create)
            else:
                room = await self.history.room_by_id(ref)
        except UnavailableError as exc:
            raise ChatError(ErrorCode.UNAVAILABLE, "the room store is unavailable") from exc
        if room is None:
            raise ChatError(ErrorCode.NOT_FOUND, f"no room {ref!r}")
        self._remember(room)
        return room

    async def _entered(
        self, ref: RoomId | str, identity: Identity | None, *, create: bool = False
    ) -> Room:
        """The room (as :meth:`resolve`) if the identity may enter it, else ``forbidden``;
        a name the identity may not enter is refused before the room is made."""
        if identity is not None and isinstance(ref, str) and not identity.may_enter(ref):
            raise ChatError(ErrorCode.FORBIDDEN, f"your token does not let you into {ref!r}")
        room = await self.resolve(ref, create=create)
        self.check_entry(identity, room)
        return room

    def _remember(self, room: Room) -> None:
        if len(self._room_ids) >= ROOM_CACHE:
            self._room_ids.clear()
            self._room_names.clear()
        self._room_ids[room.name] = room.id
        self._room_names[room.id] = room.name

    async def _room_id(self, ref: RoomId | str) -> tuple[RoomId, str]:
        """A room's id and name. A room's id and name never change, so after the first
        look-up this costs no store round trip (the hot path of ``send``)."""
        room_id = self._room_ids.get(ref) if isinstance(ref, str) else ref
        name = self._room_names.get(room_id) if room_id is not None else None
        if room_id is None or name is None:
            room = await self.resolve(ref)
            return room.id, room.name
        return room_id, name

    async def join(
        self,
        session: Session,
        ref: RoomId | str,
        since: Position | None = None,
        *,
        members: bool = True,
    ) -> JoinResult:
        """Make the session a member of the room (made if it does not exist) and announce
        it. The result lists the room's members on every node, or with ``members=False``
        only counts them: in a room of thousands, a join that lists them reads and sends
        every one (~5 ms for 5,000 on Redis), and a storm of such joins costs the square
        of the room's size."""
        room = await self._entered(ref, session.identity, create=True)
        if room.id in session.rooms:
            await self._leave(session, room.id, announce=False)
        if not self.broker.healthy:
            raise ChatError(ErrorCode.UNAVAILABLE, "the broker is unavailable, try again")
        conn = session.conn
        try:
            await self.hub.begin_join(room.id, conn)
        except UnavailableError as exc:
            raise ChatError(ErrorCode.UNAVAILABLE, "the broker is unavailable") from exc
        try:
            member = Member(session.user, conn.id, self.node)
            await self.presence.add(room.id, member)
            seq = await self.history.latest(room.id)
            recovered: bool | None = None
            missed: list[Message] = []
            changed: list[Message] = []
            if since is not None:
                recovered, missed, changed = await self._recover(room, since, seq)
            listed: list[User] | None = None
            count: int | None = None
            if members:
                listed = await self._members_noted(room.id)
            else:
                if not self.hub.knows_roster(room.id):
                    await self._members_noted(room.id)  # once per room a node has members in
                count = (await self.presence.counts([room.id])).get(room.id, 0)
            # Announced while the joiner is still held, so its own copy of the event
            # reaches it after the join reply, like every frame that follows.
            await self._publish_presence(room.id, "join", session.user)
        except BaseException:
            self.hub.detach(room.id, conn)
            await self._remove_presence(room.id, conn.id)
            raise
        if self._sessions.get(conn.id) is not session:
            # The connection closed while it joined: its disconnect left the rooms it was
            # in by then, not this one. Undone here, or its entry would stay listed (and
            # its node subscribed) for as long as the node lives.
            self.hub.detach(room.id, conn)
            await self._remove_presence(room.id, conn.id)
            await self._publish_presence(room.id, "leave", session.user)
            raise ChatError(ErrorCode.BAD_REQUEST, "not connected")
        session.rooms.add(room.id)
        return JoinResult(room, seq, listed, recovered, missed, count, changed)

    def activate(self, session: Session, join: JoinResult) -> list[Frame]:
        """Make a joined connection a live member of the room.

        Transports call this right after writing the join reply, and write the returned
        frames (what arrived during the join and is newer than the reply) before anything
        else, so the client sees the reply, then every later frame once, in order.
        """
        if join.room.id not in session.rooms:
            return []
        return self.hub.activate(join.room.id, session.conn, after=join.seq)

    async def _recover(
        self, room: Room, since: Position, seq: int
    ) -> tuple[bool, list[Message], list[Message]]:
        """Whether the client at ``since`` recovers, what it missed after it, and which of
        the messages it holds were edited or deleted while it was away.

        When it was away is not known, but it had every change made before it got its
        message ``since.seq`` (live, or as the messages and changes of a recovery), so
        changes from that message's ``ts`` on (less :data:`CHANGE_SKEW`, two nodes' clocks
        apart) are enough; the client applies one it had seen again, unchanged."""
        if since.epoch != room.epoch or since.seq > seq:
            return False, [], []
        if seq - since.seq > RECOVERY_LIMIT:
            return False, [], []
        if since.seq == 0:
            missed = await self.history.after(room.id, 0, seq)
            last = None
        else:  # the client's last message too, for its ts
            read = await self.history.after(room.id, since.seq - 1, seq - since.seq + 1)
            last = read[0] if read and read[0].seq == since.seq else None
            missed = read[1:] if last is not None else read
        # Recovered only if the store returned exactly the gapless range.
        if len(missed) != seq - since.seq:
            return False, [], []
        if last is None:  # nothing held, or retention took all the client holds
            return True, missed, []
        since_ms = last.ts - CHANGE_SKEW
        changed = await self.history.changed(room.id, since.seq, since_ms, CHANGES_MAX + 1)
        if len(changed) > CHANGES_MAX:
            return False, [], []
        return True, missed, changed

    async def leave(self, session: Session, ref: RoomId | str) -> Room:
        room = await self.resolve(ref)
        if room.id not in session.rooms:
            raise ChatError(ErrorCode.NOT_MEMBER, f"not a member of room {room.name!r}")
        await self._leave(session, room.id)
        return room

    async def _leave(self, session: Session, room_id: RoomId, *, announce: bool = True) -> None:
        session.rooms.discard(room_id)
        self.hub.detach(room_id, session.conn)
        await self._remove_presence(room_id, session.conn.id)
        if announce and not await self._still_in(room_id, session.user, session.conn.id):
            await self._publish_presence(room_id, "leave", session.user)

    async def _still_in(self, room_id: RoomId, user: User, leaving: ConnId | None) -> bool:
        """Whether ``user`` is still in the room through another connection (on any node),
        so that its ``leave`` must not be told: a user of a token can be connected more
        than once (two tabs, a phone), and members list users, not connections. Read
        after the connection's entry is gone, so of two connections leaving at once at
        least one sees the other gone. On an open server every connection is a user of
        its own: nothing to read."""
        if self.auth is None:
            return False
        if any(
            room_id in other.rooms
            for conn, other in self._by_user.get(user.id, {}).items()
            if conn != leaving
        ):
            return True
        try:
            if not [m for m in await self.presence.locate(user.id) if m.conn != leaving]:
                # No other connection. A login of the gRPC door is none (it keeps a record
                # in room -id instead, see roomcast.transports.grpc.users).
                if not await self.presence.members(RoomId(-user.id)):
                    return False  # its only connection (the usual case): no room to read
            return any(
                m.user.id == user.id and m.conn != leaving
                for m in await self.presence.members(room_id)
            )
        except UnavailableError:
            return False  # told: a leave too many is corrected by the next roster read

    @staticmethod
    def _spend(session: Session) -> None:
        if session.bucket is not None and not session.bucket.take():
            raise ChatError(ErrorCode.RATE_LIMITED, "too many requests, slow down")

    @staticmethod
    def spend_request(session: Session) -> None:
        """Count a request other than a message (``join``, ``leave``, ``history``,
        ``rooms``, ``members``) against the connection's request rate; raises
        ``RATE_LIMITED`` past it. Transports call it before they handle the request, so a
        client stuck in a loop of joins or listings is slowed down before it costs the
        node (and every member of the room it joins and leaves) more than its rate."""
        if session.requests is not None and not session.requests.take():
            raise ChatError(ErrorCode.RATE_LIMITED, "too many requests, slow down")

    async def send(
        self, session: Session, ref: RoomId | str, text: object, message_id: object = None
    ) -> Message:
        """Store a message in a room the session is a member of and deliver it to every
        member; the stored message, with its ``seq``, once it is durable.

        ``message_id``, if given, is the message's id, chosen by the sender so that it can
        send again what got no answer: a send whose id the room holds already (among its
        newest :data:`~roomcast.core.ports.RETRY_WINDOW`) stores nothing and answers with
        that message — or ``conflict`` if that message has another text or sender name.
        """
        # The lock is the first suspension point: requests handled in arrival order reach
        # it in arrival order, and asyncio.Lock wakes its waiters first come, first served.
        async with session.sending:
            body = validation.text({"text": text})
            chosen = validation.message_id({"id": message_id})
            self._spend(session)
            room_id = await self._member_room(session, ref)
            if not self.broker.healthy:
                raise ChatError(ErrorCode.UNAVAILABLE, "the broker is unavailable, try again")
            if chosen is None:
                draft = Draft(room_id, self._message_id(), session.user, body, self._now_ms())
            else:
                draft = Draft(room_id, chosen, session.user, body, self._now_ms(), chosen=True)
            return await self.sequencer.append(draft)

    def spend_read(self, source: str) -> None:
        """Count a read of the REST API (rooms, history, members) against its caller's
        ``request_rate_limit``, as a connection's reads count against its own; ``source``
        is the caller, as for :meth:`post`. ``rate_limited`` past it."""
        if not self._readers.take(source):
            raise ChatError(ErrorCode.RATE_LIMITED, "too many requests, slow down")

    async def post(
        self,
        ref: RoomId | str,
        text: object,
        message_id: object = None,
        *,
        identity: Identity | None,
        name: object = None,
        source: str,
    ) -> Message:
        """Store and deliver a message sent without a connection: by an application's
        backend, a bot or a script, over the REST API. The room must exist; the sender
        need not be a member. On a server that checks tokens the sender is the token's
        user; on an open server it names itself (``name``), a new user as each connection
        is. ``message_id`` makes a retry safe, as on :meth:`send`. ``source`` is who sends,
        for the rate limit: the user on a server that checks tokens, else the client's
        address."""
        body = validation.text({"text": text})
        chosen = validation.message_id({"id": message_id})
        if identity is None and self.auth is not None:
            raise ChatError(ErrorCode.UNAUTHORIZED, "a token is required")
        if identity is None and name is None:
            raise ChatError(
                ErrorCode.INVALID_NAME,
                "'name' is required: on an open server a sender names itself",
            )
        nick = validation.nickname(name) if identity is None else identity.name
        if not self._posters.take(source):
            raise ChatError(ErrorCode.RATE_LIMITED, "too many messages, slow down")
        room = await self._entered(ref, identity)
        if not self.broker.healthy:
            raise ChatError(ErrorCode.UNAVAILABLE, "the broker is unavailable, try again")
        try:
            if identity is None:
                user = User(await self.history.next_user_id(), nick)
            else:
                user = User(await self.history.user_id_for(identity.subject), nick)
        except UnavailableError as exc:
            raise ChatError(ErrorCode.UNAVAILABLE, "the store is unavailable") from exc
        if chosen is None:
            draft = Draft(room.id, self._message_id(), user, body, self._now_ms())
        else:
            draft = Draft(room.id, chosen, user, body, self._now_ms(), chosen=True)
        return await self.sequencer.append(draft)

    def _message_id(self) -> str:
        # Unique across the cluster: a random prefix per node process and a counter.
        return f"{self._id_prefix}{next(self._message_ids):x}"

    async def typing(self, session: Session, ref: RoomId | str) -> None:
        room_id = await self._member_room(session, ref)
        self._spend(session)
        await self._publish(room_id, typing_frame(room_id, session.user))

    async def delete(self, session: Session, ref: RoomId | str, seq: object) -> Message:
        """Delete the room's message ``seq``: the session's own, or any message on a
        moderator's token (the ``moderator`` claim). The message keeps its place and
        loses its text, for good; every member of the room is told (a ``deleted``
        event). Membership is not required, but on a server that checks tokens the
        token must let its user into the room. Counts as a message against the
        connection's rate. Deleting a deleted message tells the room again."""
        number = validation.seq({"seq": seq})
        self._spend(session)
        room = await self._entered(ref, session.identity)
        moderator = session.identity is not None and session.identity.moderator
        owner = None if moderator else session.user.id
        return await self._delete(room, number, session.user, owner)

    async def remove(
        self, ref: RoomId | str, seq: object, *, identity: Identity | None, source: str
    ) -> Message:
        """Delete the room's message ``seq`` without a connection (the REST API): on a
        server that checks tokens as :meth:`delete` lets the token's user; an open server
        trusts its callers as it does for :meth:`post`, and deletes any message. ``source``
        is the caller, for the rate limit, as for :meth:`post`."""
        number = validation.seq({"seq": seq})
        room, user = await self._changer(ref, identity, source)
        if identity is None or user is None:
            return await self._delete(room, number, None, None)
        return await self._delete(room, number, user, None if identity.moderator else user.id)

    async def _changer(
        self, ref: RoomId | str, identity: Identity | None, source: str
    ) -> tuple[Room, User | None]:
        """The room of a REST request that changes a message, and who asks: the token's
        user, or None on an open server (which trusts its callers). ``unauthorized``
        without a token where one is needed, ``rate_limited`` past the caller's rate (the
        senders' rate, see :meth:`post`), ``forbidden`` outside the token's rooms."""
        if identity is None and self.auth is not None:
            raise ChatError(ErrorCode.UNAUTHORIZED, "a token is required")
        if not self._posters.take(source):
            raise ChatError(ErrorCode.RATE_LIMITED, "too many messages, slow down")
        room = await self._entered(ref, identity)
        if identity is None:
            return room, None
        try:
            return room, User(await self.history.user_id_for(identity.subject), identity.name)
        except UnavailableError as exc:
            raise ChatError(ErrorCode.UNAVAILABLE, "the store is unavailable") from exc

    async def _delete(self, room: Room, seq: int, by: User | None, owner: UserId | None) -> Message:
        """Delete message ``seq`` of the room if ``owner`` (None: anyone's) sent it, and
        tell the room."""
        if not self.broker.healthy:
            raise ChatError(ErrorCode.UNAVAILABLE, "the broker is unavailable, try again")
        try:
            message = await self.history.get(room.id, seq)
            if message is not None and owner is not None and message.user.id != owner:
                raise ChatError(
                    ErrorCode.FORBIDDEN,
                    "only the sender of a message, or a moderator, may delete it",
                )
            if message is None:
                deleted = None
            else:
                deleted = await self.history.delete(room.id, seq, self._now_ms())
        except UnavailableError as exc:
            raise ChatError(ErrorCode.UNAVAILABLE, "the message store is unavailable") from exc
        if message is None or deleted is None:
            raise ChatError(
                ErrorCode.NOT_FOUND, f"room {room.name!r} holds no message {seq} (any more)"
            )
        if not message.deleted:
            self.messages_deleted += 1
        await self._tell(room, deleted_frame(deleted, by), "deleted", "delete")
        return deleted

    async def _tell(self, room: Room, frame: Frame, done: str, again: str) -> None:
        """Publish the news of a change made to a message of the room; ``unavailable``
        (saying the change was made, and to make it ``again``) if the broker fails."""
        try:
            await self.broker.publish(room.id, frame.encode())
        except Exception as exc:
            log.warning("publish to room %s of a message %s failed", room.id, done, exc_info=True)
            raise ChatError(
                ErrorCode.UNAVAILABLE,
                f"the message was {done}, but its room could not be told: {again} it again",
            ) from exc

    async def edit(self, session: Session, ref: RoomId | str, seq: object, text: object) -> Message:
        """Replace the text of the session's own message ``seq`` of the room (no one else
        may, moderators included): it keeps its place, and says when it was last edited;
        every member of the room is told (an ``edited`` event with the message as it is
        now). A deleted message cannot be edited. Membership is not required, but on a
        server that checks tokens the token must let its user into the room. Counts as a
        message against the connection's rate."""
        number = validation.seq({"seq": seq})
        body = validation.text({"text": text})
        self._spend(session)
        room = await self._entered(ref, session.identity)
        return await self._edit(room, number, body, session.user.id)

    async def revise(
        self,
        ref: RoomId | str,
        seq: object,
        text: object,
        *,
        identity: Identity | None,
        source: str,
    ) -> Message:
        """Edit the room's message ``seq`` without a connection (the REST API): on a server
        that checks tokens only the token's user's own message, as :meth:`edit`; an open
        server trusts its callers as it does for :meth:`post`. ``source`` is the caller,
        for the rate limit, as for :meth:`post`."""
        number = validation.seq({"seq": seq})
        body = validation.text({"text": text})
        room, user = await self._changer(ref, identity, source)
        return await self._edit(room, number, body, None if user is None else user.id)

    async def _edit(self, room: Room, seq: int, text: str, owner: UserId | None) -> Message:
        """Edit message ``seq`` of the room if ``owner`` (None: anyone) sent it, and tell
        the room."""
        if not self.broker.healthy:
            raise ChatError(ErrorCode.UNAVAILABLE, "the broker is unavailable, try again")
        gone = ChatError(ErrorCode.NOT_FOUND, f"room {room.name!r} holds no message {seq}")
        try:
            message = await self.history.get(room.id, seq)
            if message is None:
                raise gone
            if owner is not None and message.user.id != owner:
                raise ChatError(ErrorCode.FORBIDDEN, "only the sender of a message may edit it")
            edited = None
            if not message.deleted:
                edited = await self.history.edit(room.id, seq, text, self._now_ms())
        except UnavailableError as exc:
            raise ChatError(ErrorCode.UNAVAILABLE, "the message store is unavailable") from exc
        if edited is None:  # deleted, before or meanwhile; or let go by retention meanwhile
            raise ChatError(ErrorCode.NOT_FOUND, f"message {seq} of {room.name!r} was deleted")
        self.messages_edited += 1
        await self._tell(room, edited_frame(edited), "edited", "edit")
        return edited

    async def history_page(
        self, ref: RoomId | str, before: int | None, limit: int, identity: Identity | None = None
    ) -> list[Message]:
        """The newest ``limit`` messages of the room below ``before``, ascending; for an
        ``identity``, only of a room its token lets it into."""
        room = await self._entered(ref, identity)
        try:
            return await self.history.before(room.id, before, limit)
        except UnavailableError as exc:
            raise ChatError(ErrorCode.UNAVAILABLE, "the message store is unavailable") from exc

    async def rooms(
        self,
        *,
        occupied: bool = False,
        after: RoomId | None = None,
        limit: int | None = None,
        identity: Identity | None = None,
    ) -> list[RoomInfo]:
        """Every room ever made, by id, with its member count across the cluster — a read
        of every room and of its count; ``after`` and ``limit`` page through them (the
        first ``limit`` rooms with an id above ``after``), each page a read of its rooms
        only. With ``occupied``, only the rooms with members, most members first (the
        first ``limit`` of them): a read of the cluster's memberships, whatever the number
        of rooms (what a list of rooms to show people wants), shared by the callers of
        about a second — this node's own joins and leaves show at once, other nodes'
        within the second (see :class:`~roomcast.core.listing.OccupiedRooms`).

        For an ``identity`` whose token names its rooms, only those rooms are listed (a
        page may then hold fewer than ``limit``)."""
        if not occupied:
            rooms = _visible(identity, await self.history.rooms(after=after, limit=limit))
            counts = await self.presence.counts([r.id for r in rooms])
            return [RoomInfo(room, counts.get(room.id, 0)) for room in rooms]
        # Rooms with ids below 1 are records a door keeps in presence, not rooms.
        counts = {room: n for room, n in (await self._occupied.get()).items() if room > 0}
        found = _visible(identity, await self.history.rooms(list(counts)) if counts else [])
        infos = [RoomInfo(room, counts[room.id]) for room in found]
        infos.sort(key=lambda info: (-info.members, info.room.id))
        return infos if limit is None else infos[:limit]

    async def rooms_page(
        self, after: RoomId | None, limit: int, identity: Identity | None = None
    ) -> tuple[list[RoomInfo], RoomId | None]:
        """The first ``limit`` rooms with an id above ``after`` (every room: 0), with their
        member counts, and the ``after`` of the next page (None when no room follows);
        for an ``identity``, only the rooms its token lets it into of those."""
        found = await self.history.rooms(after=after, limit=limit + 1)
        page = _visible(identity, found[:limit])
        counts = await self.presence.counts([room.id for room in page])
        infos = [RoomInfo(room, counts.get(room.id, 0)) for room in page]
        return infos, found[limit - 1].id if len(found) > limit else None

    async def members(
        self,
        ref: RoomId | str,
        *,
        after: UserId | None = None,
        limit: int | None = None,
        identity: Identity | None = None,
    ) -> tuple[Room, list[User], UserId | None]:
        """The room and its members on every node, each user once, in join order. With
        ``after`` or ``limit``: by user id, the first ``limit`` (None: all) with an id above
        ``after``, and the ``after`` of the next page (None when no member follows). Each
        call reads every membership of the room: a page bounds the answer, not the read.
        For an ``identity``, only of a room its token lets it into."""
        room = await self._entered(ref, identity)
        users = await self._members(room.id)
        if after is None and limit is None:
            return room, users, None
        ranked = sorted((u for u in users if after is None or u.id > after), key=lambda u: u.id)
        if limit is None or len(ranked) <= limit:
            return room, ranked, None
        page = ranked[:limit]
        return room, page, page[-1].id

    # -- direct messages -------------------------------------------------------------

    async def dm(self, session: Session, to: int, text: object) -> dict[str, object]:
        """Send a direct message to a user on any node.

        Acknowledged only once at least one live connection of the user has been handed
        the message; otherwise a ``not_found`` (no such connected user) or ``unavailable``
        error, and nothing was delivered.
        """
        body = validation.text({"text": text})
        self._spend(session)
        try:
            targets = await self.presence.locate(UserId(to))
        except UnavailableError as exc:
            raise ChatError(ErrorCode.UNAVAILABLE, "presence is unavailable") from exc
        if not targets:
            raise ChatError(ErrorCode.NOT_FOUND, f"user {to} is not connected")
        message = {
            "id": self._message_id(),
            "from": session.user.to_wire(),
            "to": to,
            "text": body,
            "ts": self._now_ms(),
        }
        frame = dm_frame(message)
        nodes = {m.node for m in targets}
        delivered = 0
        if self.node in nodes:
            nodes.discard(self.node)
            delivered += await self._deliver_to_user(UserId(to), frame)
        if nodes:
            delivered += await self._ask_nodes(nodes, UserId(to), frame)
        if not delivered:
            raise ChatError(ErrorCode.UNAVAILABLE, f"user {to} could not be reached, try again")
        return message

    async def _ask_nodes(self, nodes: set[NodeId], user: UserId, frame: Frame) -> int:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[int]] = []
        for node in nodes:
            request = next(self._requests)
            future: asyncio.Future[int] = loop.create_future()
            self._waiting[request] = future
            futures.append(future)
            envelope = DeliverRequest(request, self.node, user, frame.encode())
            try:
                await self.broker.send(node, envelope.encode())
            except Exception:
                log.warning("direct message to node %s failed", node, exc_info=True)
                future.set_result(0)
        try:
            done, _ = await asyncio.wait(futures, timeout=DM_TIMEOUT)
            return sum(f.result() for f in done)
        finally:
            for request in [r for r, f in self._waiting.items() if f in futures]:
                del self._waiting[request]

    async def _deliver_to_user(self, user: UserId, frame: Frame) -> int:
        sessions = list(self._by_user.get(user, {}).values())
        for target in sessions:
            await target.conn.transport.deliver_one(frame, target.conn)
        return len(sessions)

    async def on_inbox(self, data: bytes) -> None:
        """The broker's inbox handler: requests from other nodes, and their answers."""
        try:
            envelope = decode_envelope(data)
        except (ValueError, UnicodeDecodeError):
            log.warning("dropped a malformed inbox frame (%d bytes)", len(data))
            return
        if isinstance(envelope, RunBeacon):
            if envelope.run != self.run and envelope.run not in self.shared_id:
                self.shared_id.add(envelope.run)
                log.error(
                    "another process runs as node %s: node ids must be unique, or the "
                    "nodes take each other's members for their own (its run %s, ours %s)",
                    self.node, envelope.run, self.run,
                )  # fmt: skip
            return
        if isinstance(envelope, DeliverAnswer):
            future = self._waiting.get(envelope.request)
            if future is not None and not future.done():
                future.set_result(envelope.delivered)
            return
        try:
            frame = Frame.decode(envelope.frame)
        except (ValueError, KeyError):
            delivered = 0
        else:
            delivered = await self._deliver_to_user(UserId(envelope.user), frame)
        answer = DeliverAnswer(envelope.request, delivered)
        try:
            await self.broker.send(NodeId(envelope.reply_to), answer.encode())
        except Exception:
            log.warning("answer to node %s failed", envelope.reply_to, exc_info=True)

    async def beacon(self) -> None:
        """Send this process's run to the node's own inbox. Every process subscribed to
        it receives the beacon: one with another run (see :attr:`shared_id`) was given
        this node id too."""
        await self.broker.send(self.node, RunBeacon(self.run).encode())

    # -- listeners without a session (the gRPC door's streams) ---------------------

    async def watch(self, room_id: RoomId, conn: Connection) -> list[Frame]:
        """Receive a room's live frames on ``conn`` without a presence entry (the caller
        keeps membership itself). Returns what arrived while subscribing; write it first."""
        try:
            await self.hub.begin_join(room_id, conn)
            latest = await self.history.latest(room_id)
        except UnavailableError as exc:
            self.hub.detach(room_id, conn)
            raise ChatError(ErrorCode.UNAVAILABLE, "the broker is unavailable") from exc
        except BaseException:
            self.hub.detach(room_id, conn)
            raise
        if not self.hub.knows_roster(room_id):
            try:
                await self._members_noted(room_id)  # once per room a node has members in
            except Exception:
                # Presence out of reach: the stream opens all the same; the next join or
                # stream of the room reads the roster again.
                log.warning("reading the members of room %s failed", room_id, exc_info=True)
            except BaseException:  # cancelled
                self.hub.detach(room_id, conn)
                raise
        return self.hub.activate(room_id, conn, after=latest)

    def unwatch(self, room_id: RoomId, conn: Connection) -> None:
        self.hub.detach(room_id, conn)

    async def announce(self, room_id: RoomId, event: str, user: User) -> None:
        """Publish a presence event (``join`` / ``leave``) of a user to a room."""
        await self._publish_presence(room_id, event, user)

    # -- cluster -----------------------------------------------------------------------

    async def restore_presence(self, *, announce: bool = False) -> None:
        """Write this node's entries again (after the presence engine lost them, e.g. a
        Redis restart). Adding an entry that exists is harmless. With ``announce`` (the
        entries may have been gone: the node had been taken for dead, and the other nodes
        told the rooms its members left), each membership is announced again with a
        ``join``."""
        joins: list[tuple[RoomId, User]] = []
        for session in list(self._sessions.values()):
            member = Member(session.user, session.conn.id, self.node)
            await self._quiet(self.presence.register(member))
            for room_id in list(session.rooms):
                await self._quiet(self.presence.add(room_id, member))
                joins.append((room_id, session.user))
        if announce and joins:
            # One announcer batch, not a broker round trip each (failures are logged).
            await asyncio.gather(*(self._publish_presence(r, "join", u) for r, u in joins))

    async def announce_departed(self, removed: list[tuple[RoomId, Member]]) -> None:
        """Send leave events for members whose owner died (found by the reaper). Rooms
        with ids below 1 are records a door keeps in presence, not rooms."""
        for room_id, member in removed:
            if room_id > 0 and not await self._still_in(room_id, member.user, None):
                await self._publish_presence(room_id, "leave", member.user)
        for room_id in dict.fromkeys(room_id for room_id, _ in removed if room_id > 0):
            await self._republish_last(room_id)

    async def _republish_last(self, room_id: RoomId) -> None:
        """Publish the room's last stored message again, after a node that had members in
        it died: it may have stored messages there that it never published. Every node
        that lacks it sees the gap and fills it from history; one that has it drops the
        copy. Without this, such a message would reach members only when the room's next
        message showed the gap — in a quiet room, not for as long as it stays quiet."""
        try:
            latest = await self.history.latest(room_id)
            last = await self.history.after(room_id, latest - 1, 1) if latest > 0 else []
            if last:
                await self.broker.publish_many([(room_id, message_frame(last[0]).encode())])
        except Exception:
            log.warning("publishing room %s's last message again failed", room_id, exc_info=True)

    # -- helpers -----------------------------------------------------------------------

    async def _member_room(self, session: Session, ref: RoomId | str) -> RoomId:
        room_id, name = await self._room_id(ref)
        if room_id not in session.rooms:
            raise ChatError(ErrorCode.NOT_MEMBER, f"join room {name!r} first")
        return room_id

    async def _members_noted(self, room_id: RoomId) -> list[User]:
        """The room's members (as :meth:`_members`); a room whose roster this node does not
        know yet learns it from this read (see :meth:`~roomcast.core.hub.Hub.end_roster_read`)."""
        if self.hub.knows_roster(room_id):
            return await self._members(room_id)
        read = self.hub.begin_roster_read(room_id)
        users: list[User] | None = None
        try:
            users = await self._members(room_id)
        finally:
            missed = [] if read is None else self.hub.end_roster_read(room_id, read, users)
        if missed:
            await self.hub.deliver_presence(missed)
        return users

    async def trim_history(
        self,
        *,
        keep: int | None = None,
        max_age: float | None = None,
        stopping: asyncio.Event | None = None,
    ) -> int:
        """One retention pass: in every room, delete the oldest messages but the newest
        ``keep`` and those older than ``max_age`` seconds (see :meth:`History.trim`), a
        batch at a time so appends take turns with it. Stops early once ``stopping`` is
        set. Returns how many messages it deleted.

        Every node of a cluster makes its own passes; the deletions are the same whoever
        makes them, so two nodes at once only do some of the work twice."""
        if keep is None and max_age is None:
            return 0
        before_ms = None if max_age is None else self._now_ms() - int(max_age * 1000)
        deleted, after = 0, None
        while not (stopping is not None and stopping.is_set()):
            page = await self.history.oldest(after=after, limit=TRIM_ROOMS_PAGE)
            for room in page:
                if (keep is None or room.first_seq > room.seq - keep) and (
                    before_ms is None or room.first_ts >= before_ms
                ):
                    continue  # nothing of it to let go: no write
                while not (stopping is not None and stopping.is_set()):
                    count = await self.history.trim(
                        room.room, keep=keep, before_ms=before_ms, limit=TRIM_BATCH
                    )
                    deleted += count
                    self.messages_trimmed += count
                    if count < TRIM_BATCH:
                        break
                    await asyncio.sleep(0)  # what waits to append goes first
            if len(page) < TRIM_ROOMS_PAGE:
                break
            after = page[-1].room
        return deleted

    async def resync(self) -> None:
        """After the broker was out of reach, or dropped frames: deliver from history every
        message the local rooms missed, then tell their members of the joins and leaves
        they missed — each room's members in presence compared with what its members here
        were told (a read of presence per room)."""
        await self.hub.resync()
        reads = asyncio.Semaphore(ROSTER_READS)
        await asyncio.gather(
            *(self._correct_roster(room_id, reads) for room_id in self.hub.rooms_with_members())
        )

    async def _correct_roster(self, room_id: RoomId, reads: asyncio.Semaphore) -> None:
        """Read a room's members and tell its members here the difference (see
        :meth:`resync`)."""
        async with reads:
            read = self.hub.begin_roster_read(room_id)
            if read is None:
                return
            users: list[User] | None = None
            try:
                users = await self._members(room_id)
            except Exception:
                log.warning("reading the members of room %s failed", room_id, exc_info=True)
            finally:
                missed = self.hub.end_roster_read(room_id, read, users)
        if missed:
            await self.hub.deliver_presence(missed)

    async def _members(self, room_id: RoomId) -> list[User]:
        seen: dict[int, User] = {}
        for member in await self.presence.members(room_id):
            seen.setdefault(member.user.id, member.user)
        return list(seen.values())

    async def _publish_presence(self, room_id: RoomId, event: str, user: User) -> None:
        """Publish a presence event; returns once it is published (or its publish failed,
        which is logged).

        Events are published by one announcer task: those that queue up while it
        publishes, or within the same turn of the event loop, go in one
        ``publish_many``, and a node hands such a batch to each member of a room as one
        run (one write). After a publish that took a millisecond or more the announcer
        waits as long again (50 ms at most) before the next, so events that trickle in
        gather meanwhile. A storm of joins into a big room — clients reconnecting after
        a deploy — costs each member a write per batch instead of one per joiner."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._announcing.append((room_id, presence_frame(room_id, event, user).encode(), done))
        if self._announcer is None:
            self._announcer = asyncio.create_task(self._announce(), name="roomcast-announcer")
        await done

    async def _announce(self) -> None:
        batch: list[tuple[RoomId, bytes, asyncio.Future[None]]] = []
        try:
            while self._announcing:
                batch, self._announcing = self._announcing, []
                started = time.perf_counter()
                try:
                    await self.broker.publish_many([(room, frame) for room, frame, _ in batch])
                except Exception:
                    log.warning("publishing %d presence events failed", len(batch), exc_info=True)
                for _, _, done in batch:
                    if not done.done():
                        done.set_result(None)
                batch = []
                # A publish that took long (the in-process broker hands a big room's
                # batch to every member within it) is followed by as long a wait, in
                # which the next events gather: a trickle of joins into a big room then
                # costs each member a write per gathered batch, not one per joiner.
                spent = time.perf_counter() - started
                if spent >= PRESENCE_GATHER_FROM:
                    await asyncio.sleep(min(spent, PRESENCE_GATHER_MAX))
        finally:
            self._announcer = None
            # Only when the task is cancelled (the event loop shutting down): no caller
            # is left waiting for an announcement that will not be made.
            for _, _, done in [*batch, *self._announcing]:
                if not done.done():
                    done.set_result(None)
            self._announcing = []

    async def _publish(self, room_id: RoomId, frame: Frame) -> None:
        try:
            await self.broker.publish(room_id, frame.encode())
        except Exception:
            log.warning("publish to room %s failed", room_id, exc_info=True)

    def _removal(self, room_id: RoomId | None, conn_id: ConnId) -> Awaitable[None]:
        """Presence's removal of a membership, or with no room of a registration."""
        if room_id is None:
            return self.presence.unregister(conn_id)
        return self.presence.remove(room_id, conn_id)

    async def _remove_presence(self, room_id: RoomId | None, conn_id: ConnId) -> None:
        """Remove a membership (or, with no room, a registration) from presence; if the
        engine cannot be reached, keep it for the heartbeat to retry."""
        try:
            await self._removal(room_id, conn_id)
        except Exception as exc:
            # No traceback: a thousand clients dropping while the engine is away would
            # otherwise hold the event loop formatting them.
            log.warning("removing %s from presence failed, to be retried: %s", conn_id, exc)
            if len(self._unremoved) < UNREMOVED_MAX:
                self._unremoved[(room_id, conn_id)] = None
        else:
            self._removed(room_id, conn_id)

    def _removed(self, room_id: RoomId | None, conn_id: ConnId) -> None:
        lately, key, now = self._removed_lately, (room_id, conn_id), time.monotonic()
        lately[key] = now
        lately.move_to_end(key)  # the dict stays in time order
        self._forget_removals(now - REDO_WINDOW)

    def _forget_removals(self, cutoff: float) -> None:
        """Drop the removals made before ``cutoff`` (and the oldest past :data:`REDO_MAX`)."""
        lately = self._removed_lately
        while lately and (len(lately) > REDO_MAX or next(iter(lately.values())) < cutoff):
            lately.popitem(last=False)

    async def redo_removals(self) -> int:
        """Make again the presence removals of the last :data:`REDO_WINDOW` seconds whose
        entries are listed again, and announce their leaves; returns how many.

        For after the engine comes back from an outage: a Redis failover loses the writes
        the dead primary had acknowledged and not yet passed to its replica (replication
        is asynchronous), and a removal lost so would leave its member listed for as long
        as this node lives — no one else removes the entries of a live node. A connection
        back in the room (or still connected, for a registration) stays listed."""
        self._forget_removals(time.monotonic() - REDO_WINDOW)
        lately = self._removed_lately
        by_room: dict[RoomId, set[ConnId]] = {}
        for room_id, conn_id in list(lately):
            session = self._sessions.get(conn_id)
            if session is not None and (room_id is None or room_id in session.rooms):
                continue  # back since
            if room_id is None:
                await self._quiet(self.presence.unregister(conn_id))
            else:
                by_room.setdefault(room_id, set()).add(conn_id)
        redone = 0
        for room_id, conns in by_room.items():
            try:
                listed = await self.presence.members(room_id)
            except Exception as exc:
                log.warning("reading room %s's members to redo removals failed: %s", room_id, exc)
                continue
            for member in listed:
                if member.conn in conns and member.node == self.node:
                    await self._quiet(self.presence.remove(room_id, member.conn))
                    if room_id > 0:  # below 1: records a door keeps in presence
                        await self._publish_presence(room_id, "leave", member.user)
                    redone += 1
        if redone:
            log.warning("removed %d members again that presence had lost the removal of", redone)
        return redone

    async def retry_removals(self, budget: float | None = None) -> int:
        """Retry the presence removals that failed, in order, until one fails again (the
        engine still out of reach): it moves to the end and the rest wait for the next
        call. A connection back in the room (or still connected, for a registration)
        stays listed. With a ``budget`` (seconds) it stops once that is spent (after one
        at least), so a long backlog never holds up the heartbeat that calls it. Returns
        how many are still to do."""
        deadline = None if budget is None else time.monotonic() + budget
        for key in list(self._unremoved):
            room_id, conn_id = key
            session = self._sessions.get(conn_id)
            if session is None or (room_id is not None and room_id not in session.rooms):
                try:
                    await self._removal(room_id, conn_id)
                except Exception:
                    del self._unremoved[key]
                    self._unremoved[key] = None
                    break
                self._removed(room_id, conn_id)
            del self._unremoved[key]
            if deadline is not None and time.monotonic() >= deadline:
                break  # at least one done per call, however small the budget
        return len(self._unremoved)

    @staticmethod
    async def _quiet(awaitable: object) -> None:
        try:
            await awaitable  # type: ignore[misc]
        except Exception:
            log.warning("presence update failed", exc_info=True)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)
