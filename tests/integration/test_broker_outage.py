"""Redis restarted in the middle of traffic: no false ok while it is down, and afterwards no
acknowledged message is missing from any member's view."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
import uuid

from tests import services
from tests.redis_server import private_redis
from tests.relay import TcpRelay

from .clients import ChatClient, told
from .cluster import cluster, postgres_schema

OUTAGE_SENDS = 5
"""Refused sends to see while Redis is down (proof the outage reached the clients)."""


async def test_redis_restart_mid_traffic_loses_no_acknowledged_message(tmp_path):
    async with private_redis(tmp_path) as redis_server, postgres_schema() as store:
        with cluster(redis_server.url + "?prefix=outage", store, tmp_path) as c:
            one, two = c.start(2)
            sender = await ChatClient(one.url, "sender").connect()
            near = await ChatClient(one.url, "near").connect()
            far = await ChatClient(two.url, "far").connect()
            readers = [near, far]
            try:
                room = (await sender.ok("join", {"room": "steady"}))["room"]["id"]
                for reader in readers:
                    await reader.ok("join", {"room": "steady"})
                acked: list[dict] = []
                refused: list[dict] = []
                counter = 0

                async def send() -> None:
                    nonlocal counter
                    counter += 1
                    reply = await sender.call("send", {"room": "steady", "text": f"m{counter}"})
                    (acked if reply["ok"] else refused).append(reply)

                for _ in range(20):
                    await send()
                await redis_server.kill()
                deadline = time.monotonic() + 30
                while len(refused) < OUTAGE_SENDS:
                    assert time.monotonic() < deadline, "sends were never refused"
                    await send()
                assert all(r["error"]["code"] == "unavailable" for r in refused)
                await redis_server.start()
                before = len(acked)
                deadline = time.monotonic() + 30
                while len(acked) < before + 20:
                    assert time.monotonic() < deadline, "sends never recovered"
                    await send()

                expected = sorted((r["message"]["seq"], r["message"]["text"]) for r in acked)
                assert [seq for seq, _ in expected] == list(range(1, len(expected) + 1))
                for reader in readers:
                    await reader.wait_for(
                        lambda r=reader: len(r.messages(room)) >= len(expected), timeout=30
                    )
                    view = [(m["seq"], m["text"]) for m in reader.messages(room)]
                    assert view == expected, f"{reader.name} saw {view[-5:]}"
            finally:
                for client in (sender, *readers):
                    await client.close()


async def test_the_http_api_answers_unavailable_while_presence_is_out_of_reach(tmp_path):
    """Members and room counts live in Redis: while it is down their endpoints answer
    503 with the protocol's ``unavailable`` code (not a 500), history still answers from
    the store, and once Redis is back every endpoint answers again."""
    async with private_redis(tmp_path) as redis_server:
        with cluster(
            redis_server.url + "?prefix=http", f"sqlite:///{tmp_path}/s.db", tmp_path
        ) as c:
            (node,) = c.start(1)
            client = await ChatClient(node.url, "ada").connect()
            try:
                await client.ok("join", {"room": "steady"})
                await client.ok("send", {"room": "steady", "text": "kept"})
            finally:
                await client.close()
            await redis_server.kill()
            for path in ("/api/rooms/steady/members", "/api/rooms"):
                status, body = await asyncio.to_thread(get, node.url + path)
                assert status == 503, (path, body)
                assert body["ok"] is False and body["error"]["code"] == "unavailable", body
            status, body = await asyncio.to_thread(get, node.url + "/api/rooms/steady/messages")
            assert status == 200 and [m["text"] for m in body["messages"]] == ["kept"]
            await redis_server.start()
            deadline = time.monotonic() + 30
            while (await asyncio.to_thread(get, node.url + "/api/rooms"))[0] != 200:
                assert time.monotonic() < deadline, "the API never answered again"
                await asyncio.sleep(0.1)
            assert "Exception in ASGI application" not in node.output()


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            return error.code, json.loads(body)
        except ValueError:
            return error.code, {"body": body.decode(errors="replace")}


async def test_members_are_listed_again_after_redis_restarts_empty(tmp_path):
    """Redis keeps presence, and here nothing on disk: a restart loses every entry. Each
    node writes its members' entries again once it is back, so the room lists everyone
    who is still connected — on every node — and a joiner's reply lists them too."""
    async with private_redis(tmp_path) as redis_server, postgres_schema() as store:
        with cluster(redis_server.url + "?prefix=members", store, tmp_path) as c:
            one, two = c.start(2)
            clients = [
                await ChatClient(node.url, f"user{i}").connect()
                for i, node in enumerate((one, two, one, two))
            ]
            try:
                for client in clients:
                    await client.ok("join", {"room": "kept"})
                names = {f"user{i}" for i in range(4)}
                await redis_server.kill()
                await redis_server.start()
                for node in (one, two):
                    deadline = time.monotonic() + 30
                    while True:
                        status, body = await asyncio.to_thread(
                            get, node.url + "/api/rooms/kept/members"
                        )
                        if status == 200 and {m["name"] for m in body["members"]} == names:
                            break
                        assert time.monotonic() < deadline, (node.url, status, body)
                        await asyncio.sleep(0.1)
                late = await ChatClient(one.url, "late").connect()
                clients.append(late)
                reply = await late.ok("join", {"room": "kept"})
                assert {m["name"] for m in reply["members"]} == names | {"late"}
            finally:
                for client in clients:
                    await client.close()


async def test_a_node_cut_off_from_the_broker_tells_its_members_who_came_and_went(tmp_path):
    """RabbitMQ reached by one node through a relay that is cut: while it is away, a member
    of another node leaves and another joins; once it is back, its members are told."""
    services.require("RabbitMQ", services.RABBITMQ_HOST, services.RABBITMQ_PORT)
    relay = TcpRelay(services.RABBITMQ_HOST, services.RABBITMQ_PORT)
    await relay.start()
    prefix = f"roster{uuid.uuid4().hex[:8]}"
    relayed = f"amqp://guest:guest@127.0.0.1:{relay.port}/?prefix={prefix}"
    direct = f"{services.RABBITMQ_URL}?prefix={prefix}"
    try:
        async with postgres_schema() as store:
            with cluster(direct, store, tmp_path) as c:
                (far,) = c.start(1)
                c.broker = relayed
                # Off the event loop: the relay runs on it, and the node connects through it.
                (near,) = await asyncio.to_thread(c.start, 1)
                bob = await ChatClient(far.url, "bob").connect()
                carol = await ChatClient(far.url, "carol").connect()
                alice = await ChatClient(near.url, "alice").connect()
                dave = await ChatClient(far.url, "dave").connect()
                try:
                    await bob.ok("join", {"room": "roster"})
                    await carol.ok("join", {"room": "roster"})
                    joined = await alice.ok("join", {"room": "roster"})
                    assert told(alice, joined) == ["alice", "bob", "carol"]

                    await relay.cut()
                    await until_status(near.url, 503)  # the node knows its broker is gone
                    await carol.ok("leave", {"room": "roster"})
                    await dave.ok("join", {"room": "roster"})
                    sent = await bob.ok("send", {"room": "roster", "text": "while away"})

                    await relay.start()
                    await alice.wait_for(
                        lambda: told(alice, joined) == ["alice", "bob", "dave"], timeout=30
                    )
                    assert await alice.wait_messages(joined["room"]["id"], 1) == ["while away"]
                    assert alice.messages()[0]["seq"] == sent["message"]["seq"]
                finally:
                    for client in (alice, bob, carol, dave):
                        await client.close()
    finally:
        await relay.cut()


async def until_status(url: str, status: int, timeout: float = 30) -> None:
    """Poll ``/healthz`` until it answers ``status`` (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as response:
                seen = response.status
        except urllib.error.HTTPError as error:
            seen = error.code
        if seen == status:
            return
        assert time.monotonic() < deadline, f"/healthz never answered {status} (last {seen})"
        await asyncio.sleep(0.1)
