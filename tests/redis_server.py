"""A private ``redis-server`` on a free port, for tests that kill and restart Redis
without disturbing anything else."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis.asyncio as redis

WAIT = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)


class RedisServer:
    """A throw-away ``redis-server`` that keeps nothing on disk."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        with (self.directory / "redis.log").open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                self.binary,
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.directory)),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            deadline = time.monotonic() + WAIT
            while True:
                if self.process.returncode is not None:
                    raise RuntimeError(f"redis-server exited:\n{self.log()}")
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    if await client.ping():
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer PING:\n{self.log()}")
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()

    async def kill(self) -> None:
        """SIGKILL: Redis vanishes without closing anything, as in a crash."""
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGKILL)
            await asyncio.wait_for(process.wait(), WAIT)

    def pause(self, paused: bool) -> None:
        """SIGSTOP / SIGCONT: connections stay open but nothing answers (a hung server)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)

    def log(self) -> str:
        return (self.directory / "redis.log").read_text(errors="replace")


@contextlib.asynccontextmanager
async def private_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A running private Redis; skipped without redis-server (failed under CI=true)."""
    binary = shutil.which("redis-server")
    if binary is None:
        reason = "redis-server is not installed (needed to restart Redis under the broker)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    srv = RedisServer(binary, tmp_path)
    try:
        await srv.start()
        yield srv
    finally:
        await srv.kill()
