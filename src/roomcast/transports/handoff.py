"""Handing a WebSocket upgrade's TCP connection to the worker that owns its session.

With ``--workers N`` the kernel gives each new connection to any worker. When a
long-polling session upgrades (socket.io-client's default), its WebSocket request lands
on the worker that owns the session only one time in N. Instead of bridging every frame
to the owner for as long as the session lives (two more WebSockets and a relay task, and
an extra hop for every message), the worker that accepted the connection passes the
connection itself to the owner over a Unix socket (``SCM_RIGHTS``), with the request it
read. The owner serves it as if it had accepted it — the request goes through
its own HTTP protocol, and the session is served by :class:`EngineWebSocket` like any
other upgraded there — and the accepting worker forgets it. If the owner cannot take it
(not listening yet, or its link full), the frame-by-frame bridge of ``forward.py`` is used.
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
    """The listening socket a worker takes connections on, bound at ``path``.

    ``SOCK_SEQPACKET``: each sibling keeps one connection to it, on which every request
    arrives whole with its descriptor, and a burst of upgrades waits in that connection's
    buffer (~160 of them) instead of the 10 datagrams an unconnected socket queues."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(path)
    sock.listen(64)
    sock.setblocking(False)
    return sock


class HandoffSender:
    """Passes accepted TCP connections to sibling workers, over one connection to each."""

    def __init__(self) -> None:
        self._links: dict[str, socket.socket] = {}
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
            fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            for _ in range(2):  # the second on a new link: the sibling may have restarted
                link = self._link(path)
                if link is None:
                    return False
                try:
                    link.sendmsg([request], fds, socket.MSG_NOSIGNAL)
                except BlockingIOError:  # its buffer is full: the sibling is far behind
                    log.debug("handing a connection to %s: its link is full", path)
                    return False
                except OSError as error:  # the sibling closed the link (it restarted)
                    log.debug("handing a connection to %s failed: %s", path, error)
                    self._drop(path)
                    continue
                self.handed += 1
                return True
            return False
        finally:
            os.close(fd)  # the receiver has its own descriptor now

    def _link(self, path: str) -> socket.socket | None:
        link = self._links.get(path)
        if link is None:
            link = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            link.setblocking(False)
            try:
                link.connect(path)
            except OSError as error:  # not listening (yet), or its backlog full
                log.debug("no link to %s: %s", path, error)
                link.close()
                return None
            self._links[path] = link
        return link

    def _drop(self, path: str) -> None:
        link = self._links.pop(path, None)
        if link is not None:
            link.close()

    def close(self) -> None:
        for path in list(self._links):
            self._drop(path)


class HandoffReceiver:
    """Serves the connections sibling workers hand to this one.

    ``protocol_factory`` makes the protocol this worker's server gives a connection it
    accepted itself (uvicorn's HTTP protocol); the request the sibling read is fed to it
    before anything else the connection brings.
    """

    def __init__(self, sock: socket.socket, protocol_factory: Callable[[], Any]) -> None:
        self._sock = sock
        self._factory = protocol_factory
        self._links: set[socket.socket] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.adopted = 0
        """Connections taken over so far."""

    def start(self) -> None:
        """Start taking connections (on the running event loop)."""
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._accept)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in (self._sock, *self._links):
            with contextlib.suppress(Exception):
                loop.remove_reader(sock.fileno())
            sock.close()
        self._links.clear()

    def _accept(self) -> None:
        for _ in range(64):  # bounded; the loop calls again while more are waiting
            try:
                link, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                log.warning("accepting a sibling's link failed: %s", error)
                return
            link.setblocking(False)
            self._links.add(link)
            asyncio.get_running_loop().add_reader(link.fileno(), self._readable, link)

    def _readable(self, link: socket.socket) -> None:
        for _ in range(64):  # bounded; the loop calls again while more are waiting
            try:
                request, fds, flags, _ = socket.recv_fds(link, MAX_REQUEST, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                log.warning("receiving a handed-over connection failed: %s", error)
                self._close_link(link)
                return
            if not request and not fds:  # the sibling closed its link
                self._close_link(link)
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

    def _close_link(self, link: socket.socket) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(link.fileno())
        self._links.discard(link)
        link.close()

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
