"""Real roomcast servers for tests: subprocesses on free loopback ports, stopped in teardown.

Every wait is bounded; a server that does not come up fails the test with its log.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.ports import free_port

START_TIMEOUT = 20.0


@dataclass
class Server:
    """A running ``roomcast serve`` process."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __str__(self) -> str:
        return self.url

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up (a crashed node)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        """SIGTERM and wait for a clean exit (bounded), then SIGKILL."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"roomcast exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"roomcast did not answer /healthz within {timeout}s:\n{log.read_text()}")


def start_server(
    *args: str,
    store_url: str | None = None,
    port: int | None = None,
    env: dict[str, str] | None = None,
    log_dir: Path | None = None,
) -> Server:
    """Start ``python -m roomcast serve`` on 127.0.0.1 and wait until it is healthy."""
    port = port or free_port()
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="roomcast-"))
    log = log_dir / f"server-{port}.log"
    if store_url is None:
        store_url = f"sqlite:///{log_dir}/roomcast-{port}.db"
    command = [
        sys.executable, "-m", "roomcast", "serve",
        "--host", "127.0.0.1", "--port", str(port), "--store-url", store_url,
        "--log-level", "warning", "--grpc-port", "0", *args,
    ]  # fmt: skip
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=full_env)
    server = Server(process, port, log)
    try:
        wait_healthy(server.url, process, log, START_TIMEOUT)
    except BaseException:
        server.kill()
        raise
    return server


@contextlib.contextmanager
def run_server(*args: str, **kwargs: object) -> Iterator[Server]:
    """A server for the duration of a ``with`` block (see :func:`start_server`)."""
    server = start_server(*args, **kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()


def every_workers_metrics(url: str, workers: int) -> dict[str, str]:
    """Each worker's /metrics, by node id: fresh connections until all have answered
    (the kernel picks the worker), bounded."""
    seen: dict[str, str] = {}
    for _ in range(500):
        text = httpx.get(url + "/metrics", headers={"Connection": "close"}, timeout=10).text
        node = re.search(r'^roomcast_connections\{node="([^"]+)"\}', text, re.MULTILINE)
        assert node is not None, text[:500]
        seen[node.group(1)] = text
        if len(seen) == workers:
            return seen
    raise AssertionError(f"only {len(seen)} of {workers} workers answered /metrics")


def metric_total(texts: dict[str, str], name: str, **labels: str) -> float:
    """The sum over every worker of ``name``'s samples that carry ``labels``."""
    total = 0.0
    for text in texts.values():
        for found, value in re.findall(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.MULTILINE):
            have = dict(re.findall(r'(\w+)="([^"]*)"', found))
            if all(have.get(k) == v for k, v in labels.items()):
                total += float(value)
    return total
