"""The servers under test: started by the benchmark on 127.0.0.1 free ports, measured, stopped,
and their broker state removed.

A target is one server implementation on N processes (nodes), each on its own port, sharing
rooms through a broker when N > 1:

=====================  ==============================================================
roomcast               ``python -m roomcast serve`` (memory broker alone; Redis,
                       RabbitMQ or NATS with a unique ``?prefix=``); history in SQLite
                       (one process) or, shared by the nodes, in a unique PostgreSQL
                       schema (default) or one SQLite file (``--shared-store sqlite``)
python-socketio        ``bench/baselines/psio_server.py`` on uvicorn; ``AsyncRedisManager``
                       or ``AsyncAioPikaManager`` with a unique channel
node                   ``bench/node/server.js`` (Socket.IO v4); ``@socket.io/redis-adapter``
                       with a unique key
=====================  ==============================================================
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
NODE_DIR = BENCH / "node"
PSIO_SERVER = BENCH / "baselines" / "psio_server.py"
SOCKETIO_PATH = "/ws/socket.io"

REDIS = ("127.0.0.1", 6379)
RABBITMQ = ("127.0.0.1", 5672)
NATS = ("127.0.0.1", 4222)
POSTGRES = ("127.0.0.1", 5432)
POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
BROKER_PORTS = {"redis": REDIS[1], "rabbitmq": RABBITMQ[1], "nats": NATS[1]}


@dataclass(frozen=True)
class TargetSpec:
    """A server implementation on a number of processes."""

    key: str
    server: str
    """``roomcast``, ``python-socketio`` or ``node``."""
    broker: str
    """``memory`` (one process), ``redis``, ``rabbitmq`` or ``nats``."""
    processes: int
    label: str
    store: str | None = None
    """roomcast on several processes: the history they share, ``postgres`` or ``sqlite``;
    None follows ``--shared-store``."""

    def services(self, shared_store: str) -> list[tuple[str, tuple[str, int]]]:
        """The external services this target needs."""
        shared_store = self.store or shared_store
        needed = []
        if self.broker == "redis":
            needed.append(("Redis", REDIS))
        elif self.broker == "rabbitmq":
            needed.append(("RabbitMQ", RABBITMQ))
        elif self.broker == "nats":
            needed.append(("NATS", NATS))
        if self.server == "roomcast" and self.processes > 1 and shared_store == "postgres":
            needed.append(("PostgreSQL", POSTGRES))
        return needed

    def with_processes(self, n: int) -> TargetSpec:
        return replace(self, processes=n)


_RC, _PY, _NODE = "roomcast", "python-socketio", "node"

HOT_PATH_STEPS = ("store_append", "broker_publish")
"""roomcast's per-batch steps whose durations its /metrics exports (``roomcast_*_seconds``)."""
TARGETS: dict[str, TargetSpec] = {
    t.key: t
    for t in [
        TargetSpec("roomcast-1", _RC, "memory", 1, "roomcast, 1 process"),
        TargetSpec("roomcast-redis-2", _RC, "redis", 2, "roomcast, 2 processes, Redis"),
        TargetSpec(
            "roomcast-redis-pg-2",
            _RC,
            "redis",
            2,
            "roomcast, 2 processes, Redis + PostgreSQL",
            store="postgres",
        ),
        TargetSpec("roomcast-rabbitmq-2", _RC, "rabbitmq", 2, "roomcast, 2 processes, RabbitMQ"),
        TargetSpec("roomcast-nats-2", _RC, "nats", 2, "roomcast, 2 processes, NATS"),
        TargetSpec("psio-1", _PY, "memory", 1, "python-socketio, 1 process"),
        TargetSpec("psio-redis-2", _PY, "redis", 2, "python-socketio, 2 processes, Redis manager"),
        TargetSpec(
            "psio-aiopika-2", _PY, "rabbitmq", 2, "python-socketio, 2 processes, aio-pika manager"
        ),
        TargetSpec("node-1", _NODE, "memory", 1, "Node Socket.IO, 1 process"),
        TargetSpec("node-redis-2", _NODE, "redis", 2, "Node Socket.IO, 2 processes, redis-adapter"),
    ]
}


class TargetError(RuntimeError):
    """A target did not start, or a service it needs is missing."""


def reachable(address: tuple[str, int], timeout: float = 1.0) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(address, timeout=timeout):
        return True
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine_cpu_seconds() -> tuple[float, float]:
    """CPU seconds the whole machine has spent busy since boot (every CPU, every process,
    interrupt work, and the hypervisor's steal), and of them, the steal."""
    return cpu_seconds_of(Path("/proc/stat").read_text(), os.sysconf("SC_CLK_TCK"))


def cpu_seconds_of(stat: str, ticks_per_second: int) -> tuple[float, float]:
    """Busy and steal seconds from the text of ``/proc/stat`` (its first, all-CPU line)."""
    fields = stat.splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    busy = user + nice + system + irq + softirq + steal
    return busy / ticks_per_second, steal / ticks_per_second


def ensure_node_modules(timeout: float = 300.0) -> None:
    """``npm ci`` in bench/node when its node_modules is missing."""
    if (NODE_DIR / "node_modules" / "socket.io").is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise TargetError("the Node baselines need node and npm")
    print("bench: npm ci in bench/node ...", file=sys.stderr, flush=True)
    subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=timeout
    )


class Cluster:
    """One running target: its processes, ports and broker namespace."""

    def __init__(self, spec: TargetSpec, *, shared_store: str = "sqlite") -> None:
        self.spec = spec
        self.shared_store = spec.store or shared_store
        self.prefix = f"bench{secrets.token_hex(4)}"
        self.workdir = Path(tempfile.mkdtemp(prefix="roomcast-bench-"))
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[Path] = []
        self._queues: list[str] = []
        self._earlier_issues: dict[str, Any] = {"count": 0, "sample": []}
        self.restarts = 0

    # -- starting and stopping ---------------------------------------------------------

    def _command(self, index: int, port: int) -> list[str]:
        spec, prefix = self.spec, self.prefix
        if spec.server == "roomcast":
            broker = {
                "memory": "memory://",
                "redis": f"redis://127.0.0.1:6379/0?prefix={prefix}",
                "rabbitmq": f"amqp://guest:guest@127.0.0.1:5672/?prefix={prefix}",
                "nats": f"nats://127.0.0.1:4222?prefix={prefix}",
            }[spec.broker]
            if spec.processes > 1 and self.shared_store == "postgres":
                store = f"{POSTGRES_URL}?schema={prefix}"
            else:
                store = f"sqlite:///{self.workdir / 'roomcast.db'}"
            return [
                sys.executable, "-m", "roomcast", "serve",
                "--host", "127.0.0.1", "--port", str(port), "--grpc-port", "0",
                "--rate-limit", "0", "--log-level", "warning",
                "--store-url", store, "--broker-url", broker, "--node-id", f"n{index}",
            ]  # fmt: skip
        if spec.server == "python-socketio":
            manager, url = {
                "memory": ("none", ""),
                "redis": ("redis", "redis://127.0.0.1:6379/0"),
                "rabbitmq": ("aiopika", "amqp://guest:guest@127.0.0.1:5672/"),
            }[spec.broker]
            return [
                sys.executable, str(PSIO_SERVER), "--port", str(port), "--path", SOCKETIO_PATH,
                "--manager", manager, "--url", url, "--channel", prefix,
            ]  # fmt: skip
        if spec.server == "node":
            node = shutil.which("node") or "node"
            cmd = [node, str(NODE_DIR / "server.js"), "--port", str(port), "--path", SOCKETIO_PATH]
            if spec.broker == "redis":
                cmd += ["--redis-url", "redis://127.0.0.1:6379/0", "--key", prefix]
            return cmd
        raise TargetError(f"unknown server {spec.server!r}")

    def start(self, timeout: float = 60.0) -> None:
        """Start every process and wait (bounded) until each accepts connections."""
        for name, address in self.spec.services(self.shared_store):
            if not reachable(address):
                raise TargetError(f"{self.spec.key} needs {name} on {address[0]}:{address[1]}")
        if self.spec.server == "node":
            ensure_node_modules()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("ROOMCAST_BROKER_URL", None)
        env.pop("ROOMCAST_STORE_URL", None)
        for index in range(self.spec.processes):
            port = free_port()
            log = self.workdir / f"node{index}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    self._command(index, port),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=self.workdir,
                    start_new_session=True,
                )
            self.ports.append(port)
            self.procs.append(proc)
            self._logs.append(log)
        deadline = time.monotonic() + timeout
        for proc, port, log in zip(self.procs, self.ports, self._logs, strict=True):
            while not reachable(("127.0.0.1", port), timeout=0.5):
                if proc.poll() is not None:
                    tail = log.read_text(errors="replace")[-2000:]
                    self.stop()
                    raise TargetError(f"{self.spec.key} exited at start:\n{tail}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise TargetError(f"{self.spec.key} did not listen within {timeout:.0f} s")
                time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every process (its session), then SIGKILL what is left."""
        if self.spec.server == "python-socketio" and self.spec.broker == "rabbitmq":
            with contextlib.suppress(Exception):
                self._queues = [q for q in (s.get("queue") for s in self.stats()) if q]
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)

    def cleanup(self) -> None:
        """Remove every key, exchange, queue and schema this cluster made, and its files."""
        from . import cleanup

        errors = []
        for step in cleanup.steps(self.spec, self.prefix, self._queues, self.shared_store):
            try:
                step()
            except Exception as exc:
                errors.append(f"{step.__name__}: {exc}")
        shutil.rmtree(self.workdir, ignore_errors=True)
        if errors:
            print(f"bench: cleanup of {self.spec.key}: {'; '.join(errors)}", file=sys.stderr)

    def restart(self) -> None:
        """Stop, clean up and start again under a new name (a server left overloaded)."""
        issues = self.log_issues()
        self.stop()
        self.cleanup()
        self._earlier_issues = issues
        self.prefix = f"bench{secrets.token_hex(4)}"
        self.workdir = Path(tempfile.mkdtemp(prefix="roomcast-bench-"))
        self.ports, self.procs, self._logs, self._queues = [], [], [], []
        self.restarts += 1
        self.start()

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.cleanup()

    # -- addresses ---------------------------------------------------------------------

    def ws_url(self, node: int) -> str:
        port = self.ports[node % len(self.ports)]
        return f"ws://127.0.0.1:{port}{SOCKETIO_PATH}/?EIO=4&transport=websocket"

    # -- readings ----------------------------------------------------------------------

    def pids(self) -> list[int]:
        """Every process of the target: the started ones and their descendants."""
        found = [p.pid for p in self.procs if p.poll() is None]
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    stat = (entry / "stat").read_text()
                    ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
                    children.setdefault(ppid, []).append(int(entry.name))
        queue = list(found)
        while queue:
            for child in children.get(queue.pop(), []):
                found.append(child)
                queue.append(child)
        return found

    def rss_bytes(self) -> int:
        """Resident memory summed over the target's processes."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        return total

    def cpu_seconds(self) -> float:
        """User + system CPU seconds used so far by the target's processes."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError, ValueError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                total += (int(fields[11]) + int(fields[12])) / tick
        return total

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def stats(self) -> list[dict[str, Any]]:
        """The python-socketio baseline's ``/stats`` of every process."""
        import json

        out = []
        for port in self.ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as r:
                out.append(json.loads(r.read()))
        return out

    def broker_frames(self) -> list[int]:
        """Messages each process has received from the broker so far: roomcast's
        ``roomcast_broker_frames_received_total``, the baseline's pub/sub count."""
        if self.spec.server == "python-socketio":
            return [int(s["pubsub_messages"]) for s in self.stats()]
        if self.spec.server != "roomcast":
            raise TargetError(f"no broker counter for {self.spec.key}")
        counts = []
        pattern = re.compile(r"^roomcast_broker_frames_received_total\{[^}]*\}\s+(\S+)", re.M)
        for port in self.ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
            match = pattern.search(text)
            counts.append(int(float(match.group(1))) if match else 0)
        return counts

    def hot_path_seconds(self) -> dict[str, tuple[float, float]] | None:
        """roomcast's per-batch durations so far, summed over its processes:
        ``{"store_append": (seconds, batches), "broker_publish": (seconds, batches)}``
        from the ``roomcast_*_seconds`` histograms of ``/metrics``; None for a baseline."""
        if self.spec.server != "roomcast":
            return None
        totals = {step: [0.0, 0.0] for step in HOT_PATH_STEPS}
        for port in self.ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
            for step, sums in totals.items():
                for i, kind in enumerate(("sum", "count")):
                    pattern = rf"^roomcast_{step}_seconds_{kind}\{{[^}}]*\}}\s+(\S+)"
                    found = re.search(pattern, text, re.M)
                    sums[i] += float(found.group(1)) if found else 0.0
        return {step: (seconds, batches) for step, (seconds, batches) in totals.items()}

    def broker_bytes(self) -> list[int]:
        """Bytes each process has received on its TCP connections to the broker
        (``bytes_received`` of ``ss -ti``; every connection, commands' replies included)."""
        port = BROKER_PORTS.get(self.spec.broker)
        if port is None:
            return [0] * len(self.procs)
        out = subprocess.run(
            ["ss", "-tinpH", f"dport = :{port}"], capture_output=True, text=True, timeout=10
        ).stdout
        by_pid: dict[int, int] = {}
        pid = None
        for line in out.splitlines():
            found = re.search(r"pid=(\d+)", line)
            if found:
                pid = int(found.group(1))
                continue
            received = re.search(r"bytes_received:(\d+)", line)
            if received and pid is not None:
                by_pid[pid] = by_pid.get(pid, 0) + int(received.group(1))
                pid = None
        return [by_pid.get(p.pid, 0) for p in self.procs]

    def log_issues(self, limit: int = 6) -> dict[str, Any]:
        """Warning and error lines the processes logged, before a restart included: their
        count, and a sample of distinct ones (log lines without their time stamp, and the
        exception lines of tracebacks)."""
        count, sample = self._earlier_issues["count"], list(self._earlier_issues["sample"])
        for log in self._logs:
            with contextlib.suppress(OSError):
                for line in log.read_text(errors="replace").splitlines():
                    if re.search(r"\b(WARNING|ERROR|CRITICAL)\b", line):
                        count += 1
                    elif not re.match(r"[\w.]+(Error|Exception)\b", line):
                        continue
                    text = re.sub(r"^\d{4}-\d\d-\d\d [\d:,.]+ ", "", line)[:300]
                    if text not in sample and len(sample) < limit:
                        sample.append(text)
        return {"count": count, "sample": sample}
