"""``python -m bench`` (``make bench``): roomcast against python-socketio and Node Socket.IO,
side by side on this machine, in one run.

    python -m bench                                  # everything: ~20 minutes on 2 cores
    python -m bench --quick --targets roomcast-1     # a smoke run, under 2 minutes
    python -m bench --targets roomcast-1,node-1 --scenarios A,B --runs 3
    python -m bench --list

Results: ``bench/results/latest.json`` (``raw/quick.json`` for ``--quick``), one raw file per
target and run under ``bench/results/raw/``, and, for a full run, ``docs/benchmarks.md`` with
its plots ``docs/img/bench-*.png``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from . import report
from .environment import REPO, machine, tree, versions
from .generator import GeneratorError, GeneratorPool, raise_fd_limit
from .scenarios import Config, close, cross_node, fan_out, idle_memory
from .targets import TARGETS, Cluster, TargetError, reachable

SCENARIOS = ("A", "B", "C", "D", "E")
QUICK_TARGETS = "roomcast-1,psio-1"
E_TARGETS = "roomcast-redis-2,psio-redis-2"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="roomcast against python-socketio and Node Socket.IO on this machine.",
    )
    parser.add_argument(
        "--targets", help=f"comma-separated, or 'all' (default: all; --quick: {QUICK_TARGETS})"
    )
    parser.add_argument(
        "--scenarios", default="A,B,C,D,E", help="comma-separated of A,B,C,D,E (default: all)"
    )
    parser.add_argument("--runs", type=int, help="runs per figure (default 3; --quick: 1)")
    parser.add_argument(
        "--warmup", type=float, help="seconds of load before each measurement (0.75)"
    )
    parser.add_argument("--measure", type=float, help="seconds measured per rate step (2)")
    parser.add_argument(
        "--fixed-measure", type=float, help="seconds measured at B's fixed rate (6)"
    )
    parser.add_argument("--drain", type=float, help="max seconds to wait for late deliveries (1)")
    parser.add_argument("--generators", type=int, default=2, help="load generator processes (2)")
    parser.add_argument("--clients", type=int, help="clients in A/B/C (1000)")
    parser.add_argument("--idle-clients", type=int, help="clients in D (5000; --quick: 1000)")
    parser.add_argument(
        "--memory-targets", help="targets in D (default: the single-process ones among --targets)"
    )
    parser.add_argument("--e-nodes", help="node counts in E (2,4,8; --quick: 2)")
    parser.add_argument(
        "--e-targets", default=E_TARGETS, help=f"implementations in E ({E_TARGETS})"
    )
    parser.add_argument(
        "--shared-store",
        choices=["postgres", "sqlite"],
        default="sqlite",
        help="history shared by roomcast's processes (default sqlite: one file, the store of "
        "one host's workers; roomcast-redis-pg-2 always uses a PostgreSQL schema)",
    )
    parser.add_argument(
        "--e-store",
        choices=["postgres", "sqlite"],
        default="sqlite",
        help="history shared by the nodes in E (default sqlite: 8 nodes' connection pools "
        "exceed PostgreSQL's default max_connections)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 run, short steps")
    parser.add_argument(
        "--output", type=Path, default=REPO / "bench" / "results", help="results directory"
    )
    parser.add_argument(
        "--docs", type=Path, default=REPO / "docs" / "benchmarks.md", help="the page to write"
    )
    parser.add_argument(
        "--no-docs", action="store_true", help="do not write the page (default for --quick)"
    )
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    return parser.parse_args(argv)  # fmt: skip


def build_config(args: argparse.Namespace) -> Config:
    cfg = Config()
    if args.quick:
        cfg = replace(
            cfg,
            warmup=0.5,
            measure=1.5,
            fixed_measure=1.5,
            drain=0.5,
            quiet_limit=5.0,
            max_steps=6,
            idle_clients=1000,
            settle=1.0,
            e_nodes=(2,),
            e_windows=1,
            e_window=1.5,
        )
    overrides: dict[str, Any] = {}
    for name in ("warmup", "measure", "fixed_measure", "drain", "clients", "idle_clients"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.e_nodes:
        overrides["e_nodes"] = tuple(int(n) for n in args.e_nodes.split(","))
    return replace(cfg, **overrides)


def _keys(text: str, allowed: dict[str, Any] | tuple[str, ...], what: str) -> list[str]:
    keys = (
        list(allowed)
        if text.strip() == "all"
        else [k.strip() for k in text.split(",") if k.strip()]
    )
    unknown = [k for k in keys if k not in allowed]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(allowed)})")
    return keys


def _write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


class Bench:
    """One benchmark run: the generator processes, the records, the raw files."""

    def __init__(self, args: argparse.Namespace, cfg: Config, stamp: str) -> None:
        self.args, self.cfg, self.stamp = args, cfg, stamp
        self.pool = GeneratorPool(args.generators)
        self.raw = args.output / "raw"
        self.records: list[dict[str, Any]] = []

    def _reset_pool(self) -> None:
        self.pool.close()
        self.pool = GeneratorPool(self.args.generators)

    @staticmethod
    def _record(**fields: Any) -> dict[str, Any]:
        """A new record, with the roomcast tree it is about to measure."""
        return {**fields, "tree": tree()}

    def _save(self, record: dict[str, Any], name: str) -> None:
        self.records.append(record)
        _write(self.raw / f"{self.stamp}-{name}.json", record)

    def _close_clients(self) -> None:
        """Close the generator's connections; a generator that does not answer is replaced."""
        try:
            close(self.pool)
        except GeneratorError as exc:
            print(f"  closing the clients: {exc}", file=sys.stderr, flush=True)
            self._reset_pool()

    def _guard(self, record: dict[str, Any], work: Any) -> None:
        """Run ``work()``; a target or generator failure is recorded, not fatal."""
        try:
            work()
        except (TargetError, GeneratorError, OSError) as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"
            print(f"  {record['target']}: {record['error']}", file=sys.stderr, flush=True)
            if isinstance(exc, GeneratorError):
                self._reset_pool()

    def load(self, keys: list[str], scenarios: list[str]) -> None:
        """A, B and C: per run, per target, one fresh cluster."""
        knees: dict[str, int | None] = {}
        for run in range(1, self.args.runs + 1):
            for key in keys:
                spec = TARGETS[key]
                record = self._record(target=key, run=run, kind="load")
                print(f"[run {run}] {spec.label}", flush=True)

                def work(spec: Any = spec, record: dict[str, Any] = record, run: int = run) -> None:
                    sweeping = "A" in scenarios or "B" in scenarios
                    cfg = self.cfg if "A" in scenarios else replace(self.cfg, max_steps=1)
                    with Cluster(spec, shared_store=self.args.shared_store) as cluster:
                        try:
                            record.update(
                                fan_out(
                                    cluster,
                                    self.pool,
                                    cfg,
                                    one_room="C" in scenarios,
                                    sweep=sweeping,
                                    prior=knees.get(spec.key) if run > 1 else None,
                                )
                            )
                            if run == 1 and "sweep" in record:
                                knees[spec.key] = record["sweep"]["knee_k"]
                        finally:
                            record["alive"] = cluster.alive()
                            record["log_issues"] = cluster.log_issues()
                            self._close_clients()

                self._guard(record, work)
                self._save(record, f"{key}-run{run}")

    def memory(self, keys: list[str]) -> None:
        """D: per run, per target, a fresh cluster."""
        for run in range(1, self.args.runs + 1):
            for key in keys:
                spec = TARGETS[key]
                record = self._record(target=key, run=run, kind="memory")
                print(f"[run {run}] {spec.label}: idle memory", flush=True)

                def work(spec: Any = spec, record: dict[str, Any] = record) -> None:
                    prefix = f"idle{int(time.time())}"
                    record["memory"] = idle_memory(
                        spec, self.pool, self.cfg, prefix, self.args.shared_store
                    )

                self._guard(record, work)
                self._save(record, f"{key}-memory-run{run}")

    def cross_node(self, keys: list[str]) -> None:
        """E: per implementation, per node count, one cluster (its windows are the runs)."""
        for key in keys:
            spec = TARGETS[key]
            for nodes in self.cfg.e_nodes:
                record = self._record(target=key, nodes=nodes, kind="cross_node")
                print(f"[cross-node] {spec.server} on {nodes} nodes ({spec.broker})", flush=True)

                def work(
                    spec: Any = spec, record: dict[str, Any] = record, nodes: int = nodes
                ) -> None:
                    record["cross_node"] = cross_node(
                        spec, nodes, self.pool, self.cfg, f"x{nodes}", self.args.e_store
                    )

                self._guard(record, work)
                self._save(record, f"{key}-{nodes}nodes")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for spec in TARGETS.values():
            print(f"{spec.key:22s} {spec.label}")
        return 0
    keys = _keys(args.targets or (QUICK_TARGETS if args.quick else "all"), TARGETS, "target")
    scenarios = _keys(args.scenarios.upper(), SCENARIOS, "scenario")
    e_keys = _keys(args.e_targets, TARGETS, "E target") if "E" in scenarios else []
    if args.memory_targets:
        d_keys = _keys(args.memory_targets, TARGETS, "D target")
    else:
        d_keys = [k for k in keys if TARGETS[k].processes == 1] or keys
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    cfg = build_config(args)
    raise_fd_limit()
    # A SIGTERM ends the run like Ctrl-C does: every cluster is stopped and cleaned up.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    for key in dict.fromkeys([*keys, *d_keys, *e_keys]):
        store = args.e_store if key in e_keys and key not in keys else args.shared_store
        for name, address in TARGETS[key].services(store):
            if not reachable(address):
                print(
                    f"bench: {key} skipped: {name} is not reachable on {address}", file=sys.stderr
                )
                keys = [k for k in keys if k != key]
                d_keys = [k for k in d_keys if k != key]
                e_keys = [k for k in e_keys if k != key]
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m bench", *(shlex.quote(a) for a in given)])
    started = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    print(
        f"bench: targets {', '.join(keys)}; scenarios {','.join(scenarios)}; {args.runs} run(s)",
        flush=True,
    )
    bench = Bench(args, cfg, stamp)
    try:
        if {"A", "B", "C"} & set(scenarios):
            bench.load(keys, scenarios)
        if "D" in scenarios:
            bench.memory(d_keys)
        if "E" in scenarios:
            bench.cross_node(e_keys)
    finally:
        bench.pool.close()
    results = {
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "duration_s": time.time() - started,
        "quick": args.quick,
        "scenarios": scenarios,
        "runs": args.runs,
        "shared_store": args.shared_store,
        "e_store": args.e_store,
        "generators": args.generators,
        "config": asdict(cfg),
        "machine": machine(),
        "versions": versions(),
        "tree": tree(),
        "targets": {k: asdict(TARGETS[k]) for k in dict.fromkeys([*keys, *d_keys, *e_keys])},
        "records": bench.records,
    }
    results["summary"] = report.summarize(results)
    out = args.output / ("raw/quick.json" if args.quick else "latest.json")
    _write(out, results)
    print(report.console(results), flush=True)
    print(f"bench: results in {out} ({results['duration_s'] / 60:.1f} min)", flush=True)
    if not (args.no_docs or args.quick):
        report.write_docs(results, args.docs, args.docs.parent / "img")
        print(f"bench: wrote {args.docs}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
