"""Engine.IO WebSocket sessions that roomcast serves itself.

A client that opens its Engine.IO session on a WebSocket (``?EIO=4&transport=websocket``
without a ``sid``: every non-browser client, and socket.io-client with
``transports: ["websocket"]``) never needs long-polling, upgrades or Engine.IO's queue.
For those, :class:`EngineWebSocket` is the whole connection: the asyncio protocol that
uvicorn hands the upgraded socket to, the WebSocket framing (websockets' sans-I/O
:class:`~websockets.protocol.Protocol`, which also answers WebSocket pings and closes),
Engine.IO's open packet and heartbeat, and the writer that room frames are written to.
There is no ASGI scope, no task, no queue and no event object per connection: it costs a
few KiB where uvicorn's protocol, the ASGI app task and python-engineio's receive task,
writer task and queue cost tens. Pings are timer callbacks of the event loop.

Socket.IO packets go to :class:`~roomcast.transports.socketio.SocketIOTransport`, which
reads events with the same :class:`~roomcast.transports.socketio.EventReader` as the
upgraded fast path and answers every other packet the way python-socketio does.

A long-polling session that upgrades (socket.io-client's default) is served the same way
once the switch is done: :class:`EngineWebSocket` answers the client's probe and, at its
``UPGRADE`` packet, takes the session over from python-engineio (see
:meth:`~roomcast.transports.socketio.SocketIOTransport.finish_upgrade`).

With ``--workers``, an upgrade that reaches a worker other than the session's owner has
its TCP connection passed to the owner (:mod:`roomcast.transports.handoff`), which then
serves it here like its own.

Everything else — long-polling itself, an upgrade the owner could not be handed (it then
goes through the frame-by-frame bridge), other Engine.IO versions, a rejected
``Origin``, an application mounted under a root path — is handed, untouched, to
:class:`~roomcast.transports.fastws.RoomcastWebSocketProtocol` and python-socketio.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from engineio import packet as eio_packet
from websockets.frames import Opcode
from websockets.http11 import Request
from websockets.protocol import Protocol, Side, State
from websockets.server import ServerProtocol

from . import fastjson
from .fastws import (
    MAX_BUFFERED,
    RoomcastWebSocketProtocol,
    drop_slow_reader,
    text_frame,
    ws_frame,
)

if TYPE_CHECKING:
    from ..app import RoomcastApp
    from .socketio import EventReader, SocketIOConnection

log = logging.getLogger(__name__)

MAX_PAYLOAD = 1_000_000
"""Largest message a client may send, advertised as Engine.IO's ``maxPayload``."""

CLOSE_TIMEOUT = 10.0
"""Seconds a client has to answer a closing handshake before its TCP connection is cut."""


class EngineDoor:
    """uvicorn's WebSocket protocol factory for a roomcast node (``ws=`` in its config):
    Engine.IO sessions opened on a WebSocket are served by :class:`EngineWebSocket`,
    every other WebSocket by :class:`RoomcastWebSocketProtocol` and the ASGI app."""

    def __init__(self, app: RoomcastApp) -> None:
        self.app = app
        path = app.settings.socketio_path.rstrip("/").encode()
        self._paths = (path, path + b"/")
        self.ping_interval = app.settings.ping_interval
        self.ping_timeout = app.settings.ping_timeout

    def protocol_class(self) -> type[EngineWebSocket]:
        """The class uvicorn instantiates for each WebSocket (its ``ws`` setting)."""
        return type("NodeEngineWebSocket", (EngineWebSocket,), {"__slots__": (), "door": self})

    def _session(self, target: bytes, root_path: str) -> str | None:
        """For an Engine.IO v4 WebSocket request on the Socket.IO path: the session id it
        upgrades, or ``""`` for a new session; None for any other request."""
        path, _, query = target.partition(b"?")
        if root_path or path not in self._paths:
            return None
        args = parse_qs(query.decode("latin-1"))
        if args.get("EIO") != ["4"] or args.get("transport") != ["websocket"]:
            return None
        sids = args.get("sid")
        if sids is None:
            return ""
        return sids[0] if len(sids) == 1 and sids[0] else None

    def takes(self, target: bytes, root_path: str) -> str | None:
        """Whether :class:`EngineWebSocket` serves a WebSocket request for ``target``:
        ``""`` for a new Engine.IO session, the session id for an upgrade of a
        long-polling session of this process, None for neither."""
        if not self.app.node.started:
            return None
        sid = self._session(target, root_path)
        if sid is None or sid == "" or self.app.socketio.upgradable(sid):
            return sid
        return None

    def hand_over(
        self, target: bytes, root_path: str, request: bytes, transport: asyncio.Transport
    ) -> bool:
        """With workers: pass the connection of a WebSocket upgrade of a long-polling
        session a sibling owns to that sibling, with the ``request`` read from it; True if
        it went (see :mod:`roomcast.transports.handoff`)."""
        worker, sender = self.app.worker, self.app.handoff
        if worker is None or sender is None:
            return False
        sid = self._session(target, root_path)
        owner = worker.owner(sid) if sid else None
        if owner is None or owner == worker.index:
            return False
        return sender.hand_over(transport, request, worker.handoff(owner))

    def origin_allowed(self, request: Request) -> bool:
        """python-engineio's check of the ``Origin`` header, with its own policy."""
        origin = request.headers.get("Origin")
        eio = self.app.sio.eio
        if not origin or eio.cors_allowed_origins == []:  # python-engineio checks nothing
            return True
        environ = {"wsgi.url_scheme": "http", "HTTP_ORIGIN": origin}
        for name, key in (
            ("Host", "HTTP_HOST"),
            ("X-Forwarded-Proto", "HTTP_X_FORWARDED_PROTO"),
            ("X-Forwarded-Host", "HTTP_X_FORWARDED_HOST"),
        ):
            value = request.headers.get(name)
            if value is not None:
                environ[key] = value
        allowed = eio._cors_allowed_origins(environ)
        return allowed is None or origin in allowed

    def open_packet(self, eio_sid: str) -> str:
        """Engine.IO's OPEN packet for a new session."""
        return "0" + fastjson.dumps(
            {
                "sid": eio_sid,
                "upgrades": [],
                "pingTimeout": int(self.ping_timeout * 1000),
                "pingInterval": int(self.ping_interval * 1000),
                "maxPayload": MAX_PAYLOAD,
            }
        )


class EngineWebSocket(asyncio.Protocol):
    """One client's WebSocket and Engine.IO session, served without a task or a queue.

    Until the request is read it may still become a :class:`RoomcastWebSocketProtocol`:
    then every call is passed to that protocol (uvicorn keeps this object as the
    transport's protocol).
    """

    __slots__ = (
        "_app_state",
        "_binary",
        "_config",
        "_delegate",
        "_held",
        "_partial",
        "_ping_sent",
        "_pong_due",
        "_server_state",
        "_timer",
        "_upgrade_pending",
        "closing",
        "conn",
        "connecting",
        "eio_sid",
        "reader",
        "shell",
        "sid",
        "transport",
        "upgrading",
        "ws",
    )

    door: EngineDoor
    """The node's door; set on the class :meth:`EngineDoor.protocol_class` makes."""

    read_paused = False
    """Never paused by anything but the event reader's own bound."""

    def __init__(self, config: Any, server_state: Any, app_state: Any, **_: Any) -> None:
        self._config = config
        self._server_state = server_state
        self._app_state = app_state
        self._delegate: RoomcastWebSocketProtocol | None = None
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.ws: Protocol | None = None
        self.eio_sid = ""
        self.sid: str | None = None
        """The Socket.IO session id, once the client has connected to namespace "/"."""
        self.conn: SocketIOConnection | None = None
        self.reader: EventReader | None = None
        self.connecting = False
        self.closing = False
        self.upgrading: Any = None
        """python-engineio's socket of the long-polling session being upgraded, between
        the client's probe and its ``UPGRADE`` packet."""
        self._upgrade_pending = False
        self.shell: Any = None
        """An upgraded long-polling session's python-engineio socket, kept registered
        without a task (see ``SocketIOTransport.finish_upgrade``)."""
        self._timer: asyncio.TimerHandle | None = None
        self._ping_sent = 0.0
        self._pong_due = False
        self._partial: tuple[bool, list[bytes]] | None = None
        self._binary: Any = None
        self._held: list[bytes] | None = None
        """Frames gathered into one write until :meth:`release` (see :meth:`hold`)."""

    # -- asyncio protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._delegate is not None:
            self._delegate.data_received(data)
            return
        ws = self.ws
        if ws is None:
            self._handshake(data)
            return
        ws.receive_data(data)
        events: list[Any] = ws.events_received()
        for frame in events:
            opcode = frame.opcode
            if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
                if frame.fin:
                    self._message(opcode is Opcode.TEXT, frame.data)
                else:  # the first fragment of a message
                    self._partial = (opcode is Opcode.TEXT, [frame.data])
            elif opcode is Opcode.CONT and self._partial is not None:
                is_text, parts = self._partial
                parts.append(frame.data)
                if frame.fin:
                    self._partial = None
                    data = b"".join(parts)
                    if len(data) > MAX_PAYLOAD:
                        self._fail(1009, "message too big")
                        break
                    self._message(is_text, data)
            # CLOSE, PING and PONG frames are answered by the WebSocket protocol itself.
        self._flush()

    def eof_received(self) -> bool | None:
        if self._delegate is not None:
            self._delegate.eof_received()
        return None

    def pause_writing(self) -> None:
        # Writers check the transport's buffer themselves (MAX_BUFFERED).
        if self._delegate is not None:
            self._delegate.pause_writing()

    def resume_writing(self) -> None:
        if self._delegate is not None:
            self._delegate.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._delegate is not None:
            self._delegate.connection_lost(exc)
            return
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.ws is not None:
            self._server_state.connections.discard(self)
            self.door.app.socketio.native_closed(self)

    def shutdown(self) -> None:
        """uvicorn is stopping: tell the client to reconnect elsewhere (1012)."""
        if self._delegate is not None:  # pragma: no cover - uvicorn calls the delegate
            self._delegate.shutdown()
            return
        self.close(1012)
        self.transport.close()

    # -- the opening handshake ---------------------------------------------------------

    def _handshake(self, data: bytes) -> None:
        door = self.door
        parts = data.split(b" ", 2)
        upgrade = door.takes(parts[1], self._config.root_path) if len(parts) == 3 else None
        if upgrade is None:
            if len(parts) == 3 and door.hand_over(
                parts[1], self._config.root_path, data, self.transport
            ):
                # The owner serves the connection now; this process lets go of its
                # descriptor without closing the connection.
                self.closing = True
                self.transport.abort()
                return
            self._delegate_to(data)
            return
        handshake = ServerProtocol(max_size=MAX_PAYLOAD)
        handshake.receive_data(data)
        events = handshake.events_received()
        request = events[0] if events else None
        if not isinstance(request, Request) or not door.origin_allowed(request):
            self._delegate_to(data)
            return
        response = handshake.accept(request)
        if response.status_code != 101:
            # Let uvicorn's protocol give its own answer to a bad handshake.
            self._delegate_to(data)
            return
        for name, value in self._server_state.default_headers:
            response.headers[name.decode("latin-1")] = value.decode("latin-1")
        handshake.send_response(response)
        self.transport.write(b"".join(handshake.data_to_send()))
        # A fresh protocol in the OPEN state: nothing of the handshake is kept.
        self.ws = Protocol(Side.SERVER, state=State.OPEN, max_size=MAX_PAYLOAD)
        self._server_state.connections.add(self)
        loop = asyncio.get_running_loop()
        if upgrade:
            # The client probes, then switches; python-engineio gives it as long.
            self.eio_sid = upgrade
            self._upgrade_pending = True
            self._timer = loop.call_later(
                door.ping_interval + door.ping_timeout, self._upgrade_expired
            )
            return
        self.eio_sid = door.app.sio.eio.generate_id()
        self.send_text(door.open_packet(self.eio_sid))
        self._timer = loop.call_later(door.ping_interval, self._ping)

    def _delegate_to(self, data: bytes) -> None:
        proto = RoomcastWebSocketProtocol(
            config=self._config, server_state=self._server_state, app_state=self._app_state
        )
        self._delegate = proto
        proto.connection_made(self.transport)
        proto.data_received(data)

    # -- Engine.IO ---------------------------------------------------------------------

    def _message(self, text: bool, data: bytes) -> None:
        if self.closing:  # what a client sends after the close is not answered
            return
        if self._upgrade_pending:
            self._upgrade_step(text, data)
            return
        if not text:
            self.door.app.socketio.native_binary(self, data)
            return
        reader = self.reader
        if reader is not None and reader(data):
            return
        try:
            packet = data.decode()
        except UnicodeDecodeError:
            self._fail(1007, "invalid UTF-8")
            return
        kind = packet[:1]
        if kind == "4":  # MESSAGE: a Socket.IO packet
            self.door.app.socketio.native_message(self, packet[1:])
        elif kind == "3":  # PONG
            self._pong()
        elif kind == "2":  # PING
            self.send_text("3" + packet[1:])
        elif kind == "1":  # CLOSE
            self.close(1000)
        elif kind != "6" and kind != "5":  # NOOP, and UPGRADE: nothing to do
            log.debug("closing a client that sent an unknown Engine.IO packet %r", kind)
            self.close(1002)

    def _upgrade_step(self, text: bool, data: bytes) -> None:
        """The upgrade of a long-polling session: ``2probe`` is answered ``3probe``, and
        at ``5`` the session is served here. Anything else, or a session that has ended
        meanwhile, closes this WebSocket; the session goes on over long-polling."""
        socketio = self.door.app.socketio
        if text and data == b"2probe" and self.upgrading is None:
            if socketio.begin_upgrade(self):
                self.send_text("3probe")
                return
        elif text and data == b"5" and self.upgrading is not None:
            if socketio.finish_upgrade(self):
                self._upgrade_pending = False
                if self._timer is not None:
                    self._timer.cancel()
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(self.door.ping_interval, self._ping)
                return
        log.debug("closing a WebSocket whose upgrade did not go through")
        self.close(1000)

    def _upgrade_expired(self) -> None:
        self._timer = None
        if self._upgrade_pending and not self.closing:
            log.debug("closing a WebSocket whose client did not finish its upgrade")
            self.close(1000)

    def _ping(self) -> None:
        if self.closing:
            return
        self._ping_sent = asyncio.get_running_loop().time()
        self._pong_due = True
        self.send_text("2")
        self._timer = asyncio.get_running_loop().call_later(
            self.door.ping_timeout, self._ping_expired
        )

    def _pong(self) -> None:
        if not self._pong_due:
            return
        self._pong_due = False
        if self._timer is not None:
            self._timer.cancel()
        # The next ping one interval after this one was sent, as the client expects it.
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(self._ping_sent + self.door.ping_interval, self._ping)

    def _ping_expired(self) -> None:
        self._timer = None
        if self._pong_due and not self.closing:
            log.debug("closing a client that did not answer a ping")
            self.close(1000)

    # -- writing -----------------------------------------------------------------------

    def ready(self) -> bool:
        """Whether frames can be written (the writer interface of the delivery path)."""
        return not self.closing

    def write(self, frame: bytes) -> bool:
        """Write one serialized WebSocket frame; False if the connection is closing."""
        transport = self.transport
        if self.closing or transport.is_closing():
            return False
        held = self._held
        if held is not None:
            held.append(frame)
            return True
        # write_frame(transport, frame), inlined: this runs once per member of every room
        # message, and the call was a measurable part of a busy node's CPU.
        transport.write(frame)
        if transport.get_write_buffer_size() > MAX_BUFFERED:
            drop_slow_reader(transport)
        return True

    def hold(self) -> None:
        """Gather the frames written to this connection from now until :meth:`release`
        into one write.

        The event reader holds the sender's connection while a client event is handled,
        until the handling finishes or first has to wait: when it finishes at once (a
        message sent to a room the sender is in, stored and delivered without waiting,
        at a chat's pace), the sender's copy of its message and the event's reply leave
        in one send system call, waking the client once, instead of two. Everything
        written meanwhile keeps its order."""
        if self._held is None:
            self._held = []

    def release(self) -> None:
        """Write what :meth:`hold` gathered, in one write, and stop gathering."""
        held, self._held = self._held, None
        if not held:
            return
        transport = self.transport
        if self.closing or transport.is_closing():
            return
        transport.write(held[0] if len(held) == 1 else b"".join(held))
        if transport.get_write_buffer_size() > MAX_BUFFERED:
            drop_slow_reader(transport)

    async def shell_send(self, pkt: Any) -> None:
        """python-engineio's ``send`` for the shell of an upgraded session: a packet
        goes to this WebSocket, a CLOSE closes it, pings are left to this heartbeat."""
        kind = pkt.packet_type
        if kind == eio_packet.CLOSE:
            self.close(1000)
        elif kind != eio_packet.PING:
            self.write(ws_frame(pkt.encode()))

    async def shell_alive(self) -> bool:
        """python-engineio's ping check for the shell: this heartbeat decides."""
        return not self.closing

    def send_text(self, text: str) -> bool:
        """Write one Engine.IO packet as a text message."""
        return self.write(text_frame(text))

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake; the TCP connection is cut if the client does not
        finish it within :data:`CLOSE_TIMEOUT`."""
        ws = self.ws
        if ws is None or self.closing:
            return
        self.release()  # what was written before the close goes before it
        self.closing = True
        if ws.state is State.OPEN:
            ws.send_close(code, reason)
        self._flush()
        if self._timer is not None:
            self._timer.cancel()
        if not self.transport.is_closing():
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(CLOSE_TIMEOUT, self.transport.abort)
        self.door.app.socketio.native_closed(self)

    def _fail(self, code: int, reason: str) -> None:
        ws = self.ws
        if ws is not None and ws.state is State.OPEN:
            ws.fail(code, reason)
        self.close(code, reason)

    def _flush(self) -> None:
        ws = self.ws
        assert ws is not None
        out = ws.data_to_send()
        if not out:
            return
        transport = self.transport
        for chunk in out:
            if chunk:
                if not transport.is_closing():
                    transport.write(chunk)
            else:  # the protocol is done with the connection
                transport.close()
        if ws.state is State.CLOSED or ws.close_expected():
            if not self.closing:
                self.closing = True
                self.door.app.socketio.native_closed(self)
            if ws.state is State.CLOSED:
                transport.close()
