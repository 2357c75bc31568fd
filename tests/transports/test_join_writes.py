"""What reaches a room while a client joins it goes to that client after the join reply, in
order, and in one write: in a join storm into a big room, each joiner gathers a frame for
each joiner announced in the meantime."""

from __future__ import annotations

import json
from typing import Any

import socketio

from roomcast.adapters.memory import MemoryBroker, MemoryHistory, MemoryPresence
from roomcast.core.hub import Hub
from roomcast.core.models import NodeId
from roomcast.core.service import ChatService
from roomcast.transports.socketio import SocketIOConnection, SocketIOTransport


class Writer:
    """A client's WebSocket on the fast path: every write call, kept."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def ready(self) -> bool:
        return True

    def write(self, frame: bytes) -> bool:
        self.writes.append(frame)
        return True

    def hold(self) -> None:
        pass

    def release(self) -> None:
        pass


def events(data: bytes) -> list[Any]:
    """The Socket.IO events in a run of unmasked WebSocket text frames."""
    out, at = [], 0
    while at < len(data):
        assert data[at] == 0x81, data[at:]
        size, at = data[at + 1], at + 2
        if size == 126:
            size, at = int.from_bytes(data[at : at + 2], "big"), at + 2
        payload = data[at : at + size].decode()
        at += size
        assert payload.startswith("42"), payload
        out.append(json.loads(payload[2:]))
    return out


async def test_frames_held_for_a_joiner_reach_it_in_one_write_in_order():
    broker = MemoryBroker()
    history = MemoryHistory()
    hub = Hub(broker, history, unsubscribe_grace=0)
    service = ChatService(
        node=NodeId("n0"), history=history, broker=broker, presence=MemoryPresence(), hub=hub
    )
    await broker.start(NodeId("n0"), hub.on_frame, service.on_inbox, hub.resync)
    transport = SocketIOTransport(service, socketio.AsyncServer(async_mode="asgi"))

    async def connect(name: str) -> tuple[Any, Writer]:
        writer = Writer()
        conn = SocketIOConnection(service.new_conn_id(), name, name, transport, writer, True)
        return await service.connect(conn, name), writer

    alice, _ = await connect("alice")
    bob, bob_writes = await connect("bob")
    joined = await service.join(alice, "lobby")
    await transport._activate(alice, joined)
    # bob's join is answered; until it is activated, what reaches the room is held for him.
    bob_joined = await service.join(bob, "lobby")
    for i in range(3):
        await service.send(alice, "lobby", f"m{i}")
    assert bob_writes.writes == []

    await transport._activate(bob, bob_joined)

    assert len(bob_writes.writes) == 1
    held = events(bob_writes.writes[0])
    # His own join first (announced while he was held), then the messages, in seq order.
    assert [(event, data.get("text", data["user"]["name"])) for event, data in held] == [
        ("presence", "bob"),
        ("message", "m0"),
        ("message", "m1"),
        ("message", "m2"),
    ]
    assert [data["seq"] for event, data in held if event == "message"] == [
        bob_joined.seq + 1,
        bob_joined.seq + 2,
        bob_joined.seq + 3,
    ]
