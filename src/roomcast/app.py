"""The ASGI application: Socket.IO and HTTP of one node, with the node's lifespan.

``create_app(settings)`` is the embedding API: mount the result into an existing
FastAPI/Starlette application, and either pass its :attr:`RoomcastApp.lifespan` to the host
application or let it start on its first request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import engineio.payload
import socketio

from .config import Settings
from .node import Node
from .transports import fastjson
from .transports.forward import Forwarder
from .transports.handoff import HandoffSender
from .transports.http import create_http_app
from .transports.socketio import MAX_PACKETS_PER_POST, JsonPacket, PollQueue, SocketIOTransport
from .workers import WorkerInfo

if TYPE_CHECKING:
    from .transports.grpc import GrpcDoor

log = logging.getLogger(__name__)

Scope = dict[str, Any]


class RoomcastApp:
    """An ASGI application serving one roomcast node."""

    def __init__(self, settings: Settings, *, worker: WorkerInfo | None = None) -> None:
        self.settings = settings
        self.worker = worker
        self.node = Node(settings)
        self.sio = socketio.AsyncServer(
            async_mode="asgi",
            cors_allowed_origins=settings.allowed_origins(),
            logger=False,
            engineio_logger=False,
            serializer=JsonPacket,
            json=fastjson,
            ping_interval=settings.ping_interval,
            ping_timeout=settings.ping_timeout,
        )
        # Each session's outgoing queue: a long-polling response carries no more packets
        # than a Python client accepts.
        self.sio.eio.create_queue = PollQueue
        # A long-polling POST may carry a client's whole burst (a class-wide setting of
        # python-engineio, which has no per-server one).
        engineio.payload.Payload.max_decode_packets = max(
            engineio.payload.Payload.max_decode_packets, MAX_PACKETS_PER_POST
        )
        self.socketio = SocketIOTransport(self.node.service, self.sio)
        self.node.metrics.collector.socketio = self.socketio
        self.http = create_http_app(self.node)
        self._asgi = socketio.ASGIApp(
            self.sio, other_asgi_app=self.http, socketio_path=settings.socketio_path
        )
        self._sio_prefix = settings.socketio_path.rstrip("/") + "/"
        self._forwarder: Forwarder | None = None
        self.handoff: HandoffSender | None = None
        """With workers: passes WebSocket upgrades to the worker that owns the session."""
        if worker is not None:
            self._forwarder = Forwarder()
            self.handoff = HandoffSender()
            self.node.metrics.collector.handoff_sender = self.handoff
            _tag_session_ids(self.sio, worker.tag())
        self._start_lock = asyncio.Lock()
        self.grpc: GrpcDoor | None = None
        self.on_started: list[Callable[[], None]] = []
        """Called once the node and the gRPC door have started."""

    async def startup(self) -> None:
        """Start the node and the gRPC door (idempotent)."""
        async with self._start_lock:
            if not self.node.started:
                await self.node.start()
                if self.settings.grpc_port:
                    from .transports.grpc import GrpcDoor

                    self.grpc = GrpcDoor(self.node)
                    self.node.metrics.collector.grpc_refused = self.grpc.refused
                    await self.grpc.start()
                for callback in self.on_started:
                    callback()

    async def shutdown(self) -> None:
        """Disconnect every client and stop the node."""
        if self.grpc is not None:
            await self.grpc.stop()
            self.grpc = None
        if self._forwarder is not None:
            await self._forwarder.close()
        await self.socketio.close()
        if self.node.started:
            for sid in list(self.socketio.sids()):
                with contextlib.suppress(Exception):
                    await self.socketio.disconnect(sid)
            await self.node.stop()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """A lifespan context for a host application: ``FastAPI(lifespan=chat.lifespan)``."""
        await self.startup()
        try:
            yield
        finally:
            await self.shutdown()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if not self.node.started:
            # Mounted in a host app whose lifespan does not reach us: start on first use.
            await self.startup()
        root = scope.get("root_path", "")
        if root and scope["type"] == "http" and scope["path"] in (root, ""):
            # Mounted at /chat: the page's relative URLs need /chat/.
            await _redirect(send, root + "/")
            return
        if root and scope["path"].startswith(root):
            # Starlette's Mount keeps the full path; the Socket.IO path is relative to us.
            scope = {**scope, "path": scope["path"][len(root) :] or "/"}
        if self.worker is not None and await self._forwarded(scope, receive, send):
            return
        if scope["type"] != "websocket":
            if scope["type"] == "http" and scope.get("method") == "POST":
                await self._post(scope, receive, send)
                return
            await self._asgi(scope, receive, send)
            return
        sid = _sid(scope)
        if sid is not None:  # an upgrade of a long-polling session
            self.socketio.websocket_opened(scope, sid)
        try:
            await self._asgi(scope, receive, send)
        finally:
            if sid is not None:
                self.socketio.websocket_closed(sid)

    async def _post(self, scope: Scope, receive: Any, send: Any) -> None:
        """A POST: a long-polling session's packets are counted before python-engineio
        decodes them. Past :data:`MAX_PACKETS_PER_POST` python-engineio refuses the
        payload inside a catch-all that still answers ``200 OK``, and every message in it
        would be lost without the client knowing. Such a POST is answered ``413`` instead,
        none of its packets is handled, and the session is closed, so the client sees a
        transport error and connects again."""
        sid = _sid(scope)
        if sid is None or not (scope["path"] + "/").startswith(self._sio_prefix):
            await self._asgi(scope, receive, send)
            return
        limit = self.sio.eio.max_http_buffer_size
        body = bytearray()
        more = True
        while more and len(body) <= limit:  # a longer one is refused by its length
            message = await receive()
            if message["type"] != "http.request":
                return  # the client has gone
            body += message.get("body", b"")
            more = bool(message.get("more_body", False))
        packets = _packet_count(bytes(body))
        eio = self.sio.eio
        session = eio.sockets.get(sid)
        if packets > MAX_PACKETS_PER_POST and session is not None:
            log.warning(
                "session %s sent %d packets in one POST (at most %d): closed",
                sid,
                packets,
                MAX_PACKETS_PER_POST,
            )
            # Not Engine.IO's disconnect, which waits, unbounded, for a poll to take the
            # CLOSE packet: a pending poll gets it, a later one is told the session is gone.
            await session.close(wait=False)
            eio.sockets.pop(sid, None)
            text = (
                f"too many packets in one POST: {packets} (at most {MAX_PACKETS_PER_POST}); "
                "none of them was handled and the session is closed"
            )
            # The CORS headers python-engineio gives its own answers, so a browser on
            # another allowed origin can read the reason.
            cors = eio._cors_headers(_environ(scope))
            await _plain(send, 413, text, [(k.lower().encode(), v.encode()) for k, v in cors])
            return
        replay: list[dict[str, Any]] = [
            {"type": "http.request", "body": bytes(body), "more_body": more}
        ]

        async def receive_again() -> Any:
            return replay.pop() if replay else await receive()

        await self._asgi(scope, receive_again, send)

    async def _forwarded(self, scope: Scope, receive: Any, send: Any) -> bool:
        """Hand an Engine.IO request to the sibling worker that owns its session."""
        assert self.worker is not None and self._forwarder is not None
        if not (scope["path"] + "/").startswith(self._sio_prefix):
            return False
        sid = _sid(scope)
        owner = self.worker.owner(sid) if sid else None
        if owner is None or owner == self.worker.index:
            return False
        uds = self.worker.uds(owner)
        if scope["type"] == "websocket":
            await self._forwarder.websocket(scope, receive, send, uds)
        else:
            await self._forwarder.http(scope, receive, send, uds)
        return True

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _sid(scope: Scope) -> str | None:
    """The Engine.IO session id a request names, if any."""
    query = scope.get("query_string", b"")
    if b"sid=" not in query:
        return None
    values = parse_qs(query.decode("latin-1")).get("sid")
    return values[0] if values else None


def _packet_count(body: bytes) -> int:
    """How many Engine.IO packets a long-polling POST body holds, counted the way
    python-engineio splits it (JSONP's ``d=`` form included)."""
    if body.startswith(b"d="):
        values = parse_qs(body.decode("utf-8", "replace")).get("d")
        return values[0].count("\x1e") + 1 if values else 1
    return body.count(b"\x1e") + 1


def _environ(scope: Scope) -> dict[str, str]:
    """The part of a WSGI environ python-engineio's CORS rules read, from an HTTP scope."""
    environ = {
        "REQUEST_METHOD": scope.get("method", "GET"),
        "wsgi.url_scheme": scope.get("scheme", "http"),
    }
    for name, value in scope.get("headers", ()):
        key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
        text = value.decode("latin-1")
        environ[key] = f"{environ[key]},{text}" if key in environ else text
    return environ


async def _plain(
    send: Any, status: int, text: str, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = text.encode()
    headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        *(extra or ()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _redirect(send: Any, location: str) -> None:
    headers = [(b"location", location.encode()), (b"content-length", b"0")]
    await send({"type": "http.response.start", "status": 308, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def _tag_session_ids(sio: socketio.AsyncServer, tag: str) -> None:
    """Prefix every Engine.IO session id with this worker's tag, so siblings can tell
    which worker owns a session."""
    generate = sio.eio.generate_id
    sio.eio.generate_id = lambda: tag + generate()


def create_app(settings: Settings | None = None, **overrides: Any) -> RoomcastApp:
    """The ASGI app of a roomcast node: ``create_app(Settings(store_url=...))`` or
    ``create_app(store_url=...)``."""
    if settings is None:
        settings = Settings(**overrides)
    elif overrides:
        settings = settings.model_copy(update=overrides)
    return RoomcastApp(settings)
