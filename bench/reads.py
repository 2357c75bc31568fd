"""What history reads cost when many are in flight at once, per store.

``python -m bench.reads`` has ``--concurrency`` tasks share a fixed number of reads of one
room through roomcast's history adapter, each read what a join and a history page make
(the room's position, then its latest page of 10): the shape of a reconnect storm, when
every client rejoins its rooms within seconds. It records the reads per second and the CPU
this process spent per read (the event loop's own cost; the store's server runs apart).
Every figure is the median over ``--rounds`` rounds with min-max; the results go to
``bench/results/reads.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from roomcast.adapters import open_history
from roomcast.core.models import Draft, User, UserId

from .cleanup import drop_schema
from .environment import machine, tree, versions
from .report import run_and_write, stats
from .targets import POSTGRES_URL

STORES = ("sqlite", "postgresql")
RESULTS = Path(__file__).parent / "results" / "reads.json"


async def reads(name: str, concurrency: int, total: int) -> dict[str, float]:
    """``total`` reads of one room (alternately its position and its newest 10 messages)
    shared by ``concurrency`` tasks, after one unmeasured pass."""
    prefix = f"bench{uuid.uuid4().hex[:12]}"
    workdir = Path(tempfile.mkdtemp(prefix="roomcast-reads-", dir=Path.cwd()))
    url = (
        f"sqlite:///{workdir / 'roomcast.db'}"
        if name == "sqlite"
        else f"{POSTGRES_URL}?schema={prefix}"
    )
    history = open_history(url)
    user = User(UserId(1), "bench")
    per_task = max(1, total // (2 * concurrency))
    done = 0
    try:
        await history.start()
        room = await history.room_by_name("reads", create=True)
        assert room is not None
        await history.append(
            [Draft(room.id, uuid.uuid4().hex, user, "x" * 100, 0) for _ in range(20)]
        )

        async def reader() -> None:
            nonlocal done
            for _ in range(per_task):
                assert await history.latest(room.id) == 20
                assert len(await history.before(room.id, None, 10)) == 10
                done += 2

        await asyncio.gather(*(reader() for _ in range(concurrency)))  # warm-up pass
        done = 0
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(reader() for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    finally:
        await history.close()
        if name == "postgresql":
            await drop_schema(POSTGRES_URL, prefix)
        shutil.rmtree(workdir, ignore_errors=True)
    return {"reads": done, "reads_per_s": done / wall, "cpu_us_per_read": cpu / done * 1e6}


def _table(results: dict[str, Any]) -> str:
    levels = list(results["concurrency"])

    def cell(rounds: list[dict[str, Any]], key: str, digits: int) -> str:
        s = stats([r[key] for r in rounds])
        if s is None:
            return "-"
        return f"{s['median']:,.{digits}f} [{s['min']:,.{digits}f}-{s['max']:,.{digits}f}]"

    head = " | ".join(f"reads/s, {n} at once | CPU µs per read, {n} at once" for n in levels)
    lines = [f"| store | {head} |", "|---|" + "---|" * (2 * len(levels))]
    for name in results["concurrency"][levels[0]]:
        cells = []
        for level in levels:
            rounds = results["concurrency"][level][name]
            cells += [cell(rounds, "reads_per_s", 0), cell(rounds, "cpu_us_per_read", 0)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    stores = [s for s in args.stores.split(",") if s]
    levels = [int(n) for n in args.concurrency.split(",") if n]
    results: dict[str, Any] = {
        "command": "python -m bench.reads " + " ".join(args.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "reads": args.reads,
        **args.environment,
        "concurrency": {str(n): {name: [] for name in stores} for n in levels},
    }
    for round_ in range(1, args.rounds + 1):
        for level in levels:  # every store at every level in each round
            for name in stores:
                one = await reads(name, level, args.reads)
                results["concurrency"][str(level)][name].append(one)
                print(
                    f"[round {round_}, {level} at once] {name:10} "
                    f"{one['reads_per_s']:9,.0f} reads/s, {one['cpu_us_per_read']:5.0f} µs CPU "
                    "per read",
                    flush=True,
                )
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.reads",
        description="History reads per second and CPU per read, many in flight at once.",
    )
    parser.add_argument("--stores", default=",".join(STORES), help="of sqlite,postgresql")
    parser.add_argument(
        "--concurrency", default="1,8,50", help="reads in flight at once, one or more (1,8,50)"
    )
    parser.add_argument("--reads", type=int, default=4000, help="measured per round and level")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    args.environment = {"machine": machine(), "versions": versions(), "tree": tree()}
    run_and_write(_main(args), args.output, _table)


if __name__ == "__main__":
    main()
