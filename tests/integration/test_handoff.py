"""Handing an accepted TCP connection to another process's event loop over a Unix datagram
socket (what ``--workers`` does with a WebSocket upgrade that reached the wrong worker).
Real sockets, one process standing in for both workers."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from roomcast.transports.handoff import HandoffReceiver, HandoffSender, handoff_socket

from .clients import WAIT


class Owner(asyncio.Protocol):
    """The receiving side's protocol: answers every chunk, tagged."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"owner:" + data + b"\n")  # type: ignore[attr-defined]


def acceptor(sender: HandoffSender, path: str) -> type[asyncio.Protocol]:
    class Acceptor(asyncio.Protocol):
        """The accepting side: hands the connection over with its first chunk, or answers
        it itself when that fails."""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            if sender.hand_over(self.transport, data, path):  # type: ignore[arg-type]
                self.transport.abort()  # lets go of its descriptor only
            else:
                self.transport.write(b"acceptor:" + data + b"\n")  # type: ignore[attr-defined]

    return Acceptor


async def exchange(port: int, *chunks: bytes) -> list[bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        answers = []
        for chunk in chunks:
            writer.write(chunk)
            answers.append(await asyncio.wait_for(reader.readline(), WAIT))
        return answers
    finally:
        writer.close()


async def test_the_owner_serves_the_connection_from_the_request_on(tmp_path: Path):
    path = str(tmp_path / "w1.handoff")
    receiver = HandoffReceiver(handoff_socket(path), Owner)
    receiver.start()
    sender = HandoffSender()
    server = await asyncio.get_running_loop().create_server(acceptor(sender, path), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        # The request read by the acceptor reaches the owner first, then what follows.
        assert await exchange(port, b"upgrade", b"frame") == [
            b"owner:upgrade\n",
            b"owner:frame\n",
        ]
        assert sender.handed == 1 and receiver.adopted == 1
        # Garbage on the owner's socket (no descriptor) is dropped; hand-overs go on.
        garbage = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        garbage.connect(path)
        garbage.send(b"not a connection")
        garbage.close()
        assert await exchange(port, b"again") == [b"owner:again\n"]
        assert sender.handed == 2 and receiver.adopted == 2
        # The owner restarts (a new socket at the same path): the sender's link to the
        # old one is broken, and the next hand-over goes over a new one.
        receiver.close()
        receiver = HandoffReceiver(handoff_socket(path), Owner)
        receiver.start()
        assert await exchange(port, b"restarted") == [b"owner:restarted\n"]
        assert sender.handed == 3 and receiver.adopted == 1
    finally:
        server.close()
        receiver.close()
        sender.close()


async def test_with_no_owner_listening_the_acceptor_keeps_the_connection(tmp_path: Path):
    sender = HandoffSender()
    server = await asyncio.get_running_loop().create_server(
        acceptor(sender, str(tmp_path / "nobody.handoff")), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    try:
        assert await exchange(port, b"upgrade", b"frame") == [
            b"acceptor:upgrade\n",
            b"acceptor:frame\n",
        ]
        assert sender.handed == 0
    finally:
        server.close()
        sender.close()
