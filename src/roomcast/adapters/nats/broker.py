"""The NATS broker: a subject per room and a subject per node's inbox, on core NATS.

Subjects, for ``nats://...?prefix=P`` (``P`` defaults to ``roomcast``)::

    P.room.<room id>    a room's frames; a node subscribes while it has local members
    P.node.<node id>    a node's inbox; subscribed from start to close

The NATS server sends a subject's messages only to connections subscribed to it, so a node
receives no traffic of rooms it has no member in. Delivery is core NATS, at most once: what
a node misses while disconnected it reads from history (``on_reconnect``). NATS keeps the
order of the messages one connection publishes to one subject, so frames one node publishes
to one room arrive in publish order on every node; frames of one room published by two nodes
can interleave, which the hub's ``seq`` ordering takes care of.

Receiving. nats-py runs one task per subscription that awaits its callback for each message
in arrival order. The callbacks of every subscription (the rooms and the inbox) take one FIFO
lock around the frame handler, so ``on_room`` and ``on_inbox`` run one frame at a time; order
within a subject is exact, and since waiters get the lock first come first served, frames of
different subjects are handled in about the order they arrived (nothing depends on order
across rooms). No task is created per message, and frames not yet handled stay in nats-py's
per-subscription queue, whose limits make a stalled node a reported slow consumer rather
than a memory leak; nats-py drops what does not fit, and the node reads what its rooms
missed from history a second later (``SLOW_RESYNC_DELAY``), as after a reconnect.

With a batch handler (``hand_batches_to``), a room's callback that sees
more of the room's messages already queued behind its own (nats-py's ``pending_msgs``) only
sets its frame aside; the callback of the last one queued hands them all over in one call,
in arrival order (at most ``GATHER_MAX``), so the hub writes each local member one write for
them instead of one each — in a join storm, hundreds of presence frames arrive together.
A frame that arrives alone is handed over at once, as before.

Publishing. ``publish`` and ``send`` write to nats-py's outgoing buffer and return; there is
no round trip. nats-py would buffer frames while it reconnects and send them later; for chat a
frame that looks sent but is not is worse than an error, so while the connection is down
``healthy`` is False and ``publish`` raises ``UnavailableError`` at once, and the node tells
its client. nats-py's own forced flush is bounded by ``flush_timeout``.

Reconnection. nats-py reconnects forever (every second), re-sends every subscription and
flushes before it calls ``reconnected_cb``; the broker then awaits ``on_reconnect()`` in a
task of its own, so a slow resync never holds up nats-py's reconnect loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ...core.models import NodeId, RoomId
from ...core.ports import BatchHandler, FrameHandler, ReconnectHandler
from ...exceptions import ConfigError, UnavailableError
from .._resync import Resync

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "roomcast"
CONNECT_TIMEOUT = 10.0
"""Seconds for the first connection, all attempts included."""
ATTEMPT_TIMEOUT = 2
"""Seconds for one connection attempt."""
RECONNECT_WAIT = 1
"""Seconds between reconnection attempts to one server."""
PING_INTERVAL = 5
"""Seconds between client pings; two unanswered pings mark the connection dead."""
FLUSH_TIMEOUT = 5
"""Seconds for a flush: a subscription reaching the server, or a full outgoing buffer."""
CLOSE_TIMEOUT = 5.0
GATHER_MAX = 256
PENDING_MSGS_LIMIT = 512 * 1024
"""Frames a room's subscription queues before nats-py drops them (its own default): a node
that far behind is a slow consumer."""
SLOW_RESYNC_DELAY = 1.0
"""Seconds after a slow consumer's first dropped frame that the node reads what its rooms
missed from history (once, however many frames were dropped meanwhile)."""
"""Room frames handed to the batch handler in one call at most."""

_ERRORS = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionDrainingError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.errors.NoServersError,
    nats.errors.TimeoutError,
    OSError,
)
"""What nats-py raises when the server cannot be reached."""
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_PREFIX = re.compile(r"[^\s.*>]+(\.[^\s.*>]+)*")


def parse_url(url: str) -> tuple[list[str], str]:
    """Split ``?prefix=`` off a NATS URL; return the server URLs and the prefix.

    Several servers of one cluster may be given comma-separated:
    ``nats://a:4222,nats://b:4222?prefix=chat``.
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = DEFAULT_PREFIX
    rest: list[tuple[str, str]] = []
    for key, value in query:
        if key == "prefix":
            prefix = value
        else:
            rest.append((key, value))
    if not _PREFIX.fullmatch(prefix):
        raise ConfigError(f"prefix {prefix!r} is not a valid NATS subject (broker URL {url!r})")
    base = urlunsplit(parts._replace(query=urlencode(rest)))
    servers = [server.strip() for server in base.split(",") if server.strip()]
    return servers, prefix


class NatsBroker:
    """A :class:`~roomcast.core.ports.Broker` on core NATS (see the module docstring)."""

    def __init__(self, url: str) -> None:
        self._servers, self._prefix = parse_url(url)
        self._node: NodeId | None = None
        self._on_room: FrameHandler | None = None
        self._on_inbox: FrameHandler | None = None
        self._on_rooms: BatchHandler | None = None
        self._nc: Client | None = None
        self._subs: dict[RoomId, Subscription] = {}
        self._inbox: Subscription | None = None
        self._turn = asyncio.Lock()
        """Held while a frame handler runs: one frame at a time across all subjects."""
        self._resync: Resync | None = None
        self._slow: asyncio.TimerHandle | None = None
        """Set while a resync after dropped frames is due (see :meth:`_on_error`)."""
        self._closed = False
        self.received = 0
        """Room frames this node received (the per-node counter the metrics export)."""

    def _room_subject(self, room: RoomId) -> str:
        return f"{self._prefix}.room.{room}"

    def _inbox_subject(self, node: NodeId) -> str:
        return f"{self._prefix}.node.{node}"

    # -- lifecycle ---------------------------------------------------------------------

    async def start(
        self,
        node: NodeId,
        on_room: FrameHandler,
        on_inbox: FrameHandler,
        on_reconnect: ReconnectHandler,
    ) -> None:
        if not _TOKEN.fullmatch(node):
            raise ConfigError(f"node id {node!r} must be letters, digits, '_' or '-'")
        if self._closed or self._node is not None:
            raise UnavailableError("NATS broker already started or closed")
        self._node = node
        self._on_room, self._on_inbox = on_room, on_inbox
        self._resync = Resync(on_reconnect, f"roomcast-nats-resync-{node}")
        nc = Client()
        self._nc = nc
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await nc.connect(
                    self._servers,
                    name=f"roomcast {self._prefix} {node}",
                    connect_timeout=ATTEMPT_TIMEOUT,
                    reconnect_time_wait=RECONNECT_WAIT,
                    max_reconnect_attempts=-1,
                    ping_interval=PING_INTERVAL,
                    flush_timeout=FLUSH_TIMEOUT,
                    # Subjects are built here from a checked prefix, an int and a checked
                    # node id; nats-py need not scan each one again on every publish.
                    skip_subject_validation=True,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                )
                self._inbox = await nc.subscribe(self._inbox_subject(node), cb=self._handle_inbox)
                await nc.flush(FLUSH_TIMEOUT)
        except BaseException as exc:
            await self._close_client()
            self._node = None
            if isinstance(exc, (*_ERRORS, TimeoutError)):
                raise UnavailableError(f"NATS: cannot connect to {self._servers}: {exc!r}") from exc
            raise

    @property
    def healthy(self) -> bool:
        return self._nc is not None and self._nc.is_connected and not self._closed

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._slow is not None:
            self._slow.cancel()
        if self._resync is not None:
            await self._resync.close()
        await self._close_client()
        self._subs.clear()
        self._inbox = None

    async def _close_client(self) -> None:
        nc, self._nc = self._nc, None
        if nc is None or nc.is_closed:
            return
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await nc.close()
        except (*_ERRORS, TimeoutError):
            log.warning("closing the NATS connection failed", exc_info=True)

    # -- subscriptions -----------------------------------------------------------------

    def _require_connected(self) -> Client:
        nc = self._nc
        if nc is None or self._closed or not nc.is_connected:
            raise UnavailableError("NATS is not connected")
        return nc

    async def subscribe(self, room: RoomId) -> None:
        nc = self._require_connected()
        if room in self._subs:
            return
        feed = _RoomFeed(self)
        try:
            sub = await nc.subscribe(
                self._room_subject(room), cb=feed.take, pending_msgs_limit=PENDING_MSGS_LIMIT
            )
        except _ERRORS as exc:
            raise UnavailableError(f"NATS: subscribing to room {room} failed: {exc!r}") from exc
        feed.sub = sub
        self._subs[room] = sub
        try:
            # The PONG comes after the server has processed the SUB.
            await nc.flush(FLUSH_TIMEOUT)
        except _ERRORS as exc:
            # Not known to be in effect: do not leave it to a reconnect to restore either.
            if self._subs.get(room) is sub:
                del self._subs[room]
                await self._drop(sub)
            raise UnavailableError(f"NATS: subscribing to room {room} failed: {exc!r}") from exc

    async def unsubscribe(self, room: RoomId) -> None:
        sub = self._subs.pop(room, None)
        if sub is not None:
            await self._drop(sub)

    async def _drop(self, sub: Subscription) -> None:
        # While nats-py reconnects this only forgets the subscription, which is what is
        # wanted: it will not be sent again.
        try:
            await sub.unsubscribe()
        except (*_ERRORS, nats.errors.BadSubscriptionError):
            log.debug("unsubscribing from %s failed", sub.subject, exc_info=True)

    # -- sending -----------------------------------------------------------------------

    async def publish(self, room: RoomId, frame: bytes) -> None:
        await self._publish(self._room_subject(room), frame)

    async def publish_many(self, frames: Sequence[tuple[RoomId, bytes]]) -> None:
        # nats-py appends each publish to its write buffer and flushes it in the
        # background: the batch already goes out in as few writes as the client can.
        for room, frame in frames:
            await self._publish(self._room_subject(room), frame)

    async def send(self, node: NodeId, frame: bytes) -> None:
        await self._publish(self._inbox_subject(node), frame)

    async def _publish(self, subject: str, frame: bytes) -> None:
        nc = self._require_connected()
        try:
            await nc.publish(subject, frame)
        except _ERRORS as exc:
            raise UnavailableError(f"NATS: publish failed: {exc!r}") from exc

    # -- receiving ---------------------------------------------------------------------

    def hand_batches_to(self, on_rooms: BatchHandler) -> None:
        """Hand this node a room's frames that are queued together (nats-py read them off
        the connection in one go) in one call of ``on_rooms``, in arrival order, instead
        of one ``on_room`` call each; a frame that arrives alone still goes to ``on_room``.
        The hub then writes each local member the frames of a batch in one write."""
        self._on_rooms = on_rooms

    async def _handle_rooms(self, frames: list[bytes], subject: str) -> None:
        assert self._on_room is not None
        async with self._turn:
            try:
                if len(frames) == 1:
                    await self._on_room(frames[0])
                else:
                    assert self._on_rooms is not None
                    await self._on_rooms(frames)
            except Exception:
                log.exception("the room frame handler failed (%s)", subject)

    async def _handle_inbox(self, msg: Msg) -> None:
        assert self._on_inbox is not None
        async with self._turn:
            try:
                await self._on_inbox(msg.data)
            except Exception:
                log.exception("the inbox frame handler failed")

    # -- connection events -------------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            # nats-py dropped frames the node could not take in time: without a resync, a
            # room would see them only once its next message shows the gap.
            if self._slow is None and not self._closed and self._resync is not None:
                log.warning(
                    "NATS: this node is a slow consumer; frames dropped (%s); reading what"
                    " its rooms missed from history in %gs",
                    exc.subject,
                    SLOW_RESYNC_DELAY,
                )
                self._slow = asyncio.get_running_loop().call_later(
                    SLOW_RESYNC_DELAY, self._resync_after_drops
                )
        elif not self._closed:
            log.debug("NATS: %r", exc)

    def _resync_after_drops(self) -> None:
        self._slow = None
        if not self._closed and self._resync is not None:
            self._resync.request()

    async def _on_disconnected(self) -> None:
        if not self._closed and self._nc is not None:
            log.warning("lost the NATS connection; reconnecting")

    async def _on_reconnected(self) -> None:
        if self._closed:
            return
        log.info("NATS connection restored with %d room subscriptions", len(self._subs))
        if self._resync is not None:
            self._resync.request()


class _RoomFeed:
    """The callback of one room's subscription: gathers the frames queued together."""

    __slots__ = ("_broker", "_frames", "sub")

    def __init__(self, broker: NatsBroker) -> None:
        self._broker = broker
        self._frames: list[bytes] = []
        self.sub: Subscription | None = None
        """Set once nats-py has made it; until then every frame goes alone."""

    async def take(self, msg: Msg) -> None:
        broker = self._broker
        broker.received += 1
        frames = self._frames
        frames.append(msg.data)
        sub = self.sub
        if (
            broker._on_rooms is not None
            and sub is not None
            and sub.pending_msgs
            and len(frames) < GATHER_MAX
        ):
            # nats-py's task takes the next one at once, without waiting: the last frame
            # queued (or the GATHER_MAX-th) hands the whole run over.
            return
        self._frames = []
        await broker._handle_rooms(frames, msg.subject)
