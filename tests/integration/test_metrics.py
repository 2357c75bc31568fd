"""/metrics of a real server: what an operator graphs — messages stored, and how long the
store and the broker take per batch."""

from __future__ import annotations

import re
import time

from .clients import ChatClient, scrape
from .servers import run_server


def one(samples: dict[str, float], prefix: str) -> float:
    found = [v for k, v in samples.items() if k.startswith(prefix)]
    assert len(found) == 1, (prefix, found)
    return found[0]


async def test_stored_messages_and_per_batch_durations_are_exported(tmp_path):
    with run_server("--rate-limit", "0", log_dir=tmp_path) as server:
        client = await ChatClient(server.url, "ada").connect()
        try:
            await client.ok("join", {"room": "measured"})
            for i in range(5):
                await client.ok("send", {"room": "measured", "text": f"m{i}"})
            samples = scrape(server.url)
        finally:
            await client.close()
    assert one(samples, "roomcast_messages_stored_total{") == 5
    # One series per room is for a look into a few rooms, asked for; not by default.
    assert not [k for k in samples if k.startswith("roomcast_broker_room_frames_received")]
    for step in ("store_append", "broker_publish"):
        name = f"roomcast_{step}_seconds"
        # One client sending one at a time: each acknowledged send was its own batch.
        count = one(samples, f"{name}_count{{")
        assert count == 5
        assert one(samples, f'{name}_bucket{{le="+Inf"') == count
        assert 0 < one(samples, f"{name}_sum{{") < 5 * 5.0
        buckets = sorted(
            (float(re.search(r'le="([^"]+)"', k).group(1)), v)
            for k, v in samples.items()
            if k.startswith(f"{name}_bucket{{")
        )
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), f"{name} buckets are not cumulative: {buckets}"


def room_series(url: str) -> dict[int, float]:
    pattern = r'^roomcast_broker_room_frames_received_total\{node="[^"]*",room="(\d+)"\}$'
    return {int(m[1]): v for k, v in scrape(url).items() if (m := re.match(pattern, k)) is not None}


async def test_frames_per_room_list_only_the_rooms_a_node_is_subscribed_to(tmp_path):
    """A node that has served thousands of rooms must not export a series for each."""
    args = ("--metrics-rooms", "true", "--unsubscribe-grace", "0", "--rate-limit", "0")
    with run_server(*args, log_dir=tmp_path) as server:
        client = await ChatClient(server.url, "ada").connect()
        try:
            ids = {}
            for name in ("kept", "left1", "left2"):
                ids[name] = (await client.ok("join", {"room": name}))["room"]["id"]
                for i in range(2):
                    await client.ok("send", {"room": name, "text": f"{name}{i}"})
            await client.wait_for(lambda: len(client.of("message")) == 6)
            # Each room's frames: ada's join, then her two messages.
            assert room_series(server.url) == {ids[name]: 3 for name in ids}
            await client.ok("leave", {"room": "left1"})
            await client.ok("leave", {"room": "left2"})
            for _ in range(100):  # the grace is 0: the unsubscribes follow the leaves
                if room_series(server.url) == {ids["kept"]: 3}:
                    break
                time.sleep(0.05)
            assert room_series(server.url) == {ids["kept"]: 3}
            assert one(scrape(server.url), "roomcast_broker_stray_frames_received_total{") == 0
        finally:
            await client.close()


async def test_refused_events_are_counted_by_code(tmp_path):
    """What an operator watches for a client stuck in a loop, or an engine out of reach."""
    args = ("--request-rate-limit", "0.1", "--request-rate-burst", "2")
    with run_server(*args, log_dir=tmp_path) as server:
        client = await ChatClient(server.url, "ada").connect()
        try:
            await client.ok("join", {"room": "counted"})
            replies = [await client.call("history", {"room": "counted"}) for _ in range(4)]
            assert [r["ok"] for r in replies] == [True, False, False, False]
            bad = await client.call("send", {"room": "counted", "text": ""})
            assert bad["error"]["code"] == "invalid_text"
            samples = scrape(server.url)
        finally:
            await client.close()
    refused = {
        re.search(r'code="([^"]+)"', k).group(1): v
        for k, v in samples.items()
        if k.startswith("roomcast_socketio_refused_total{")
    }
    assert refused["rate_limited"] == 3
    assert refused["invalid_text"] == 1
    assert refused["unavailable"] == 0
