"""Handing a WebSocket upgrade's TCP connection to the worker that owns its session.

With ``--workers N`` the kernel gives each new connection to any worker. When a
long-polling session upgrades (socket.io-client's default), its WebSocket request lands
on the worker that owns the session only one time in N. Instead of bridging every frame
to the owner for as long as the session lives (two more WebSockets and a relay task, and
an extra hop for every message), the worker that accepted the connection passes the
connection itself to the owner over a Unix datagram socket (``SCM_RIGHTS``), with the
request it read. The owner serves it as if it had accepted it — the request goes through
its own HTTP protocol, and the session is served by :class:`EngineWebSocket` like any
other upgraded there — and the accepting worker forgets it. If the owner cannot take it
(not listening yet, its queue full), the frame-by-frame bridge of ``forward.py`` is used.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
"""Largest request head handed over (uvicorn refuses bigger heads before this point)."""


def handoff_socket(path: str) -> socket.socket:
    """The datagram socket a worker receives connections on, bound at ``path``."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    return sock


class HandoffSender:
    """Passes accepted TCP connections to sibling workers."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self.handed = 0
        """Connections handed over so far."""

    def hand_over(self, transport: asyncio.Transport, request: bytes, path: str) -> bool:
        """Send ``transport``'s connection and the ``request`` read from it to the worker
        listening at ``path``; True if it went (the caller then drops the transport
        without closing the connection), False if the caller must serve it itself."""
        if len(request) > MAX_REQUEST:
            return False
        sock = transport.get_extra_info("socket")
        if sock is None or transport.is_closing() or transport.get_extra_info("sslcontext"):
            return False  # a TLS session's state lives in this process
        try:
            fd = os.dup(sock.fileno())
        except OSError:
            return False
        try:
            fds = array.array("i", [fd])
            self._sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], 0, path)
        except OSError as error:  # not listening (yet), its queue full, gone
            log.debug("handing a connection to %s failed: %s", path, error)
            return False
        finally:
            os.close(fd)  # the receiver has its own descriptor now
        self.handed += 1
        return True

    def close(self) -> None:
        self._sock.close()


class HandoffReceiver:
    """Serves the connections sibling workers hand to this one.

    ``protocol_factory`` makes the protocol this worker's server gives a connection it
    accepted itself (uvicorn's HTTP protocol); the request the sibling read is fed to it
    before anything else the connection brings.
    """

    def __init__(self, sock: socket.socket, protocol_factory: Callable[[], Any]) -> None:
        self._sock = sock
        self._factory = protocol_factory
        self._tasks: set[asyncio.Task[None]] = set()
        self.adopted = 0
        """Connections taken over so far."""

    def start(self) -> None:
        """Start taking connections (on the running event loop)."""
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._readable)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
        self._sock.close()

    def _readable(self) -> None:
        for _ in range(64):  # bounded; the loop calls again while more are waiting
            try:
                request, fds, flags, _ = socket.recv_fds(self._sock, MAX_REQUEST, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                log.warning("receiving a handed-over connection failed: %s", error)
                return
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) != 1 or not request:
                for fd in fds:
                    os.close(fd)
                log.warning("dropped a malformed connection hand-over")
                continue
            conn = socket.socket(fileno=fds[0])
            task = asyncio.get_running_loop().create_task(self._adopt(conn, request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _adopt(self, conn: socket.socket, request: bytes) -> None:
        factory = self._factory

        def protocol() -> Any:
            proto = factory()
            made = proto.connection_made

            def connection_made(transport: asyncio.BaseTransport) -> None:
                made(transport)
                proto.data_received(request)  # before any byte the socket brings

            proto.connection_made = connection_made
            return proto

        try:
            await asyncio.get_running_loop().connect_accepted_socket(protocol, conn)
        except Exception as error:
            log.warning("taking over a handed-over connection failed: %s", error)
            conn.close()
            return
        self.adopted += 1
