"""The Socket.IO door: python-socketio's AsyncServer on the ASGI app.

Every client event is answered by an ack, ``{"ok": true, ...}`` or
``{"ok": false, "error": {"code", "message"}}`` (see docs/protocol.md). Room frames are
written by :meth:`SocketIOTransport.deliver`: the Socket.IO packet is built once per frame
from the body bytes the publishing node encoded, and the same packet object goes to every
local member's Engine.IO socket.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

import socketio
from engineio import packet as eio_packet
from engineio.async_socket import AsyncSocket as _EngineSocket

from ..core import validation
from ..core.auth import past
from ..core.events import Frame
from ..core.hub import Connection
from ..core.models import ConnId, Message
from ..core.service import ChatService, JoinResult, Session, members_wire, rooms_wire
from ..exceptions import ChatError, ErrorCode, UnavailableError
from . import fastjson
from .fastws import (
    DirectWriter,
    RoomcastWebSocketProtocol,
    protocol_of,
    text_frame,
    text_frame_of,
    ws_frame,
)

if TYPE_CHECKING:
    from .engine import EngineWebSocket

log = logging.getLogger(__name__)

T = TypeVar("T")


class FrameWriter(Protocol):
    """Writes serialized WebSocket frames straight to a client's connection."""

    def ready(self) -> bool:
        """Whether frames can be written this way now."""
        ...

    def write(self, frame: bytes) -> bool:
        """Write one frame if :meth:`ready`; False (and nothing written) if not."""
        ...

    def hold(self) -> None:
        """Gather what is written from now on into one write, until :meth:`release`; a
        writer may also write at once."""
        ...

    def release(self) -> None:
        """Write what :meth:`hold` gathered."""
        ...


Reply = dict[str, Any]
Handler = Callable[[Session, dict[str, Any]], Awaitable[Reply]]


@dataclass(slots=True, eq=False)
class SocketIOConnection:
    """A Socket.IO client on this node."""

    id: ConnId
    sid: str
    eio_sid: str
    transport: SocketIOTransport
    writer: FrameWriter | None
    """The WebSocket fast path, where roomcast serves the connection itself."""
    native: bool = False
    """Served by an :class:`~roomcast.transports.engine.EngineWebSocket`: every write goes
    through ``writer``. Set from the start for a session opened on a WebSocket (which
    python-engineio does not know), or once a long-polling session has upgraded to one
    (see :meth:`SocketIOTransport.finish_upgrade`)."""


class JsonPacket(socketio.packet.Packet):  # type: ignore[misc]
    """Socket.IO packets as roomcast writes them: JSON payloads only.

    python-socketio searches every outgoing payload (each ack included) recursively for
    bytes to send as binary attachments; roomcast never sends bytes, so that search is
    skipped. Binary packets from clients are still decoded (and refused by validation).
    """

    uses_binary_events = False


MAX_PACKETS_PER_POLL = 16
"""Most packets in one long-polling response: python-engineio's clients refuse a payload
of more (``Payload.max_decode_packets``) and drop the connection."""


class PollQueue(asyncio.Queue[Any]):
    """Engine.IO's queue of one session's outgoing packets, handing at most
    :data:`MAX_PACKETS_PER_POLL` to each poll.

    python-engineio's poll takes one packet with :meth:`get`, then every other waiting
    packet with :meth:`get_nowait` until the queue says it is empty. A burst of a busy
    room, queued at once for a long-polling member, would go out as one payload too many
    packets long for a Python client; this queue says "empty" after the limit, and the
    rest go with the client's next poll, which it sends at once. On a WebSocket upgraded
    from polling the same limit only splits the queue's writes.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._taken = 0

    async def get(self) -> Any:
        self._taken = 0
        item = await super().get()
        self._taken = 1
        return item

    def get_nowait(self) -> Any:
        if self._taken >= MAX_PACKETS_PER_POLL:
            raise asyncio.QueueEmpty
        item = super().get_nowait()
        self._taken += 1
        return item


MAX_PACKETS_PER_POST = 1000
"""Most packets a client may send in one long-polling POST (python-engineio's
``Payload.max_decode_packets``, set by :class:`~roomcast.app.RoomcastApp`).

A client on long-polling sends everything it emitted while its last POST was under way
in the next one: a burst, or the emits a browser buffered while it was offline. Past
python-engineio's own limit of 16 the server refused the whole POST, yet answered it
``200 OK``, so every message in it was lost without a word. The size of a POST stays
bounded by ``max_http_buffer_size``, and a burst past the rate limit is refused message by
message, each with its ``rate_limited`` reply."""


MAX_IN_FLIGHT = 64
"""Events of one fast-path connection handled at once; past this its reading pauses."""

_RESERVED_EVENTS = frozenset(("connect", "connect_error", "disconnect"))

_REQUESTS = frozenset(("join", "leave", "history", "rooms", "members", "refresh"))
"""Events counted against the connection's request rate (``send``, ``typing``, ``edit``,
``delete`` and ``dm`` count against its message rate, in the service)."""

_KEPT_ENVIRON = frozenset(("REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "CONTENT_TYPE"))
"""What an upgraded session keeps of its long-poll's WSGI environ, besides the headers."""

_SEND_PING = _EngineSocket._send_ping
"""python-engineio's task that sends a session's next ping after the ping interval."""


class EventReader:
    """Takes a fast-path connection's Socket.IO events straight off its WebSocket.

    Handles ``42[...]`` and ``42<id>[...]`` (an EVENT on the default namespace, with or
    without an ack id) exactly as python-socketio would: the handler runs in a task of its
    own, and the ack, ``43<id>[reply]``, is written to the connection directly. Everything
    else (other packet types, namespaces, binary events, malformed JSON) is declined and
    takes python-socketio's path, which answers it as it always has.
    """

    __slots__ = ("_inflight", "_paused", "_proto", "_sid", "_transport", "_writer")

    def __init__(
        self,
        transport: SocketIOTransport,
        sid: str,
        writer: FrameWriter,
        proto: RoomcastWebSocketProtocol | EngineWebSocket,
    ) -> None:
        self._transport = transport
        self._sid = sid
        self._writer = writer
        self._proto = proto
        self._inflight = 0
        self._paused = False

    def __call__(self, data: bytes) -> bool:
        # Engine.IO MESSAGE (4) carrying a Socket.IO EVENT (2).
        if data[:2] != b"42" or not self._writer.ready():
            return False
        start = data.find(b"[", 2)
        if start < 0:
            return False
        ack = data[2:start]
        if ack and not (ack.isdigit() and len(ack) <= 15):
            return False
        try:
            # Invalid UTF-8 is declined and gets uvicorn's answer on the ASGI path; the
            # standard library reads integers beyond 64 bits exactly, as python-socketio's.
            args = json.loads(data[start:].decode())
        except ValueError:
            return False
        if not (args and isinstance(args, list) and isinstance(args[0], str)):
            return False
        if args[0] in _RESERVED_EVENTS:
            return False
        transport = self._transport
        if self._sid not in transport._by_sid:
            return False
        task = asyncio.get_running_loop().create_task(self._handle(args, int(ack) if ack else None))
        transport._tasks.add(task)
        task.add_done_callback(self._done)
        transport.direct_events += 1
        self._inflight += 1
        if self._inflight >= MAX_IN_FLIGHT:
            sock = self._proto.transport
            if sock.is_reading():
                sock.pause_reading()
                self._paused = True
        return True

    async def _handle(self, args: list[Any], ack: int | None) -> None:
        writer = self._writer
        # What the handling writes to this client before it first has to wait (its own
        # copy of a message it sent to a room) leaves with the reply, in one write.
        writer.hold()
        try:
            handling = self._transport._on_event(args[0], self._sid, *args[1:])
            reply = await UntilSuspended(handling, writer.release)
            if ack is not None:
                payload = b"43%d" % ack + fastjson.dumps([reply]).encode()
                writer.write(text_frame_of(payload))
        finally:
            writer.release()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._transport._tasks.discard(task)
        self._inflight -= 1
        if not task.cancelled() and task.exception() is not None:
            log.error("event failed", exc_info=task.exception())
        if self._paused and self._inflight <= MAX_IN_FLIGHT // 2:
            self._paused = False
            proto = self._proto
            if not proto.read_paused and not proto.transport.is_closing():
                proto.transport.resume_reading()


class UntilSuspended(Generic[T]):
    """Awaits a coroutine and calls ``on_suspend`` the first time it has to wait.

    The coroutine runs in the awaiting task exactly as with a plain ``await`` (what it
    awaits, returns and raises, and a cancellation, pass through unchanged); the
    callback lets the caller tell the part that ran at once from the rest."""

    __slots__ = ("_coro", "_on_suspend")

    def __init__(self, coro: Coroutine[Any, Any, T], on_suspend: Callable[[], None]) -> None:
        self._coro = coro
        self._on_suspend = on_suspend

    def __await__(self) -> Generator[Any, Any, T]:
        steps = self._coro.__await__()
        try:
            yielded = steps.send(None)
        except StopIteration as done:
            return cast(T, done.value)
        self._on_suspend()
        while True:
            try:
                try:
                    sent = yield yielded
                except GeneratorExit:
                    steps.close()
                    raise
                except BaseException as exc:  # a cancellation, or a future's exception
                    yielded = steps.throw(exc)
                else:
                    yielded = steps.send(sent)
            except StopIteration as done:
                return cast(T, done.value)


EXPIRY_CHECK = 1.0
"""Seconds between two looks for connections whose token has expired."""


def _welcome(session: Session) -> dict[str, Any]:
    """The welcome event: the user, and on a server that checks tokens when the
    connection's token expires (``refresh`` before then to keep the connection) and
    whether the user is a moderator (only when it is)."""
    if session.identity is None:
        return {"user": session.user.to_wire()}
    welcome = {"user": session.user.to_wire(), "expires": session.identity.expires}
    if session.identity.moderator:
        welcome["moderator"] = True
    return welcome


def _credentials(auth: Any) -> tuple[Any, Any]:
    """The ``name`` and ``token`` of a Socket.IO connect payload (``auth`` of the client)."""
    if not isinstance(auth, dict):
        return None, None
    return auth.get("name"), auth.get("token")


def _ok(**fields: Any) -> Reply:
    return {"ok": True, **fields}


def _error(error: ChatError) -> Reply:
    return {"ok": False, "error": error.to_dict()}


def _messages(messages: list[Message]) -> list[dict[str, Any]]:
    return [m.to_wire() for m in messages]


class _Drained:
    """Engine.IO's queue of a session that has upgraded to an EngineWebSocket: everything
    is written straight to the WebSocket, so it stays empty (one instance for all)."""

    __slots__ = ()

    def empty(self) -> bool:
        return True

    def qsize(self) -> int:
        return 0

    def put_nowait(self, item: Any) -> None:
        log.debug("a packet for an upgraded session's Engine.IO queue was dropped")

    async def put(self, item: Any) -> None:
        self.put_nowait(item)

    def get_nowait(self) -> Any:
        raise asyncio.QueueEmpty

    async def join(self) -> None:
        return None


_DRAINED = _Drained()


class SocketIOTransport:
    """Binds a ChatService to a python-socketio AsyncServer."""

    def __init__(self, service: ChatService, sio: socketio.AsyncServer) -> None:
        self.service = service
        self.sio = sio
        self._by_sid: dict[str, Session] = {}
        self._upgrades: dict[str, RoomcastWebSocketProtocol] = {}
        self._by_eio: dict[str, SocketIOConnection] = {}
        self.direct_writes = 0
        """Room frames written on the WebSocket fast path (one per recipient)."""
        self.queued_writes = 0
        """Room frames handed to Engine.IO's queue (long-polling, or not served by us)."""
        self.events = 0
        """Client events handled, on either path."""
        self.direct_events = 0
        """Client events read straight off a fast-path WebSocket by an EventReader."""
        self.refused: collections.Counter[ErrorCode] = collections.Counter()
        """Client events answered with an error, by its code."""
        self.upgrades_served = 0
        """Long-polling sessions that upgraded to an EngineWebSocket."""
        self._upgraded: dict[str, EngineWebSocket] = {}
        """Upgraded sessions whose client has not connected to namespace "/" yet."""
        self._handlers: dict[str, Handler] = {
            "join": self._join,
            "leave": self._leave,
            "send": self._send,
            "history": self._history,
            "rooms": self._rooms,
            "members": self._members,
            "typing": self._typing,
            "edit": self._edit,
            "delete": self._delete,
            "dm": self._dm,
            "refresh": self._refresh,
        }
        self._expiries: list[tuple[float, str]] = []
        """(token expiry, sid) of the connections of tokens, earliest first (a heap); an
        entry whose connection has since refreshed (or gone) is skipped when it comes up."""
        self._expirer: asyncio.Task[None] | None = None
        self.expired = 0
        """Connections ended because their token expired."""
        # Keep references to fire-and-forget tasks so they are not collected mid-flight.
        self._tasks: set[asyncio.Task[None]] = set()
        sio.on("connect", self._on_connect)
        sio.on("disconnect", self._on_disconnect)
        sio.on("*", self._on_event)
        self._track_ping_tasks()

    def _track_ping_tasks(self) -> None:
        """Remember each Engine.IO socket's pending ping task on the socket.

        python-engineio starts a session's first ping as a task that sleeps for the whole
        ping interval, and keeps no reference to it. Once a session has upgraded to an
        :class:`~roomcast.transports.engine.EngineWebSocket`, whose own heartbeat takes
        over, that task would only wake up to send a ping that goes nowhere; remembering
        it lets :meth:`finish_upgrade` cancel it (~1.7 KiB a session until it fires)."""
        eio = self.sio.eio
        start = eio.start_background_task

        def start_background_task(target: Any, *args: Any, **kwargs: Any) -> Any:
            task = start(target, *args, **kwargs)
            owner = getattr(target, "__self__", None)
            if getattr(target, "__func__", None) is _SEND_PING and owner is not None:
                owner.roomcast_ping_task = task
            return task

        eio.start_background_task = start_background_task

    def sids(self) -> list[str]:
        """Socket.IO session ids of the connected clients."""
        return list(self._by_sid)

    # -- delivery (the hot path) -------------------------------------------------------

    @staticmethod
    def _packet(frame: Frame) -> eio_packet.Packet:
        # A Socket.IO EVENT on namespace "/" is '2["<event>",<data>]'; the body is the
        # data already encoded as JSON by the publishing node.
        text = f'2["{frame.kind.event}",{frame.body.decode()}]'
        return eio_packet.Packet(eio_packet.MESSAGE, text)

    async def deliver(self, frame: Frame, conns: Collection[Connection]) -> None:
        await self.deliver_many((frame,), conns)

    async def deliver_many(self, frames: Sequence[Frame], conns: Collection[Connection]) -> None:
        packets = [self._packet(frame) for frame in frames]
        data: bytes | None = None
        direct = 0
        queued: list[Connection] | None = None
        for conn in conns:
            writer = conn.writer  # type: ignore[attr-defined]
            if writer is not None:
                if data is None:
                    # Encoded once for every member on the fast path: one WebSocket frame
                    # per packet, all of them in one write.
                    data = b"".join([text_frame(pkt.encode()) for pkt in packets])
                # One call per member: write() checks readiness itself.
                if writer.write(data):
                    direct += 1
                    continue
            if conn.native:  # type: ignore[attr-defined]  # closing: no other way to it
                continue
            if queued is None:
                queued = [conn]
            else:
                queued.append(conn)
        self.direct_writes += direct * len(frames)
        if queued is not None:
            await self._send_queued(packets, queued)

    async def _send_queued(
        self, packets: Sequence[eio_packet.Packet], conns: list[Connection]
    ) -> None:
        """Engine.IO's queue, for members off the fast path (long-polling, upgrading).

        Called once the loop over the room's members is done: a send may wait (Engine.IO
        closes a session whose pings stopped, and its disconnect changes the room's
        members), so it must not run while that loop is iterating them."""
        send_packet = self.sio.eio.send_packet
        for conn in conns:
            for pkt in packets:
                self.queued_writes += 1
                await send_packet(conn.eio_sid, pkt)  # type: ignore[attr-defined]

    async def deliver_one(self, frame: Frame, conn: Connection) -> None:
        await self.deliver(frame, (conn,))

    def websocket_opened(self, scope: dict[str, Any], sid: str) -> None:
        """An Engine.IO session is upgrading to a WebSocket roomcast serves itself: let its
        connection use the fast path once the upgrade is done."""
        proto = protocol_of(scope)
        if proto is None:
            return
        conn = self._by_eio.get(sid)
        if conn is not None and isinstance(conn.writer, DirectWriter):
            conn.writer.proto = proto
            self._read_events(conn)
        else:  # the Socket.IO connect may still come, over the new WebSocket
            self._upgrades[sid] = proto

    def _read_events(self, conn: SocketIOConnection) -> None:
        writer = conn.writer
        if isinstance(writer, DirectWriter) and writer.proto is not None:
            writer.proto.receiver = EventReader(self, conn.sid, writer, writer.proto)

    def websocket_closed(self, sid: str) -> None:
        self._upgrades.pop(sid, None)

    # -- connection lifecycle ----------------------------------------------------------

    async def _on_connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        name, token = _credentials(auth)
        eio_sid = self.sio.manager.eio_sid_from_sid(sid, "/")
        conn = SocketIOConnection(
            self.service.new_conn_id(), sid, eio_sid, self, self._writer(eio_sid, environ)
        )
        try:
            session = await self.service.connect(conn, name, token)
        except ChatError as exc:
            self.refused[exc.code] += 1
            raise socketio.exceptions.ConnectionRefusedError(exc.message, exc.to_dict()) from None
        if eio_sid not in self.sio.eio.sockets:
            # The session ended while the service connected it; python-socketio calls no
            # disconnect handler for a client that had not connected yet.
            await self.service.disconnect(conn.id)
            raise socketio.exceptions.ConnectionRefusedError("the session has ended")
        self._by_sid[sid] = session
        self._by_eio[eio_sid] = conn
        upgraded = self._upgraded.pop(eio_sid, None)
        if upgraded is not None:  # its session switched to a WebSocket meanwhile
            self._serve_upgraded(conn, upgraded)
        else:
            self._read_events(conn)
        # After the handler returns python-socketio confirms the connection; the welcome
        # goes out right after that confirmation.
        self._watch_expiry(sid, session)
        self._spawn(self.sio.emit("welcome", _welcome(session), to=sid))

    def _writer(self, eio_sid: str, environ: dict[str, Any]) -> DirectWriter | None:
        eio_socket = self.sio.eio.sockets.get(eio_sid)
        if eio_socket is None:
            return None
        scope = environ.get("asgi.scope") or {}
        proto: RoomcastWebSocketProtocol | None = protocol_of(scope)
        if proto is None:
            proto = self._upgrades.pop(eio_sid, None)
        return DirectWriter(eio_socket, proto)

    async def _on_disconnect(self, sid: str, reason: Any = None) -> None:
        session = self._by_sid.pop(sid, None)
        if session is not None:
            eio_sid = session.conn.eio_sid  # type: ignore[attr-defined]
            writer = session.conn.writer  # type: ignore[attr-defined]
            if isinstance(writer, DirectWriter) and writer.proto is not None:
                writer.proto.receiver = None
            self._upgrades.pop(eio_sid, None)
            self._by_eio.pop(eio_sid, None)
            if not session.conn.native:  # type: ignore[attr-defined]
                self._end_poll(eio_sid)
            await self.service.disconnect(session.conn.id)

    def _end_poll(self, eio_sid: str) -> None:
        """Answer the pending GET of a long-polling session that has ended.

        python-engineio leaves it waiting for a packet until its ping interval and timeout
        have passed, and a client waits for it before its disconnect returns; as Node's
        Engine.IO does, the poll is answered (with a NOOP, as Engine.IO ends a poll before
        an upgrade) at once."""
        sock = self.sio.eio.sockets.get(eio_sid)
        if sock is not None and not sock.upgraded:
            sock.queue.put_nowait(eio_packet.Packet(eio_packet.NOOP))

    # -- token expiry ------------------------------------------------------------------

    def _watch_expiry(self, sid: str, session: Session) -> None:
        """End the connection when its token expires (see :meth:`_expire_loop`)."""
        identity = session.identity
        if identity is None or identity.expires == math.inf:
            return
        heapq.heappush(self._expiries, (identity.expires, sid))
        if self._expirer is None:
            self._expirer = asyncio.create_task(self._expire_loop(), name="roomcast-expiry")

    async def _expire_loop(self) -> None:
        """One task for every connection of the node: each second, end the connections
        whose token (the newest they sent) expired."""
        while True:
            await asyncio.sleep(EXPIRY_CHECK)
            now = time.time()
            while self._expiries and past(self._expiries[0][0], now):
                expires, sid = heapq.heappop(self._expiries)
                session = self._by_sid.get(sid)
                if session is None or session.identity is None:
                    continue
                if session.identity.expires != expires:
                    continue  # refreshed since
                try:
                    await self._end_expired(sid, session)
                except Exception:
                    log.warning("ending the expired connection %s failed", sid, exc_info=True)

    async def _end_expired(self, sid: str, session: Session) -> None:
        """Tell the client why (``expired``), then disconnect it: a Socket.IO client does
        not reconnect by itself after a disconnect from the server's side."""
        self.expired += 1
        told = {"code": ErrorCode.UNAUTHORIZED.value, "message": "the token has expired"}
        if session.conn.native:  # type: ignore[attr-defined]
            writer: EngineWebSocket = session.conn.writer  # type: ignore[attr-defined]
            writer.send_text("42" + fastjson.dumps(["expired", told]))
        else:
            await self.sio.emit("expired", told, to=sid)
        await self.disconnect(sid)

    async def close(self) -> None:
        """Stop ending expired connections (the node is shutting down)."""
        if self._expirer is not None:
            self._expirer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expirer
            self._expirer = None

    async def disconnect(self, sid: str) -> None:
        """Disconnect a client from the server's side."""
        session = self._by_sid.get(sid)
        writer = session.conn.writer if session is not None else None  # type: ignore[attr-defined]
        if session is not None and session.conn.native:  # type: ignore[attr-defined]
            sock: EngineWebSocket = writer  # type: ignore[assignment]
            sock.send_text("41")
            self._native_left(sock)
            sock.close(1000)
            return
        eio_sid = session.conn.eio_sid if session is not None else None  # type: ignore[attr-defined]
        await self.sio.disconnect(sid)
        if eio_sid is not None:
            await self._close_engine_session(eio_sid)

    async def _close_engine_session(self, eio_sid: str) -> None:
        """End a disconnected client's Engine.IO session as well: python-socketio's
        disconnect leaves only the namespace, so a long-polling client that does not close
        its side (python-socketio's own) would keep a poll open on this node until the next
        ping, 25 s on — and a node shutting down would wait for it. Its pending poll is
        answered with the close; one that comes after gets 400, as for any ended session.
        Not waiting for the client to fetch the close: it may never come back."""
        sock = self.sio.eio.sockets.get(eio_sid)
        if sock is None:
            return
        await sock.close(wait=False, reason=self.sio.eio.reason.SERVER_DISCONNECT)
        self.sio.eio.sockets.pop(eio_sid, None)

    # -- sessions served by EngineWebSocket --------------------------------------------

    def native_message(self, sock: EngineWebSocket, text: str) -> None:
        """A Socket.IO packet of an :class:`EngineWebSocket` session that its event
        reader did not take, answered as python-socketio answers it."""
        try:
            pkt = JsonPacket(encoded_packet=text)
        except Exception:  # python-socketio drops what it cannot decode
            log.debug("dropped an undecodable Socket.IO packet")
            return
        kind = pkt.packet_type
        namespace = pkt.namespace or "/"
        if kind == socketio.packet.CONNECT:
            if namespace != "/":
                error = JsonPacket(
                    socketio.packet.CONNECT_ERROR, data="Unable to connect", namespace=namespace
                )
                sock.send_text("4" + error.encode())
            elif sock.sid is None and not sock.connecting:
                sock.connecting = True
                self._spawn(self._native_connect(sock, pkt.data))
        elif namespace != "/" or sock.sid is None:
            return  # python-socketio ignores packets of a namespace not connected
        elif kind == socketio.packet.DISCONNECT:
            self._native_left(sock)
        elif kind == socketio.packet.EVENT:
            self._native_event(sock, pkt.id, pkt.data)
        elif kind in (socketio.packet.BINARY_EVENT, socketio.packet.BINARY_ACK):
            if pkt.attachment_count:
                sock._binary = pkt
        # ACK: roomcast asks no client for acks; CONNECT_ERROR never comes from a client.

    def native_binary(self, sock: EngineWebSocket, data: bytes) -> None:
        """A binary WebSocket message: an attachment of the pending binary packet."""
        pkt = sock._binary
        if pkt is None:
            return
        try:
            complete = pkt.add_attachment(data)
        except ValueError:
            sock._binary = None
            return
        if complete:
            sock._binary = None
            if pkt.packet_type == socketio.packet.BINARY_EVENT and sock.sid is not None:
                self._native_event(sock, pkt.id, pkt.data)

    def _native_event(self, sock: EngineWebSocket, ack: int | None, data: Any) -> None:
        if not (isinstance(data, list) and data) or data[0] in _RESERVED_EVENTS:
            return
        sid = sock.sid
        assert sid is not None

        async def handle() -> None:
            reply = await self._on_event(data[0], sid, *data[1:])
            if ack is not None:
                sock.write(text_frame_of(b"43%d" % ack + fastjson.dumps([reply]).encode()))

        self._spawn(handle())

    async def _native_connect(self, sock: EngineWebSocket, auth: Any) -> None:
        name, token = _credentials(auth)
        sid = self.sio.eio.generate_id()
        conn = SocketIOConnection(
            self.service.new_conn_id(), sid, sock.eio_sid, self, sock, native=True
        )
        try:
            session = await self.service.connect(conn, name, token)
        except ChatError as exc:
            self.refused[exc.code] += 1
            sock.connecting = False
            refusal = {"message": exc.message, "data": exc.to_dict()}
            sock.send_text("44" + fastjson.dumps(refusal))
            return
        except Exception:
            sock.connecting = False
            log.exception("connect failed")
            refusal = {"message": "the service is unavailable, try again"}
            sock.send_text("44" + fastjson.dumps(refusal))
            return
        sock.connecting = False
        if sock.closing:  # gone while it was connecting
            await self.service.disconnect(conn.id)
            return
        self._upgraded.pop(sock.eio_sid, None)
        self._by_sid[sid] = session
        self._by_eio[sock.eio_sid] = conn
        sock.sid = sid
        sock.conn = conn
        sock.reader = EventReader(self, sid, sock, sock)
        sock.send_text("40" + fastjson.dumps({"sid": sid}))
        self._watch_expiry(sid, session)
        sock.send_text("42" + fastjson.dumps(["welcome", _welcome(session)]))

    def _native_left(self, sock: EngineWebSocket) -> None:
        """The client's Socket.IO session has ended (its WebSocket may stay open)."""
        sid, conn = sock.sid, sock.conn
        sock.sid = sock.conn = sock.reader = None
        sock._binary = None
        if sock.upgrading is not None:  # the upgrade was not finished: polling goes on
            sock.upgrading.upgrading = False
            sock.upgrading = None
        if sock.shell is not None:
            # python-socketio knows the sid only if the connect came over long-polling.
            self._upgraded.pop(sock.eio_sid, None)
            self._forget_shell(sock, sid)
        if sid is None or conn is None:
            return
        self._by_sid.pop(sid, None)
        self._by_eio.pop(conn.eio_sid, None)
        self._spawn(self.service.disconnect(conn.id))

    def native_closed(self, sock: EngineWebSocket) -> None:
        """An :class:`EngineWebSocket` is closing or closed."""
        self._native_left(sock)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        async def run() -> None:
            try:
                await coro
            except Exception:
                log.warning("background write failed", exc_info=True)

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- long-polling sessions upgrading to an EngineWebSocket -------------------------

    def upgradable(self, eio_sid: str) -> bool:
        """Whether a WebSocket upgrade of this long-polling session can be served by an
        :class:`EngineWebSocket`: the session lives in this process and no upgrade of it
        is under way or done."""
        eio_socket = self.sio.eio.sockets.get(eio_sid)
        return (
            eio_socket is not None
            and not (eio_socket.upgraded or eio_socket.upgrading)
            and not (eio_socket.closing or eio_socket.closed)
        )

    def begin_upgrade(self, sock: EngineWebSocket) -> bool:
        """The client probed the new WebSocket (``2probe``): hold the session's packets
        in Engine.IO's queue and end its pending poll, as python-engineio does."""
        if not self.upgradable(sock.eio_sid):
            return False
        eio_socket = self.sio.eio.sockets[sock.eio_sid]
        eio_socket.upgrading = True
        eio_socket.queue.put_nowait(eio_packet.Packet(eio_packet.NOOP))  # ends the poll
        sock.upgrading = eio_socket
        return True

    def finish_upgrade(self, sock: EngineWebSocket) -> bool:
        """The client switched to the WebSocket (``5``): from here on the session is
        served like one opened on a WebSocket, with no task of its own.

        What Engine.IO queued meanwhile is written first, in order. python-engineio's
        socket stays registered as the session's shell, without a task, for
        python-socketio to answer what the client sent over long-polling before the
        switch — its connect included: anything sent to the shell goes to the WebSocket,
        but pings (the WebSocket has its own heartbeat)."""
        eio_socket, sock.upgrading = sock.upgrading, None
        if (
            eio_socket is None
            or self.sio.eio.sockets.get(sock.eio_sid) is not eio_socket
            or eio_socket.closing
            or eio_socket.closed
        ):
            if eio_socket is not None:
                eio_socket.upgrading = False
            return False
        eio_socket.upgraded = True
        eio_socket.upgrading = False
        queue = eio_socket.queue
        while not queue.empty():
            pkt = asyncio.Queue.get_nowait(queue)  # past PollQueue's per-poll limit
            queue.task_done()
            if pkt is not None and pkt.packet_type not in (eio_packet.NOOP, eio_packet.PING):
                sock.write(ws_frame(pkt.encode()))

        eio_socket.queue = _DRAINED  # an asyncio.Queue costs ~3 KiB, kept for nothing
        eio_socket.send = sock.shell_send
        eio_socket.check_ping_timeout = sock.shell_alive
        eio_socket.last_ping = None
        ping = eio_socket.__dict__.pop("roomcast_ping_task", None)
        if ping is not None:
            ping.cancel()
        environ = self.sio.environ.get(sock.eio_sid)
        if environ is not None:
            # The request's headers, path and query stay; the ASGI objects of the
            # long-poll that opened the session (its scope, receive and send, and what
            # they hold) and the WSGI boilerplate every request shares are not kept for
            # as long as the WebSocket lives.
            self.sio.environ[sock.eio_sid] = {
                k: v for k, v in environ.items() if k in _KEPT_ENVIRON or k.startswith("HTTP_")
            }
        sock.shell = eio_socket
        self._upgrades.pop(sock.eio_sid, None)
        self.upgrades_served += 1
        conn = self._by_eio.get(sock.eio_sid)
        if conn is not None:
            self._serve_upgraded(conn, sock)
        else:  # its connect is still to come: over long-polling, or on the WebSocket
            self._upgraded[sock.eio_sid] = sock
        return True

    def _serve_upgraded(self, conn: SocketIOConnection, sock: EngineWebSocket) -> None:
        """Bind a Socket.IO connection to the EngineWebSocket its session upgraded to."""
        conn.writer = sock
        conn.native = True
        sock.sid = conn.sid
        sock.conn = conn
        sock.reader = EventReader(self, conn.sid, sock, sock)

    def _forget_shell(self, sock: EngineWebSocket, sid: str | None) -> None:
        """An upgraded session has ended: forget it in python-engineio and
        python-socketio without their disconnect handlers (the service is told once, by
        the caller)."""
        shell, sock.shell = sock.shell, None
        if shell is None:
            return
        shell.closed = True
        eio_sid = sock.eio_sid
        if self.sio.eio.sockets.get(eio_sid) is shell:
            del self.sio.eio.sockets[eio_sid]
        if sid is not None:
            self.sio.manager.basic_disconnect(sid, "/")
        self.sio.environ.pop(eio_sid, None)
        self.sio._binary_packet.pop(eio_sid, None)

    # -- events ------------------------------------------------------------------------

    async def _on_event(self, event: str, sid: str, *args: Any) -> Reply:
        self.events += 1
        session = self._by_sid.get(sid)
        handler = self._handlers.get(event)
        try:
            if session is None:
                raise ChatError(ErrorCode.BAD_REQUEST, "not connected")
            if handler is None:
                raise ChatError(ErrorCode.UNKNOWN_EVENT, f"unknown event {event!r}")
            if event in _REQUESTS:
                self.service.spend_request(session)
            if len(args) > 1:
                raise ChatError(ErrorCode.BAD_REQUEST, "an event takes one argument")
            data = validation.payload(args[0] if args else None)
            return await handler(session, data)
        except ChatError as exc:
            refusal = exc
        except UnavailableError as exc:
            log.warning("event %r: %s", event, exc)
            refusal = ChatError(ErrorCode.UNAVAILABLE, "the service is unavailable, try again")
        except Exception:
            log.exception("event %r failed", event)
            refusal = ChatError(ErrorCode.UNAVAILABLE, "internal error, try again")
        self.refused[refusal.code] += 1
        return _error(refusal)

    async def _join(self, session: Session, data: dict[str, Any]) -> Reply:
        ref = validation.room_ref(data)
        since = validation.since(data)
        listed = validation.flag(data, "members", default=True)
        result = await self.service.join(session, ref, since, members=listed)
        self._spawn(self._activate(session, result))
        reply = _ok(room=result.room.to_wire(), epoch=result.room.epoch, seq=result.seq)
        if result.members is not None:
            reply["members"] = [u.to_wire() for u in result.members]
        else:
            reply["count"] = result.count
        if result.recovered is not None:
            reply["recovered"] = result.recovered
            reply["missed"] = _messages(result.missed)
            reply["changed"] = _messages(result.changed)
        return reply

    async def _activate(self, session: Session, result: JoinResult) -> None:
        # Runs after python-socketio has queued the join ack: held frames follow the reply,
        # in one write (a join into a busy room gathers a frame for each joiner announced
        # meanwhile).
        frames = self.service.activate(session, result)
        if frames:
            await self.deliver_many(frames, (session.conn,))

    async def _leave(self, session: Session, data: dict[str, Any]) -> Reply:
        room = await self.service.leave(session, validation.room_ref(data))
        return _ok(room=room.to_wire())

    async def _send(self, session: Session, data: dict[str, Any]) -> Reply:
        ref = validation.room_ref(data)
        text = validation.text(data)
        message = await self.service.send(session, ref, text, data.get("id"))
        return _ok(message=message.to_wire())

    async def _history(self, session: Session, data: dict[str, Any]) -> Reply:
        ref = validation.room_ref(data)
        before, limit = validation.history_args(data)
        page = await self.service.history_page(ref, before, limit, session.identity)
        return _ok(messages=_messages(page))

    async def _rooms(self, session: Session, data: dict[str, Any]) -> Reply:
        occupied, after, limit = validation.rooms_args(data)
        if limit is not None and not occupied:
            page = await self.service.rooms_page(after, limit, session.identity)
            return _ok(**rooms_wire(*page))
        rooms = await self.service.rooms(
            occupied=occupied, after=after, limit=limit, identity=session.identity
        )
        return _ok(**rooms_wire(rooms))

    async def _members(self, session: Session, data: dict[str, Any]) -> Reply:
        after, limit = validation.members_args(data)
        room, members, following = await self.service.members(
            validation.room_ref(data), after=after, limit=limit, identity=session.identity
        )
        return _ok(room=room.to_wire(), **members_wire(members, following))

    async def _dm(self, session: Session, data: dict[str, Any]) -> Reply:
        to = validation.user_id(data, "to")
        text = validation.text(data)
        return _ok(dm=await self.service.dm(session, to, text))

    async def _refresh(self, session: Session, data: dict[str, Any]) -> Reply:
        identity, left = await self.service.refresh(session, data.get("token"))
        sid = session.conn.sid  # type: ignore[attr-defined]
        self._watch_expiry(sid, session)
        reply = _ok(expires=identity.expires, left=[room.to_wire() for room in left])
        if identity.moderator:
            reply["moderator"] = True
        return reply

    async def _edit(self, session: Session, data: dict[str, Any]) -> Reply:
        ref = validation.room_ref(data)
        seq = validation.seq(data)
        message = await self.service.edit(session, ref, seq, validation.text(data))
        return _ok(message=message.to_wire())

    async def _delete(self, session: Session, data: dict[str, Any]) -> Reply:
        ref = validation.room_ref(data)
        message = await self.service.delete(session, ref, validation.seq(data))
        return _ok(message=message.to_wire())

    async def _typing(self, session: Session, data: dict[str, Any]) -> Reply:
        await self.service.typing(session, validation.room_ref(data))
        return _ok()
