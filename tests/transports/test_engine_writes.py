"""How an EngineWebSocket puts frames on its connection: gathered writes keep their order
and go before a close."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from websockets.protocol import Protocol, Side, State

from roomcast.transports.engine import EngineWebSocket
from roomcast.transports.fastws import text_frame


class Connection(asyncio.Transport):
    """The client's TCP connection as the protocol sees it: every write call, kept."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def open_socket() -> tuple[EngineWebSocket, Connection, list[EngineWebSocket]]:
    closed: list[EngineWebSocket] = []
    door = SimpleNamespace(
        app=SimpleNamespace(socketio=SimpleNamespace(native_closed=closed.append))
    )
    cls = type("TestEngineWebSocket", (EngineWebSocket,), {"__slots__": (), "door": door})
    sock = cls(None, None, None)
    conn = Connection()
    sock.connection_made(conn)
    sock.ws = Protocol(Side.SERVER, state=State.OPEN)
    return sock, conn, closed


ONE, TWO, THREE = text_frame('42["a"]'), text_frame('42["b"]'), text_frame("431[{}]")


async def test_without_a_hold_every_frame_is_written_at_once():
    sock, conn, _ = open_socket()
    assert sock.write(ONE) and sock.write(TWO)
    assert conn.writes == [ONE, TWO]


async def test_held_frames_leave_in_one_write_in_the_order_they_were_written():
    sock, conn, _ = open_socket()
    sock.hold()
    assert sock.write(ONE) and sock.write(TWO) and sock.write(THREE)
    assert conn.writes == []
    sock.release()
    assert conn.writes == [ONE + TWO + THREE]
    assert sock.write(ONE)  # the hold is over
    assert conn.writes == [ONE + TWO + THREE, ONE]


async def test_held_frames_go_before_the_close_frame():
    sock, conn, closed = open_socket()
    sock.hold()
    sock.write(ONE)
    sock.close(1000)
    assert conn.writes[0] == ONE
    assert conn.writes[1][0] == 0x88  # the close frame, after the frame written before it
    assert closed == [sock]
    assert not sock.write(TWO)  # closing: nothing more is written or held
    sock.release()
    assert conn.writes[2:] == []
