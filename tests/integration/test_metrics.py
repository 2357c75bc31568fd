"""/metrics of a real server: what an operator graphs — messages stored, and how long the
store and the broker take per batch."""

from __future__ import annotations

import re

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
