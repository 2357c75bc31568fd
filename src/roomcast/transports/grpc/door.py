"""The gRPC door: one grpc.aio server, on the node's event loop, serving the Agent,
Heartbeat, Lobby and Channel services on one address."""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc

from ...config import Settings
from ...core.models import ConnId, RoomId, UserId
from ...core.ratelimit import TokenBucket
from ...core.service import ChatService, Session
from ...exceptions import ChatError, ConfigError, ErrorCode
from ...grpc import client_to_agent_pb2_grpc as pb2_grpc
from .agent import AgentService
from .callers import Callers
from .channel import ChannelService
from .errors import Context, abort, answer
from .heartbeat import HeartbeatService
from .lobby import LobbyService
from .malformed import add_checked
from .streams import GrpcTransport
from .users import GrpcUser, Users

if TYPE_CHECKING:
    from ...node import Node

log = logging.getLogger(__name__)

T = TypeVar("T")

BEAT = 1.0
"""Seconds between two beats of a heartbeat stream (less for very short timeouts)."""

STOP_GRACE = 1.0
"""Seconds calls may take to finish when the door stops."""

BUCKETS_MAX = 10_000
"""Rate-limit buckets kept for the most recent senders of this node."""


@dataclass(frozen=True, slots=True)
class _Sender:
    """The connection a gRPC user sends through; it receives nothing."""

    id: ConnId
    transport: GrpcTransport


class GrpcDoor:
    """Serves the gRPC protocol of ``proto/client_to_agent.proto`` for one node."""

    def __init__(self, node: Node) -> None:
        settings = node.settings
        self.settings = settings
        self.service: ChatService = node.service
        self.beat = min(BEAT, settings.liveness_timeout / 4)
        # The reaper runs every heartbeat_interval: expire that much earlier, so a silent
        # user is gone within the liveness timeout, not just after it.
        ttl = max(settings.liveness_timeout - settings.heartbeat_interval, 2 * self.beat)
        self.users = Users(node.service, ttl=ttl)
        self.callers = Callers(node.service, self.users)
        """Who calls: each call's token, on a server that checks tokens."""
        self.transport = GrpcTransport(node.service, self._still_member)
        self.address = ""
        """host:port that clients dial for every service (set by :meth:`start`)."""
        self.port = 0
        self._server: Any = None
        self._stopping = asyncio.Event()
        self._buckets: OrderedDict[UserId, TokenBucket] = OrderedDict()
        self._request_buckets: OrderedDict[UserId, TokenBucket] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.refused: collections.Counter[str] = collections.Counter()
        """Calls this door ended with a status other than OK, by the status's name."""

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def start(self) -> None:
        await self.users.lobby()
        server = grpc.aio.server(options=_server_options(self.settings))
        services: list[tuple[Callable[[Any, Any], None], object]] = [
            (pb2_grpc.add_AgentServicer_to_server, AgentService(self)),
            (pb2_grpc.add_HeartbeatServicer_to_server, HeartbeatService(self)),
            (pb2_grpc.add_LobbyServicer_to_server, LobbyService(self)),
            (pb2_grpc.add_ChannelServicer_to_server, ChannelService(self)),
        ]
        for add, servicer in services:
            add_checked(server, add, servicer, self.refused)
        bind = f"{_host(self.settings.host)}:{self.settings.grpc_port}"
        try:
            port = server.add_insecure_port(bind)
        except RuntimeError as exc:
            raise ConfigError(f"the gRPC door cannot listen on {bind}: {exc}") from exc
        if not port:
            raise ConfigError(f"the gRPC door cannot listen on {bind}")
        await server.start()
        self._server = server
        self.port = port
        self.address = public_address(self.settings, port)
        self._sweeper = asyncio.create_task(self._sweep(), name="roomcast-grpc-sweep")
        log.info("gRPC door on %s (clients dial %s)", bind, self.address)

    async def stop(self) -> None:
        """End every stream of this node, then the server. Users whose heartbeat was here
        stay logged in until their liveness lapses, so a client can beat elsewhere."""
        self._stopping.set()
        if self._sweeper is not None:
            await asyncio.wait([self._sweeper], timeout=STOP_GRACE)
            self._sweeper.cancel()
        self.transport.close_all()
        if self._server is not None:
            await self._server.stop(STOP_GRACE)
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=STOP_GRACE)

    async def _sweep(self) -> None:
        while not self.stopping:
            await self.pause(self.settings.liveness_timeout)
            if not self.stopping:
                try:
                    await self.transport.sweep()
                except Exception:
                    log.warning("sweeping gRPC streams failed", exc_info=True)

    # -- for the servicers ---------------------------------------------------------------

    async def pause(self, seconds: float) -> None:
        """Sleep, but return as soon as the door stops."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass

    async def send(
        self, user: GrpcUser, room: RoomId, text: str, message_id: str | None = None
    ) -> None:
        """Send a chat message as ``user`` to ``room`` (which it is a member of); with
        ``message_id``, one the room stores once however often it is sent (see
        :meth:`~roomcast.core.service.ChatService.send`)."""
        sender = _Sender(user.conn, self.transport)
        session = Session(sender, user.user, {room}, self._bucket(user.index))
        await self.service.send(session, room, text, message_id)

    async def remove(self, user: GrpcUser) -> bool:
        """Log the user out (see :meth:`Users.remove`); False when it was gone already."""
        removed = await self.users.remove(user)
        self.quit_here(user.index)
        return removed

    def quit_here(self, index: UserId) -> None:
        """On a server that checks tokens, end a logged-out user's streams on this node at
        once. Its leave events, which do that elsewhere, may go untold: a user of a token
        can still be in the lobby or its channel through Socket.IO. (Streams on other
        nodes end at their next sweep.) An open server waits for the events, as ever."""
        if self.service.auth is not None:
            self.transport.quit_user(index)

    async def answer(self, context: Context, call: Awaitable[T]) -> T:
        """Await ``call``; what it raises ends the gRPC call with a status, counted in
        :attr:`refused` (see :func:`~roomcast.transports.grpc.errors.answer`)."""
        return await answer(context, call, self.refused)

    async def abort(self, context: Context, code: Any, message: str) -> NoReturn:
        """End the gRPC call with ``code`` and ``message``, counted in :attr:`refused`."""
        await abort(context, code, message, self.refused)

    def spend(self, user: GrpcUser) -> None:
        """Count a costly request (a new channel) against the user's rate limit."""
        bucket = self._bucket(user.index)
        if bucket is not None and not bucket.take():
            raise ChatError(ErrorCode.RATE_LIMITED, "too many requests, slow down")

    def spend_request(self, user: UserId) -> None:
        """Count a command (listing, joining, leaving) against the user's request rate."""
        settings = self.settings
        bucket = _kept_bucket(
            self._request_buckets,
            user,
            settings.request_rate_limit,
            settings.request_rate_burst,
        )
        if bucket is not None and not bucket.take():
            raise ChatError(ErrorCode.RATE_LIMITED, "too many requests, slow down")

    def spawn(self, coro: Awaitable[object], what: str) -> None:
        """Run ``coro`` in the background; failures are logged."""

        async def run() -> None:
            try:
                await coro
            except Exception:
                log.warning("%s failed", what, exc_info=True)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _bucket(self, user: UserId) -> TokenBucket | None:
        return _kept_bucket(self._buckets, user, self.settings.rate_limit, self.settings.rate_burst)

    async def _still_member(self, index: UserId, room: RoomId) -> bool:
        user = await self.users.find(index)
        if user is None:
            return False
        return room == (await self.users.lobby()).id or user.channel == room


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def public_address(settings: Settings, port: int) -> str:
    """The host:port clients dial: ``grpc_public_address``, else the listening address
    (this host's name when listening on every interface)."""
    if settings.grpc_public_address:
        return settings.grpc_public_address
    host = settings.host
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = socket.gethostname()
    return f"{_host(host)}:{port}"


def _server_options(settings: Settings) -> list[tuple[str, int]]:
    # Keepalive pings find clients that vanished without closing their connection (a
    # host that froze or lost power, a dropped NAT mapping) within the liveness timeout:
    # a ping every third of it, unanswered for another third, closes the connection, so
    # the client's streams end and its user is removed.
    third = max(int(settings.liveness_timeout * 1000 / 3), 1000)
    return [
        # Workers of one node share the port; anything else already on it is an error.
        ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
        ("grpc.keepalive_time_ms", third),
        ("grpc.keepalive_timeout_ms", third),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.ping_timeout_ms", third),
    ]


def _kept_bucket(
    buckets: OrderedDict[UserId, TokenBucket], user: UserId, rate: float, burst: int
) -> TokenBucket | None:
    """The user's bucket in ``buckets`` (made full the first time; the least recently used
    forgotten past ``BUCKETS_MAX``); None when ``rate`` is 0 (no limit)."""
    if rate <= 0:
        return None
    bucket = buckets.get(user)
    if bucket is None:
        bucket = TokenBucket(rate, burst)
        buckets[user] = bucket
        while len(buckets) > BUCKETS_MAX:
            buckets.popitem(last=False)
    else:
        buckets.move_to_end(user)
    return bucket
