"""Scale-out acceptance: several nodes (separate processes, separate ports) sharing rooms
through Redis, RabbitMQ or NATS, with the durable history in PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request

import pytest
import socketio

from tests.contract.engines import engine_url, unique
from tests.redis_server import RedisClusterServers, RedisSentinelServers

from .clients import ChatClient, eventually, told
from .cluster import BROKERS, FAST, cluster, postgres_schema, room_frames, stray_frames
from .servers import run_server

LONG = 60.0


@pytest.fixture(params=BROKERS)
async def engines(request, tmp_path):
    async with engine_url(request.param, tmp_path) as url, postgres_schema() as store:
        yield url, store


@pytest.fixture
async def clients():
    opened: list[ChatClient] = []

    async def connect(node, name):
        client = await ChatClient(node.url, name).connect()
        opened.append(client)
        return client

    yield connect
    for client in opened:
        await client.close()


async def test_600_messages_from_three_nodes_arrive_once_in_one_order(engines, clients, tmp_path):
    broker, store = engines
    with cluster(broker, store, tmp_path) as c:
        nodes = c.start(3)
        senders = [await clients(node, f"sender{i}") for i, node in enumerate(nodes)]
        readers = [await clients(node, f"reader{i}") for i, node in enumerate(nodes)]
        everyone = senders + readers
        for client in everyone:
            room = (await client.ok("join", {"room": "storm"}))["room"]["id"]

        async def send_200(client):
            for i in range(200):
                await client.ok("send", {"room": "storm", "text": f"{client.name}:{i}"})

        await asyncio.gather(*(send_200(s) for s in senders))
        for client in everyone:
            await client.wait_messages(room, 600, timeout=LONG)
        views = [[(m["seq"], m["text"]) for m in client.messages(room)] for client in everyone]
        assert [seq for seq, _ in views[0]] == list(range(1, 601))
        for view in views[1:]:
            assert view == views[0]
        for sender in senders:
            mine = [text for _, text in views[0] if text.startswith(f"{sender.name}:")]
            assert mine == [f"{sender.name}:{i}" for i in range(200)]


async def test_clients_hopping_between_nodes_mid_traffic_see_every_message_once_in_order(
    engines, clients, tmp_path
):
    """Clients that keep reconnecting to another node and joining with ``since`` while
    three nodes send: what each one saw — live, then each join's ``missed``, then live
    again — is the room's history, every message once, in order. (A join reads the room's
    position from the store, which can be ahead of what its node has delivered.)"""
    broker, store = engines
    with cluster(broker, store, tmp_path) as c:
        nodes = c.start(3)
        senders = [await clients(node, f"sender{i}") for i, node in enumerate(nodes)]
        for sender in senders:
            room = (await sender.ok("join", {"room": "hops"}))["room"]["id"]
        hoppers = []
        for i in range(3):
            client = await clients(nodes[i], f"hopper{i}")
            joined = await client.ok("join", {"room": "hops"})
            hoppers.append({"client": client, "epoch": joined["epoch"], "from": joined["seq"]})
            hoppers[-1]["seen"] = []
        done = asyncio.Event()

        async def send(sender: ChatClient) -> None:
            i = 0
            while not done.is_set():
                await sender.ok("send", {"room": "hops", "text": f"{sender.name}:{i}"})
                i += 1
                await asyncio.sleep(0.005)

        async def hop(k: int, hopper: dict) -> None:
            for n in range(1, 13):
                await asyncio.sleep(0.1)
                old: ChatClient = hopper["client"]
                await old.close()  # nothing more reaches it: its view is final
                hopper["seen"] += [m["seq"] for m in old.messages(room)]
                last = hopper["seen"][-1] if hopper["seen"] else hopper["from"]
                new = await clients(nodes[(k + n) % 3], f"hopper{k}")
                since = {"epoch": hopper["epoch"], "seq": last}
                reply = await new.ok("join", {"room": "hops", "since": since})
                assert reply["recovered"] is True, reply
                hopper["seen"] += [m["seq"] for m in reply["missed"]]
                hopper["client"] = new

        senders_done = asyncio.gather(*(send(s) for s in senders))
        await asyncio.gather(*(hop(k, h) for k, h in enumerate(hoppers)))
        done.set()
        await senders_done
        last = (await senders[0].ok("history", {"room": "hops", "limit": 1}))["messages"][-1]
        for hopper in hoppers:
            client = hopper["client"]
            await client.wait_for(
                lambda c=client, h=hopper: (
                    (h["seen"] + [m["seq"] for m in c.messages(room)])[-1:] == [last["seq"]]
                ),
                timeout=LONG,
            )
            seen = hopper["seen"] + [m["seq"] for m in client.messages(room)]
            assert seen == list(range(hopper["from"] + 1, last["seq"] + 1)), client.name


async def _whole_history(client: ChatClient, room: str) -> list[dict]:
    """Every message of the room, oldest first, a page of 100 at a time."""
    pages: list[list[dict]] = []
    before = None
    while True:
        args = {"room": room, "limit": 100} | ({} if before is None else {"before": before})
        page = (await client.ok("history", args))["messages"]
        if not page:
            return [m for p in reversed(pages) for m in p]
        pages.append(page)
        before = page[0]["seq"]


async def test_senders_of_a_node_killed_mid_traffic_send_again_and_each_message_is_stored_once(
    engines, clients, tmp_path
):
    """Three clients send, each as fast as its answers come, through a node that is killed
    mid-traffic; each sends what got no answer again, same id, through another node. Every
    message is in the room once, in each sender's order, and a member on a third node gets
    each once, in the room's order — also those the dead node stored and never published."""
    broker, store = engines
    count = 40
    with cluster(broker, store, tmp_path) as c:
        one, two, doomed = c.start(3)
        watcher = await clients(two, "watcher")
        room = (await watcher.ok("join", {"room": "crash"}))["room"]["id"]
        senders = [await clients(doomed, f"s{k}") for k in range(3)]
        for sender in senders:
            await sender.ok("join", {"room": "crash"})
        acked = [0, 0, 0]
        resent: list[str] = []

        async def send_all(k: int, client: ChatClient) -> None:
            while acked[k] < count:
                data = {"room": "crash", "text": f"s{k}:{acked[k]}", "id": f"s{k}-{acked[k]}"}
                try:
                    reply = await client.sio.call("send", data, timeout=3)
                except (TimeoutError, socketio.exceptions.SocketIOError):
                    reply = None  # no answer: its node is gone
                if reply is not None and reply["ok"]:
                    assert reply["message"]["id"] == data["id"]
                    acked[k] += 1
                    continue
                assert reply is None or reply["error"]["code"] == "unavailable", reply
                resent.append(data["id"])
                await client.close()
                client = await clients(one, f"s{k}")
                await client.ok("join", {"room": "crash"})

        sending = asyncio.gather(*(send_all(k, s) for k, s in enumerate(senders)))
        for _ in range(1000):  # 10 s at most
            if min(acked) >= 5:
                break
            await asyncio.sleep(0.01)
        doomed.kill()
        await sending
        assert len(resent) >= 3, resent  # each sender had to send one again

        history = await _whole_history(watcher, "crash")
        ids = [m["id"] for m in history]
        assert sorted(ids) == sorted(f"s{k}-{i}" for k in range(3) for i in range(count))
        for k in range(3):
            assert [i for i in ids if i.startswith(f"s{k}-")] == [f"s{k}-{i}" for i in range(count)]
        assert [m["seq"] for m in history] == list(range(1, 3 * count + 1))
        await watcher.wait_messages(room, 3 * count, timeout=LONG)
        assert [m["id"] for m in watcher.messages(room)] == ids


async def test_a_node_without_members_of_a_room_receives_none_of_its_traffic(
    engines, clients, tmp_path
):
    broker, store = engines
    with cluster(broker, store, tmp_path, "--metrics-rooms", "true") as c:
        busy, other, idle = c.start(3)
        alice, bob = await clients(busy, "alice"), await clients(other, "bob")
        carol = await clients(idle, "carol")
        x = (await alice.ok("join", {"room": "x"}))["room"]["id"]
        await bob.ok("join", {"room": "x"})
        y = (await carol.ok("join", {"room": "y"}))["room"]["id"]
        for i in range(50):
            await alice.ok("send", {"room": "x", "text": f"x{i}"})
        await bob.wait_messages(x, 50)
        await carol.ok("send", {"room": "y", "text": "only y here"})
        await carol.wait_messages(y, 1)
        frames = room_frames(idle)
        assert frames.get(x, 0) == 0
        assert frames.get(y, 0) >= 1
        assert room_frames(other).get(x, 0) >= 50
        # Nor did x's frames reach it unasked, to be dropped (a room it never had).
        assert stray_frames(idle) == 0


async def test_kill_9_of_a_node_removes_its_members_and_its_clients_recover(
    engines, clients, tmp_path
):
    broker, store = engines
    with cluster(broker, store, tmp_path) as c:
        one, two, doomed = c.start(3)
        alice, bob = await clients(one, "alice"), await clients(two, "bob")
        carol = await clients(doomed, "carol")
        room = (await alice.ok("join", {"room": "fragile"}))["room"]["id"]
        await bob.ok("join", {"room": "fragile"})
        joined = await carol.ok("join", {"room": "fragile"})
        await alice.ok("send", {"room": "fragile", "text": "before"})
        # Carol's last send: a client that never got its answer sends it again, same id.
        mine = {"room": "fragile", "text": "did this go?", "id": "carol-7f3a"}
        first = (await carol.ok("send", mine))["message"]
        await carol.wait_messages(room, 2)
        seen = carol.messages(room)[-1]["seq"]

        killed_at = time.monotonic()
        doomed.kill()
        for i in range(5):
            await alice.ok("send", {"room": "fragile", "text": f"while away {i}"})
        leave = {"room": room, "event": "leave", "user": carol.user}
        await alice.wait_for(lambda: leave in alice.of("presence"), timeout=10)
        await bob.wait_for(lambda: leave in bob.of("presence"), timeout=10)
        assert time.monotonic() - killed_at < 10
        members = await bob.ok("members", {"room": "fragile"})
        assert {m["name"] for m in members["members"]} == {"alice", "bob"}

        carol2 = await clients(one, "carol")  # reconnects to a surviving node
        since = {"epoch": joined["epoch"], "seq": seen}
        reply = await carol2.ok("join", {"room": "fragile", "since": since})
        assert reply["recovered"] is True
        assert [m["text"] for m in reply["missed"]] == [f"while away {i}" for i in range(5)]
        assert [m["seq"] for m in reply["missed"]] == list(range(seen + 1, seen + 6))
        # Sent again through another node: the message stored before, not a second one.
        assert (await carol2.ok("send", mine))["message"] == first
        other = await carol2.call("send", {**mine, "text": "something else"})
        assert other["error"]["code"] == "conflict"
        await carol2.ok("send", {"room": "fragile", "text": "last"})
        history = (await bob.ok("history", {"room": "fragile"}))["messages"]
        assert [m["id"] for m in history].count("carol-7f3a") == 1
        assert [m["text"] for m in history[-2:]] == ["while away 4", "last"]
        # Bob had it live; the retry's copy, published before "last", is not shown again.
        await bob.wait_messages(room, 8)
        assert [m["text"] for m in bob.messages(room)].count("did this go?") == 1
        assert [m["seq"] for m in bob.messages(room)] == list(range(1, 9))


async def test_a_node_started_again_at_once_with_its_id_removes_what_its_last_run_left(
    engines, clients, tmp_path
):
    """A node with a fixed ``--node-id`` that dies and is started again within its ttl (a
    supervisor's restart): the new run removes the members the dead one left, with leave
    events. Without it, the new run's heartbeats kept the old run alive: its members stayed
    listed for as long as the new run lived."""
    broker, store = engines
    with cluster(broker, store, tmp_path, "--node-ttl", "30") as c:
        one, doomed = c.start(2)
        alice, carol = await clients(one, "alice"), await clients(doomed, "carol")
        joined = await alice.ok("join", {"room": "restarted"})
        await carol.ok("join", {"room": "restarted"})
        await alice.wait_for(lambda: told(alice, joined) == ["alice", "carol"])

        doomed.kill()
        again = c.restart(doomed)  # same node id, same port, well within the ttl of 30 s
        await alice.wait_for(lambda: told(alice, joined) == ["alice"])
        members = await alice.ok("members", {"room": "restarted"})
        assert [m["name"] for m in members["members"]] == ["alice"]

        dave = await clients(again, "dave")  # the new run serves its own members
        await dave.ok("join", {"room": "restarted"})
        await alice.wait_for(lambda: told(alice, joined) == ["alice", "dave"])
        sent = await dave.ok("send", {"room": "restarted", "text": "from the new run"})
        assert await alice.wait_messages(joined["room"]["id"], 1) == ["from the new run"]
        assert alice.messages()[0]["seq"] == sent["message"]["seq"]


@pytest.mark.parametrize("broker_kind", ["redis", "nats"])
async def test_two_servers_given_one_node_id_say_so(broker_kind, tmp_path):
    """Two running servers with one ``--node-id`` (a template that sets it for every
    replica): each logs an error and ``/healthz`` says ``node_id_shared``; a server of its
    own id does not. (On RabbitMQ the second one cannot start: the node's queue is
    exclusive.)"""
    async with engine_url(broker_kind, tmp_path) as broker, postgres_schema() as store:
        common = ("--broker-url", broker, *FAST)
        with (
            run_server(*common, "--node-id", "same", store_url=store, log_dir=tmp_path) as one,
            run_server(*common, "--node-id", "same", store_url=store, log_dir=tmp_path) as two,
            run_server(*common, "--node-id", "other", store_url=store, log_dir=tmp_path) as other,
        ):
            for server in (one, two):
                await eventually(lambda s=server: health(s)["node_id_shared"], timeout=10)
                assert "another process runs as node same" in server.output()
            assert health(other)["node_id_shared"] is False
            assert "another process runs as node" not in other.output()


def health(server) -> dict:
    with urllib.request.urlopen(server.url + "/healthz", timeout=5) as response:
        return json.loads(response.read())


async def test_direct_message_to_a_client_on_the_other_server(engines, clients, tmp_path):
    """Two servers on two ports: a message to a client connected to the other server."""
    broker, store = engines
    with cluster(broker, store, tmp_path) as c:
        first, second = c.start(2)
        a = await clients(first, "on-first")
        b = await clients(second, "on-second")
        reply = await a.ok("dm", {"to": b.user["id"], "text": "hello from the first server"})
        got = await b.wait_for(lambda: b.of("dm"))
        assert got == [reply["dm"]]
        back = await b.ok("dm", {"to": a.user["id"], "text": "and back"})
        assert await a.wait_for(lambda: a.of("dm")) == [back["dm"]]


async def test_a_node_paused_past_its_ttl_announces_its_members_again_when_it_wakes(
    clients, tmp_path
):
    """A node stopped longer than ``node_ttl`` (a stall, a stopped VM) is taken for dead:
    the others remove its members and send their leaves. When it wakes, its members are
    still connected to it: it writes their entries again and announces them, so the other
    nodes' members see them back."""
    async with engine_url("redis", tmp_path) as broker, postgres_schema() as store:
        with cluster(broker, store, tmp_path) as c:
            one, sleeper = c.start(2)
            alice, carol = await clients(one, "alice"), await clients(sleeper, "carol")
            joined = await alice.ok("join", {"room": "naps"})
            await carol.ok("join", {"room": "naps"})
            room = joined["room"]["id"]
            await alice.wait_for(lambda: told(alice, joined) == ["alice", "carol"])

            sleeper.process.send_signal(signal.SIGSTOP)
            try:
                await alice.wait_for(lambda: told(alice, joined) == ["alice"], timeout=15)
            finally:
                sleeper.process.send_signal(signal.SIGCONT)
            await alice.wait_for(lambda: told(alice, joined) == ["alice", "carol"], timeout=15)
            members = await alice.ok("members", {"room": "naps"})
            assert sorted(m["name"] for m in members["members"]) == ["alice", "carol"]
            # And carol is a member as before: what she sends reaches alice.
            await carol.ok("send", {"room": "naps", "text": "back"})
            assert await alice.wait_messages(room, 1) == ["back"]


async def test_a_redis_cluster_primary_dies_and_its_rooms_go_on(clients, tmp_path):
    """Two nodes on a Redis Cluster of three primaries with a replica each. The primary
    that holds a room (its channel and its members) is killed: while its replica takes
    over, sends may answer ``unavailable`` and are sent again with their ids; afterwards
    every member has every message once, in order, and the members are listed again."""
    servers = RedisClusterServers(tmp_path, primaries=3, replicas=1)
    try:
        servers.start()
        prefix = unique()

        def kill(room: int) -> None:
            servers.kill(servers.primary_of(b"%s:room:{r%d}" % (prefix.encode(), room)))

        await _failover(clients, tmp_path, f"{servers.url}&prefix={prefix}", kill)
    finally:
        servers.stop()


async def test_a_sentinel_watched_primary_dies_and_the_rooms_go_on(clients, tmp_path):
    """The same on the primary that Redis Sentinel names, killed: the nodes follow
    Sentinel to the replica it promotes."""
    servers = RedisSentinelServers(tmp_path)
    try:
        servers.start()
        url = f"{servers.url}?prefix={unique()}"
        await _failover(clients, tmp_path, url, lambda room: servers.kill(servers.primary()))
    finally:
        servers.stop()


async def _failover(clients, tmp_path, broker, kill) -> None:
    async with postgres_schema() as store:
        with cluster(broker, store, tmp_path) as c:
            one, two = c.start(2)
            alice, bob = await clients(one, "alice"), await clients(two, "bob")
            joined = await alice.ok("join", {"room": "failover"})
            room = joined["room"]["id"]
            await bob.ok("join", {"room": "failover"})
            await alice.ok("send", {"room": "failover", "text": "before", "id": "a0"})
            await bob.wait_messages(room, 1)
            kill(room)

            async def send(i: int) -> None:
                message = {"room": "failover", "text": f"after {i}", "id": f"a{i}"}
                deadline = time.monotonic() + LONG
                while True:
                    reply = await alice.call("send", message)
                    if reply["ok"]:
                        return
                    assert reply["error"]["code"] == "unavailable", reply
                    assert time.monotonic() < deadline, "no send went through"
                    await asyncio.sleep(0.2)

            for i in range(1, 6):
                await send(i)
            texts = ["before"] + [f"after {i}" for i in range(1, 6)]
            for client in (alice, bob):
                assert await client.wait_messages(room, 6, timeout=LONG) == texts
                assert [m["seq"] for m in client.messages(room)] == list(range(1, 7))

            async def listed() -> list[str]:
                reply = await bob.call("members", {"room": "failover"})
                return sorted(m["name"] for m in reply.get("members", []))

            deadline = time.monotonic() + LONG
            while await listed() != ["alice", "bob"]:
                assert time.monotonic() < deadline, await listed()
                await asyncio.sleep(0.2)
