"""The WebSocket fast path: one frame written as the same bytes to every WebSocket member,
with Engine.IO's queue kept for long-polling. Real python-socketio clients, real server."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from typing import Any

import httpx
import pytest
import socketio
import websockets

from .clients import WAIT, ChatClient, eventually
from .servers import run_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server without the per-connection rate limit: these tests send in bursts."""
    with run_server("--rate-limit", "0", log_dir=tmp_path_factory.mktemp("fast")) as srv:
        yield srv


def by_path(url: str, metric: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.findall(rf'^{metric}\{{node="[^"]*",path="(\w+)"\}} (\S+)$', text, re.MULTILINE)
    return {path: float(value) for path, value in found}


def writes(url: str) -> dict[str, float]:
    return by_path(url, "roomcast_socketio_writes_total")


def events(url: str) -> dict[str, float]:
    return by_path(url, "roomcast_socketio_events_total")


class RawClient:
    """Engine.IO and Socket.IO frames written and read by hand over one WebSocket."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.events: list[Any] = []

    @classmethod
    async def connect(cls, port: int, name: str) -> RawClient:
        url = f"ws://127.0.0.1:{port}/ws/socket.io/?EIO=4&transport=websocket"
        # Unbounded receive queue: a client that is sent more than it reads still sees
        # the server's closing handshake when it closes.
        ws = await websockets.connect(url, open_timeout=WAIT, compression=None, max_queue=None)
        client = cls(ws)
        assert (await client.recv()).startswith("0")
        await ws.send("40" + json.dumps({"name": name}))
        assert (await client.recv()).startswith("40")
        return client

    async def recv(self) -> str:
        while True:
            packet = await asyncio.wait_for(self.ws.recv(), WAIT)
            if packet == "2":
                await self.ws.send("3")
                continue
            return str(packet)

    async def ack(self, ack_id: str) -> list[Any]:
        """The data of the ack with ``ack_id``; events that come first are kept."""
        while True:
            packet = await self.recv()
            if packet.startswith("43" + ack_id + "["):
                return list(json.loads(packet[2 + len(ack_id) :]))
            assert packet.startswith("42"), packet
            self.events.append(json.loads(packet[2:]))

    async def call(self, ack_id: str, frame: str) -> list[Any]:
        await self.ws.send(f"42{ack_id}{frame}")
        return await self.ack(ack_id)


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


async def test_websocket_events_are_read_off_the_wire_polling_ones_through_the_queue(server):
    ws_client = await ChatClient(server.url, "ws-reader", transports=["websocket"]).connect()
    poller = await ChatClient(server.url, "poll-reader", transports=["polling"]).connect()
    try:
        before = events(server.url)
        for i in range(20):
            for client in (ws_client, poller):
                await client.ok("join", {"room": f"read-{i}"})
        assert (await ws_client.ok("rooms"))["rooms"]
        after = events(server.url)
        assert after["direct"] - before.get("direct", 0) == 21
        assert after["queued"] - before.get("queued", 0) == 20
    finally:
        await ws_client.close()
        await poller.close()


async def test_raw_event_frames_get_python_socketios_answers(server):
    """Every kind of event frame a client may send, valid or not, on the fast path: each
    gets the ack python-socketio gives, under the client's ack id, and the connection
    stays usable after the ones that get no answer."""
    client = await RawClient.connect(server.port, "raw")
    try:
        [reply] = await client.call("1", '["nope",{}]')
        assert reply["error"]["code"] == "unknown_event"
        [reply] = await client.call("2", '["join",{"room":"raw-room"},5]')
        assert reply["error"]["code"] == "bad_request"
        [reply] = await client.call("3", '["send",{"room":"raw-room","text":"a\\u0007"}]')
        assert reply["error"]["code"] == "invalid_text"
        # No answer to these, as from python-socketio: malformed JSON, a frame that is not
        # an event list, a reserved event name, an event without an ack id.
        for frame in ('42["send",{', '42{"a":1}', "42[1,2]", '424["connect",{}]'):
            await client.ws.send(frame)
        await client.ws.send('42["join",{"room":"raw-room"}]')
        # The join without an ack id is handled: the room announces the new member.
        assert (await client.recv()).startswith('42["presence",')
        # An ack id longer than the fast path reads is answered all the same.
        [reply] = await client.call(
            "123456789012345678901234567890", '["members",{"room":"raw-room"}]'
        )
        assert [u["name"] for u in reply["members"]] == ["raw"]
        # Ack ids are numbers: 007 is answered as 7.
        await client.ws.send('42007["send",{"room":"raw-room","text":"hello"}]')
        [reply] = await client.ack("7")
        assert reply["ok"] is True and reply["message"]["text"] == "hello"
    finally:
        await client.ws.close()


async def test_a_burst_of_sends_past_the_in_flight_bound_is_answered_in_full(server):
    """500 sends written without waiting for a single ack: reading pauses while 64 are in
    flight and resumes, every send is acked once, and the room keeps them in sending order."""
    client = await RawClient.connect(server.port, "burster")
    reader = await ChatClient(server.url, "burst-reader", transports=["websocket"]).connect()
    try:
        [joined] = await client.call("0", '["join",{"room":"burst"}]')
        room = (await reader.ok("join", {"room": "burst"}))["room"]["id"]
        n = 500
        for i in range(1, n + 1):
            await client.ws.send(f'42{i}["send",{{"room":"burst","text":"b{i}"}}]')
        seqs: dict[int, int] = {}
        while len(seqs) < n:
            packet = await client.recv()
            if packet.startswith("43"):
                ack_id, _, body = packet[2:].partition("[")
                [reply] = json.loads("[" + body)
                assert reply["ok"] is True, reply
                assert int(ack_id) not in seqs
                seqs[int(ack_id)] = reply["message"]["seq"]
        assert sorted(seqs.values()) == list(range(joined["seq"] + 1, joined["seq"] + n + 1))
        texts = await reader.wait_messages(room, n)
        assert texts == [f"b{i}" for i in range(1, n + 1)]
    finally:
        await client.ws.close()
        await reader.close()


async def test_bursts_stored_in_batches_reach_every_kind_of_member_whole_and_in_order(server):
    """30 senders write 10 messages each without waiting for acks: the server stores what
    comes in while a batch is being stored as the next batch, and hands each batch's
    messages of the room over at once — to a WebSocket member in one write, to a
    long-polling member through Engine.IO's queue, which a Python client takes in
    payloads of at most 16 packets. Every member sees every message once, in seq order."""
    members = [
        ChatClient(server.url, "batch-ws", transports=["websocket"]),
        ChatClient(server.url, "batch-upgraded"),  # starts on polling, then upgrades
        ChatClient(server.url, "batch-poller", transports=["polling"]),
    ]
    senders = [await RawClient.connect(server.port, f"batch-sender-{i}") for i in range(30)]
    try:
        for member in members:
            await member.connect()
            joined = await member.ok("join", {"room": "batches"})
        room, first = joined["room"]["id"], joined["seq"] + 1
        for sender in senders:
            await sender.call("0", '["join",{"room":"batches"}]')
        per_sender = 10
        for i in range(1, per_sender + 1):
            for k, sender in enumerate(senders):
                await sender.ws.send(f'42{i}["send",{{"room":"batches","text":"s{k}-{i}"}}]')
        n = per_sender * len(senders)
        for member in members:
            await member.wait_messages(room, n)
            seqs = [m["seq"] for m in member.messages(room)]
            assert seqs == list(range(first, first + n))
            texts = member.texts(room)
            for k in range(len(senders)):  # each sender's messages in its sending order
                assert [t for t in texts if t.startswith(f"s{k}-")] == [
                    f"s{k}-{i}" for i in range(1, per_sender + 1)
                ]
            assert member.sio.connected
    finally:
        for sender in senders:
            await sender.ws.close()
        for member in members:
            await member.close()


async def test_a_long_polling_client_that_disconnects_is_let_go_at_once(server):
    """Its pending poll is answered when its session ends: the client's disconnect, which
    waits for that poll, returns without waiting out a ping interval (25 s)."""
    poller = await ChatClient(server.url, "leaving-poller", transports=["polling"]).connect()
    watcher = await ChatClient(server.url, "watcher", transports=["websocket"]).connect()
    try:
        room = (await watcher.ok("join", {"room": "leaving"}))["room"]["id"]
        await poller.ok("join", {"room": "leaving"})
        await asyncio.wait_for(poller.sio.disconnect(), WAIT)
        assert not poller.sio.connected
        await watcher.wait_for(
            lambda: any(
                p["room"] == room
                and p["user"]["name"] == "leaving-poller"
                and p["event"] == "leave"
                for p in watcher.of("presence")
            )
        )
    finally:
        await watcher.close()


async def test_a_long_polling_client_that_sends_a_burst_has_every_message_stored(server):
    """A long-polling client sends what it emitted while a POST was under way in the next
    POST, as one payload of many packets (a browser flushing the emits it buffered while
    offline does the same). Every message of a 40-message burst is acknowledged, stored
    and delivered, in the order it was sent."""
    poller = await ChatClient(server.url, "burst-poller", transports=["polling"]).connect()
    watcher = await ChatClient(server.url, "burst-watcher", transports=["websocket"]).connect()
    try:
        room = (await watcher.ok("join", {"room": "poll-burst"}))["room"]["id"]
        await poller.ok("join", {"room": "poll-burst"})
        n = 40
        replies = await asyncio.gather(
            *(poller.call("send", {"room": "poll-burst", "text": f"p{i}"}) for i in range(n))
        )
        assert [r["ok"] for r in replies] == [True] * n, replies
        assert await watcher.wait_messages(room, n) == [f"p{i}" for i in range(n)]
        history = await watcher.ok("history", {"room": "poll-burst"})
        assert [m["text"] for m in history["messages"]][-n:] == [f"p{i}" for i in range(n)]
        assert poller.sio.connected
    finally:
        await poller.close()
        await watcher.close()


async def test_a_long_polling_post_past_the_packet_limit_is_refused_out_loud(server):
    """A POST of 1000 packets is handled whole; one of 1001 is answered 413 with the
    reason, none of its messages is stored or delivered, and its session is closed, so
    the client knows (python-engineio alone answered such a POST 200 OK and dropped it)."""
    watcher = await ChatClient(server.url, "limit-watcher", transports=["websocket"]).connect()
    base = f"{server.url}/ws/socket.io/"
    try:
        room = (await watcher.ok("join", {"room": "post-limit"}))["room"]["id"]
        async with httpx.AsyncClient(timeout=WAIT) as http:
            opened = await http.get(base, params={"EIO": "4", "transport": "polling"})
            sid = json.loads(opened.text[1:])["sid"]
            session = {"EIO": "4", "transport": "polling", "sid": sid}

            async def post(*packets: str) -> httpx.Response:
                return await http.post(base, params=session, content="\x1e".join(packets))

            assert (await post('40{"name":"limit-poller"}')).status_code == 200
            assert (await http.get(base, params=session)).text.startswith("40{")
            assert (await post('42["join",{"room":"post-limit"}]')).status_code == 200

            def send(text: str) -> str:
                return "42" + json.dumps(["send", {"room": "post-limit", "text": text}])

            # As a browser sends them: with the page's origin, so both answers must let
            # the page read them.
            origin = {"origin": server.url}
            kept = [f"k{i}" for i in range(1000)]
            accepted = await http.post(
                base, params=session, content="\x1e".join(send(t) for t in kept), headers=origin
            )
            assert accepted.status_code == 200
            assert accepted.headers["access-control-allow-origin"] == server.url
            assert (await watcher.wait_messages(room, 1000))[-1000:] == kept

            refused = await http.post(
                base,
                params=session,
                content="\x1e".join(send(f"x{i}") for i in range(1001)),
                headers=origin,
            )
            assert refused.status_code == 413
            assert "too many packets in one POST: 1001 (at most 1000)" in refused.text
            assert refused.headers.get("access-control-allow-origin") == server.url
            after = await http.get(base, params=session)
            assert after.status_code == 400  # the session is gone

        await watcher.ok("send", {"room": "post-limit", "text": "after"})
        texts = await watcher.wait_messages(room, 1001)
        assert texts[-1001:] == [*kept, "after"]
        history = await watcher.ok("history", {"room": "post-limit", "limit": 100})
        assert [m["text"] for m in history["messages"]][-2:] == ["k999", "after"]
        members = await watcher.ok("members", {"room": "post-limit"})
        assert [u["name"] for u in members["members"]] == ["limit-watcher"]
    finally:
        await watcher.close()
