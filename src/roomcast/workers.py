"""``roomcast serve --workers N``: N processes on one port, no sticky load balancer needed.

The parent binds the port once and starts N worker processes that accept on the same
socket; each worker is a full node (its own broker subscriptions, only for its own members)
and the workers share rooms through the broker like nodes on different hosts do.

WebSocket connections live on whichever worker accepted them. Long-polling is the hard part:
an Engine.IO session lives in one worker, but the kernel hands each new HTTP request to any
of them. So every worker also listens on a private Unix socket, every Engine.IO session id
starts with the tag of the worker that owns it (``w3.``), and a polling request (or a
WebSocket upgrade of a polling session) that reaches another worker is forwarded to the
owner over its Unix socket.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .config import Settings
from .exceptions import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """Where a worker sits among its siblings."""

    index: int
    count: int
    socket_dir: str

    def uds(self, index: int) -> str:
        return os.path.join(self.socket_dir, f"w{index}.sock")

    def handoff(self, index: int) -> str:
        """Where worker ``index`` takes the connections its siblings hand it."""
        return os.path.join(self.socket_dir, f"w{index}.handoff")

    def tag(self) -> str:
        return f"w{self.index}."

    def owner(self, sid: str) -> int | None:
        """The index of the worker that owns an Engine.IO session id, if tagged."""
        head, dot, _ = sid.partition(".")
        if not dot or not head.startswith("w") or not head[1:].isdigit():
            return None
        index = int(head[1:])
        return index if index < self.count else None


def check(settings: Settings, workers: int) -> None:
    if workers > 1 and urlsplit(settings.broker_url).scheme == "memory":
        raise ConfigError(
            "--workers > 1 needs a broker the workers share: "
            "--broker-url redis://..., amqp://... or nats://..."
        )


def serve(settings: Settings, workers: int) -> int:
    """Run ``workers`` worker processes on one port until SIGINT/SIGTERM."""
    check(settings, workers)
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((settings.host, settings.port))
    listener.listen(2048)
    listener.set_inheritable(True)
    socket_dir = tempfile.mkdtemp(prefix="roomcast-workers-")
    context = multiprocessing.get_context("spawn")
    stopping = threading.Event()
    processes: dict[int, Any] = {}

    def start(index: int) -> None:
        info = WorkerInfo(index, workers, socket_dir)
        process = context.Process(
            target=_worker_main,
            args=(settings.model_dump(), info, listener),
            name=f"roomcast-worker-{index}",
        )
        process.start()
        processes[index] = process

    def stop(*_: object) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for index in range(workers):
            start(index)
        log.info("roomcast: %d workers on http://%s:%d", workers, settings.host, settings.port)
        while not stopping.wait(0.5):
            for index, process in list(processes.items()):
                if not process.is_alive() and not stopping.is_set():
                    log.warning("worker %d exited with %s; restarting it", index, process.exitcode)
                    start(index)
    finally:
        for process in processes.values():
            if process.is_alive():
                process.terminate()
        for process in processes.values():
            process.join(15)
            if process.is_alive():
                process.kill()
                process.join(5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        listener.close()
        shutil.rmtree(socket_dir, ignore_errors=True)
    return 0


def _worker_main(settings_data: dict[str, Any], info: WorkerInfo, listener: socket.socket) -> None:
    from .app import RoomcastApp
    from .server import run
    from .transports.handoff import handoff_socket

    settings = Settings(**settings_data)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s w{info.index} %(name)s: %(message)s",
    )
    path = info.uds(info.index)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    private = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    private.bind(path)
    private.listen(512)
    handoff = handoff_socket(info.handoff(info.index))
    app = RoomcastApp(settings, worker=info)
    run(app, [listener, private], handoff=handoff, log_level=settings.log_level)
