"""History retention on a real server: the oldest messages go, the room goes on, and a
client whose position was trimmed is told to reload instead of getting a gap."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.contract.engines import engine_url

from .clients import ChatClient, scrape
from .cluster import cluster, postgres_schema
from .servers import run_server


async def test_a_server_keeps_only_the_newest_messages_of_each_room(tmp_path):
    args = ("--history-max-messages", "3", "--history-trim-interval", "0.2", "--rate-limit", "0")
    with run_server(*args, log_dir=tmp_path) as server:
        ada = await ChatClient(server.url, "ada").connect()
        bob = await ChatClient(server.url, "bob").connect()
        try:
            joined = await bob.ok("join", {"room": "kept"})
            room = joined["room"]["id"]
            await ada.ok("join", {"room": "kept"})
            for i in range(1, 6):
                await ada.ok("send", {"room": "kept", "text": f"m{i}"})
            await bob.wait_messages(room, 5)
            deadline = time.monotonic() + 10
            while True:
                texts = [m["text"] for m in (await ada.ok("history", {"room": "kept"}))["messages"]]
                if texts == ["m3", "m4", "m5"]:
                    break
                assert time.monotonic() < deadline, texts
                await asyncio.sleep(0.05)
            async with httpx.AsyncClient(base_url=server.url) as http:
                page = (await http.get(f"/api/rooms/{room}/messages")).json()["messages"]
            assert [(m["seq"], m["text"]) for m in page] == [(3, "m3"), (4, "m4"), (5, "m5")]
            # The room's order goes on from where it was.
            sent = await ada.ok("send", {"room": "kept", "text": "m6"})
            assert sent["message"]["seq"] == 6
            # bob comes back from seq 1: m2 is gone, so no gapless recovery — reload.
            await bob.close()
            bob = await ChatClient(server.url, "bob").connect()
            since = {"epoch": joined["epoch"], "seq": 1}
            back = await bob.ok("join", {"room": "kept", "since": since})
            assert (back["recovered"], back["missed"]) == (False, [])
            # From seq 4 nothing he missed was trimmed: he gets exactly m5 and m6.
            again = await bob.ok("join", {"room": "kept", "since": {**since, "seq": 4}})
            assert again["recovered"] is True
            assert [m["text"] for m in again["missed"]] == ["m5", "m6"]
            deadline = time.monotonic() + 10
            while (trimmed := scrape(server.url)) and not any(
                k.startswith("roomcast_messages_trimmed_total") and v == 3
                for k, v in trimmed.items()
            ):
                assert time.monotonic() < deadline, "m3 was not trimmed after m6"
                await asyncio.sleep(0.05)
        finally:
            await ada.close()
            await bob.close()
    assert "retention pass failed" not in server.output()


@pytest.mark.service
async def test_nodes_trimming_one_store_at_once_leave_live_delivery_whole(tmp_path):
    """Two nodes on Redis + PostgreSQL, each making its own retention passes every 0.2 s
    while both rooms' members send: every member gets every message once, in order, and
    both nodes answer with the same newest messages."""
    retention = ("--history-max-messages", "5", "--history-trim-interval", "0.2")
    async with engine_url("redis", tmp_path) as broker, postgres_schema() as store:
        with cluster(broker, store, tmp_path, *retention) as c:
            one, two = c.start(2)
            ada = await ChatClient(one.url, "ada").connect()
            bob = await ChatClient(two.url, "bob").connect()
            try:
                room = (await ada.ok("join", {"room": "busy"}))["room"]["id"]
                await bob.ok("join", {"room": "busy"})

                async def send(client, count):
                    for i in range(count):
                        await client.ok("send", {"room": "busy", "text": f"{client.name}{i}"})
                        await asyncio.sleep(0.01)

                await asyncio.gather(send(ada, 40), send(bob, 40))
                for client in (ada, bob):
                    texts = await client.wait_messages(room, 80)
                    assert sorted(texts) == sorted(
                        [f"ada{i}" for i in range(40)] + [f"bob{i}" for i in range(40)]
                    )
                    seqs = [m["seq"] for m in client.messages(room)]
                    assert seqs == list(range(1, 81))
                deadline = time.monotonic() + 10
                while True:
                    pages = [
                        [m["seq"] for m in (await cl.ok("history", {"room": "busy"}))["messages"]]
                        for cl in (ada, bob)
                    ]
                    if pages == [list(range(76, 81))] * 2:
                        break
                    assert time.monotonic() < deadline, pages
                    await asyncio.sleep(0.05)

                # Each of the 75 deleted once, counted by the node whose pass deleted it.
                def trimmed() -> float:
                    return sum(
                        v
                        for node in (one, two)
                        for k, v in scrape(node.url).items()
                        if k.startswith("roomcast_messages_trimmed_total")
                    )

                while trimmed() != 75:
                    assert time.monotonic() < deadline, trimmed()
                    await asyncio.sleep(0.05)
            finally:
                await ada.close()
                await bob.close()
            for node in (one, two):
                assert "retention pass failed" not in node.output()
