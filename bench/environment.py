"""What the numbers were measured on: the machine, and the versions of everything involved."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from .targets import NATS, NODE_DIR, REDIS

REPO = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], timeout: float = 10.0, cwd: Path | None = None) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        return done.stdout.strip()
    return ""


def machine() -> dict[str, Any]:
    """nproc, memory, CPU model, kernel."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "cpu": model or platform.processor(),
        "kernel": platform.release(),
    }


def _dist(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _npm_version(package: str) -> str | None:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads((NODE_DIR / "node_modules" / package / "package.json").read_text())
        return str(data["version"])
    return None


def _redis_version() -> str | None:
    with contextlib.suppress(Exception):
        import redis

        client = redis.Redis(host=REDIS[0], port=REDIS[1], socket_timeout=2)
        try:
            return str(client.info("server")["redis_version"])
        finally:
            client.close()
    return None


def _nats_version() -> str | None:
    with contextlib.suppress(OSError, ValueError):
        with socket.create_connection(NATS, timeout=2) as s:
            line = s.makefile("rb").readline().decode()
        if line.startswith("INFO "):
            return str(json.loads(line[5:])["version"])
    return None


def _rabbitmq_version() -> str | None:
    with contextlib.suppress(Exception):
        import asyncio

        import aio_pika

        async def read() -> str:
            conn = await aio_pika.connect("amqp://guest:guest@127.0.0.1:5672/", timeout=3)
            try:
                props = conn.transport.connection.server_properties  # type: ignore[union-attr]
                value = props.get("version", b"")
                return value.decode() if isinstance(value, bytes) else str(value)
            finally:
                await conn.close()

        return asyncio.run(asyncio.wait_for(read(), 5))
    return None


def _postgres_version() -> str | None:
    out = _run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-tAc", "show server_version"]
    )
    return out.split()[0] if out else None


def tree() -> dict[str, Any]:
    """The commit measured and whether roomcast's sources differ from it."""
    commit = _run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO)
    changed = _run(["git", "status", "--porcelain", "--", "src"], cwd=REPO)
    return {
        "commit": commit or None,
        "uncommitted_src_files": len([line for line in changed.splitlines() if line.strip()]),
    }


def versions() -> dict[str, Any]:
    node = shutil.which("node")
    return {
        "python": platform.python_version(),
        "roomcast": _dist("roomcast"),
        "python-socketio": _dist("python-socketio"),
        "python-engineio": _dist("python-engineio"),
        "uvicorn": _dist("uvicorn"),
        "websockets": _dist("websockets"),
        "uvloop": _dist("uvloop"),
        "picows": _dist("picows"),
        "node": _run([node, "--version"]).lstrip("v") if node else None,
        "socket.io": _npm_version("socket.io"),
        "@socket.io/redis-adapter": _npm_version("@socket.io/redis-adapter"),
        "redis (server)": _redis_version(),
        "rabbitmq": _rabbitmq_version(),
        "nats-server": _nats_version(),
        "postgresql": _postgres_version(),
        "executable": sys.executable,
    }
