"""History retention on a real server: the oldest messages go, the room goes on, and a
client whose position was trimmed is told to reload instead of getting a gap."""

from __future__ import annotations

import asyncio
import time

import httpx

from .clients import ChatClient, scrape
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
