"""``roomcast serve --workers N``: N processes on one port, no sticky load balancer needed.

The parent binds the port and starts N worker processes; each worker is a full node (its
own broker subscriptions, only for its own members) and the workers share rooms through the
broker like nodes on different hosts do. On Linux each worker accepts on a listening socket
of its own, all bound to the port with ``SO_REUSEPORT``, so the kernel spreads connections
over the workers by a hash of their addresses. On one socket shared by every worker (the
fallback elsewhere) the worker that wakes first takes each connection: under a steady
trickle of connections that is nearly always the same one, and long-lived WebSocket
connections pile up on it while the others idle.

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
import sys
import tempfile
import threading
import time
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
    parent: int = 0
    """The supervisor's process id (0: none to watch)."""

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
    if workers > 1 and settings.node_id is not None:
        longest = worker_node_id(settings.node_id, workers - 1)
        if len(longest) > NODE_ID_MAX:
            raise ConfigError(
                f"--node-id {settings.node_id!r} is too long for {workers} workers: each worker "
                f"is node '<node id>-w<index>' ({longest!r}), at most {NODE_ID_MAX} characters"
            )


NODE_ID_MAX = 64
"""The longest node id (see ``Settings.node_id``)."""


def worker_node_id(node_id: str, index: int) -> str:
    """The node id of worker ``index`` of a server started with ``--node-id node_id``.

    Every worker is a node of the cluster: the ids of its connections, its inbox and its
    presence entries are made from its node id, so siblings sharing one would take each
    other's members for their own (one worker's client leaving removed another worker's)."""
    return f"{node_id}-w{index}"


def serve(settings: Settings, workers: int) -> int:
    """Run ``workers`` worker processes on one port until SIGINT/SIGTERM."""
    check(settings, workers)
    listeners = _listeners(settings.host, settings.port, workers)
    socket_dir = tempfile.mkdtemp(prefix="roomcast-workers-")
    context = multiprocessing.get_context("spawn")
    stopping = threading.Event()
    processes: dict[int, Any] = {}

    def start(index: int) -> None:
        info = WorkerInfo(index, workers, socket_dir, os.getpid())
        process = context.Process(
            target=_worker_main,
            args=(settings.model_dump(), info, listeners[index % len(listeners)]),
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
        for listener in listeners:
            listener.close()
        shutil.rmtree(socket_dir, ignore_errors=True)
    return 0


REUSEPORT = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")
"""Whether the kernel spreads connections over sockets bound to one port with
``SO_REUSEPORT`` (Linux does; elsewhere the option exists without the spreading)."""


def _listeners(host: str, port: int, workers: int) -> list[socket.socket]:
    """The listening sockets of ``workers`` workers: one each where :data:`REUSEPORT`, kept
    by the parent so that a worker that is restarted finds its socket, and what waited in
    its backlog, again; else one for all.

    The port is bound first without ``SO_REUSEPORT``: a port another process listens on —
    another roomcast with workers included — fails to start the server instead of being
    shared with it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror}") from error
        port = probe.getsockname()[1]  # port 0: the one the system chose, for every worker
    listeners: list[socket.socket] = []
    try:
        for _ in range(workers if REUSEPORT else 1):
            listener = socket.socket(family, socket.SOCK_STREAM)
            listeners.append(listener)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if REUSEPORT:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.bind((host, port))
            listener.listen(2048)
            listener.set_inheritable(True)
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def _worker_main(settings_data: dict[str, Any], info: WorkerInfo, listener: socket.socket) -> None:
    from .app import RoomcastApp
    from .server import run
    from .transports.handoff import handoff_socket

    if settings_data.get("node_id"):
        settings_data = {
            **settings_data,
            "node_id": worker_node_id(settings_data["node_id"], info.index),
        }
    settings = Settings(**settings_data)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s w{info.index} %(name)s: %(message)s",
    )
    if info.parent:
        _stop_when_orphaned(info.parent)
    path = info.uds(info.index)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    private = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    private.bind(path)
    private.listen(512)
    handoff = handoff_socket(info.handoff(info.index))
    app = RoomcastApp(settings, worker=info)
    run(app, [listener, private], handoff=handoff, log_level=settings.log_level)


PARENT_CHECK = 1.0
"""Seconds between a worker's looks at whether its supervisor is still there."""


def _stop_when_orphaned(parent: int) -> None:
    """Stop this worker (SIGTERM: a graceful stop, its clients told to reconnect) once its
    supervisor has gone — killed with ``kill -9``, say, which gives it no chance to stop its
    workers. Orphaned workers would go on serving the port, unsupervised, and a new
    ``roomcast serve`` could not listen on it."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK)
        log.warning("the supervisor (pid %d) has gone; stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="roomcast-parent-watch", daemon=True).start()
