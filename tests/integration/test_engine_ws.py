"""Engine.IO sessions opened on a WebSocket, which roomcast serves itself (no ASGI app task,
no python-engineio socket): the protocol as a Socket.IO client sees it, frame by frame,
and against real python-socketio clients. Real server, real WebSockets."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import urllib.error
import urllib.request

import httpx
import pytest
import socketio
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .clients import WAIT, ChatClient, eventually
from .servers import run_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with run_server("--rate-limit", "0", log_dir=tmp_path_factory.mktemp("engine")) as srv:
        yield srv


def ws_url(port: int, query: str = "EIO=4&transport=websocket") -> str:
    return f"ws://127.0.0.1:{port}/ws/socket.io/?{query}"


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    values = re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    return sum(float(v) for v in values)


async def recv(ws: websockets.ClientConnection) -> str:
    """The next packet that is not a ping (pings are answered)."""
    while True:
        packet = await asyncio.wait_for(ws.recv(), WAIT)
        if packet == "2":
            await ws.send("3")
            continue
        return str(packet)


async def opened(port: int, **kwargs: object) -> tuple[websockets.ClientConnection, dict]:
    ws = await websockets.connect(ws_url(port), open_timeout=WAIT, compression=None, **kwargs)
    packet = await recv(ws)
    assert packet.startswith("0"), packet
    return ws, json.loads(packet[1:])


async def connected(port: int, name: str) -> tuple[websockets.ClientConnection, str]:
    ws, _ = await opened(port)
    await ws.send("40" + json.dumps({"name": name}))
    reply = await recv(ws)
    assert reply.startswith("40{"), reply
    welcome = await recv(ws)
    assert welcome.startswith('42["welcome",'), welcome
    return ws, json.loads(reply[2:])["sid"]


async def ack(ws: websockets.ClientConnection, ack_id: int) -> dict:
    while True:
        packet = await recv(ws)
        if packet.startswith(f"43{ack_id}["):
            return json.loads(packet[2 + len(str(ack_id)) :])[0]


async def test_the_open_packet_names_the_session_and_its_heartbeat(server):
    ws, info = await opened(server.port)
    try:
        assert set(info) == {"sid", "upgrades", "pingInterval", "pingTimeout", "maxPayload"}
        assert info["upgrades"] == []  # already on the best transport
        assert (info["pingInterval"], info["pingTimeout"]) == (25000, 20000)
        assert info["maxPayload"] == 1_000_000
        # Socket.IO's CONNECT answer carries a session id of its own.
        await ws.send('40{"name":"opener"}')
        reply = await recv(ws)
        sid = json.loads(reply[2:])["sid"]
        assert sid and sid != info["sid"]
        welcome = json.loads((await recv(ws))[2:])
        assert welcome[0] == "welcome" and welcome[1]["user"]["name"] == "opener"
    finally:
        await ws.close()


async def test_refusals_and_foreign_namespaces_get_socketios_error_packets(server):
    ws, _ = await opened(server.port)
    try:
        await ws.send("40/admin,")
        assert await recv(ws) == '44/admin,"Unable to connect"'
        await ws.send('40{"name":""}')  # a nickname is 1-32 characters
        refusal = json.loads((await recv(ws))[2:])
        assert refusal["data"]["code"] == "invalid_name" and refusal["message"]
        # Events before a successful CONNECT are not handled; the session may still connect.
        await ws.send('421["rooms",{}]')
        await ws.send('40{"name":"second try"}')
        assert (await recv(ws)).startswith("40{")
        assert (await recv(ws)).startswith('42["welcome",')
        await ws.send('422["rooms",{}]')
        assert (await ack(ws, 2))["ok"] is True
    finally:
        await ws.close()


async def test_python_socketio_clients_on_websocket_and_polling_share_a_room(server):
    """A WebSocket-first client (served by roomcast's Engine.IO path) and a long-polling one
    (python-engineio's) in one room: each sees the other's messages and presence."""
    ws_first = await ChatClient(server.url, "ws-first", transports=["websocket"]).connect()
    poller = await ChatClient(server.url, "poller", transports=["polling"]).connect()
    try:
        room = (await ws_first.ok("join", {"room": "mixed"}))["room"]["id"]
        await poller.ok("join", {"room": "mixed"})
        await ws_first.ok("send", {"room": "mixed", "text": "from ws"})
        await poller.ok("send", {"room": "mixed", "text": "from polling"})
        for client in (ws_first, poller):
            assert await client.wait_messages(room, 2) == ["from ws", "from polling"]
        before = metric(server.url, "roomcast_connections")
        await ws_first.close()
        await eventually(lambda: metric(server.url, "roomcast_connections") == before - 1)
        await poller.wait_for(
            lambda: any(p.get("event") == "leave" and p["user"]["name"] == "ws-first"
                        for p in poller.of("presence"))
        )  # fmt: skip
    finally:
        await poller.close()


async def test_a_socketio_disconnect_ends_the_session_but_not_the_websocket(server):
    ws, _ = await connected(server.port, "leaver")
    watcher = await ChatClient(server.url, "watcher", transports=["websocket"]).connect()
    try:
        await ws.send('421["join",{"room":"leaving"}]')
        assert (await ack(ws, 1))["ok"] is True
        await watcher.ok("join", {"room": "leaving"})
        await ws.send("41")
        await watcher.wait_for(
            lambda: any(p.get("event") == "leave" for p in watcher.of("presence"))
        )
        # The same WebSocket connects again as a new session.
        await ws.send('40{"name":"leaver again"}')
        for _ in range(10):  # the room's events from before the disconnect may come first
            packet = await recv(ws)
            if not packet.startswith('42["presence",'):
                break
        assert packet.startswith("40{"), packet
    finally:
        await ws.close()
        await watcher.close()


async def test_fragmented_and_binary_events_are_answered(server):
    ws, _ = await connected(server.port, "fragments")
    try:
        # One event split over three WebSocket frames.
        await ws.send(["421", '["join",', '{"room":"frag"}]'])
        reply = await ack(ws, 1)
        assert reply["ok"] is True and reply["room"]["name"] == "frag"
        # A binary event: roomcast takes JSON only and says so, under the event's ack id.
        await ws.send('451-2["send",{"room":"frag","text":{"_placeholder":true,"num":0}}]')
        await ws.send(b"\x00\x01")
        reply = await ack(ws, 2)
        assert reply["ok"] is False and reply["error"]["code"] in ("bad_request", "invalid_text")
        await ws.send('423["send",{"room":"frag","text":"still here"}]')
        assert (await ack(ws, 3))["message"]["text"] == "still here"
    finally:
        await ws.close()


async def test_a_message_over_the_payload_limit_closes_with_1009(server):
    ws, info = await opened(server.port, max_size=None)
    try:
        with pytest.raises(ConnectionClosed) as closed:
            # The server may close before the frame is all written: then send() raises.
            await ws.send("4" + "x" * info["maxPayload"])
            for _ in range(10):
                await recv(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    finally:
        await ws.close()


async def test_an_engineio_close_packet_ends_the_connection(server):
    ws, _ = await connected(server.port, "closer")
    await ws.send("1")
    with pytest.raises(ConnectionClosed):
        for _ in range(10):
            await recv(ws)
    await asyncio.wait_for(ws.wait_closed(), WAIT)


async def test_a_client_that_stops_answering_pings_is_dropped(tmp_path):
    with run_server("--ping-interval", "0.5", "--ping-timeout", "0.5", log_dir=tmp_path) as srv:
        ws, _ = await connected(srv.port, "silent")
        watcher = await ChatClient(srv.url, "watcher", transports=["websocket"]).connect()
        try:
            await ws.send('421["join",{"room":"quiet"}]')
            assert (await ack(ws, 1))["ok"] is True
            await watcher.ok("join", {"room": "quiet"})
            pings = 0
            with pytest.raises(ConnectionClosed):
                for _ in range(20):  # bounded: the server closes after one unanswered ping
                    packet = await asyncio.wait_for(ws.recv(), WAIT)
                    pings += packet == "2"
            assert pings == 1
            await watcher.wait_for(
                lambda: any(p.get("event") == "leave" for p in watcher.of("presence"))
            )
        finally:
            await ws.close()
            await watcher.close()


async def test_origins_are_checked_as_python_engineio_checks_them(tmp_path):
    with run_server("--cors-origins", "https://app.example", log_dir=tmp_path) as srv:
        with pytest.raises(InvalidStatus):
            await websockets.connect(
                ws_url(srv.port), origin="https://evil.example", open_timeout=WAIT
            )
        ws = await websockets.connect(
            ws_url(srv.port), origin="https://app.example", open_timeout=WAIT
        )
        try:
            assert (await recv(ws)).startswith("0{")
        finally:
            await ws.close()


async def test_a_client_that_stops_reading_is_cut_off_and_the_room_goes_on(tmp_path):
    """A member that stops reading its socket is disconnected once 4 MiB wait for it (the
    others' traffic is not held up, nor the server's memory), and the room sees it leave."""
    ping = ("--ping-interval", "60", "--ping-timeout", "60")  # no ping drops it meanwhile
    with run_server("--rate-limit", "0", *ping, log_dir=tmp_path) as srv:
        # A raw client that reads its first answers, then nothing: websockets stops reading
        # the socket once one message waits, and the socket's receive buffer is small.
        sleeper, _ = await opened(srv.port, max_queue=1)
        sock = sleeper.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        talker = await ChatClient(srv.url, "talker", transports=["websocket"]).connect()
        try:
            await sleeper.send("40" + json.dumps({"name": "sleeper"}))
            assert (await recv(sleeper)).startswith("40{")
            assert (await recv(sleeper)).startswith('42["welcome",')
            await sleeper.send('421["join",{"room":"flood"}]')
            assert (await ack(sleeper, 1))["ok"] is True
            room = (await talker.ok("join", {"room": "flood"}))["room"]["id"]

            def left() -> bool:
                return any(
                    p.get("event") == "leave" and p["user"]["name"] == "sleeper"
                    for p in talker.of("presence")
                )

            text = "\U0001f4ac" * 4000  # 16 KB a message in UTF-8
            sent = 0
            while not left() and sent < 3000:  # ~48 MB at most; 4 MiB + socket buffers cut it
                await talker.ok("send", {"room": room, "text": text})
                sent += 1
            assert left(), f"still a member after {sent} messages of 16 KB"
            # The talker got every one of its messages, in order, while it happened.
            await talker.wait_for(lambda: len(talker.messages(room)) == sent)
            seqs = [m["seq"] for m in talker.messages(room)]
            assert seqs == list(range(1, sent + 1))
            assert "does not read" in srv.output()
        finally:
            sleeper.transport.abort()
            await talker.close()


async def test_by_default_only_the_same_origin_may_connect(server):
    """No --cors-origins: a page of another site is refused, on a WebSocket and on
    long-polling; the server's own page, the public origin a proxy names in X-Forwarded-*,
    and clients that send no Origin (apps, services, terminals) get in."""
    own = f"http://127.0.0.1:{server.port}"
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(
            ws_url(server.port), origin="https://evil.example", open_timeout=WAIT
        )
    assert refused.value.response.status_code == 403
    proxied = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "chat.example"}
    for options in (
        {"origin": own},
        {},
        {"origin": "https://chat.example", "additional_headers": proxied},
    ):
        ws = await websockets.connect(ws_url(server.port), open_timeout=WAIT, **options)
        try:
            assert (await recv(ws)).startswith("0{")
        finally:
            await ws.close()

    def polling_handshake(origin: str) -> int:
        request = urllib.request.Request(
            f"{own}/ws/socket.io/?EIO=4&transport=polling", headers={"Origin": origin}
        )
        try:
            with urllib.request.urlopen(request, timeout=WAIT) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return error.code

    assert await asyncio.to_thread(polling_handshake, "https://evil.example") == 400
    assert await asyncio.to_thread(polling_handshake, own) == 200


async def test_other_engineio_requests_keep_python_engineios_answers(server):
    """What roomcast's path does not serve reaches python-engineio unchanged."""
    with pytest.raises(InvalidStatus):  # protocol version 3 is not supported
        await websockets.connect(ws_url(server.port, "EIO=3&transport=websocket"))
    with pytest.raises(InvalidStatus):  # an upgrade for a session that does not exist
        await websockets.connect(ws_url(server.port, "EIO=4&transport=websocket&sid=nope"))
    client = socketio.AsyncClient()
    try:  # polling first, then the upgrade: python-engineio's path, roomcast's writer
        await client.connect(
            server.url, socketio_path="/ws/socket.io", auth={"name": "upgrader"}, wait_timeout=WAIT
        )
        assert client.transport() == "websocket"
        reply = await client.call("rooms", {}, timeout=WAIT)
        assert reply["ok"] is True
    finally:
        await client.disconnect()


async def test_a_stopping_server_closes_its_websockets_with_1012(tmp_path):
    with run_server(log_dir=tmp_path) as srv:
        ws, _ = await connected(srv.port, "restarting")
        srv.stop()  # SIGTERM: uvicorn's graceful shutdown, bounded
        assert srv.process.poll() is not None
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(10):
                await recv(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012


async def test_a_session_that_connects_on_long_polling_then_upgrades_is_served_whole(server):
    """The browser's way: the Socket.IO connect over long-polling, then the probe and the
    switch. What was sent to the client between the two arrives over the WebSocket, in
    order, and from then on events, acks, room messages and the leave all go that way."""
    base = f"{server.url}/ws/socket.io/"
    before = metric(server.url, "roomcast_socketio_upgrades_total")
    watcher = await ChatClient(server.url, "up-watcher", transports=["websocket"]).connect()
    try:
        room = (await watcher.ok("join", {"room": "upgrading"}))["room"]["id"]
        async with httpx.AsyncClient(timeout=WAIT) as http:
            opened = await http.get(base, params={"EIO": "4", "transport": "polling"})
            info = json.loads(opened.text[1:])
            assert info["upgrades"] == ["websocket"]
            sid = info["sid"]
            session = {"EIO": "4", "transport": "polling", "sid": sid}
            assert (await http.post(base, params=session, content='40{"name":"up"}')).is_success
            polled = (await http.get(base, params=session)).text
            assert polled.startswith("40{") and '42["welcome"' in polled
            joined = '42["join",{"room":"upgrading"}]'
            assert (await http.post(base, params=session, content=joined)).is_success

            ws = await websockets.connect(
                ws_url(server.port, f"EIO=4&transport=websocket&sid={sid}"),
                open_timeout=WAIT,
                compression=None,
            )
            try:
                await ws.send("2probe")
                assert await recv(ws) == "3probe"
                # Sent while the client switches: held by Engine.IO, then written first.
                await watcher.ok("send", {"room": room, "text": "during"})
                await ws.send("5")
                await ws.send("421" + json.dumps(["send", {"room": room, "text": "after"}]))
                seen: list[str] = []
                reply = None
                while reply is None:  # bounded by recv's timeout
                    packet = await recv(ws)
                    if packet.startswith('42["message"'):
                        seen.append(json.loads(packet[2:])[1]["text"])
                    elif packet.startswith("431["):
                        reply = json.loads(packet[3:])[0]
                assert reply["ok"] is True
                while len(seen) < 2:
                    packet = await recv(ws)
                    if packet.startswith('42["message"'):
                        seen.append(json.loads(packet[2:])[1]["text"])
                assert seen == ["during", "after"]
                assert await watcher.wait_messages(room, 2) == ["during", "after"]
                assert metric(server.url, "roomcast_socketio_upgrades_total") == before + 1
                # Long-polling is over for this session, as python-engineio has it.
                late = await http.get(base, params=session)
                assert late.status_code == 400 and "Unexpected HTTP request" in late.text
            finally:
                await ws.close()
            await watcher.wait_for(
                lambda: any(
                    p["event"] == "leave" and p["user"]["name"] == "up"
                    for p in watcher.of("presence")
                )
            )
            # The session is gone everywhere: Engine.IO no longer knows it.
            gone = await http.get(base, params=session)
            assert gone.status_code == 400 and f"Invalid session {sid}" in gone.text
        members = await watcher.ok("members", {"room": room})
        assert [u["name"] for u in members["members"]] == ["up-watcher"]
    finally:
        await watcher.close()


async def test_a_python_socketio_client_that_upgrades_keeps_its_session(tmp_path):
    """python-socketio's client upgrades before its Socket.IO connect, which then comes
    over the WebSocket; the session lives through many heartbeats, and a server-side
    close reaches it."""
    with run_server("--ping-interval", "0.3", "--ping-timeout", "1", log_dir=tmp_path) as srv:
        watcher = await ChatClient(srv.url, "py-watcher", transports=["websocket"]).connect()
        upgraded = ChatClient(srv.url, "py-upgraded")  # long-polling first, then upgrades
        try:
            await upgraded.connect()
            assert upgraded.sio.transport() == "websocket"
            room = (await watcher.ok("join", {"room": "py-up"}))["room"]["id"]
            await upgraded.ok("join", {"room": "py-up"})
            await upgraded.ok("send", {"room": room, "text": "one"})
            assert await watcher.wait_messages(room, 1) == ["one"]
            assert metric(srv.url, "roomcast_socketio_upgrades_total") == 1
            # Ten ping intervals later it is still connected and answered.
            deadline = asyncio.get_running_loop().time() + 3.0
            while asyncio.get_running_loop().time() < deadline:
                assert (await upgraded.ok("rooms"))["ok"] is True
                await asyncio.sleep(0.3)
            await watcher.ok("send", {"room": room, "text": "two"})
            assert await upgraded.wait_messages(room, 2) == ["one", "two"]
        finally:
            await upgraded.close()
        await watcher.wait_for(lambda: any(p["event"] == "leave" for p in watcher.of("presence")))
        await watcher.close()


async def test_idle_sessions_keep_no_task_on_the_server_however_they_were_opened(server):
    """Thirty sessions, half opened on a WebSocket and half on long-polling and then
    upgraded (the browser's way), each connected and answered once: once they are idle
    none of them keeps an asyncio task on the server — not even the first ping that
    python-engineio schedules when a long-polling session opens."""
    base = f"{server.url}/ws/socket.io/"

    async def upgraded(http: httpx.AsyncClient, name: str) -> websockets.ClientConnection:
        sid = json.loads(
            (await http.get(base, params={"EIO": "4", "transport": "polling"})).text[1:]
        )["sid"]
        session = {"EIO": "4", "transport": "polling", "sid": sid}
        assert (
            await http.post(base, params=session, content="40" + json.dumps({"name": name}))
        ).is_success
        assert (await http.get(base, params=session)).text.startswith("40{")
        ws = await websockets.connect(
            ws_url(server.port, f"EIO=4&transport=websocket&sid={sid}"),
            open_timeout=WAIT,
            compression=None,
        )
        await ws.send("2probe")
        assert await recv(ws) == "3probe"
        await ws.send("5")
        return ws

    def tasks() -> float:
        return metric(server.url, "roomcast_event_loop_tasks")

    before = tasks()
    sockets: list[websockets.ClientConnection] = []
    try:
        async with httpx.AsyncClient(timeout=WAIT) as http:
            for i in range(15):
                sockets.append(await upgraded(http, f"idle-up-{i}"))
                sockets.append((await connected(server.port, f"idle-ws-{i}"))[0])
            for i, ws in enumerate(sockets):
                await ws.send(f"42{i}" + json.dumps(["rooms", {}]))
                assert (await ack(ws, i))["ok"] is True
        # What the connects started (welcomes, the service's bookkeeping) has finished
        # within a second; a task kept per session would show as 30 more.
        for _ in range(int(WAIT / 0.1)):
            if (now := tasks()) <= before + 2:
                break
            await asyncio.sleep(0.1)
        assert now <= before + 2, (before, now)
        assert metric(server.url, "roomcast_connections") >= 30
    finally:
        for ws in sockets:
            await ws.close()
