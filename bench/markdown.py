"""The generated part of docs/benchmarks.md: the run, the goals, one table per scenario."""

from __future__ import annotations

from typing import Any

from .report import KIB, ROOMCAST_VS, _fmt, _label, _median


def page_template() -> str:
    """The page a first run writes when docs/benchmarks.md does not exist yet."""
    return (
        "# Benchmarks\n\n"
        "roomcast against the servers its users would otherwise pick — python-socketio and\n"
        "Node Socket.IO — side by side on one machine, in one run: `make bench`\n"
        "(`python -m bench`). Everything below the line is written by that command.\n"
    )


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _run_section(results: dict[str, Any]) -> str:
    m, v, t, c = results["machine"], results["versions"], results["tree"], results["config"]
    commits = list(
        dict.fromkeys(
            r["tree"]["commit"]
            for r in results["records"]
            if r.get("target", "").startswith("roomcast") and r.get("tree")
        )
    )
    moved = (
        f" (roomcast's tree moved during the run: {', '.join(f'`{c}`' for c in commits)})"
        if len(commits) > 1
        else ""
    )
    tree = f"commit `{t['commit']}`{moved}" + (
        f" with uncommitted changes in {t['uncommitted_src_files']} file(s) under `src/`"
        if t.get("uncommitted_src_files")
        else ""
    )
    shared = (
        "one PostgreSQL schema per cluster"
        if results["shared_store"] == "postgres"
        else "one SQLite file per cluster (the store of one host's workers), but for "
        "`roomcast-redis-pg-2`, whose processes share one PostgreSQL schema (the store of "
        "many hosts)"
    )
    versions = ", ".join(f"{k} {val}" for k, val in v.items() if val and k not in ("executable",))
    return "\n".join(
        [
            f"Produced by `{results['command']}` on {results['started']} in "
            f"{results['duration_s'] / 60:.1f} minutes; roomcast {tree}.",
            "",
            f"- **Machine**: {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB, Linux "
            f"{m['kernel']}; the load generator ({results['generators']} processes) and every "
            "server share these CPUs.",
            f"- **Versions**: {versions}.",
            f"- **Method**: every figure is the median of {results['runs']} run(s) with "
            "[min-max]; each run starts the servers afresh. A rate step offers a fixed rate "
            f"for {c['warmup']:g} s of warm-up and {c['measure']:g} s measured "
            f"({c.get('fixed_measure', c['measure']):g} s at B's fixed rate), then waits up "
            f"to {c['drain']:g} s for late deliveries; a step passes with p99 <= "
            f"{c['p99_limit_ms']:g} ms and >= {c['min_delivered']:.0%} of the expected "
            "deliveries (messages sent x room members, the sender included). Rates step along "
            f"a grid of x{c['grid']:.3f}. roomcast's processes share history through {shared}.",
        ]
    )


def _goals_section(s: dict[str, Any]) -> str:
    if not s["goals"]:
        return "_No goal could be evaluated from the scenarios and targets of this run._"
    rows = [[g["goal"], g["measured"], "met" if g["met"] else "**not met**"] for g in s["goals"]]
    return _table(["goal", "measured", ""], rows)


def _throughput_section(results: dict[str, Any], s: dict[str, Any]) -> str:
    rows = []
    for key, t in s["throughput"].items():
        ratios = s["ratios"].get(key, {})
        rows.append(
            [
                _label(results, key),
                _fmt(t["deliveries_per_s"]),
                _fmt(t["rate"]),
                ", ".join(f"{v:.2f}x {k}" for k, v in ratios.items()) or "",
                _fmt(t["server_us_per_delivery"], digits=1),
                f"{_fmt(t.get('server_cores'), digits=2)} / "
                f"{_fmt(t.get('generator_cores'), digits=2)}",
            ]
        )
    return _table(
        [
            "target",
            "sustained deliveries/s",
            "msgs/s sent",
            "roomcast ÷ baseline",
            "server CPU µs per delivery",
            "CPU cores used: servers / generator",
        ],
        rows,
    )


def _latency_section(results: dict[str, Any], data: dict[str, Any]) -> str:
    rows = [
        [
            _label(results, key),
            _fmt(d["p50_ms"], digits=2),
            _fmt(d["p99_ms"], digits=2),
            _fmt(d["delivered"], scale=100, digits=2, unit=" %"),
            _fmt(d.get("store_append_ms"), digits=2),
            _fmt(d.get("broker_publish_ms"), digits=2),
        ]
        for key, d in data.items()
    ]
    header = ["target", "p50 ms", "p99 ms", "delivered"]
    return _table([*header, "store append, ms per batch", "broker publish, ms per batch"], rows)


def _memory_section(results: dict[str, Any], s: dict[str, Any]) -> str:
    rows = [
        [
            _label(results, key),
            _fmt(d["kib_per_connection"], digits=1),
            _fmt(d["base_mib"], digits=1),
            _fmt(d["clients"]),
        ]
        for key, d in s["memory"].items()
    ]
    return _table(["target", "KiB per idle connection", "RSS with no client, MiB", "clients"], rows)


def _cross_section(results: dict[str, Any], s: dict[str, Any]) -> str:
    counts = sorted({n for per in s["cross_node"].values() for n in per}, key=int)
    rows = []
    for key, per in s["cross_node"].items():
        for layout in ("local", "spread"):
            cells = []
            for n in counts:
                d = per.get(n, {}).get(layout)
                if not d:
                    cells.append("—")
                    continue
                msgs = _median(d["messages_per_node"])
                kib = _median(d["bytes_per_node"])
                kib_s = (kib or 0) / KIB
                cells.append(
                    f"{msgs:,.0f} msgs/s, {kib_s:,.1f} KiB/s (of {d['sent_per_s']:,.0f} sent)"
                )
            rows.append([f"{_label(results, key).split(',')[0]}, rooms {layout}", *cells])
    return _table(["per node received", *[f"{n} nodes" for n in counts]], rows)


def _health_section(results: dict[str, Any], s: dict[str, Any]) -> str:
    rows = []
    for key, h in s["health"].items():
        notes = []
        if h["errors"]:
            notes.append("run failed: " + "; ".join(e[:160] for e in h["errors"]))
        if h["died"]:
            notes.append(f"{h['died']} run(s) with a server process gone")
        if h["ack_errors"]:
            notes.append(f"{h['ack_errors']:,} `send` refused ({h['ack_error_sample'][:120]})")
        if h["disconnects"] or h.get("dropped"):
            notes.append(
                f"{h['disconnects']:,} disconnects during measured steps, "
                f"{h.get('dropped', 0):,} clients found disconnected after steps (reconnected)"
            )
        if h.get("repeated_steps"):
            notes.append(f"{h['repeated_steps']} step(s) measured again after a drop")
        if h.get("restarts"):
            notes.append(f"{h['restarts']} restart(s) after a backlog did not clear")
        if h.get("memory_dropped"):
            notes.append(f"{h['memory_dropped']:,} idle clients dropped by the server in D")
        if h.get("memory_failed_connects"):
            notes.append(f"{h['memory_failed_connects']:,} connections failed in D")
        if h["generator_limited_steps"]:
            notes.append(f"{h['generator_limited_steps']} step(s) where the generator fell behind")
        if h["log_lines"]:
            first = (h["log_sample"] or [""])[0][:140]
            notes.append(f"{h['log_lines']:,} warning/error log lines, e.g. `{first}`")
        rows.append(
            [
                _label(results, key),
                "; ".join(notes) or "none",
                _fmt(h.get("other_cores"), digits=2),
                _fmt(h.get("steal_cores"), digits=2),
            ]
        )
    return _table(
        [
            "target",
            "errors, refusals, losses seen",
            "CPU cores busy outside server and generator",
            "of them, the hypervisor's steal",
        ],
        rows,
    )


def generated_block(results: dict[str, Any], images: dict[str, str]) -> str:
    """The markdown between the page's markers."""
    s = results["summary"]
    parts = ["## The run", "", _run_section(results), "", "## Goals", "", _goals_section(s)]
    if s["throughput"]:
        parts += [
            "",
            "## A — fan-out: 1000 clients in 100 rooms of 10",
            "",
            "The highest offered rate a target sustains (p99 <= 250 ms, >= 99 % delivered), "
            "as deliveries per second actually received; ratios are roomcast's median over "
            "the baseline's median of the same run (baselines with the same process count: "
            + "; ".join(f"{k} vs {', '.join(v)}" for k, v in ROOMCAST_VS.items())
            + ").",
            "",
            _throughput_section(results, s),
        ]
        for name in ("throughput", "sweep"):
            if name in images:
                parts += ["", f"![{name}]({images[name]})"]
    if s["fixed_rate"]:
        c = results["config"]
        parts += [
            "",
            f"## B — latency at {c['base_rate']:g} msgs/s "
            f"({c['base_rate'] * c['room_size']:,.0f} deliveries/s)",
            "",
            "End-to-end: receive time minus the send time written into the message text, over "
            "every delivery, the sender's own included. For roomcast, the mean time per "
            "stored batch of its two steps between receiving a message and the other nodes "
            "receiving it: the store's append (seq given, committed durably) and the "
            "broker's publish (read from its `/metrics` over the same window; in one process "
            "the in-memory broker's publish is the local fan-out itself); the baselines store "
            "nothing and number nothing.",
            "",
            _latency_section(results, s["fixed_rate"]),
        ]
    if s["one_room"]:
        parts += [
            "",
            f"## C — one room of {results['config']['clients']:,} clients at "
            f"{results['config']['one_room_rate']:g} msgs/s",
            "",
            _latency_section(results, s["one_room"]),
        ]
    if "latency" in images:
        parts += ["", f"![latency]({images['latency']})"]
    if s["memory"]:
        parts += [
            "",
            f"## D — memory per idle connection ({results['config']['idle_clients']:,} clients)",
            "",
            "Resident memory summed over the target's processes with every client connected "
            "(authenticated, in no room), minus the same after a warm-up connection set had "
            "come and gone, divided by the connections still open.",
            "",
            _memory_section(results, s),
        ]
        if "memory" in images:
            parts += ["", f"![memory]({images['memory']})"]
    if s["cross_node"]:
        c = results["config"]
        parts += [
            "",
            "## E — cross-node cost",
            "",
            f"Nodes on this machine, {c['e_clients_per_node']} clients and "
            f"{c['e_rate_per_node']:g} msgs/s per node, in rooms of {c['room_size']}: rooms "
            "*local* have all their members on one node, rooms *spread* have them on every "
            "node. Per node: broker messages received (roomcast's "
            "`roomcast_broker_frames_received_total`; python-socketio's manager counted in the "
            "baseline server) and bytes received on its broker connections (`ss -ti`, replies "
            f"to its own commands included); median of {c['e_windows']} windows of "
            f"{c['e_window']:g} s.",
            "",
            _cross_section(results, s),
        ]
        if "crossnode" in images:
            parts += ["", f"![cross-node]({images['crossnode']})"]
    gen = s.get("generator_us_per_delivery")
    other = s.get("other_cores")
    steal = s.get("steal_cores")
    parts += [
        "",
        "## Health under load",
        "",
        _health_section(results, s),
        "",
        "The load generator's own CPU time (user + system, all its processes) per delivery: "
        + (_fmt(gen, digits=1, unit=" µs") if gen else "—")
        + " over every measured step (median [min-max]). Outside the servers and the "
        "generator, "
        + (_fmt(other, digits=2) if other else "—")
        + " CPU cores were busy during the measured windows (machine busy time minus the "
        "servers' and the generator's: the brokers and databases, other processes, interrupt "
        "work, and time the hypervisor took from this machine, /proc/stat's steal)"
        + (f"; of them, {_fmt(steal, digits=2)} cores of steal." if steal else "."),
    ]
    return "\n".join(parts)
