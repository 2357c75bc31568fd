"""The plots of docs/benchmarks.md (matplotlib, written as docs/img/bench-*.png)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROOMCAST = "#1f6feb"
PYTHON = "#d4a017"
NODE = "#3c873a"


def _color(results: dict[str, Any], key: str) -> str:
    server = results["targets"].get(key, {}).get("server", "")
    return {"roomcast": ROOMCAST, "python-socketio": PYTHON, "node": NODE}.get(server, "#888888")


_STYLES = {"memory": "-", "redis": "--", "rabbitmq": ":", "nats": "-."}
_MARKERS = {"memory": "o", "redis": "s", "rabbitmq": "^", "nats": "D"}


def _plain_log_axis(axis: Any) -> None:
    """Log scale with plain numbers as tick labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _bars(
    ax: Any,
    results: dict[str, Any],
    entries: dict[str, dict[str, Any] | None],
    scale: float = 1.0,
) -> None:
    keys = [k for k, v in entries.items() if v]
    meds = [entries[k]["median"] * scale for k in keys]  # type: ignore[index]
    lows = [m - entries[k]["min"] * scale for k, m in zip(keys, meds, strict=True)]  # type: ignore[index]
    highs = [entries[k]["max"] * scale - m for k, m in zip(keys, meds, strict=True)]  # type: ignore[index]
    ax.barh(keys, meds, xerr=[lows, highs], color=[_color(results, k) for k in keys], capsize=3)
    ax.invert_yaxis()
    for y, (m, hi) in enumerate(zip(meds, highs, strict=True)):
        # The median's label past the end of its error bar, so the two never overlap.
        ax.text(
            m + hi,
            y,
            f"  {m:,.0f}" if m >= 100 else f"  {m:,.2f}" if m < 10 else f"  {m:,.1f}",
            va="center",
            fontsize=8,
        )
    ax.grid(axis="x", alpha=0.3)


def write_plots(results: dict[str, Any], img_dir: Path) -> dict[str, Path]:
    """Every plot the results allow; returns name -> file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img_dir.mkdir(parents=True, exist_ok=True)
    s = results["summary"]
    out: dict[str, Path] = {}

    def save(fig: Any, name: str) -> None:
        path = img_dir / f"bench-{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        out[name] = path

    if s["throughput"]:
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(s["throughput"]) + 1.2))
        _bars(ax, results, {k: v["deliveries_per_s"] for k, v in s["throughput"].items()})
        ax.set_xlabel("highest sustained deliveries/s (p99 <= 250 ms, >= 99 % delivered)")
        ax.set_title("A: fan-out, 1000 clients in 100 rooms of 10 (median, min-max)")
        save(fig, "throughput")

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for rec in results["records"]:
            if rec.get("kind") != "load" or rec.get("run") != 1 or "sweep" not in rec:
                continue
            steps = sorted(rec["sweep"]["steps"], key=lambda st: st["rate"])
            xs = [st["offered_deliveries_per_s"] for st in steps if st["p99_ms"] is not None]
            ys = [st["p99_ms"] for st in steps if st["p99_ms"] is not None]
            broker = results["targets"][rec["target"]]["broker"]
            ax.plot(
                xs,
                ys,
                _STYLES.get(broker, "-"),
                marker=_MARKERS.get(broker, "o"),
                ms=4,
                color=_color(results, rec["target"]),
                label=rec["target"],
            )
        ax.axhline(250, color="#c00", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_log_axis(ax.xaxis)
        _plain_log_axis(ax.yaxis)
        ax.set_xlabel("offered deliveries/s")
        ax.set_ylabel("p99 latency, ms")
        ax.set_title("A: p99 latency as the offered rate rises (run 1)")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3, which="both")
        save(fig, "sweep")

    if s["fixed_rate"] or s["one_room"]:
        c = results["config"]
        titles = (
            f"B: {c['base_rate']:g} msgs/s in rooms of {c['room_size']}",
            f"C: one room of {c['clients']}, {c['one_room_rate']:g} msgs/s",
        )
        panels = [
            (t, d) for t, d in zip(titles, (s["fixed_rate"], s["one_room"]), strict=True) if d
        ]
        rows = max(len(d) for _, d in panels)
        fig, axes = plt.subplots(
            1, len(panels), figsize=(5.5 * len(panels), 0.45 * rows + 1.4), squeeze=False
        )
        for ax, (title, data) in zip(axes[0], panels, strict=True):
            shown = {k: v for k, v in data.items() if v["p99_ms"] and v["p50_ms"]}
            _bars(ax, results, {k: v["p99_ms"] for k, v in shown.items()})
            meds = [v["p50_ms"]["median"] for v in shown.values()]
            ax.scatter(
                meds, range(len(meds)), marker="|", s=200, color="black", zorder=3, label="p50"
            )
            ax.set_xscale("log")
            _plain_log_axis(ax.xaxis)
            ax.set_xlabel("p99 latency, ms (| = p50)")
            ax.set_title(title)
        save(fig, "latency")

    if s["memory"]:
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(s["memory"]) + 1.2))
        _bars(ax, results, {k: v["kib_per_connection"] for k, v in s["memory"].items()})
        ax.axvline(15, color="#c00", lw=0.8, ls=":")
        ax.set_xlabel("KiB of RSS per idle connection (5000 clients, all processes)")
        ax.set_title("D: memory per idle connection")
        save(fig, "memory")

    if s["cross_node"]:
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for key, per in s["cross_node"].items():
            counts = sorted(per, key=int)
            for layout, style in (("local", "-"), ("spread", "--")):
                ys = [per[n].get(layout, {}).get("messages_per_node") for n in counts]
                if all(ys):
                    ax.plot(
                        [int(n) for n in counts],
                        [y["median"] for y in ys if y],
                        style,
                        marker="o",
                        color=_color(results, key),
                        label=f"{key}, rooms {layout}",
                    )
        ax.set_xlabel("nodes (processes)")
        ax.set_ylabel("broker messages received per node, /s")
        rate = results["config"]["e_rate_per_node"]
        ax.set_title(f"E: what each node receives ({rate:g} msgs/s sent per node)")
        ax.set_xticks(sorted({int(n) for per in s["cross_node"].values() for n in per}))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        save(fig, "crossnode")
    return out
