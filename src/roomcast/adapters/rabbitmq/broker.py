"""The RabbitMQ broker: a topic exchange, one exclusive queue per node, a binding per room.

Layout, for ``amqp://...?prefix=P`` (``P`` defaults to ``roomcast``)::

    exchange  P                 topic, non-durable, auto-delete
      |-- room.<room id>  -->  queue P.node.<node id>   one binding per subscribed room
      '-- node.<node id>  -->  queue P.node.<node id>   the node's inbox

    queue     P.node.<node id>  exclusive, auto-delete: it lives and dies with the node's
                                connection

Room frames and inbox frames go through the same exchange, told apart by routing key, so a
node needs one queue and one consumer, and every live node holds at least one binding (its
inbox). That keeps the auto-delete exchange alive exactly as long as some node of the
cluster is: it never piles up across runs, and nothing has to decide who deletes it. The
binding keys hold no wildcard, so the topic exchange routes like a direct one; it is a topic
exchange so that an operator can bind ``room.#`` to watch a cluster's traffic.

Receiving. One consumer on the node's queue hands each delivery to a local FIFO without
awaiting anything, and a single task drains that FIFO, awaiting ``on_room`` or ``on_inbox``
(or, for a bundle, the batch handler) one delivery at a time in delivery order. (aio-pika
starts each consumer callback as a task of its own; tasks start in the order they were
created, and the callback only enqueues, so they cannot reorder frames.) Deliveries are
acknowledged only so that the prefetch window bounds what the node holds in memory: the
queue is exclusive, so an ack never decides whether some other consumer gets a frame, and
the unacknowledged frames of a lost connection vanish with the queue either way. So one ack
with ``multiple=True`` covers every ``ACK_EVERY`` deliveries (a quarter of the window), and
up to ``ACK_EVERY - 1`` handled deliveries may wait for it on a quiet node; an ack per
delivery had cost ~9 % of a busy node's CPU, and RabbitMQ the work of each ack. What a node
misses while disconnected it reads from history (``on_reconnect``), not from RabbitMQ.

Publishing. A second channel, in publisher-confirm mode, publishes both room and inbox
frames; ``publish`` returns once RabbitMQ has confirmed the frame, i.e. routed it to every
bound queue. Consuming and publishing use separate channels, as RabbitMQ advises: when it
throttles a publisher, or a publish fails and RabbitMQ closes the channel, the consumer goes
on undisturbed. Frames are transient (delivery mode 1): durability is the history's job.

Bundles. ``publish_many`` sends a batch of frames (at most ``BUNDLE_FRAMES`` frames and
about ``BUNDLE_BYTES`` bytes) as one AMQP message of type ``roomcast.frames``: each frame
behind its room's id (8 bytes) and its length (4 bytes), big-endian. It is routed by its
first room's key and, through RabbitMQ's sender-selected distribution (the ``BCC``
header, which RabbitMQ removes before delivery), by the key of every other room in it, and
RabbitMQ puts one copy in each queue bound to any of them. So a batch costs one publish,
one confirm and one delivery per node that has members in one of its rooms, instead of
one of each per frame; a receiving node keeps the frames of the rooms it is subscribed to,
in order, hands them to the hub in one call (``hand_batches_to``), and drops the others
(they shared a batch with one of its rooms). A room's frames keep their order.

Reconnection. aio-pika's robust connection reconnects (every ``reconnect_interval`` seconds,
1 unless the URL says otherwise; heartbeats every 10 s unless ``heartbeat`` says otherwise)
and re-declares the exchange, the queue and its consumer. The bindings are roomcast's own
state: after a reconnect the broker binds the inbox and every room still subscribed, then
turns healthy and awaits ``on_reconnect()``. A room unsubscribed while the connection was
down is not restored. While the connection is down ``healthy`` is False and ``publish``,
``send`` and ``subscribe`` raise ``UnavailableError`` at once; every call to RabbitMQ is
bounded by a timeout, so none of them hangs.

Any other query parameter of the URL goes to aio-pika unchanged (``heartbeat``,
``reconnect_interval``, ``name``, TLS options for ``amqps://``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustExchange,
    AbstractRobustQueue,
)
from aio_pika.connection import make_url
from aio_pika.exceptions import (
    AMQPError,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
)
from aiormq.exceptions import ChannelLockedResource  # aio-pika's own AMQP client

from ...core.models import NodeId, RoomId
from ...core.ports import BatchHandler, FrameHandler, ReconnectHandler
from ...exceptions import ConfigError, UnavailableError
from .._resync import Resync

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "roomcast"
CONNECT_TIMEOUT = 10.0
"""Seconds for the first connection (and each reconnect attempt)."""
OPERATION_TIMEOUT = 5.0
"""Seconds for a declare, bind or unbind, including waiting for a reconnect in progress."""
PUBLISH_TIMEOUT = 5.0
"""Seconds for RabbitMQ to confirm a published frame."""
CLOSE_TIMEOUT = 5.0
RECOVERY_RETRY = 1.0
"""Seconds between attempts to restore the bindings after a reconnect."""
PREFETCH = 256
"""Unacknowledged deliveries RabbitMQ may push to a node before it acknowledges."""
ACK_EVERY = PREFETCH // 4
"""Deliveries handled per acknowledgement (``multiple=True``)."""
BUNDLE_TYPE = "roomcast.frames"
"""The AMQP ``type`` of a message that carries a batch of frames (see the module docstring)."""
BUNDLE_FRAMES = 256
"""Frames in one bundle at most."""
BUNDLE_BYTES = 1 << 20
"""A bundle takes no further frame once it holds this many bytes."""

URL_DEFAULTS = {"reconnect_interval": "1", "heartbeat": "10"}
"""aio-pika settings used unless the URL gives its own. A short heartbeat makes both ends
notice a dead peer within seconds; until RabbitMQ has dropped a node's old connection, the
node cannot declare its exclusive queue again."""

_ERRORS = (AMQPError, ChannelInvalidStateError, OSError, TimeoutError)
"""What a call to RabbitMQ raises when RabbitMQ cannot be reached or the channel is gone."""
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_HEAD = struct.Struct(">qI")
"""A bundled frame's head: its room's id and its length."""


def parse_url(url: str) -> tuple[str, str]:
    """Split ``?prefix=`` off an AMQP URL; return the URL for aio-pika and the prefix."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = DEFAULT_PREFIX
    rest: list[tuple[str, str]] = []
    for key, value in query:
        if key == "prefix":
            prefix = value
        else:
            rest.append((key, value))
    if not prefix:
        raise ConfigError(f"empty prefix in broker URL {url!r}")
    for key, default in URL_DEFAULTS.items():
        if not any(k == key for k, _ in rest):
            rest.append((key, default))
    return urlunsplit(parts._replace(query=urlencode(rest))), prefix


@contextmanager
def _unavailable(what: str) -> Iterator[None]:
    """Turn RabbitMQ's connection and channel errors into ``UnavailableError``."""
    try:
        yield
    except TimeoutError as exc:
        raise UnavailableError(f"RabbitMQ: {what} timed out") from exc
    except _ERRORS as exc:
        raise UnavailableError(f"RabbitMQ: {what} failed: {exc!r}") from exc


class RabbitBroker:
    """A :class:`~roomcast.core.ports.Broker` on RabbitMQ (see the module docstring)."""

    def __init__(self, url: str) -> None:
        self._url, self._prefix = parse_url(url)
        self._node: NodeId | None = None
        self._inbox_key = ""
        self._on_room: FrameHandler | None = None
        self._on_inbox: FrameHandler | None = None
        self._on_rooms: BatchHandler | None = None
        self._connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustExchange | None = None
        self._queue: AbstractRobustQueue | None = None
        self._rooms: set[RoomId] = set()
        """Rooms subscribed: the bindings a reconnect restores."""
        self._bind_lock = asyncio.Lock()
        self._deliveries: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._drainer: asyncio.Task[None] | None = None
        self._rebind: asyncio.Task[None] | None = None
        self._resync: Resync | None = None
        self._ready = False
        self._closed = False
        self.received = 0
        """Room frames this node received (the per-node counter the metrics export)."""

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
            raise UnavailableError("RabbitMQ broker already started or closed")
        self._node = node
        self._inbox_key = f"node.{node}"
        self._on_room, self._on_inbox = on_room, on_inbox
        self._resync = Resync(on_reconnect, f"roomcast-rabbitmq-resync-{node}")
        # The exchange deletes itself when its last binding goes; a node that starts just as
        # the last other node stops can see it vanish between declaring it and binding its
        # inbox. Declaring everything again on a fresh connection settles that.
        for attempt in range(2):
            try:
                with _unavailable("connect"):
                    async with asyncio.timeout(CONNECT_TIMEOUT + OPERATION_TIMEOUT):
                        await self._open(node)
                break
            except BaseException as exc:
                await self._close_connection()
                vanished = isinstance(exc.__cause__, ChannelNotFoundEntity)
                if attempt == 0 and vanished:
                    continue
                self._node = None
                if isinstance(exc.__cause__, ChannelLockedResource):
                    raise UnavailableError(
                        f"RabbitMQ: the queue of node {node!r} is held by another connection:"
                        " another running server has this node id (node ids must be unique),"
                        " or RabbitMQ has not yet noticed that a previous run of it died"
                        " (it does within the connection heartbeat)"
                    ) from exc
                raise
        self._drainer = asyncio.get_running_loop().create_task(
            self._drain(), name=f"roomcast-rabbitmq-{node}"
        )
        self._ready = True

    async def _open(self, node: NodeId) -> None:
        # What aio_pika.connect_robust does, in two steps, so that a first connection that
        # fails can still be closed (and leaves no reconnect task behind).
        connection = aio_pika.RobustConnection(
            make_url(self._url),
            client_properties={"connection_name": f"roomcast {self._prefix} {node}"},
        )
        self._connection = connection
        await connection.connect(timeout=CONNECT_TIMEOUT)
        consuming = await connection.channel(publisher_confirms=False)
        await consuming.set_qos(prefetch_count=PREFETCH)
        publishing: AbstractRobustChannel = await connection.channel(publisher_confirms=True)
        self._publisher = await publishing.declare_exchange(
            self._prefix, aio_pika.ExchangeType.TOPIC, durable=False, auto_delete=True
        )
        self._queue = await consuming.declare_queue(
            f"{self._prefix}.node.{node}", exclusive=True, auto_delete=True
        )
        await self._queue.bind(self._prefix, self._inbox_key, robust=False)
        await self._queue.consume(self._enqueue, no_ack=False)
        connection.close_callbacks.add(self._on_connection_lost)
        connection.reconnect_callbacks.add(self._on_connection_back)

    @property
    def healthy(self) -> bool:
        return self._ready

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ready = False
        if self._resync is not None:
            await self._resync.close()
        tasks = [t for t in (self._rebind, self._drainer) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._rebind = self._drainer = None
        await self._close_connection()
        while not self._deliveries.empty():
            self._deliveries.get_nowait()
        self._rooms.clear()

    async def _close_connection(self) -> None:
        connection, self._connection = self._connection, None
        self._publisher = self._queue = None
        if connection is None:
            return
        connection.close_callbacks.discard(self._on_connection_lost)
        connection.reconnect_callbacks.discard(self._on_connection_back)
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await connection.close()
        except _ERRORS:
            # Best effort: the server drops the exclusive queue (and with its last binding
            # the exchange) when the connection goes, however it goes.
            log.warning("closing the RabbitMQ connection failed", exc_info=True)

    # -- subscriptions -----------------------------------------------------------------

    def _require_queue(self) -> AbstractRobustQueue:
        if not self._ready or self._queue is None:
            raise UnavailableError("RabbitMQ is not connected")
        return self._queue

    async def subscribe(self, room: RoomId) -> None:
        queue = self._require_queue()
        with _unavailable(f"subscribing to room {room}"):
            async with asyncio.timeout(OPERATION_TIMEOUT), self._bind_lock:
                await queue.bind(self._prefix, f"room.{room}", robust=False)
                self._rooms.add(room)

    async def unsubscribe(self, room: RoomId) -> None:
        if room not in self._rooms:
            return
        # Forgotten first, so a reconnect in progress does not bind the room again.
        self._rooms.discard(room)
        queue = self._queue
        if queue is None:
            return
        with _unavailable(f"unsubscribing from room {room}"):
            async with asyncio.timeout(OPERATION_TIMEOUT), self._bind_lock:
                # While disconnected the binding is gone with the queue; a room subscribed
                # again meanwhile keeps its binding.
                if self._ready and room not in self._rooms:
                    await queue.unbind(self._prefix, f"room.{room}")

    # -- sending -----------------------------------------------------------------------

    async def publish(self, room: RoomId, frame: bytes) -> None:
        await self._publish(f"room.{room}", frame)

    async def publish_many(self, frames: Sequence[tuple[RoomId, bytes]]) -> None:
        if len(frames) == 1:
            await self.publish(*frames[0])
            return
        chunks = list(_chunks(frames))
        if len(chunks) == 1:
            # Awaited directly, it is written before this call first waits (for the
            # confirm): a task would be written only after the caller's next wait.
            await self._publish_bundle(chunks[0])
            return
        # The publishes start in order and take the channel's (first-come, first-served)
        # lock in that order, so they are written in order; their confirms are awaited
        # together instead of one round trip each.
        publishes = [asyncio.ensure_future(self._publish_bundle(c)) for c in chunks]
        results = await asyncio.gather(*publishes, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def send(self, node: NodeId, frame: bytes) -> None:
        await self._publish(f"node.{node}", frame)

    async def _publish_bundle(self, frames: list[tuple[RoomId, bytes]]) -> None:
        if len(frames) == 1:
            room, frame = frames[0]
            await self._publish(f"room.{room}", frame)
            return
        first, *others = dict.fromkeys(room for room, _ in frames)
        also = {"BCC": [f"room.{room}" for room in others]} if others else None
        await self._publish(f"room.{first}", bundle(frames), BUNDLE_TYPE, also)

    async def _publish(
        self,
        routing_key: str,
        body: bytes,
        kind: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> None:
        exchange = self._publisher
        if not self._ready or exchange is None:
            raise UnavailableError("RabbitMQ is not connected")
        message = aio_pika.Message(
            body, delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT, type=kind, headers=headers
        )
        try:
            with _unavailable("publish"):
                async with asyncio.timeout(PUBLISH_TIMEOUT):
                    await exchange.publish(message, routing_key, mandatory=False)
        except asyncio.CancelledError:
            # aiormq cancels pending confirms when the connection closes under them; only a
            # cancellation of the caller itself is passed on as one.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            raise UnavailableError("RabbitMQ: the connection closed before the confirm") from None

    # -- receiving ---------------------------------------------------------------------

    async def _enqueue(self, message: AbstractIncomingMessage) -> None:
        # Nothing is awaited here, so deliveries enter the FIFO in the order RabbitMQ sent them.
        self._deliveries.put_nowait(message)

    async def _drain(self) -> None:
        assert self._on_room is not None and self._on_inbox is not None
        on_room, on_inbox, inbox_key = self._on_room, self._on_inbox, self._inbox_key
        deliveries = self._deliveries
        unacked = 0
        while True:
            message = await deliveries.get()
            try:
                if message.routing_key == inbox_key:
                    await on_inbox(message.body)
                elif message.type == BUNDLE_TYPE:
                    await self._unbundle(message.body)
                else:
                    self.received += 1
                    await on_room(message.body)
            except Exception:
                log.exception("a frame handler failed (routing key %s)", message.routing_key)
            unacked += 1
            if unacked >= ACK_EVERY:
                unacked = 0
                try:
                    await message.ack(multiple=True)
                except _ERRORS:
                    # Delivered on a channel that has since closed: nothing left to ack.
                    pass

    def hand_batches_to(self, on_rooms: BatchHandler) -> None:
        """Hand this node the frames of a bundle (a batch of another node's
        ``publish_many``) of the rooms it is subscribed to in one call of ``on_rooms``, in
        order, instead of one ``on_room`` call each. The hub then writes each local member
        the frames in one write."""
        self._on_rooms = on_rooms

    async def _unbundle(self, body: bytes) -> None:
        assert self._on_room is not None
        try:
            entries = unbundle(body)
        except ValueError as exc:
            log.warning("dropped a malformed bundle of %d bytes: %s", len(body), exc)
            return
        rooms = self._rooms
        frames = [frame for room, frame in entries if room in rooms]
        self.received += len(frames)
        if len(frames) > 1 and self._on_rooms is not None:
            await self._on_rooms(frames)
        else:
            for frame in frames:
                await self._on_room(frame)

    # -- reconnection ------------------------------------------------------------------

    def _on_connection_lost(self, _sender: object, exc: BaseException | None = None) -> None:
        if self._closed:
            return
        if self._ready:
            log.warning("lost the RabbitMQ connection: %r", exc)
        self._ready = False
        if self._rebind is not None:
            self._rebind.cancel()
            self._rebind = None

    def _on_connection_back(self, _sender: object) -> None:
        if self._closed:
            return
        if self._rebind is not None:
            self._rebind.cancel()
        self._rebind = asyncio.get_running_loop().create_task(
            self._restore_bindings(), name=f"roomcast-rabbitmq-rebind-{self._node}"
        )

    async def _restore_bindings(self) -> None:
        """Bind the inbox and every subscribed room again, then resync the node.

        Cancelled when the connection is lost again; retried until it succeeds otherwise.
        """
        queue = self._queue
        assert queue is not None
        while True:
            try:
                async with asyncio.timeout(OPERATION_TIMEOUT), self._bind_lock:
                    await queue.bind(self._prefix, self._inbox_key, robust=False)
                    for room in list(self._rooms):
                        if room in self._rooms:
                            await queue.bind(self._prefix, f"room.{room}", robust=False)
                    self._ready = True
                break
            except _ERRORS:
                log.warning("restoring RabbitMQ bindings failed; retrying", exc_info=True)
                await asyncio.sleep(RECOVERY_RETRY)
        log.info("RabbitMQ connection restored with %d room bindings", len(self._rooms))
        if self._resync is not None:
            self._resync.request()


def bundle(frames: Sequence[tuple[RoomId, bytes]]) -> bytes:
    """A batch of frames in one body: each behind its room's id (8 bytes, signed) and its
    length (4 bytes), big-endian."""
    return b"".join(_HEAD.pack(room, len(frame)) + frame for room, frame in frames)


def unbundle(body: bytes) -> list[tuple[RoomId, bytes]]:
    """The rooms and frames of a :func:`bundle`, in order; ``ValueError`` if ``body`` is
    not one."""
    entries: list[tuple[RoomId, bytes]] = []
    at, end, head = 0, len(body), _HEAD.size
    while at < end:
        if at + head > end:
            raise ValueError(f"a frame's head cut short at byte {at}")
        room, size = _HEAD.unpack_from(body, at)
        at += head
        if at + size > end:
            raise ValueError(f"a frame of {size} bytes at byte {at} runs past the end")
        entries.append((RoomId(room), body[at : at + size]))
        at += size
    return entries


def _chunks(
    frames: Sequence[tuple[RoomId, bytes]],
) -> Iterator[list[tuple[RoomId, bytes]]]:
    """``frames`` in order, in bundles of at most ``BUNDLE_FRAMES`` frames and, unless one
    frame alone is bigger, about ``BUNDLE_BYTES`` bytes."""
    chunk: list[tuple[RoomId, bytes]] = []
    size = 0
    for entry in frames:
        frame = entry[1]
        if chunk and (len(chunk) >= BUNDLE_FRAMES or size + len(frame) > BUNDLE_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(entry)
        size += len(frame) + _HEAD.size
    if chunk:
        yield chunk
