"""The WebSocket fast path: the same frame bytes written to every local member.

python-socketio and python-engineio handle the handshake, long-polling, upgrades, pings,
acks and disconnects, and roomcast keeps them for all of that. What they do per recipient
is the cost: each write goes into the socket's queue, wakes the socket's writer task, is
encoded for that socket, and is framed again by the WebSocket protocol. A room message
to 1000 members is 1000 of each.

When roomcast runs its own server, uvicorn speaks WebSocket through
:class:`RoomcastWebSocketProtocol`, which puts itself into the ASGI scope. Once an
Engine.IO socket is on such a WebSocket (from the start, or after an upgrade), every packet
to it — events, acks, pings — is written straight to the connection's transport by a
:class:`DirectWriter`, in the order it is sent, and a room frame is serialized into one
unmasked WebSocket frame that is written, as the same bytes, to every member.
Compression (permessage-deflate) is off on these connections: compressed frames depend on
each connection's state and could not be shared.

The other direction has a fast path too: once a connection is written directly, a
:attr:`RoomcastWebSocketProtocol.receiver` may take its text messages as they are parsed,
instead of uvicorn queueing each one for the ASGI app, pausing reading until Engine.IO's
read loop picks it up, and Engine.IO and Socket.IO each starting a task for it. The
receiver declines what it does not handle (it returns False), and a message it declines,
or any message while one is still queued, goes the ASGI way, so nothing overtakes what
came before it.

A client that does not read is not allowed to grow the server's memory without bound:
past :data:`MAX_BUFFERED` bytes waiting in its transport it is disconnected.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from engineio import packet as eio_packet
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame, Opcode

log = logging.getLogger(__name__)

EXTENSION = "roomcast.websocket"
"""The ASGI scope extension under which the protocol puts itself."""

MAX_BUFFERED = 4 << 20
"""Bytes a connection may have waiting to be sent before it is dropped as too slow."""


class RoomcastWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, reachable from the ASGI app."""

    receiver: Callable[[bytes], bool] | None = None
    """Takes a complete text message (UTF-8 bytes) straight off the wire; returns False to
    leave it to the ASGI app."""

    def send_receive_event_to_app(self) -> None:
        receiver = self.receiver
        if (
            receiver is not None
            and self.curr_msg_data_type == "text"
            and len(self.frames) == 1
            and not self.close_sent
            and self.queue.empty()
            and receiver(self.frames[0])
        ):
            self.frames = []
            return
        super().send_receive_event_to_app()

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            # The app task is created but has not run yet: it sees the extension.
            scope["extensions"][EXTENSION] = self


def protocol_of(scope: dict[str, Any]) -> RoomcastWebSocketProtocol | None:
    extensions = scope.get("extensions") or {}
    proto = extensions.get(EXTENSION)
    return proto if isinstance(proto, RoomcastWebSocketProtocol) else None


def text_frame(text: str) -> bytes:
    """One unmasked WebSocket text frame, as a server sends it."""
    return text_frame_of(text.encode())


def text_frame_of(payload: bytes) -> bytes:
    """One unmasked, final WebSocket text frame around UTF-8 ``payload`` (RFC 6455 5.2)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 1 << 16:
        return b"\x81\x7e" + n.to_bytes(2, "big") + payload
    return b"\x81\x7f" + n.to_bytes(8, "big") + payload


def write_frame(transport: Any, frame: bytes) -> None:
    """Write one serialized frame to an open transport; a client that lets more than
    :data:`MAX_BUFFERED` bytes pile up is cut off."""
    transport.write(frame)
    if transport.get_write_buffer_size() > MAX_BUFFERED:
        drop_slow_reader(transport)


def drop_slow_reader(transport: Any) -> None:
    """Cut off a client with more than :data:`MAX_BUFFERED` bytes waiting to be sent."""
    log.warning("dropping a client that does not read (%d bytes waiting)", MAX_BUFFERED)
    transport.abort()


def ws_frame(data: str | bytes) -> bytes:
    """An encoded Engine.IO packet as one WebSocket frame: text for str, binary for bytes."""
    if isinstance(data, str):
        return text_frame(data)
    return Frame(Opcode.BINARY, data).serialize(mask=False)


class DirectWriter:
    """Writes an Engine.IO socket's packets straight to its WebSocket transport.

    Inactive until the socket is on a WebSocket of :class:`RoomcastWebSocketProtocol` and
    Engine.IO's own queue for it is empty; from then on every packet goes this way, so the
    order of everything the socket is sent is kept.
    """

    __slots__ = ("_eio_socket", "_original_send", "active", "proto")

    def __init__(self, eio_socket: Any, proto: RoomcastWebSocketProtocol | None) -> None:
        self._eio_socket = eio_socket
        self.proto = proto
        self.active = False
        self._original_send: Callable[[Any], Awaitable[None]] = eio_socket.send
        # Every packet Engine.IO or Socket.IO sends to this socket passes through here.
        eio_socket.send = self._send

    def ready(self) -> bool:
        """Activate if the socket can now be written directly; True when active."""
        if self.active:
            return True
        proto, sock = self.proto, self._eio_socket
        if (
            proto is not None
            and sock.upgraded
            and not sock.upgrading
            and not sock.closed
            and sock.queue.empty()
            and proto.writable.is_set()
            and not proto.close_sent
        ):
            self.active = True
        return self.active

    def write(self, frame: bytes) -> bool:
        """Write one serialized frame; False if not :meth:`ready` or closing."""
        if not self.active and not self.ready():
            return False
        proto = self.proto
        assert proto is not None
        transport = proto.transport
        if proto.close_sent or transport.is_closing():
            return False
        write_frame(transport, frame)
        return True

    def hold(self) -> None:
        """Writes are not gathered on this path (see ``EngineWebSocket.hold``)."""

    def release(self) -> None:
        """Nothing is gathered on this path."""

    async def _send(self, pkt: Any) -> None:
        # Pings (every ping interval, order-insensitive) keep going through Engine.IO's
        # queue: its writer task closes the socket when the queue stays empty for longer
        # than ping interval + ping timeout.
        if pkt.packet_type != eio_packet.PING and self.ready():
            # Engine.IO closes a socket whose client stopped answering pings here.
            if not await self._eio_socket.check_ping_timeout():
                return
            if self.write(ws_frame(pkt.encode())):
                return
        await self._original_send(pkt)
