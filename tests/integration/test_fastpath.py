"""The WebSocket fast path: one frame written as the same bytes to every WebSocket member,
with Engine.IO's queue kept for long-polling. Real python-socketio clients, real server."""

from __future__ import annotations

import asyncio
import re
import urllib.request

import pytest
import socketio

from .clients import WAIT, ChatClient, eventually
from .servers import run_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server without the per-connection rate limit: these tests send in bursts."""
    with run_server("--rate-limit", "0", log_dir=tmp_path_factory.mktemp("fast")) as srv:
        yield srv


def writes(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.findall(
        r'^roomcast_socketio_writes_total\{node="[^"]*",path="(\w+)"\} (\S+)$', text, re.MULTILINE
    )
    return {path: float(value) for path, value in found}


async def test_websocket_polling_and_upgraded_clients_share_a_room(server):
    clients = [
        ChatClient(server.url, "ws", transports=["websocket"]),
        ChatClient(server.url, "upgraded"),  # starts on polling, then upgrades
        ChatClient(server.url, "poller", transports=["polling"]),
    ]
    try:
        for client in clients:
            await client.connect()
            room = (await client.ok("join", {"room": "fast-mixed"}))["room"]["id"]
        before = writes(server.url)
        for i in range(30):
            await clients[i % 3].ok("send", {"room": "fast-mixed", "text": f"m{i}"})
        views = [await c.wait_messages(room, 30) for c in clients]
        assert views[0] == views[1] == views[2] == [f"m{i}" for i in range(30)]
        after = writes(server.url)
        # The two WebSocket clients got all 30 on the fast path, the poller through the queue.
        assert after["direct"] - before.get("direct", 0) >= 60
        assert after["queued"] - before.get("queued", 0) >= 30
    finally:
        for client in clients:
            await client.close()


@pytest.mark.parametrize("transports", [["websocket"], None])
async def test_join_reply_comes_before_the_messages_that_follow_it(server, transports):
    """Messages keep flowing while a client joins: it receives the join reply first, then
    every later message once, in order — the reply and the messages take one path."""
    sender = await ChatClient(server.url, "sender").connect()
    timeline: list[tuple[str, object]] = []
    joiner = socketio.AsyncClient(reconnection=False)
    joiner.on("message", lambda m: timeline.append(("message", m["seq"])))
    try:
        room_name = f"flowing-{transports}"
        await sender.ok("join", {"room": room_name})
        await joiner.connect(
            server.url,
            socketio_path="/ws/socket.io",
            auth={"name": "joiner"},
            transports=transports,
            wait_timeout=WAIT,
        )
        stop = asyncio.Event()

        async def flow():
            i = 0
            while not stop.is_set() and i < 400:
                await sender.ok("send", {"room": room_name, "text": f"{i}"})
                i += 1

        flowing = asyncio.create_task(flow())
        await sender.wait_for(lambda: len(sender.messages()) >= 20)
        replied = asyncio.get_running_loop().create_future()

        def on_reply(reply):
            timeline.append(("reply", reply["seq"]))
            replied.set_result(reply)

        await joiner.emit("join", {"room": room_name}, callback=on_reply)
        reply = await asyncio.wait_for(replied, WAIT)
        await sender.wait_for(lambda: len(sender.messages()) >= reply["seq"] + 30)
        stop.set()
        await asyncio.wait_for(flowing, WAIT)
        last = sender.messages()[-1]["seq"]
        await eventually(lambda: timeline[-1] == ("message", last))
        assert timeline[0] == ("reply", reply["seq"])
        seqs = [seq for kind, seq in timeline[1:]]
        assert seqs == list(range(reply["seq"] + 1, last + 1))
    finally:
        await joiner.disconnect()
        await sender.close()
