"""Running a roomcast node under uvicorn, as ``roomcast serve`` and its workers do.

Embedding applications run :func:`~roomcast.app.create_app` under their own server and
keep their own process policies; what is here applies only to processes roomcast owns.
"""

from __future__ import annotations

import gc
import socket
from typing import Any

import uvicorn

from .app import RoomcastApp
from .transports.engine import EngineDoor

GC_THRESHOLDS = (20_000, 20, 20)
"""The cyclic garbage collector's thresholds in a roomcast process.

Python's default (700 allocations between young collections) makes a busy chat node run
a full collection every few seconds, and a full collection walks every object a thousand
connections keep alive: pauses of 100-200 ms that every member of every room feels as
latency. Fewer, larger young collections, and the objects of start-up frozen out of the
collector's reach (see :func:`freeze_startup_objects`), make full collections rare and
short. Reference counting still frees everything that is not part of a cycle at once."""


def freeze_startup_objects() -> None:
    """Move everything alive after start-up (modules, settings, engines) out of the cyclic
    collector's generations: they live as long as the process and need not be walked."""
    gc.collect()
    gc.freeze()


def uvicorn_config(app: RoomcastApp, **options: Any) -> uvicorn.Config:
    """uvicorn's configuration for a roomcast node: roomcast's WebSocket protocols (Engine.IO
    sessions opened on a WebSocket served without a task or queue, and the fast path for the
    rest), no permessage-deflate (shared frames), and no WebSocket-level keepalive pings —
    Engine.IO pings every client already and drops the ones that stop answering."""
    return uvicorn.Config(
        app,
        lifespan="on",
        ws=EngineDoor(app).protocol_class(),
        ws_max_size=1 << 20,
        ws_per_message_deflate=False,
        ws_ping_interval=None,
        ws_ping_timeout=None,
        **options,
    )


def run(app: RoomcastApp, sockets: list[socket.socket] | None = None, **options: Any) -> None:
    """Serve ``app`` in this process until it is told to stop."""
    gc.set_threshold(*GC_THRESHOLDS)
    app.on_started.append(freeze_startup_objects)
    uvicorn.Server(uvicorn_config(app, **options)).run(sockets=sockets)
