"""Server memory per idle session, by how its client opened it.

``python -m bench.upgrades`` starts roomcast in one process (the ``roomcast-1`` target),
opens ``--sessions`` Socket.IO sessions of one kind and reads the server's resident memory
before and after them:

- **websocket**: opened on a WebSocket (``?EIO=4&transport=websocket``), as the load
  generator, non-browser clients and roomcast's own page open theirs;
- **upgraded**: opened on long-polling, connected to namespace "/" there, then upgraded
  to a WebSocket with the probe and the switch — socket.io-client's default.

Every session is answered once over its WebSocket (a ``rooms`` call) before the reading,
and its pings are answered, so none is idle-closed meanwhile. Each kind gets a fresh
server in each of ``--rounds`` rounds; the figure is the median [min-max] of KiB per
session, printed and written to ``bench/results/upgrades.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import websockets

from .environment import machine, tree, versions
from .report import stats
from .targets import SOCKETIO_PATH, TARGETS, Cluster

KINDS = ("websocket", "upgraded")
RESULTS = Path(__file__).parent / "results" / "upgrades.json"
STEP_TIMEOUT = 30.0
"""Seconds any one step of opening a session may take."""


async def _answered(ws: websockets.ClientConnection, prefix: str) -> str:
    """The next packet starting with ``prefix``; pings on the way are answered."""
    while True:
        packet = str(await asyncio.wait_for(ws.recv(), STEP_TIMEOUT))
        if packet == "2":
            await ws.send("3")
        elif packet.startswith(prefix):
            return packet


async def _open(http: httpx.AsyncClient, port: int, kind: str, i: int) -> Any:
    """One session of ``kind``, connected and answered once over its WebSocket."""
    base = f"http://127.0.0.1:{port}{SOCKETIO_PATH}/"
    ws_base = f"ws://127.0.0.1:{port}{SOCKETIO_PATH}/?EIO=4&transport=websocket"
    hello = "40" + json.dumps({"name": f"m{i}"})
    if kind == "websocket":
        ws = await websockets.connect(ws_base, compression=None, open_timeout=STEP_TIMEOUT)
        await _answered(ws, "0{")
        await ws.send(hello)
        await _answered(ws, "40{")
    else:
        opened = await http.get(base, params={"EIO": "4", "transport": "polling"})
        sid = json.loads(opened.text[1:])["sid"]
        session = {"EIO": "4", "transport": "polling", "sid": sid}
        (await http.post(base, params=session, content=hello)).raise_for_status()
        polled = (await http.get(base, params=session)).text
        if not polled.startswith("40{"):
            raise RuntimeError(f"no connect over long-polling: {polled[:80]!r}")
        ws = await websockets.connect(
            f"{ws_base}&sid={sid}", compression=None, open_timeout=STEP_TIMEOUT
        )
        await ws.send("2probe")
        await _answered(ws, "3probe")
        await ws.send("5")
    await ws.send('421["rooms",{}]')
    await _answered(ws, "431[")
    return ws


async def _keep(ws: websockets.ClientConnection) -> None:
    """Answer the session's pings until it closes."""
    try:
        async for packet in ws:
            if packet == "2":
                await ws.send("3")
    except websockets.ConnectionClosed:
        pass


async def _measure(cluster: Cluster, kind: str, sessions: int) -> dict[str, Any]:
    port = cluster.ports[0]
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(limits=limits, timeout=STEP_TIMEOUT) as http:
        first = await _open(http, port, kind, -1)  # the code paths warmed up
        keepers = [asyncio.create_task(_keep(first))]
        await asyncio.sleep(1.0)
        before = cluster.rss_bytes()
        gate = asyncio.Semaphore(64)

        async def one(i: int) -> None:
            async with gate:
                ws = await _open(http, port, kind, i)
            keepers.append(asyncio.create_task(_keep(ws)))

        started = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(sessions)))
        seconds = time.monotonic() - started
        await asyncio.sleep(2.0)
        after = cluster.rss_bytes()
        for task in keepers:
            task.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)
    return {
        "kind": kind,
        "sessions": sessions,
        "open_seconds": seconds,
        "rss_before": before,
        "rss_after": after,
        "kib_per_session": (after - before) / sessions / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.upgrades", description=__doc__)
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.monotonic()
    records = []
    for round_ in range(1, args.rounds + 1):
        for kind in KINDS:
            with Cluster(TARGETS["roomcast-1"]) as cluster:
                record = asyncio.run(_measure(cluster, kind, args.sessions))
            record["round"] = round_
            records.append(record)
            print(f"round {round_}: {kind:<10} {record['kib_per_session']:6.1f} KiB per session")
    summary = {
        kind: stats([r["kib_per_session"] for r in records if r["kind"] == kind]) for kind in KINDS
    }
    for kind, s in summary.items():
        if s is not None:
            median, low, high = s["median"], s["min"], s["max"]
            print(f"{kind:<10} {median:6.1f} KiB per session [{low:.1f}-{high:.1f}]")
    result = {
        "command": "python -m bench.upgrades "
        + f"--sessions {args.sessions} --rounds {args.rounds}",
        "duration_s": time.monotonic() - started,
        "machine": machine(),
        "versions": versions(),
        "tree": tree(),
        "records": records,
        "summary": summary,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results in {args.output}")


if __name__ == "__main__":
    main()
