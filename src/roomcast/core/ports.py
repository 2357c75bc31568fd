"""The narrow interfaces the core calls: Broker, History and Presence.

Each has an in-memory implementation in :mod:`roomcast.adapters.memory` that behaves
correctly and is the reference for the contract tests in ``tests/contract``; the engines
(Redis, RabbitMQ, NATS, SQLite, PostgreSQL) implement the same protocols and are chosen by
URL scheme in :mod:`roomcast.adapters`.

Broker payloads are opaque ``bytes`` (a :class:`roomcast.core.events.Frame` encoded once by
the publishing node); a broker never looks inside them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple, Protocol, runtime_checkable

from .models import ConnId, Draft, Member, Message, NodeId, Room, RoomId, UserId

FrameHandler = Callable[[bytes], Awaitable[None]]
"""Called by a broker for every payload it receives, one at a time, in arrival order
within each room (the order across rooms may differ between nodes)."""

BatchHandler = Callable[[list[bytes]], Awaitable[None]]
"""Takes several room payloads at once, in arrival order: what a broker that can tell
them apart hands over instead of one :data:`FrameHandler` call each (see
``hand_batches_to`` on the in-process, Redis and NATS brokers)."""

ReconnectHandler = Callable[[], Awaitable[None]]
"""Called by a broker once its subscriptions are restored after a lost connection."""


TRIM_ROOMS_PAGE = 500
"""Rooms one :meth:`History.oldest` reads at most."""

TRIM_BATCH = 500
"""Messages one :meth:`History.trim` deletes at most: one short transaction, so a room's
appends never wait long behind the deletion of its old history."""

CHANGE_SKEW = 60_000
"""Milliseconds by which a look for the edits and deletions someone missed reaches back
before the last message it had (see :meth:`History.changed`): the clocks of two nodes,
which stamp messages and changes, may be that far apart."""

CHANGES_MAX = 1000
"""The most changed messages such a look reads; past it, a client reloads history."""

FIND_WINDOW = 100_000
"""How far back :meth:`History.find` looks: a batch whose append failed is among a room's
newest messages, unless this many more were stored since."""


@runtime_checkable
class Broker(Protocol):
    """Moves encoded frames between nodes.

    A node subscribes to a room's channel only while it has local members of the room (the
    :class:`~roomcast.core.hub.Hub` does the ref-counting), so a node with no member of a
    room receives none of its traffic. Every node also has an inbox for frames addressed to
    it alone (direct messages, node-to-node requests).
    """

    async def start(
        self,
        node: NodeId,
        on_room: FrameHandler,
        on_inbox: FrameHandler,
        on_reconnect: ReconnectHandler,
    ) -> None:
        """Connect, and deliver every received room frame to ``on_room`` and every inbox
        frame to ``on_inbox``.

        After a lost connection comes back, the broker restores every subscription itself
        and then awaits ``on_reconnect()``, so the node can fetch from history what it
        missed while the broker was away.
        """
        ...

    async def subscribe(self, room: RoomId) -> None:
        """Start receiving the room's frames. Returns once the subscription is in effect."""
        ...

    async def unsubscribe(self, room: RoomId) -> None:
        """Stop receiving the room's frames."""
        ...

    async def publish(self, room: RoomId, frame: bytes) -> None:
        """Send a frame to every node subscribed to the room (this one included).

        Raises :class:`~roomcast.exceptions.UnavailableError` when the broker cannot be
        reached. Frames published by one node to one room arrive in publish order.
        """
        ...

    async def publish_many(self, frames: Sequence[tuple[RoomId, bytes]]) -> None:
        """:meth:`publish` each ``(room, frame)`` in order, in one round trip where the
        broker allows it (a node publishes a batch of stored messages at once).

        Raises :class:`~roomcast.exceptions.UnavailableError` when the broker cannot be
        reached; any of the frames may then have been published or not.
        """
        ...

    async def send(self, node: NodeId, frame: bytes) -> None:
        """Send a frame to one node's inbox."""
        ...

    @property
    def healthy(self) -> bool:
        """False while the broker is known to be unreachable."""
        ...

    async def close(self) -> None: ...


class Oldest(NamedTuple):
    """A room that holds messages, as :meth:`History.oldest` reads it."""

    room: RoomId
    seq: int
    """The room's last seq."""
    first_seq: int
    """The seq of the oldest message it holds."""
    first_ts: int
    """When that message was stored (ms since the Unix epoch)."""


@runtime_checkable
class History(Protocol):
    """The durable record: rooms, and each room's messages in one order.

    ``append`` gives every message of a room the next ``seq`` (1, 2, 3, ... with no gaps)
    atomically with storing it: once it returns, the messages survive a restart.
    """

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def room_by_name(self, name: str, *, create: bool = False) -> Room | None:
        """The room with this exact name; created (next numeric id, new epoch) if asked."""
        ...

    async def room_by_id(self, room: RoomId) -> Room | None: ...

    async def rooms(
        self,
        ids: Sequence[RoomId] | None = None,
        *,
        after: RoomId | None = None,
        limit: int | None = None,
    ) -> list[Room]:
        """Every room, by id; with ``ids``, those of them that exist. ``after`` and
        ``limit`` page through them (without ``ids``): the first ``limit`` rooms whose id
        is above ``after``."""
        ...

    async def latest(self, room: RoomId) -> int:
        """The room's last ``seq`` (0 for a room with no message)."""
        ...

    async def append(self, drafts: Sequence[Draft]) -> list[Message]:
        """Sequence and store the drafts in one step, in the order given; one message per
        draft, in the drafts' order.

        An id its sender chose (:attr:`~roomcast.core.models.Draft.chosen`) is unique in
        its room: a draft with one that the room, or an earlier draft of the batch, holds
        already is not stored again, and that message stands in its place (the caller
        tells whether it is the same one). Deciding this and storing are one step, so two
        nodes storing the same retry at once store it once. Ids the server chose are
        unique by construction and are not looked up. A reset forgets the room's ids."""
        ...

    async def after(self, room: RoomId, seq: int, limit: int) -> list[Message]:
        """Up to ``limit`` messages with ``seq`` greater than the given one, ascending."""
        ...

    async def find(self, room: RoomId, message_id: str) -> Message | None:
        """The room's message with this id among its newest :data:`FIND_WINDOW`, or None.

        How a node learns whether an append that failed stored its batch all the same: a
        store on another machine can commit and lose its answer on the way back."""
        ...

    async def before(self, room: RoomId, seq: int | None, limit: int) -> list[Message]:
        """The newest ``limit`` messages with ``seq`` below ``seq`` (all if None), ascending."""
        ...

    async def get(self, room: RoomId, seq: int) -> Message | None:
        """The room's message ``seq``, or None if it has none such (never stored, or
        deleted by retention)."""
        ...

    async def delete(self, room: RoomId, seq: int, when: int) -> Message | None:
        """Delete the room's message ``seq`` at ``when`` (ms since the Unix epoch): it
        keeps its place (``seq``, ``id``, sender, ``ts``) and its text is gone for good
        (see :attr:`~roomcast.core.models.Message.deleted`). Returns the deleted message,
        or None if the room holds no such message. Deleting a deleted message changes
        nothing. Its chosen id stays taken: a retry of it answers with the deleted
        message."""
        ...

    async def changed(self, room: RoomId, upto: int, since_ms: int, limit: int) -> list[Message]:
        """Up to ``limit`` of the room's messages with ``seq`` at most ``upto`` that were
        edited or deleted at ``since_ms`` or later, ascending by seq: what a client that
        holds the room's messages up to ``upto`` and was away since then has not seen
        change. Read on an index of the changed messages only, whatever the room holds."""
        ...

    async def edit(self, room: RoomId, seq: int, text: str, when: int) -> Message | None:
        """Replace the text of the room's message ``seq``, edited at ``when`` (ms since the
        Unix epoch): it keeps its place, and says when it was edited. Returns the edited
        message, or None if the room holds no such message or it was deleted (a deleted
        message stays deleted). Its chosen id stays its own: a retry of the first send
        answers with the edited message."""
        ...

    async def reset(self, room: RoomId) -> Room:
        """Drop the room's messages and give it a new epoch; ``seq`` starts again at 1."""
        ...

    async def oldest(
        self, *, after: RoomId | None = None, limit: int = TRIM_ROOMS_PAGE
    ) -> list[Oldest]:
        """A page of the rooms that hold messages, by id (the first ``limit`` above
        ``after``): each with its last ``seq`` and the ``seq`` and ``ts`` of the oldest
        message it holds — what tells, in one read for many rooms, which have something
        for :meth:`trim` to do."""
        ...

    async def trim(
        self,
        room: RoomId,
        *,
        keep: int | None = None,
        before_ms: int | None = None,
        limit: int = TRIM_BATCH,
    ) -> int:
        """Delete up to ``limit`` of the room's oldest messages that retention lets go —
        all but its newest ``keep``, and those stored before ``before_ms`` (ms since the
        Unix epoch) — oldest first, stopping at the first one to keep, so what is left is
        always the room's newest messages without a gap. Their chosen ids go with them (a
        retry of one is stored again). The room's ``seq`` and epoch do not change. Returns
        how many were deleted: fewer than ``limit``, the room is done."""
        ...

    async def next_user_id(self) -> UserId:
        """A user id never handed out before by this store (1, 2, 3, ...)."""
        ...

    async def user_id_for(self, subject: str) -> UserId:
        """The user id of an authenticated user (a token's ``sub``): the same for the same
        subject every time, on every node sharing the store; a subject seen for the first
        time gets an id never handed out before (from the same counter as
        :meth:`next_user_id`)."""
        ...


@runtime_checkable
class Presence(Protocol):
    """Who is in which room, across the cluster, and which nodes are alive.

    Entries carry their node; a node that stops heartbeating is dead and ``reap`` removes
    its entries so the survivors can announce the leaves. The "node" of an entry is any
    owner that heartbeats: the gRPC door makes each gRPC user the owner of its own entries
    (``grpc:7``), so a user whose beats stop is reaped like a dead node.
    """

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def add(self, room: RoomId, member: Member) -> None: ...

    async def remove(self, room: RoomId, conn: ConnId) -> None: ...

    async def members(self, room: RoomId) -> list[Member]:
        """Every member of the room on every live node, in join order where known."""
        ...

    async def counts(self, rooms: Sequence[RoomId]) -> dict[RoomId, int]:
        """How many members each room has across the cluster."""
        ...

    async def occupied(self) -> dict[RoomId, int]:
        """Every room with members across the cluster, and how many (as :meth:`counts`).

        Costs what the cluster's memberships are, not how many rooms there are: the
        listing of rooms people are in, however many were ever made."""
        ...

    async def register(self, member: Member) -> None:
        """Record a connection of a user (for direct messages and liveness)."""
        ...

    async def unregister(self, conn: ConnId) -> None: ...

    async def locate(self, user: UserId) -> list[Member]:
        """The live connections of a user, each with its node."""
        ...

    async def heartbeat(self, node: NodeId, ttl: float) -> bool:
        """Record that the node is alive for another ``ttl`` seconds.

        Returns True when the node was unknown or had lapsed: its entries may have been
        reaped (a long pause, or the engine lost its data), so it should write them again.
        """
        ...

    async def reap(self) -> list[tuple[RoomId, Member]]:
        """Remove the entries (room memberships and registered connections) of nodes whose
        heartbeat lapsed; return the room memberships that were removed.

        Safe to call from every node at once: each removed entry is returned to one caller.
        """
        ...

    async def drop_node(self, node: NodeId) -> list[tuple[RoomId, Member]]:
        """Remove every entry of a node at once (a clean shutdown); return the room
        memberships that were removed."""
        ...
