"""Turning a run's records into figures: medians of the runs with [min-max], ratios against
the baselines of the same run, the goals met or not, tables, plots and docs/benchmarks.md.

The page keeps whatever is written outside its generated block
(``<!-- bench:begin -->`` ... ``<!-- bench:end -->``); the block is rewritten by every run.
"""

from __future__ import annotations

import asyncio
import json
import statistics
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
KIB = 1024

ROOMCAST_VS = {
    "roomcast-1": ["psio-1", "node-1"],
    "roomcast-redis-2": ["psio-redis-2", "node-redis-2"],
    "roomcast-redis-pg-2": ["psio-redis-2", "node-redis-2"],
    "roomcast-rabbitmq-2": ["psio-aiopika-2", "psio-redis-2", "node-redis-2"],
    "roomcast-nats-2": ["psio-redis-2", "node-redis-2"],
}
"""Each roomcast target and the baselines it is compared with (same process count)."""


def stats(values: list[Any]) -> dict[str, Any] | None:
    """Median, min, max of the runs' values, ``None`` ones left out (None when none is left)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


def _records(results: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [r for r in results["records"] if r.get("kind") == kind]


def _by_target(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(r["target"], []).append(r)
    return out


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Every figure as median [min-max] over the runs, the ratios and the goals."""
    summary: dict[str, Any] = {
        "throughput": {},
        "fixed_rate": {},
        "one_room": {},
        "memory": {},
        "cross_node": {},
        "health": {},
    }
    gen_us: list[float] = []
    other: list[float] = []
    steal: list[float] = []
    for key, recs in _by_target(_records(results, "load")).items():
        sweeps = [r["sweep"] for r in recs if "sweep" in r]
        if sweeps and "A" in results["scenarios"]:
            knees = [k for k in (_knee(s) for s in sweeps) if k is not None]
            summary["throughput"][key] = {
                "deliveries_per_s": stats([s["sustained_deliveries_per_s"] for s in sweeps]),
                "rate": stats([s["sustained_rate"] for s in sweeps]),
                **{
                    name: stats([k.get(name) for k in knees])
                    for name in (
                        "server_us_per_delivery",
                        "generator_us_per_delivery",
                        "server_cores",
                        "generator_cores",
                    )
                },
            }
        if sweeps:
            fixed = [s["fixed_rate"] for s in sweeps]
            summary["fixed_rate"][key] = _latency(fixed)
        rooms = [r["one_room"] for r in recs if "one_room" in r]
        if rooms:
            summary["one_room"][key] = _latency(rooms)
        steps = [st for s in sweeps for st in s["steps"]] + rooms
        gen_us += [
            st["generator_us_per_delivery"] for st in steps if st["generator_us_per_delivery"]
        ]
        other += [st["other_cores"] for st in steps if st.get("other_cores") is not None]
        steal += [st["steal_cores"] for st in steps if st.get("steal_cores") is not None]
        summary["health"][key] = _health(recs, steps)
    for key, recs in _by_target(_records(results, "memory")).items():
        mems = [r["memory"] for r in recs if "memory" in r]
        summary["memory"][key] = {
            "kib_per_connection": stats(
                [m["bytes_per_connection"] / KIB for m in mems if m["bytes_per_connection"]]
            ),
            "base_mib": stats([m["rss_base"] / 2**20 for m in mems]),
            "clients": stats([m["clients"] for m in mems]),
        }
        health = summary["health"].setdefault(key, _health([], []))
        health["memory_failed_connects"] = sum(m["failed"] for m in mems)
        health["memory_dropped"] = sum(m.get("dropped", 0) for m in mems)
    for r in _records(results, "cross_node"):
        if "cross_node" not in r:
            continue
        per = summary["cross_node"].setdefault(r["target"], {})
        per[str(r["nodes"])] = {
            layout: {
                "messages_per_node": stats([_mean(w["messages_per_node"]) for w in d["windows"]]),
                "bytes_per_node": stats([_mean(w["bytes_per_node"]) for w in d["windows"]]),
                "sent_per_s": d["sent_per_s"],
                "delivered": d["delivered"],
            }
            for layout, d in r["cross_node"].items()
            if layout in ("local", "spread")
        }
    summary["generator_us_per_delivery"] = stats(gen_us)
    summary["other_cores"] = stats(other)
    summary["steal_cores"] = stats(steal)
    summary["ratios"] = _ratios(summary)
    summary["goals"] = _goals(summary)
    return summary


def _knee(sweep: dict[str, Any]) -> dict[str, Any] | None:
    k = sweep.get("knee_k")
    return next((s for s in sweep["steps"] if s["k"] == k), None) if k is not None else None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _latency(steps: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "p50_ms": stats([s["p50_ms"] for s in steps]),
        "p99_ms": stats([s["p99_ms"] for s in steps]),
        "delivered": stats([s["delivered"] for s in steps]),
        "deliveries_per_s": stats([s["deliveries_per_s"] for s in steps]),
        # roomcast only (results written before these figures existed have none)
        "store_append_ms": stats([s.get("store_append_ms") for s in steps]),
        "broker_publish_ms": stats([s.get("broker_publish_ms") for s in steps]),
    }


def _health(recs: list[dict[str, Any]], steps: list[dict[str, Any]]) -> dict[str, Any]:
    issues = [r.get("log_issues", {}) for r in recs]
    repeated = [s["retried"] for s in steps if s.get("retried")]
    steps = steps + repeated
    return {
        "other_cores": stats([s["other_cores"] for s in steps if s.get("other_cores") is not None]),
        # Results of runs before this reading existed have none.
        "steal_cores": stats([s["steal_cores"] for s in steps if s.get("steal_cores") is not None]),
        "repeated_steps": len(repeated),
        "errors": [r["error"] for r in recs if r.get("error")],
        "died": sum(1 for r in recs if r.get("alive") is False),
        "ack_errors": sum(s["acks_error"] for s in steps),
        "ack_error_sample": next((s["error_sample"] for s in steps if s["error_sample"]), ""),
        "disconnects": sum(s["disconnects"] for s in steps),
        "dropped": sum(s.get("dropped", 0) for s in steps),
        "restarts": sum(r.get("sweep", {}).get("restarts", 0) for r in recs),
        "generator_limited_steps": sum(1 for s in steps if s["generator_limited"]),
        "log_lines": sum(i.get("count", 0) for i in issues),
        "log_sample": next((i["sample"] for i in issues if i.get("sample")), []),
    }


def _median(entry: dict[str, Any] | None) -> float | None:
    return entry["median"] if entry else None


def _ratios(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    tput = summary["throughput"]
    for ours, theirs in ROOMCAST_VS.items():
        mine = _median(tput.get(ours, {}).get("deliveries_per_s"))
        for other in theirs:
            base = _median(tput.get(other, {}).get("deliveries_per_s"))
            if mine is not None and base:
                out.setdefault(ours, {})[other] = mine / base
    return out


def _goals(summary: dict[str, Any]) -> list[dict[str, Any]]:
    goals: list[dict[str, Any]] = []
    ratios = summary["ratios"]

    def ratio_goal(ours: str, other: str, factor: float) -> None:
        value = ratios.get(ours, {}).get(other)
        if value is not None:
            goals.append(
                {
                    "goal": f"A: {ours} >= {factor:g}x {other}",
                    "measured": f"{value:.2f}x",
                    "met": value >= factor,
                }
            )

    ratio_goal("roomcast-redis-2", "psio-redis-2", 4)
    ratio_goal("roomcast-redis-2", "node-redis-2", 1)
    ratio_goal("roomcast-1", "psio-1", 5)
    ratio_goal("roomcast-1", "node-1", 1)
    fixed = summary["fixed_rate"]
    for ours, theirs in ROOMCAST_VS.items():
        mine = _median(fixed.get(ours, {}).get("p99_ms"))
        best = [
            (_median(fixed[o]["p99_ms"]), o) for o in theirs if o in fixed and fixed[o]["p99_ms"]
        ]
        known = [(v, o) for v, o in best if v is not None]
        if mine is not None and known:
            value, other = min(known)
            goals.append(
                {
                    "goal": f"B: {ours} p99 <= best baseline ({other})",
                    "measured": f"{mine:.2f} ms vs {value:.2f} ms",
                    "met": mine <= value,
                }
            )
    for key, mem in summary["memory"].items():
        kib = _median(mem["kib_per_connection"])
        if key.startswith("roomcast") and kib is not None:
            goals.append(
                {
                    "goal": f"D: {key} <= 15 KiB per idle connection",
                    "measured": f"{kib:.1f} KiB",
                    "met": kib <= 15,
                }
            )
    cross = summary["cross_node"]
    for key, per in cross.items():
        counts = sorted(per, key=int)
        if len(counts) < 2:
            continue
        first = _median(per[counts[0]].get("local", {}).get("messages_per_node"))
        last = _median(per[counts[-1]].get("local", {}).get("messages_per_node"))
        if first and last is not None:
            growth = last / first
            flat = growth <= 1.25
            goals.append(
                {
                    "goal": f"E: {key}, rooms local, per-node broker messages "
                    + ("flat" if key.startswith("roomcast") else "grow")
                    + f" from {counts[0]} to {counts[-1]} nodes",
                    "measured": f"x{growth:.2f}",
                    "met": flat if key.startswith("roomcast") else not flat,
                }
            )
    return goals


# -- text ----------------------------------------------------------------------------------


def _fmt(entry: dict[str, Any] | None, scale: float = 1.0, digits: int = 0, unit: str = "") -> str:
    if not entry:
        return "—"
    med, lo, hi = (entry[k] * scale for k in ("median", "min", "max"))
    if entry["n"] == 1:
        return f"{med:,.{digits}f}{unit}"
    return f"{med:,.{digits}f}{unit} [{lo:,.{digits}f}-{hi:,.{digits}f}]"


def _label(results: dict[str, Any], key: str) -> str:
    return str(results["targets"].get(key, {}).get("label", key))


def console(results: dict[str, Any]) -> str:
    """A short summary for the terminal."""
    s = results["summary"]
    lines = ["", "sustained deliveries/s (A), p99 at 200 msgs/s (B), KiB/idle connection (D):"]
    keys = dict.fromkeys([*s["throughput"], *s["fixed_rate"], *s["memory"]])
    for key in keys:
        tput = s["throughput"].get(key, {}).get("deliveries_per_s")
        p99 = s["fixed_rate"].get(key, {}).get("p99_ms")
        mem = s["memory"].get(key, {}).get("kib_per_connection")
        lines.append(
            f"  {key:22s} A {_fmt(tput):>28s}   B p99 {_fmt(p99, digits=2, unit=' ms'):>28s}"
            f"   D {_fmt(mem, digits=1):>20s}"
        )
    for ours, per in s["ratios"].items():
        lines.append(f"  {ours} / " + ", ".join(f"{k}: {v:.2f}x" for k, v in per.items()))
    gen = s.get("generator_us_per_delivery")
    if gen:
        lines.append(f"  load generator CPU per delivery: {_fmt(gen, digits=1, unit=' us')}")
    for goal in s["goals"]:
        lines.append(
            f"  [{'met' if goal['met'] else 'NOT met'}] {goal['goal']}: {goal['measured']}"
        )
    return "\n".join(lines)


def write_docs(results: dict[str, Any], page: Path, img_dir: Path) -> None:
    """Write the plots and the generated block of docs/benchmarks.md."""
    from .plots import write_plots

    images = write_plots(results, img_dir)
    rel = {name: f"img/{path.name}" for name, path in images.items()}
    from .markdown import generated_block, page_template

    block = f"{BEGIN}\n{generated_block(results, rel)}\n{END}"
    text = page.read_text() if page.exists() else page_template()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    page.write_text(text)


def run_and_write(
    work: Coroutine[Any, Any, dict[str, Any]],
    output: Path,
    table: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """Run a measurement (``python -m bench.engines``, ``bench.reads``) on uvloop, add its
    markdown table to its results, write them to ``output`` as JSON and print the table."""
    try:
        import uvloop

        results = uvloop.run(work)
    except ImportError:  # pragma: no cover - uvloop is part of roomcast's install
        results = asyncio.run(work)
    results["table"] = table(results)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1) + "\n")
    print(results["table"])
    print(f"wrote {output}")
    return results
