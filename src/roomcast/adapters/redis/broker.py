"""The Redis broker: sharded pub/sub (Redis 7 ``SPUBLISH`` / ``SSUBSCRIBE``).

Channels, where ``P`` is the URL's ``prefix`` (default ``roomcast``)::

    P:room:{r<room>}      the frames of one room; a node subscribes while it has local members
    P:inbox:{n<node>}     one node's inbox; subscribed from start to close

The part in braces is the Redis Cluster hash tag. Everything that belongs to one room (its
channel here, its presence keys, any history keys tagged ``{r<room>}``) hashes to one slot,
so a room lives on one shard and a script can touch the room's keys and ``SPUBLISH`` on its
channel in one step. Sharded pub/sub only sends a frame to the shard that owns the channel,
instead of to every node of the cluster as classic ``PUBLISH`` does.

Connections: one subscriber connection, owned by one reader task that hands the payloads to
the node's handlers in arrival order — one at a time, or the room frames read off the
connection together in one call (``hand_batches_to``); and a pool for publishing, so a slow
handler never holds up a publish. Only the reader connects and reconnects the subscriber
connection; other tasks merely write ``SSUBSCRIBE`` / ``SUNSUBSCRIBE`` on it while it is up,
and the replies come back to the reader.

The reader reads the connection directly rather than through redis-py's ``PubSub``, which
wraps every read in its retry and reconnect machinery (a hidden reconnect would resubscribe
behind the broker's back and skip ``on_reconnect``) and costs more per message: measured on
one core, ``PubSub.listen`` takes 40-50k frames/s, this reader 70-80k (220-260k with
hiredis). Reads block without a timer of their own, since arming one per message costs up to
half of that; a watchdog timer instead PINGs an idle connection and drops one that stays
silent.

When the subscriber connection is lost, the broker is unhealthy until the reader has
reconnected (backing off from 0.1 s to 2 s), subscribed the inbox and every room again and
seen every confirmation; then it awaits ``on_reconnect``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable, Coroutine, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    BlockingConnectionPool,
    Connection,
    SSLConnection,
    parse_url,
)
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ...core.models import NodeId, RoomId
from ...core.ports import BatchHandler, FrameHandler, ReconnectHandler
from ...exceptions import ConfigError, UnavailableError

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "roomcast"
IO_TIMEOUT = 2.0
"""Connect and socket timeout (seconds): a call never waits longer on a dead server."""
POOL_SIZE = 50
"""Connections a client (the broker's commands, presence) opens at most, unless the URL's
``max_connections`` says otherwise; commands beyond them wait for one."""
POOL_WAIT = 5.0
"""Seconds a command waits for a free connection before it fails as unavailable."""
SUBSCRIBE_TIMEOUT = 5.0
"""How long ``subscribe`` waits for the server to confirm."""
RECONNECT_BACKOFF = (0.1, 2.0)
"""First and longest pause between reconnect attempts (seconds)."""
IDLE_PING = 5.0
"""After this long without a reply on the subscriber connection the watchdog sends a PING; a
second silent interval means the connection is dead even if TCP has not noticed (a lost
peer sends no reset, a stuck server still acknowledges)."""

UNREACHABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    ReadOnlyError,
    ClusterError,
    TryAgainError,
    RedisClusterException,
)
"""What redis-py raises when the server cannot be reached, or cannot take writes (the
address leads to a replica: a failover that the address has not followed yet); on a Redis
Cluster also when the slot's shard is down, moving, or known to no node."""

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def is_cluster(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``?cluster=true``) rather than one server."""
    query = parse_qsl(urlsplit(url).query, keep_blank_values=True)
    value = next((v for k, v in reversed(query) if k == "cluster"), "false").lower()
    if value not in _TRUE + _FALSE:
        raise ConfigError(f"invalid Redis URL option cluster={value!r}: true or false")
    return value in _TRUE


def connection_options(url: str) -> tuple[dict[str, Any], str]:
    """redis-py connection options for ``redis[s]://host:port/db?prefix=NAME&...``, and the
    key prefix.

    ``prefix`` and ``cluster`` are roomcast's; every other query parameter is a redis-py
    connection option. Timeouts default to :data:`IO_TIMEOUT`; payloads stay bytes whatever
    the URL says.
    """
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    prefix = next((v for k, v in reversed(query) if k == "prefix"), DEFAULT_PREFIX)
    if not prefix or "{" in prefix or "}" in prefix:
        # Braces would change which part of every key Redis Cluster hashes.
        raise ConfigError(f"invalid Redis prefix {prefix!r}: non-empty, without braces")
    own = ("prefix", "cluster")
    rest = urlunsplit(parts._replace(query=urlencode([(k, v) for k, v in query if k not in own])))
    try:
        from_url: dict[str, Any] = dict(parse_url(rest))
    except ValueError as exc:
        raise ConfigError(f"invalid Redis URL {url!r}: {exc}") from exc
    options: dict[str, Any] = {
        "socket_timeout": IO_TIMEOUT,
        "socket_connect_timeout": IO_TIMEOUT,
        # One immediate retry, for a pooled connection that went stale when Redis restarted;
        # timeouts are not retried, so a dead server costs one timeout, not several.
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        **from_url,
        "decode_responses": False,
    }
    return options, prefix


SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
SENTINEL_PORT = 26379


def is_sentinel(url: str) -> bool:
    """Whether ``url`` names a service that Redis Sentinel watches."""
    return urlsplit(url).scheme in SENTINEL_SCHEMES


def sentinel_target(url: str) -> tuple[list[tuple[str, int]], str, str]:
    """For ``redis+sentinel://[USER:PASS@]HOST[:PORT][,HOST[:PORT]...]/SERVICE[/DB]?...``:
    the Sentinels' addresses, the service's name, and a ``redis[s]://`` URL with the
    credentials, database and options for the service's servers (and, in its query, the
    Sentinels' own ``sentinel_username`` and ``sentinel_password``)."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    addresses = []
    for item in hosts.split(","):
        host, colon, port = item.rpartition(":")
        if not colon:
            host, port = item, str(SENTINEL_PORT)
        if not host or not port.isdigit():
            raise ConfigError(f"invalid Sentinel address {item!r} in the Redis URL")
        addresses.append((host, int(port)))
    path = [part for part in parts.path.split("/") if part]
    if not 1 <= len(path) <= 2:
        raise ConfigError(
            "a Redis Sentinel URL names the service, and maybe a database: "
            "redis+sentinel://HOST:26379/SERVICE[/DB]"
        )
    db = path[1] if len(path) == 2 else "0"
    scheme = parts.scheme.removesuffix("+sentinel")
    first = f"{addresses[0][0]}:{addresses[0][1]}"
    netloc = f"{userinfo}@{first}" if userinfo else first
    return addresses, path[0], urlunsplit((scheme, netloc, f"/{db}", parts.query, ""))


def _sentinel_credentials(url: str) -> tuple[dict[str, str], str]:
    """``sentinel_username`` and ``sentinel_password`` from the URL's query (the Sentinels'
    own, as redis-py's options for them), and the URL without them."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    own = {"sentinel_username": "username", "sentinel_password": "password"}
    credentials = {own[k]: v for k, v in query if k in own}
    rest = urlencode([(k, v) for k, v in query if k not in own])
    return credentials, urlunsplit(parts._replace(query=rest))


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's pool (connections to the service's current primary) that waits for a
    free connection as :func:`open_client`'s pool does, and closes its Sentinel clients
    with itself."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # the client's aclose(), not a primary's change
            await self.sentinel_manager.aclose()


def open_url(url: str) -> tuple[Redis, dict[str, Any], str]:
    """A client for a ``redis://``, ``rediss://`` or ``redis+sentinel://`` URL (see
    :func:`connection_options` and :func:`sentinel_target`), the options for a connection
    of one's own to the same server (a subscriber's), and the key prefix."""
    if not is_sentinel(url):
        options, prefix = connection_options(url)
        return open_client(options), options, prefix
    addresses, service, rest = sentinel_target(url)
    credentials, rest = _sentinel_credentials(rest)
    options, prefix = connection_options(rest)
    for sentinel_address in ("host", "port"):
        options.pop(sentinel_address, None)
    tls = issubclass(options.pop("connection_class", Connection), SSLConnection)
    connection_class = SentinelManagedSSLConnection if tls else SentinelManagedConnection
    own_options = {"socket_timeout": IO_TIMEOUT, "socket_connect_timeout": IO_TIMEOUT}
    sentinel = Sentinel(addresses, sentinel_kwargs={**own_options, **credentials})
    pool_options = {"max_connections": POOL_SIZE, "timeout": POOL_WAIT, **options}
    pool = _BlockingSentinelPool(  # type: ignore[no-untyped-call]  # untyped in redis-py
        service, sentinel, connection_class=connection_class, **pool_options
    )
    # A connection of one's own asks the same Sentinels, through the pool, where the
    # primary is each time it connects.
    own = {**options, "connection_class": connection_class, "connection_pool": pool}
    return Redis.from_pool(pool), own, prefix


def open_client(options: dict[str, Any]) -> Redis:
    """A client with its own pool of connections made with ``options``.

    The pool blocks: a command that finds every connection busy waits (up to
    :data:`POOL_WAIT`) for one to come free. redis-py's default pool fails it at once with
    "Too many connections" — a thousand clients dropping together would have lost most of
    their presence updates and left them listed as members."""
    pool_options = {"max_connections": POOL_SIZE, "timeout": POOL_WAIT, **options}
    return Redis.from_pool(BlockingConnectionPool(**pool_options))


def open_cluster(options: dict[str, Any]) -> RedisCluster:
    """A Redis Cluster client made with ``options`` (its address is any node's: it learns
    the rest). Its commands find their shard by slot, follow ``MOVED`` and learn the new
    layout after a failover. Each node's pool holds up to ``max_connections`` (default
    :data:`POOL_SIZE`); callers keep within it with a :class:`Gate`, since the cluster
    client fails a command at once when a pool is full."""
    kwargs = dict(options)
    if kwargs.pop("db", 0) not in (0, "0"):
        raise ConfigError("a Redis Cluster has only database 0: drop the /N from the URL")
    connection_class = kwargs.pop("connection_class", Connection)
    if issubclass(connection_class, SSLConnection):
        kwargs["ssl"] = True
    for pool_only in ("retry", "timeout"):  # the cluster client retries by itself
        kwargs.pop(pool_only, None)
    kwargs.setdefault("max_connections", POOL_SIZE)
    try:
        return RedisCluster(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"a Redis URL option does not apply to a cluster: {exc}") from exc


async def spublish(client: Redis | RedisCluster, frames: Sequence[tuple[bytes, bytes]]) -> None:
    """``SPUBLISH`` each ``(channel, frame)``, in order: a lone one as one command, more in
    one pipeline (every command written at once, one wait for the replies; a cluster's
    pipeline does so per shard)."""
    try:
        if len(frames) == 1:
            await client.spublish(*frames[0])
            return
        async with client.pipeline(transaction=False) as pipe:
            for channel, frame in frames:
                pipe.spublish(channel, frame)
            await pipe.execute()
    except UNREACHABLE as exc:
        raise UnavailableError(f"Redis is unreachable: {exc}") from exc


class Gate:
    """At most ``size`` calls at once; one beyond waits up to :data:`POOL_WAIT` for a turn,
    then fails as unavailable — a blocking pool's behaviour, for the cluster client."""

    def __init__(self, size: int) -> None:
        self._free = asyncio.Semaphore(size)

    async def __aenter__(self) -> None:
        try:
            async with asyncio.timeout(POOL_WAIT):
                await self._free.acquire()
        except TimeoutError:
            raise UnavailableError(f"no Redis connection came free within {POOL_WAIT:g}s") from None

    async def __aexit__(self, *exc_info: object) -> None:
        self._free.release()


class RedisBroker:
    """A node's broker on Redis sharded pub/sub."""

    def __init__(self, url: str) -> None:
        if is_cluster(url):
            raise ConfigError("a Redis Cluster URL needs RedisClusterBroker")
        client, options, prefix = open_url(url)
        self._setup(options, prefix, client)

    @classmethod
    def shard_subscriber(
        cls, options: dict[str, Any], prefix: str, on_trouble: Callable[[], None]
    ) -> RedisBroker:
        """A subscriber to one shard of a Redis Cluster, for :class:`RedisClusterBroker`:
        the channels it is given, and the node's inbox only if it is handed it
        (:meth:`take_inbox`); it publishes nothing. ``on_trouble`` is called when the shard
        may no longer own a channel: the connection is lost, a subscription is refused
        (``MOVED``), or the server ends one by itself (its slot moved away)."""
        broker = cls.__new__(cls)
        broker._setup(options, prefix, None)
        broker._on_trouble = on_trouble
        return broker

    def _setup(self, options: dict[str, Any], prefix: str, client: Redis | None) -> None:
        self._prefix = prefix.encode()
        self._client = client
        self._on_trouble: Callable[[], None] | None = None
        # Not from the pool: the reader owns this connection for the broker's whole life.
        # RESP2, because redis-py's RESP3 parser formats every pushed message into a debug
        # log line (the whole payload, logged or not) before handing it over.
        options = {**options, "protocol": 2}
        options.pop("max_connections", None)  # a pool's option, not a connection's
        connection_class: type[AbstractConnection] = options.pop("connection_class", Connection)
        self._sub = connection_class(**options)
        self._on_room: FrameHandler | None = None
        self._on_rooms: BatchHandler | None = None
        self._on_inbox: FrameHandler | None = None
        self._on_reconnect: ReconnectHandler | None = None
        self._inbox = b""
        self._channels: dict[bytes, RoomId] = {}
        """The rooms the node wants, by channel: what a reconnect subscribes again."""
        self._unanswered: dict[bytes, int] = {}
        """SSUBSCRIBE commands written on the current connection and not yet confirmed."""
        self._waiters: dict[bytes, list[asyncio.Future[None]]] = {}
        self._restoring: set[bytes] | None = None
        """Channels of the last (re)connect still to be confirmed; None once all are."""
        self._connected = False
        """The subscriber connection is up and the reader has re-sent the subscriptions."""
        self._healthy = False
        self._ever_healthy = False
        self._closed = False
        self._reader: asyncio.Task[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._heard = False
        """A reply arrived since the watchdog last looked."""
        self._pinged = False
        self._chores: set[asyncio.Task[None]] = set()
        """The watchdog's PINGs and disconnects, awaited by close()."""
        self.received = 0
        """Room frames this node received (the per-node counter the metrics export)."""

    def _room_channel(self, room: RoomId) -> bytes:
        return b"%s:room:{r%d}" % (self._prefix, room)

    def _inbox_channel(self, node: NodeId) -> bytes:
        return b"%s:inbox:{n%s}" % (self._prefix, node.encode())

    # -- lifecycle ---------------------------------------------------------------------

    async def start(
        self,
        node: NodeId,
        on_room: FrameHandler,
        on_inbox: FrameHandler,
        on_reconnect: ReconnectHandler,
    ) -> None:
        if self._closed or self._reader is not None:
            raise UnavailableError("the Redis broker is closed or already started")
        self._on_room, self._on_inbox, self._on_reconnect = on_room, on_inbox, on_reconnect
        assert self._client is not None
        try:
            cluster = (await self._client.info("cluster")).get("cluster_enabled")
        except UNREACHABLE as exc:
            raise UnavailableError(f"Redis is unreachable: {exc}") from exc
        if cluster:
            # Each room's channel lives on one shard: one connection cannot hold them all.
            raise ConfigError(
                "this Redis is a node of a Redis Cluster: add ?cluster=true to the URL"
            )
        await self._start(node, self._inbox_channel(node))

    async def _start(self, name: str, inbox: bytes) -> None:
        """Connect and start the reader; with an ``inbox`` channel, return once it is
        subscribed."""
        self._inbox = inbox
        try:
            await self._establish()
        except UNREACHABLE as exc:
            self._lost(exc)
            await self._sub.disconnect(nowait=True)
            raise UnavailableError(f"Redis is unreachable: {exc}") from exc
        # The reader, started next, is what sees the confirmation.
        ready = self._waiter(inbox) if inbox else None
        self._reader = asyncio.get_running_loop().create_task(
            self._read_loop(), name=f"roomcast-redis-reader-{name}"
        )
        if ready is not None:
            try:
                await self._settle(inbox, ready)
            except UnavailableError:
                await self.close()
                raise

    async def start_shard(
        self,
        name: str,
        on_room: FrameHandler,
        on_inbox: FrameHandler,
        on_reconnect: ReconnectHandler,
    ) -> None:
        """Connect a :meth:`shard_subscriber` (``name`` names its reader task)."""
        if self._closed or self._reader is not None:
            raise UnavailableError("the Redis shard subscriber is closed or already started")
        self._on_room, self._on_inbox, self._on_reconnect = on_room, on_inbox, on_reconnect
        await self._start(name, b"")

    async def take_inbox(self, channel: bytes) -> None:
        """Subscribe the node's inbox on this shard subscriber, and return once it is."""
        if self._closed:
            raise UnavailableError("the Redis shard subscriber is closed")
        self._inbox = channel
        future = self._waiter(channel)
        await self._write_subscribe(channel)
        await self._settle(channel, future)

    async def drop_inbox(self) -> None:
        """Stop receiving the node's inbox here (it is subscribed on another shard)."""
        channel, self._inbox = self._inbox, b""
        if channel and self._writable():
            with contextlib.suppress(*UNREACHABLE):
                await self._sub.send_command(b"SUNSUBSCRIBE", channel, check_health=False)

    @property
    def inbox(self) -> bytes:
        """The inbox channel this subscriber holds (empty if none)."""
        return self._inbox

    @property
    def rooms(self) -> dict[bytes, RoomId]:
        """The rooms this subscriber holds, by channel."""
        return self._channels

    @property
    def healthy(self) -> bool:
        return self._healthy

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._connected = self._healthy = False
        self._disarm()
        reader, self._reader = self._reader, None
        tasks = {reader, *self._chores} if reader is not None else set(self._chores)
        tasks.discard(asyncio.current_task())  # close() called from a frame handler
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for task in tasks:
            if not task.cancelled() and task.exception() is not None:
                log.error("a Redis broker task had failed", exc_info=task.exception())
        for waiters in self._waiters.values():
            for future in waiters:
                if not future.done():
                    future.set_exception(UnavailableError("the Redis broker was closed"))
        self._waiters.clear()
        self._channels.clear()
        # Closing the connection ends its subscriptions on the server: no SUNSUBSCRIBE needed.
        await self._sub.disconnect(nowait=True)
        if self._client is not None:
            await self._client.aclose()

    # -- subscriptions -----------------------------------------------------------------

    async def subscribe(self, room: RoomId) -> None:
        if self._closed:
            raise UnavailableError("the Redis broker is closed")
        channel = self._room_channel(room)
        known = channel in self._channels
        self._channels[channel] = room
        if known and self._connected and channel not in self._unanswered:
            return  # in effect already
        future = self._waiter(channel)
        if not known:
            # While the connection is down the reader's reconnect subscribes every room
            # in ``_channels``, this one included; either way a confirmation follows.
            await self._write_subscribe(channel)
        await self._settle(channel, future)

    async def unsubscribe(self, room: RoomId) -> None:
        channel = self._room_channel(room)
        if self._channels.pop(channel, None) is None:
            return
        if self._on_trouble is not None:
            self._forget_pending(channel)
        # The reader drops frames of channels not in ``_channels`` from now on, so the
        # unsubscribe is in effect at once, even before the server confirms it.
        if self._writable():
            with contextlib.suppress(*UNREACHABLE):
                await self._sub.send_command(b"SUNSUBSCRIBE", channel, check_health=False)

    def _forget_pending(self, channel: bytes) -> None:
        """A shard subscriber gives a channel up that it may never see confirmed (refused
        with ``MOVED``): a reconnect's restore no longer waits for it."""
        self._unanswered.pop(channel, None)
        restoring = self._restoring
        if restoring is not None and channel in restoring:
            restoring.discard(channel)
            if not restoring:
                self._restoring = None
                self._healthy = self._ever_healthy = True

    def _writable(self) -> bool:
        # ``is_connected`` is checked too: writing on a connection the reader has not yet
        # seen fail would make redis-py reconnect it from this task, behind the reader.
        return self._connected and self._sub.is_connected

    async def _write_subscribe(self, channel: bytes) -> None:
        if not self._writable():
            return
        self._unanswered[channel] = self._unanswered.get(channel, 0) + 1
        # A failed write means a lost connection: the reader resubscribes after reconnecting.
        with contextlib.suppress(*UNREACHABLE):
            await self._sub.send_command(b"SSUBSCRIBE", channel, check_health=False)

    def _waiter(self, channel: bytes) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, []).append(future)
        return future

    async def _settle(self, channel: bytes, future: asyncio.Future[None]) -> None:
        """Wait for the confirmation of ``channel``; give the subscription up if it is late."""
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                await future
        except TimeoutError:
            waiters = self._waiters.get(channel, [])
            with contextlib.suppress(ValueError):
                waiters.remove(future)
            if not waiters:
                self._waiters.pop(channel, None)
                room = self._channels.get(channel)
                if room is not None:
                    # The caller treats the room as not subscribed; neither should we.
                    await self.unsubscribe(room)
            raise UnavailableError(
                f"Redis did not confirm the subscription within {SUBSCRIBE_TIMEOUT:g}s"
            ) from None

    # -- publishing --------------------------------------------------------------------

    async def publish(self, room: RoomId, frame: bytes) -> None:
        await self._publish(self._room_channel(room), frame)

    async def publish_many(self, frames: Sequence[tuple[RoomId, bytes]]) -> None:
        if self._closed or self._reader is None:
            raise UnavailableError("the Redis broker is not running")
        assert self._client is not None
        await spublish(self._client, [(self._room_channel(room), data) for room, data in frames])

    async def send(self, node: NodeId, frame: bytes) -> None:
        await self._publish(self._inbox_channel(node), frame)

    async def _publish(self, channel: bytes, frame: bytes) -> None:
        if self._closed or self._reader is None:
            raise UnavailableError("the Redis broker is not running")
        assert self._client is not None
        await spublish(self._client, ((channel, frame),))

    def hand_batches_to(self, on_rooms: BatchHandler) -> None:
        """Hand this node the room frames that arrive together — read off the connection
        in one go, as a publisher's pipelined batch or a busy moment's frames arrive — in
        one call of ``on_rooms``, in arrival order, instead of one ``on_room`` call each.
        The hub then writes each local member the frames of a batch in one write. A frame
        that arrives alone still goes to ``on_room``; inbox frames and subscription
        replies keep their place in the order."""
        self._on_rooms = on_rooms

    # -- the reader --------------------------------------------------------------------

    async def _establish(self) -> None:
        """Connect the subscriber connection and write SSUBSCRIBE for every channel."""
        await self._sub.connect()  # type: ignore[no-untyped-call]  # untyped in redis-py
        self._arm()
        channels = [self._inbox, *self._channels] if self._inbox else [*self._channels]
        self._unanswered = dict.fromkeys(channels, 1)
        self._restoring = set(channels)
        # Set before the write yields: a subscribe() from now on writes its own command
        # behind these, instead of being missed by the list above.
        self._connected = True
        if not channels:  # a shard subscriber that holds nothing yet: nothing to restore
            self._restoring = None
            self._healthy = self._ever_healthy = True
            return
        # One command per channel: on a cluster, one SSUBSCRIBE may only name one slot.
        commands = [(b"SSUBSCRIBE", channel) for channel in channels]
        await self._sub.send_packed_command(self._sub.pack_commands(commands), check_health=False)

    async def _read_loop(self) -> None:
        while True:
            try:
                await self._pump()
            except UNREACHABLE as exc:
                self._lost(exc)
            except Exception as exc:
                # A protocol error leaves the connection unusable: start over on a new one.
                log.exception("the Redis pub/sub reader failed")
                self._lost(exc)
            await self._reconnect()

    def _lost(self, exc: BaseException) -> None:
        if self._healthy:
            log.warning("lost the Redis pub/sub connection: %s", exc)
            if self._on_trouble is not None:
                self._on_trouble()
        self._connected = self._healthy = False
        self._restoring = None
        self._disarm()
        # Commands in flight on the old connection are never answered; the reconnect
        # writes one SSUBSCRIBE per wanted channel and counts afresh.
        self._unanswered.clear()

    async def _reconnect(self) -> None:
        delay, longest = RECONNECT_BACKOFF
        while True:
            await self._sub.disconnect(nowait=True)
            try:
                await self._establish()
                return
            except Exception as exc:  # unreachable, or refused (AUTH, SELECT): retry alike
                self._lost(exc)
                log.debug("Redis reconnect failed, next try in %gs: %s", delay, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, longest)

    async def _pump(self) -> None:
        """Read and dispatch replies until the connection fails.

        With a batch handler (:meth:`hand_batches_to`), room frames are gathered while the
        next reply is already buffered and handed over when the reader would have to wait
        for the socket, or when another kind of reply comes between."""
        sub = self._sub
        batch: list[bytes] = []
        try:
            while True:
                if batch and not self._buffered():
                    await self._hand_rooms(batch)
                    batch = []
                try:
                    # math.inf: block without a timer (the watchdog bounds the wait).
                    reply = await sub.read_response(timeout=math.inf, push_request=True)
                except ResponseError as exc:  # e.g. a refused SSUBSCRIBE (ACL, cluster MOVED)
                    self._heard = True
                    if self._on_trouble is not None and str(exc).startswith("MOVED"):
                        log.info("Redis Cluster moved a slot: %s", exc)
                        self._on_trouble()
                    else:
                        log.error("Redis refused a pub/sub command: %s", exc)
                    continue
                self._heard = True
                kind = reply[0]
                if kind == b"smessage":
                    if self._on_rooms is not None and reply[1] in self._channels:
                        self.received += 1
                        batch.append(reply[2])
                        continue
                    if batch:
                        await self._hand_rooms(batch)
                        batch = []
                    await self._dispatch(reply[1], reply[2])
                elif kind == b"ssubscribe":
                    if batch:
                        await self._hand_rooms(batch)
                        batch = []
                    await self._confirmed(reply[1])
                elif kind == b"sunsubscribe":
                    # Wanted still: the server ended it itself, as a cluster node does when
                    # the channel's slot moves to another shard.
                    if self._on_trouble is not None and reply[1] in self._channels:
                        self._on_trouble()
                # pong replies need nothing.
        except Exception:
            if batch:  # read before the connection failed: delivered all the same
                await self._hand_rooms(batch)
            raise

    def _buffered(self) -> bool:
        """Whether the next reply is already read off the socket (in hiredis's buffer),
        so reading it will not wait. False without hiredis: then frames go one by one."""
        reader = getattr(getattr(self._sub, "_parser", None), "_reader", None)
        has_data = getattr(reader, "has_data", None)
        return bool(has_data()) if has_data is not None else False

    async def _hand_rooms(self, frames: list[bytes]) -> None:
        assert self._on_room is not None and self._on_rooms is not None
        try:
            if len(frames) == 1:
                await self._on_room(frames[0])
            else:
                await self._on_rooms(frames)
        except Exception:
            # One bad frame must not end the node's subscriptions.
            log.exception("a broker frame handler failed")

    # -- the watchdog ------------------------------------------------------------------

    def _arm(self) -> None:
        self._disarm()
        self._heard = self._pinged = False
        self._watchdog = asyncio.get_running_loop().call_later(IDLE_PING, self._watch)

    def _disarm(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _watch(self) -> None:
        self._watchdog = None
        if not self._connected:
            return  # the reader's reconnect arms a new watchdog
        if self._heard:
            self._heard = self._pinged = False
        elif not self._pinged:
            self._pinged = True
            self._chore(self._ping())
        else:
            log.warning("Redis sent nothing for %gs, not even a PONG: reconnecting", 2 * IDLE_PING)
            # The blocked read then fails, and the reader reconnects.
            self._chore(self._sub.disconnect(nowait=True))
            return
        self._watchdog = asyncio.get_running_loop().call_later(IDLE_PING, self._watch)

    async def _ping(self) -> None:
        if self._writable():
            with contextlib.suppress(*UNREACHABLE):
                await self._sub.send_command(b"PING", check_health=False)

    def _chore(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    async def _dispatch(self, channel: bytes, data: bytes) -> None:
        if channel in self._channels:
            self.received += 1
            handler = self._on_room
        elif channel == self._inbox:
            handler = self._on_inbox
        else:
            return  # a room unsubscribed a moment ago
        assert handler is not None
        try:
            await handler(data)
        except Exception:
            # One bad frame must not end the node's subscriptions.
            log.exception("a broker frame handler failed")

    async def _confirmed(self, channel: bytes) -> None:
        left = self._unanswered.get(channel, 0) - 1
        if left > 0:
            # An earlier SSUBSCRIBE of the channel; waiters need the latest one (an
            # SUNSUBSCRIBE may have been written between the two).
            self._unanswered[channel] = left
            return
        self._unanswered.pop(channel, None)
        for future in self._waiters.pop(channel, ()):
            if not future.done():
                future.set_result(None)
        restoring = self._restoring
        if restoring is None:
            return
        restoring.discard(channel)
        if restoring:
            return
        self._restoring = None
        self._healthy = True
        if not self._ever_healthy:
            self._ever_healthy = True
            return
        log.info("Redis pub/sub connection restored (%d rooms)", len(self._channels))
        assert self._on_reconnect is not None
        try:
            await self._on_reconnect()
        except Exception:
            log.exception("the broker reconnect handler failed")
