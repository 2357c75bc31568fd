"""``roomcast serve --workers N`` on one port, with no sticky load balancer in front."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from pathlib import Path

import httpx
import pytest
import websockets

from tests import services

from .clients import WAIT, ChatClient
from .servers import every_workers_metrics, metric_total, run_server


@pytest.fixture
def redis_url():
    services.require("Redis", services.REDIS_HOST, services.REDIS_PORT)
    return f"{services.REDIS_URL}/0?prefix=w{uuid.uuid4().hex[:10]}"


async def test_five_workers_share_my_room(tmp_path, redis_url):
    """Five workers, two clients in my_room: the second client's message reaches the first
    (with a plain Socket.IO server behind `gunicorn -w 5` it never does)."""
    with run_server("--workers", "5", "--broker-url", redis_url, log_dir=tmp_path) as server:
        first = await ChatClient(server.url, "first").connect()
        second = await ChatClient(server.url, "second").connect()
        try:
            room = (await first.ok("join", {"room": "my_room"}))["room"]["id"]
            await second.ok("join", {"room": "my_room"})
            await second.ok("send", {"room": "my_room", "text": 'I\'m in "my_room"!'})
            assert await first.wait_messages(room, 1) == ['I\'m in "my_room"!']
            members = await first.ok("members", {"room": "my_room"})
            assert {m["name"] for m in members["members"]} == {"first", "second"}
        finally:
            await first.close()
            await second.close()


async def test_polling_only_and_websocket_clients_chat_across_four_workers(tmp_path, redis_url):
    with run_server("--workers", "4", "--broker-url", redis_url, log_dir=tmp_path) as server:
        poller = ChatClient(server.url, "poller", transports=["polling"])
        sockets = [ChatClient(server.url, f"ws{i}", transports=["websocket"]) for i in range(3)]
        clients = [poller, *sockets]
        try:
            for client in clients:
                await client.connect()
                room = (await client.ok("join", {"room": "mixed"}))["room"]["id"]
            for round_ in range(5):
                for client in clients:
                    await client.ok("send", {"room": "mixed", "text": f"{client.name} {round_}"})
            for client in clients:
                await client.wait_messages(room, 20)
            views = [[(m["seq"], m["text"]) for m in c.messages(room)] for c in clients]
            assert all(view == views[0] for view in views)
            assert [seq for seq, _ in views[0]] == list(range(1, 21))
        finally:
            for client in clients:
                await client.close()


async def test_polling_requests_reach_the_owning_worker_on_any_connection(tmp_path, redis_url):
    """Every request on a fresh TCP connection: the kernel spreads them over the workers, and
    each must still reach the worker that owns the Engine.IO session."""
    with run_server("--workers", "4", "--broker-url", redis_url, log_dir=tmp_path) as server:
        base = f"{server.url}/ws/socket.io/?EIO=4&transport=polling"
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(limits=limits, timeout=10) as http:
            opened = await http.get(base)
            assert opened.status_code == 200 and opened.text.startswith("0{")
            sid = json.loads(opened.text[1:])["sid"]
            url = f"{base}&sid={sid}"
            connect = await http.post(url, content='40{"name":"raw"}')
            assert connect.status_code == 200
            got = (await http.get(url)).text
            while '"welcome"' not in got:  # the namespace ack, then the welcome event
                got += (await http.get(url)).text
            for i in range(20):
                answer = await http.post(url, content=f'42{i}["rooms"]')
                assert answer.status_code == 200, answer.text
                reply = ""
                while f"43{i}[" not in reply:
                    reply += (await http.get(url)).text
                assert '"ok":true' in reply


async def _upgraded_session(url: str, port: int, name: str, room: str) -> None:
    """A browser's way in, each request on a fresh connection: open and connect over
    long-polling, then probe and switch to a WebSocket, join ``room`` and send to it."""
    base = f"{url}/ws/socket.io/"
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=WAIT) as http:
        opened = await http.get(base, params={"EIO": "4", "transport": "polling"})
        sid = json.loads(opened.text[1:])["sid"]
        session = {"EIO": "4", "transport": "polling", "sid": sid}
        connect = await http.post(base, params=session, content="40" + json.dumps({"name": name}))
        assert connect.is_success, connect.text
        got = ""
        while '"welcome"' not in got:  # the namespace ack, then the welcome; bounded by WAIT
            got += (await http.get(base, params=session)).text
    ws = await websockets.connect(
        f"ws://127.0.0.1:{port}/ws/socket.io/?EIO=4&transport=websocket&sid={sid}",
        open_timeout=WAIT,
        compression=None,
    )
    try:
        await ws.send("2probe")
        assert await asyncio.wait_for(ws.recv(), WAIT) == "3probe"
        await ws.send("5")
        for ack_id, event in ((1, "join"), (2, "send")):
            data = {"room": room, "text": name} if event == "send" else {"room": room}
            await ws.send(f"42{ack_id}" + json.dumps([event, data]))
            while True:  # bounded by recv's timeout
                packet = str(await asyncio.wait_for(ws.recv(), WAIT))
                if packet == "2":
                    await ws.send("3")
                elif packet.startswith(f"43{ack_id}["):
                    reply = json.loads(packet[3:])[0]
                    assert reply["ok"] is True, reply
                    break
    finally:
        await ws.close()


async def test_upgrades_landing_on_another_worker_are_served_by_the_owner(tmp_path, redis_url):
    """A browser's upgrade reaches any of the workers; one that lands on a worker other
    than the session's owner has its connection handed to the owner, which serves it on
    roomcast's own WebSocket path as if it had accepted it (no frame-by-frame bridge):
    every upgrade is served, and every hand-over sent is taken."""
    workers, sessions = 4, 24
    with run_server("--workers", str(workers), "--broker-url", redis_url, log_dir=tmp_path) as srv:
        watcher = await ChatClient(srv.url, "handoff-watcher", transports=["websocket"]).connect()
        try:
            room = (await watcher.ok("join", {"room": "handed"}))["room"]["id"]
            for i in range(sessions):
                await _upgraded_session(srv.url, srv.port, f"up{i}", "handed")
            texts = sorted(await watcher.wait_messages(room, sessions))
            assert texts == sorted(f"up{i}" for i in range(sessions))
        finally:
            await watcher.close()
        metrics = every_workers_metrics(srv.url, workers)
        assert metric_total(metrics, "roomcast_socketio_upgrades_total") == sessions
        sent = metric_total(metrics, "roomcast_worker_handoffs_total", direction="sent")
        taken = metric_total(metrics, "roomcast_worker_handoffs_total", direction="taken")
        assert sent == taken and sent >= 1, (sent, taken)


async def test_workers_of_a_server_with_a_node_id_are_nodes_of_their_own(tmp_path, redis_url):
    """``--node-id host1 --workers 2``: each worker is a node (``host1-w0``, ``host1-w1``).
    Sharing one id, the workers numbered their connections alike, and a client leaving one
    worker removed the member of the other worker that had its number."""
    with run_server(
        "--workers", "2", "--node-id", "host1", "--broker-url", redis_url, log_dir=tmp_path
    ) as server:
        assert set(every_workers_metrics(server.url, 2)) == {"host1-w0", "host1-w1"}
        watcher = await ChatClient(server.url, "watcher").connect()
        try:
            room = (await watcher.ok("join", {"room": "ids"}))["room"]["id"]
            for i in range(12):  # spread over both workers by the kernel
                passer = await ChatClient(server.url, f"passer{i}").connect()
                await passer.ok("join", {"room": "ids"})
                await passer.close()
            members = await watcher.ok("members", {"room": room})
            assert [m["name"] for m in members["members"]] == ["watcher"]
        finally:
            await watcher.close()


async def test_connections_are_spread_over_the_workers(tmp_path, redis_url):
    """Clients connecting one after another land on every worker. On one listening socket
    shared by the workers, the one that woke first took nearly every connection."""
    with run_server("--workers", "2", "--broker-url", redis_url, log_dir=tmp_path) as server:
        clients = [ChatClient(server.url, f"c{i}", transports=["websocket"]) for i in range(16)]
        try:
            for client in clients:
                await client.connect()
            texts = every_workers_metrics(server.url, 2)
            held = {
                node: metric_total({node: text}, "roomcast_connections")
                for node, text in texts.items()
            }
            assert sum(held.values()) == 16
            assert all(count >= 1 for count in held.values()), held
        finally:
            for client in clients:
                await client.close()


def worker_pids(parent: int) -> list[int]:
    """The worker processes of a ``roomcast serve --workers`` parent (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"spawn_main" in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


async def test_a_killed_worker_is_started_again_on_its_socket_and_its_members_removed(
    tmp_path, redis_url
):
    """``kill -9`` of a worker of ``--node-id web --workers 2``: the supervisor starts it
    again on the socket it had, clients connect as before (those the kernel gives that
    socket wait for the new worker), and the new run removes the killed one's members."""
    with run_server(
        "--workers", "2", "--node-id", "web", "--broker-url", redis_url, log_dir=tmp_path
    ) as server:
        first = [ChatClient(server.url, f"a{i}", transports=["websocket"]) for i in range(8)]
        later: list[ChatClient] = []
        try:
            for client in first:
                await client.connect()
                await client.ok("join", {"room": "kill"})
            pids = worker_pids(server.process.pid)
            assert len(pids) == 2
            os.kill(pids[0], signal.SIGKILL)
            for i in range(10):
                later.append(ChatClient(server.url, f"b{i}", transports=["websocket"]))
                await later[-1].connect()
            assert set(every_workers_metrics(server.url, 2)) == {"web-w0", "web-w1"}
            for _ in range(100):  # 10 s at most: the killed worker's clients see the reset
                survivors = sorted(c.name for c in first if c.sio.connected)
                members = await later[0].ok("members", {"room": "kill"})
                listed = sorted(m["name"] for m in members["members"])
                if listed == survivors and len(survivors) < len(first):
                    break
                await asyncio.sleep(0.1)
            assert 0 < len(survivors) < len(first)  # the kernel had spread them over both
            assert listed == survivors
            assert "removed" in server.output() and "left by a previous run" in server.output()
        finally:
            for client in first + later:
                await client.close()


def running(pid: int) -> bool:
    """Whether a process is alive (a zombie waiting to be reaped is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_workers_stop_when_their_supervisor_is_killed(tmp_path, redis_url):
    """``kill -9`` of the parent of ``--workers 2``: its workers stop within seconds, so a
    new server can take the port (orphans would go on serving it, unsupervised)."""
    with run_server("--workers", "2", "--broker-url", redis_url, log_dir=tmp_path) as server:
        client = await ChatClient(server.url, "orphan", transports=["websocket"]).connect()
        pids = worker_pids(server.process.pid)
        assert len(pids) == 2
        server.kill()
        for _ in range(150):  # 15 s at most
            if not any(running(pid) for pid in pids):
                break
            await asyncio.sleep(0.1)
        assert not any(running(pid) for pid in pids)
        await client.wait_for(lambda: not client.sio.connected)
        port = server.port
    with run_server(
        "--workers", "2", "--broker-url", redis_url, port=port, log_dir=tmp_path
    ) as again:
        fresh = await ChatClient(again.url, "fresh").connect()
        await fresh.ok("join", {"room": "after"})
        await fresh.close()
