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


async def test_an_idle_websocket_client_outlives_many_ping_rounds(tmp_path):
    """An idle client on the fast path answers ping after ping and stays connected: the
    server must not mistake an idle connection for a dead one. Pings every second with a
    one-second timeout; eight rounds is four times the interval + timeout after which a
    socket whose Engine.IO queue stays empty would be closed."""
    import json

    import websockets

    with run_server("--ping-interval", "1", "--ping-timeout", "1", log_dir=tmp_path) as srv:
        url = f"ws://127.0.0.1:{srv.port}/ws/socket.io/?EIO=4&transport=websocket"
        async with websockets.connect(url, open_timeout=WAIT, compression=None) as ws:
            opened = await asyncio.wait_for(ws.recv(), WAIT)
            assert opened.startswith("0") and json.loads(opened[1:])["pingInterval"] == 1000
            await ws.send('40{"name":"idler"}')
            assert (await asyncio.wait_for(ws.recv(), WAIT)).startswith("40")
            assert '"welcome"' in await asyncio.wait_for(ws.recv(), WAIT)
            pings = 0
            while pings < 8:
                packet = await asyncio.wait_for(ws.recv(), WAIT)  # raises if the server closes
                assert packet == "2", packet
                pings += 1
                await ws.send("3")
            # Still a working connection: a request gets its answer.
            await ws.send('421["join",{"room":"idle-room"}]')
            for _ in range(20):  # pings and the room's presence event may come first
                reply = await asyncio.wait_for(ws.recv(), WAIT)
                if reply == "2":
                    await ws.send("3")
                elif reply.startswith("43"):
                    break
            assert reply.startswith("431") and json.loads(reply[3:])[0]["ok"] is True
