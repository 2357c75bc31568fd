"""What one step through each engine costs, measured with roomcast's own adapters.

``python -m bench.engines`` paces single operations at fixed rates (100/s, the per-node
batch rate of scenario B, and 1000/s by default) and records each one's latency:

- **broker hop**: node ``a`` publishes a frame to a room that node ``b`` is subscribed to,
  both through roomcast's broker adapter for the engine, in one process; the latency runs
  from the call of ``publish_many`` to ``b``'s room handler. ``publish returns`` is how
  long ``a``'s call took (on RabbitMQ: until the publisher confirm).
- **store append**: one message appended through roomcast's history adapter (the SQLite
  file on this disk, a PostgreSQL schema), from the call to its return: sequenced and
  durably written.

These are the floors under scenario B: a message to a room whose members sit on two nodes
is appended once, and its remote half crosses the broker once. The faster rate shows how
much of each figure is the cost of waking the processes involved (this client's event loop
and the engine's server) rather than the operation itself: at 1000/s they seldom sleep.
Every figure is the median over ``--rounds`` rounds with min-max; the results go to
``bench/results/engines.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from roomcast.adapters import open_broker, open_history
from roomcast.core.models import Draft, NodeId, RoomId, User, UserId

from .cleanup import drop_schema, rabbit_delete
from .environment import machine, tree, versions
from .histogram import bucket, percentile_ms
from .report import run_and_write, stats
from .targets import POSTGRES_URL

BROKERS = {
    "redis": "redis://127.0.0.1:6379/0",
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672/",
    "nats": "nats://127.0.0.1:4222",
}
STORES = ("sqlite", "postgresql")
RESULTS = Path(__file__).parent / "results" / "engines.json"
QUANTILES = {"p50_ms": 0.5, "p99_ms": 0.99}


def _summary(latencies: Counter[int]) -> dict[str, float | None]:
    out: dict[str, float | None] = {k: percentile_ms(latencies, q) for k, q in QUANTILES.items()}
    out["n"] = sum(latencies.values())
    return out


async def _paced(
    operation: Callable[[int], Awaitable[None]], rate: float, seconds: float, warmup: float
) -> None:
    """Call ``operation(i)`` at ``rate`` per second on a fixed schedule (no drift), first
    for ``warmup`` seconds (i < 0), then for ``seconds``; each call is awaited before the
    next one is due, as one node's batches are."""
    loop = asyncio.get_running_loop()
    interval = 1.0 / rate
    warm = round(warmup * rate)
    start = loop.time()
    for i in range(warm + round(seconds * rate)):
        due = start + i * interval
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await operation(i - warm)


async def broker_hop(name: str, rate: float, seconds: float, warmup: float) -> dict[str, Any]:
    """Latencies of one broker engine's hop between two nodes, and of the publish call."""
    prefix = f"bench{uuid.uuid4().hex[:12]}"
    url = f"{BROKERS[name]}{'&' if '?' in BROKERS[name] else '?'}prefix={prefix}"
    a, b = open_broker(url), open_broker(url)
    hop: Counter[int] = Counter()
    publish: Counter[int] = Counter()
    room = RoomId(1)
    expected = round(seconds * rate)
    arrived = asyncio.Event()

    async def received(frame: bytes) -> None:
        sent, measured = int.from_bytes(frame[:8], "big"), frame[8]
        if measured:
            hop[bucket(time.perf_counter_ns() - sent)] += 1
            if hop.total() >= expected:
                arrived.set()

    async def ignore(_frame: bytes) -> None:
        return None

    async def nothing() -> None:
        return None

    async def send(i: int) -> None:
        started = time.perf_counter_ns()
        await a.publish_many([(room, started.to_bytes(8, "big") + bytes((i >= 0,)) + b"x" * 200)])
        if i >= 0:
            publish[bucket(time.perf_counter_ns() - started)] += 1

    try:
        await a.start(NodeId(f"{prefix}a"), ignore, ignore, nothing)
        await b.start(NodeId(f"{prefix}b"), received, ignore, nothing)
        await b.subscribe(room)
        await _paced(send, rate, seconds, warmup)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(arrived.wait(), 5.0)  # what has not come by then is lost
    finally:
        await a.close()
        await b.close()
        if name == "rabbitmq":
            await rabbit_delete(prefix, [])
    return {"hop": _summary(hop), "publish": _summary(publish), "lost": expected - hop.total()}


async def store_append(name: str, rate: float, seconds: float, warmup: float) -> dict[str, Any]:
    """Latencies of one history engine's append of a single message."""
    prefix = f"bench{uuid.uuid4().hex[:12]}"
    workdir = Path(tempfile.mkdtemp(prefix="roomcast-engines-", dir=Path.cwd()))
    url = (
        f"sqlite:///{workdir / 'roomcast.db'}"
        if name == "sqlite"
        else f"{POSTGRES_URL}?schema={prefix}"
    )
    history = open_history(url)
    append: Counter[int] = Counter()
    user = User(UserId(1), "bench")
    try:
        await history.start()
        room = await history.room_by_name("engines", create=True)
        assert room is not None

        async def one(i: int) -> None:
            draft = Draft(room.id, uuid.uuid4().hex, user, "x" * 100, int(time.time() * 1000))
            started = time.perf_counter_ns()
            await history.append([draft])
            if i >= 0:
                append[bucket(time.perf_counter_ns() - started)] += 1

        await _paced(one, rate, seconds, warmup)
    finally:
        await history.close()
        if name == "postgresql":
            await drop_schema(POSTGRES_URL, prefix)
        shutil.rmtree(workdir, ignore_errors=True)
    return {"append": _summary(append)}


def _table(results: dict[str, Any]) -> str:
    rates = list(results["rates"])

    def cell(part: str, key: str, rounds: list[dict[str, Any]]) -> str:
        s = stats([r[part][key] for r in rounds])
        if s is None:
            return "-"
        return f"{s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}]"

    def row(name: str, step: str, kind: str, part: str) -> str:
        cells = [
            cell(part, key, results["rates"][rate][kind][name])
            for rate in rates
            for key in QUANTILES
        ]
        return f"| {name} | {step} | " + " | ".join(cells) + " |"

    head = " | ".join(f"p50 ms at {rate}/s | p99 ms at {rate}/s" for rate in rates)
    lines = [f"| engine | step | {head} |", "|---|---|" + "---|" * (2 * len(rates))]
    first = results["rates"][rates[0]]
    for name in first["brokers"]:
        lines.append(row(name, "broker hop", "brokers", "hop"))
        lines.append(row(name, "publish returns", "brokers", "publish"))
    for name in first["stores"]:
        lines.append(row(name, "store append", "stores", "append"))
    return "\n".join(lines)


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    brokers = [b for b in args.brokers.split(",") if b]
    stores = [s for s in args.stores.split(",") if s]
    rates = [float(r) for r in args.rates.split(",") if r]
    results: dict[str, Any] = {
        "command": "python -m bench.engines " + " ".join(args.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": args.seconds,
        **args.environment,
        "rates": {
            f"{rate:g}": {
                "brokers": {name: [] for name in brokers},
                "stores": {name: [] for name in stores},
            }
            for rate in rates
        },
    }
    for round_ in range(1, args.rounds + 1):
        # Alternate the engines and rates within each round, so a slow minute hits all.
        for rate in rates:
            at = results["rates"][f"{rate:g}"]
            for name in brokers:
                one = await broker_hop(name, rate, args.seconds, args.warmup)
                at["brokers"][name].append(one)
                print(
                    f"[round {round_}, {rate:g}/s] {name:9} hop p50 {one['hop']['p50_ms']:.2f} "
                    f"ms p99 {one['hop']['p99_ms']:.2f} ms; publish returns p99 "
                    f"{one['publish']['p99_ms']:.2f} ms; lost {one['lost']}",
                    flush=True,
                )
            for name in stores:
                one = await store_append(name, rate, args.seconds, args.warmup)
                at["stores"][name].append(one)
                print(
                    f"[round {round_}, {rate:g}/s] {name:10} append p50 "
                    f"{one['append']['p50_ms']:.2f} ms p99 {one['append']['p99_ms']:.2f} ms",
                    flush=True,
                )
    return results


def main(argv: list[str] | None = None) -> None:
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m bench.engines",
        description="The latency of one broker hop and one store append, per engine.",
    )
    parser.add_argument("--brokers", default=",".join(BROKERS), help="of redis,rabbitmq,nats")
    parser.add_argument("--stores", default=",".join(STORES), help="of sqlite,postgresql")
    parser.add_argument(
        "--rates", default="100,1000", help="operations per second, one or more (100,1000)"
    )
    parser.add_argument("--seconds", type=float, default=6.0, help="measured per round")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    # Read before the event loop starts: some of these readings run a loop of their own.
    args.environment = {"machine": machine(), "versions": versions(), "tree": tree()}
    run_and_write(_main(args), args.output, _table)


if __name__ == "__main__":
    main()
