"""The scenarios, each measured against one running target (or, for D and E, started here).

A  fan-out sweep: 1000 clients in 100 rooms of 10, the offered rate raised step by step until
   p99 > 250 ms or deliveries < 99 %; the highest sustained deliveries/s.
B  latency at a fixed 200 msgs/s (2000 deliveries/s): the sweep's first step.
C  one room of 1000 clients at 5 msgs/s.
D  server memory per idle connection: RSS (all processes) with 5000 idle clients, minus RSS
   with none.
E  cross-node cost: broker messages and bytes each node receives as nodes go 2 -> 4 -> 8,
   with rooms spread over the nodes and with rooms local to one node.

Rates are messages sent per second (each delivered to every member of its room, the sender
included); the offered rate steps along a geometric grid ``base * grid**k``.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, replace
from typing import Any

from .generator import GeneratorPool, merge_histograms
from .histogram import percentile_ms
from .sweep import first_knee, later_knee
from .targets import HOT_PATH_STEPS, Cluster, TargetSpec, machine_cpu_seconds


@dataclass(frozen=True)
class Config:
    """Every knob of a benchmark run; the defaults are the full run's."""

    warmup: float = 0.75
    measure: float = 2.0
    fixed_measure: float = 6.0
    """Seconds measured at B's fixed rate: a p99 of 12,000 deliveries rather than 4,000."""
    drain: float = 1.0
    quiet_limit: float = 10.0
    clients: int = 1000
    room_size: int = 10
    base_rate: float = 200.0
    grid: float = 2 ** (1 / 6)
    jump: int = 6
    max_steps: int = 14
    max_steps_later: int = 4
    """Steps of runs 2, 3, ... (B included), which start at run 1's knee; more, up to
    ``max_steps``, only when every step down from it fails (see :func:`bench.sweep.later_knee`)."""
    p99_limit_ms: float = 250.0
    min_delivered: float = 0.99
    one_room_rate: float = 5.0
    idle_clients: int = 5000
    settle: float = 2.0
    e_nodes: tuple[int, ...] = (2, 4, 8)
    e_clients_per_node: int = 100
    e_rate_per_node: float = 20.0
    e_windows: int = 3
    e_window: float = 1.5
    connect_concurrency: int = 64

    def rate(self, k: int) -> float:
        return self.base_rate * self.grid**k


Plan = list[tuple[int, str, int, list[str]]]
"""Clients: (index, name, node, rooms)."""


def rooms_plan(clients: int, size: int, prefix: str, nodes: int, *, local: bool) -> Plan:
    """Clients in rooms of ``size``; a room's members spread over the nodes (member j on
    node j mod N) or all on one node (room r on node r mod N)."""
    plan: Plan = []
    for i in range(clients):
        room, member = divmod(i, size)
        node = room % nodes if local else member % nodes
        plan.append((i, f"u{i}", node, [f"{prefix}-r{room}"]))
    return plan


def connect(pool: GeneratorPool, cluster: Cluster, plan: Plan, cfg: Config) -> dict[str, Any]:
    """Open the plan's connections (client i on generator i mod G) and join their rooms."""
    per_worker: list[list[list[Any]]] = [[] for _ in range(pool.size)]
    for index, name, node, rooms in plan:
        per_worker[index % pool.size].append([index, name, cluster.ws_url(node), rooms])
    deadline = 30.0 + len(plan) / 20
    replies = pool.call(
        [
            {
                "cmd": "connect",
                "clients": c,
                "concurrency": cfg.connect_concurrency,
                "deadline": deadline,
            }
            for c in per_worker
        ],
        deadline + 20,
    )
    errors: dict[str, int] = {}
    joined: dict[str, int] = {}
    for r in replies:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
        for k, v in r["rooms"].items():
            joined[k] = joined.get(k, 0) + v
    return {
        "connected": sum(r["connected"] for r in replies),
        "rooms": joined,
        "failed": sum(r["failed"] for r in replies),
        "errors": errors,
        "seconds": max(r["seconds"] for r in replies),
    }


def quiet(pool: GeneratorPool, cfg: Config) -> dict[str, Any]:
    """Wait until the server has worked off its backlog (bounded by ``cfg.quiet_limit``)."""
    replies = pool.broadcast(
        {"cmd": "quiet", "idle": 0.3, "limit": cfg.quiet_limit}, cfg.quiet_limit + 10
    )
    return {
        "quiet": all(r["quiet"] for r in replies),
        "unacked": sum(r["unacked"] for r in replies),
        "seconds": max(r["seconds"] for r in replies),
    }


def heal(pool: GeneratorPool, cfg: Config) -> dict[str, Any]:
    """Reconnect the clients the server dropped; how many there were."""
    replies = pool.broadcast(
        {"cmd": "heal", "concurrency": cfg.connect_concurrency, "deadline": 90}, 120
    )
    return {
        "dropped": sum(r["dropped"] for r in replies),
        "reconnect_failed": sum(r["failed"] for r in replies),
    }


def live(pool: GeneratorPool) -> int:
    """Clients connected right now."""
    return sum(r["live"] for r in pool.broadcast({"cmd": "count"}, 10))


def close(pool: GeneratorPool) -> None:
    pool.broadcast({"cmd": "close", "timeout": 15}, 30)


def step(
    cluster: Cluster,
    pool: GeneratorPool,
    cfg: Config,
    rate: float,
    tag: int,
    sizes: dict[str, int],
    room: str | None = None,
) -> dict[str, Any]:
    """Offer ``rate`` messages/s for ``warmup + measure`` seconds; measure the window."""
    cmd = {
        "room": room,
        "cmd": "load",
        "rate": rate / pool.size,
        "warmup": cfg.warmup,
        "measure": cfg.measure,
        "drain": cfg.drain,
        "tag": tag,
        "room_sizes": sizes,
    }
    pool.start([cmd] * pool.size)
    time.sleep(cfg.warmup)
    cpu0, (busy0, steal0) = cluster.cpu_seconds(), machine_cpu_seconds()
    steps0 = cluster.hot_path_seconds()
    time.sleep(cfg.measure)
    cpu1, (busy1, steal1) = cluster.cpu_seconds(), machine_cpu_seconds()
    steps1 = cluster.hot_path_seconds()
    replies = pool.collect(cfg.drain + 30)
    settled = quiet(pool, cfg)
    healed = heal(pool, cfg)
    histogram = merge_histograms(replies)
    sent = sum(r["sent"] for r in replies)
    expected = sum(r["expected"] for r in replies)
    received = sum(r["received"] for r in replies)
    gen_cpu = sum(r["cpu_user"] + r["cpu_sys"] for r in replies)
    delivered = received / expected if expected else 0.0
    p50, p99 = percentile_ms(histogram, 0.50), percentile_ms(histogram, 0.99)
    reasons = []
    if delivered < cfg.min_delivered:
        reasons.append(f"delivered {delivered:.1%}")
    if p99 is None or p99 > cfg.p99_limit_ms:
        reasons.append(f"p99 {p99} ms")
    if not cluster.alive():
        reasons.append("a server process exited")
    if not settled["quiet"]:
        reasons.append(f"backlog not worked off within {cfg.quiet_limit:g} s")
    acks_error = sum(r["acks_error"] for r in replies)
    return {
        "rate": rate,
        "offered_deliveries_per_s": rate * (sum(sizes.values()) / max(1, len(sizes))),
        "sent": sent,
        "send_rate": sent / cfg.measure,
        "expected": expected,
        "received": received,
        "delivered": delivered,
        "deliveries_per_s": received / cfg.measure,
        "p50_ms": p50,
        "p90_ms": percentile_ms(histogram, 0.90),
        "p99_ms": p99,
        "max_ms": percentile_ms(histogram, 1.0),
        "acks_ok": sum(r["acks_ok"] for r in replies),
        "acks_error": acks_error,
        "error_sample": next((r["error_sample"] for r in replies if r["error_sample"]), ""),
        "disconnects": sum(r["disconnects"] for r in replies),
        "dropped": healed["dropped"],
        "reconnect_failed": healed["reconnect_failed"],
        "malformed": sum(r["malformed"] for r in replies),
        "generator_cpu_s": gen_cpu,
        "generator_us_per_delivery": 1e6 * gen_cpu / received if received else None,
        "generator_cores": gen_cpu / cfg.measure,
        "server_cores": (cpu1 - cpu0) / cfg.measure,
        # Whatever else kept the machine's CPUs busy in the window (services, other processes,
        # interrupt work, the hypervisor's steal).
        "other_cores": max(0.0, (busy1 - busy0) - (cpu1 - cpu0) - gen_cpu) / cfg.measure,
        # Of it, the time the hypervisor ran something else on this machine's CPUs.
        "steal_cores": (steal1 - steal0) / cfg.measure,
        "server_cpu_s": cpu1 - cpu0,
        "server_us_per_delivery": 1e6 * (cpu1 - cpu0) / received if received else None,
        **_hot_path_ms(steps0, steps1),
        "generator_limited": rate * cfg.measure >= 100 and sent < 0.95 * rate * cfg.measure,
        "settled": settled,
        "passed": not reasons,
        "reasons": reasons,
    }


def _hot_path_ms(
    before: dict[str, tuple[float, float]] | None, after: dict[str, tuple[float, float]] | None
) -> dict[str, float | None]:
    """roomcast's mean milliseconds per batch of each hot-path step in the window (the
    store's append, the broker's publish); None for a baseline, which exports no such
    figures."""
    out: dict[str, float | None] = {f"{step}_ms": None for step in HOT_PATH_STEPS}
    if before is None or after is None:
        return out
    for step in HOT_PATH_STEPS:
        seconds = after[step][0] - before[step][0]
        batches = after[step][1] - before[step][1]
        out[f"{step}_ms"] = 1e3 * seconds / batches if batches else None
    return out


def measured_step(
    cluster: Cluster,
    pool: GeneratorPool,
    cfg: Config,
    rate: float,
    tag: int,
    sizes: dict[str, int],
    room: str | None = None,
) -> dict[str, Any]:
    """A step, measured once more if the server dropped connections during it.

    A step in which the server disconnected clients measures the disconnection rather than
    the rate; the clients are reconnected (as Socket.IO clients do) and the step is repeated
    once. The dropped attempt is kept in the result (``retried``) and counted under health.
    """
    result = step(cluster, pool, cfg, rate, tag, sizes, room)
    _log_step(cluster.spec.key, result)
    if (result["disconnects"] or result["dropped"]) and cluster.alive():
        print(
            f"  {cluster.spec.key:22s} the server dropped {result['dropped']} clients during "
            "the step: reconnected, measuring it again",
            flush=True,
        )
        quiet(pool, cfg)
        first = result
        result = step(cluster, pool, cfg, rate, tag + 50_000, sizes, room)
        result["retried"] = first
        _log_step(cluster.spec.key, result)
    return result


def _log_step(key: str, r: dict[str, Any]) -> None:
    p99 = "-" if r["p99_ms"] is None else f"{r['p99_ms']:.2f}"
    gen = r["generator_us_per_delivery"]
    print(
        f"  {key:22s} {r['rate']:8.0f} msgs/s -> {r['deliveries_per_s']:9.0f} deliveries/s "
        f"{r['delivered']:7.2%}  p99 {p99:>7s} ms  generator "
        f"{'-' if gen is None else f'{gen:.1f}'} us/delivery  {'ok' if r['passed'] else 'FAIL'}"
        + (f" ({', '.join(r['reasons'])})" if r["reasons"] else "")
        + (
            f"  [per batch: store {r['store_append_ms']:.2f} ms,"
            f" broker {r['broker_publish_ms']:.2f} ms]"
            if r.get("store_append_ms") is not None and r.get("broker_publish_ms") is not None
            else ""
        ),
        flush=True,
    )


def fan_out(
    cluster: Cluster,
    pool: GeneratorPool,
    cfg: Config,
    *,
    one_room: bool,
    sweep: bool,
    prior: int | None,
) -> dict[str, Any]:
    """Scenarios C, B and A on one set of ``cfg.clients`` clients, each in a room of
    ``cfg.room_size`` (members spread over the nodes) and, for C, in one room of all.

    C is measured first, on fresh connections. Then the sweep: its first step is B's fixed
    rate. Without a ``prior`` knee (grid index) the rate doubles until a step fails, then
    bisects down to one grid step (see :func:`bench.sweep.first_knee`); with one it starts
    there and moves one grid step at a time (see :func:`bench.sweep.later_knee`). The knee
    is the highest passing step.
    """
    key, prefix = cluster.spec.key, cluster.prefix
    everyone = f"{prefix}-all"
    plan = rooms_plan(cfg.clients, cfg.room_size, prefix, cluster.spec.processes, local=False)
    first_plan = (
        [(i, n, node, [*rooms, everyone]) for i, n, node, rooms in plan] if one_room else plan
    )
    conn = connect(pool, cluster, first_plan, cfg)
    print(
        f"  {key:22s} {conn['connected']} clients connected in {conn['seconds']:.1f} s"
        + (f", {conn['failed']} failed: {conn['errors']}" if conn["failed"] else ""),
        flush=True,
    )
    # The members that did join: a failed join is not a lost delivery.
    sizes = {room: n for room, n in conn["rooms"].items() if room != everyone}
    quiet(pool, cfg)
    out: dict[str, Any] = {"connect": conn}
    dirty = False
    if one_room:
        joined = conn["rooms"].get(everyone, 0)
        result = measured_step(
            cluster, pool, cfg, cfg.one_room_rate, 10_000, {everyone: joined}, everyone
        )
        result["joined"] = joined
        out["one_room"] = result
        dirty = not result["settled"]["quiet"]
    if not sweep:
        return out
    steps: dict[int, dict[str, Any]] = {}

    def run(k: int) -> bool:
        nonlocal dirty
        if dirty or not cluster.alive():
            # Still working off an overload (or gone): measure on a fresh one.
            print(f"  {key:22s} restarting the target", flush=True)
            close(pool)
            cluster.restart()
            sizes.clear()
            sizes.update(connect(pool, cluster, plan, cfg)["rooms"])
            quiet(pool, cfg)
        # The first step (k = 0) is B's fixed rate, measured for longer.
        step_cfg = replace(cfg, measure=cfg.fixed_measure) if k == 0 else cfg
        result = measured_step(cluster, pool, step_cfg, cfg.rate(k), len(steps) + 1, sizes)
        result["k"] = k
        steps[k] = result
        dirty = not result["settled"]["quiet"]
        return bool(result["passed"])

    knee: int | None = 0 if run(0) else None
    if knee is not None and prior is None:
        knee = first_knee(run, passed=0, start=2 * cfg.jump, jump=cfg.jump, most=cfg.max_steps - 1)
    elif knee is not None and prior is not None:
        taken = len(steps)
        later = later_knee(
            prior,
            run,
            budget=min(cfg.max_steps, cfg.max_steps_later) - taken,
            most=cfg.max_steps - taken,
        )
        if later is not None:
            knee = later
    best = steps[knee] if knee is not None else None
    out["sweep"] = {
        "steps": [steps[k] for k in sorted(steps)],
        "knee_k": knee,
        "restarts": cluster.restarts,
        "sustained_deliveries_per_s": best["deliveries_per_s"] if best else 0.0,
        "sustained_rate": best["rate"] if best else 0.0,
        "fixed_rate": steps[0],
    }
    return out


def idle_memory(
    spec: TargetSpec, pool: GeneratorPool, cfg: Config, prefix: str, shared_store: str
) -> dict[str, Any]:
    """Scenario D on a fresh cluster: RSS with ``cfg.idle_clients`` idle clients (connected
    and authenticated, spread over the processes) minus RSS after a warm-up connection set
    has come and gone, per connection still open."""
    with Cluster(spec, shared_store=shared_store) as cluster:
        warm = rooms_plan(
            2 * cfg.room_size, cfg.room_size, f"{prefix}-w", spec.processes, local=False
        )
        connect(pool, cluster, warm, cfg)
        close(pool)
        time.sleep(cfg.settle)
        base = cluster.rss_bytes()
        plan: Plan = [(i, f"u{i}", i % spec.processes, []) for i in range(cfg.idle_clients)]
        conn = connect(pool, cluster, plan, cfg)
        settled = quiet(pool, cfg)
        time.sleep(cfg.settle)
        loaded = cluster.rss_bytes()
        connected = live(pool)
        alive = cluster.alive()
        close(pool)
        issues = cluster.log_issues()
    per_conn = (loaded - base) / connected if connected else None
    print(
        f"  {spec.key:22s} {connected} idle clients: RSS {base / 2**20:.1f} -> "
        f"{loaded / 2**20:.1f} MiB, {(per_conn or 0) / 1024:.1f} KiB per connection",
        flush=True,
    )
    return {
        "clients": connected,
        "dropped": conn["connected"] - connected,
        "failed": conn["failed"],
        "connect_errors": conn["errors"],
        "connect_seconds": conn["seconds"],
        "rss_base": base,
        "rss_loaded": loaded,
        "bytes_per_connection": per_conn,
        "settled": settled,
        "alive": alive,
        "log_issues": issues,
    }


def cross_node(
    spec: TargetSpec, nodes: int, pool: GeneratorPool, cfg: Config, prefix: str, shared_store: str
) -> dict[str, Any]:
    """Scenario E for one implementation on ``nodes`` processes: per node, broker messages
    and bytes received per second, with rooms local to nodes and spread over them, at
    ``cfg.e_rate_per_node`` messages/s per node (``cfg.e_clients_per_node`` clients each)."""
    out: dict[str, Any] = {}
    with Cluster(spec.with_processes(nodes), shared_store=shared_store) as cluster:
        for layout in ("local", "spread"):
            plan = rooms_plan(
                cfg.e_clients_per_node * nodes,
                cfg.room_size,
                f"{prefix}-{layout}",
                nodes,
                local=layout == "local",
            )
            conn = connect(pool, cluster, plan, cfg)
            quiet(pool, cfg)
            rate = cfg.e_rate_per_node * nodes
            duration = cfg.e_windows * cfg.e_window
            cmd = {
                "cmd": "load",
                "rate": rate / pool.size,
                "warmup": cfg.warmup,
                "measure": duration,
                "drain": cfg.drain,
                "tag": 20_000 + nodes,
                "room_sizes": conn["rooms"],
            }
            pool.start([cmd] * pool.size)
            time.sleep(cfg.warmup)
            readings = [(time.monotonic(), cluster.broker_frames(), cluster.broker_bytes())]
            for _ in range(cfg.e_windows):
                time.sleep(
                    max(0.0, readings[0][0] + cfg.e_window * len(readings) - time.monotonic())
                )
                readings.append((time.monotonic(), cluster.broker_frames(), cluster.broker_bytes()))
            replies = pool.collect(cfg.drain + 30)
            quiet(pool, cfg)
            windows: list[dict[str, Any]] = []
            for (t0, f0, b0), (t1, f1, b1) in itertools.pairwise(readings):
                dt = t1 - t0
                windows.append(
                    {
                        "seconds": dt,
                        "messages_per_node": [(b - a) / dt for a, b in zip(f0, f1, strict=True)],
                        "bytes_per_node": [(b - a) / dt for a, b in zip(b0, b1, strict=True)],
                    }
                )
            sent = sum(r["sent"] for r in replies)
            expected = sum(r["expected"] for r in replies)
            received = sum(r["received"] for r in replies)
            histogram = merge_histograms(replies)
            healed = heal(pool, cfg)
            out[layout] = {
                "clients": conn["connected"],
                "failed": conn["failed"],
                "connect_errors": conn["errors"],
                "sent_per_s": sent / duration,
                "delivered": received / expected if expected else 0.0,
                "p50_ms": percentile_ms(histogram, 0.5),
                "p99_ms": percentile_ms(histogram, 0.99),
                "acks_error": sum(r["acks_error"] for r in replies),
                "disconnects": sum(r["disconnects"] for r in replies),
                "dropped": healed["dropped"],
                "windows": windows,
            }
            close(pool)
            per_node = [sum(w["messages_per_node"]) / len(w["messages_per_node"]) for w in windows]
            print(
                f"  {spec.key:22s} {nodes} nodes, rooms {layout:6s}: "
                f"{sent / duration:6.0f} msgs/s sent, broker messages received per node "
                f"{', '.join(f'{x:.0f}/s' for x in per_node)}; delivered "
                f"{out[layout]['delivered']:.2%}, p99 {out[layout]['p99_ms']} ms",
                flush=True,
            )
        out["log_issues"] = cluster.log_issues()
    return out
