"""Running a roomcast node under uvicorn, as ``roomcast serve`` and its workers do.

Embedding applications run :func:`~roomcast.app.create_app` under their own server and
keep their own process policies; what is here applies only to processes roomcast owns.
"""

from __future__ import annotations

import gc
import socket
import sys
from typing import Any

import uvicorn

from .app import RoomcastApp
from .transports.engine import EngineDoor
from .transports.handoff import HandoffReceiver

GC_THRESHOLDS = (20_000, 20, 20)
"""The cyclic garbage collector's thresholds in a roomcast process.

Python's default (700 allocations between young collections) makes a busy chat node run
a full collection every few seconds, and a full collection walks every object a thousand
connections keep alive: pauses of 100-200 ms that every member of every room feels as
latency. Fewer, larger young collections, and the objects of start-up frozen out of the
collector's reach (see :func:`freeze_startup_objects`), make full collections rare and
short. Reference counting still frees everything that is not part of a cycle at once."""


SWITCH_INTERVAL = 0.0005
"""Seconds a thread may hold the GIL while another waits for it, in a roomcast process.

The SQLite store runs on a thread of its own; when it has committed a batch it needs the
GIL back to hand the result to the event loop. With Python's default (5 ms) a busy event
loop keeps it waiting for up to that long, and every message of the batch waits with it:
p99 latency at 200 msgs/s went from 2.5-2.8 ms to 1.8-1.9 ms with 0.5 ms, and throughput
did not change (``python -m bench --targets roomcast-1 --scenarios A,B``)."""


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


def run(
    app: RoomcastApp,
    sockets: list[socket.socket] | None = None,
    *,
    handoff: socket.socket | None = None,
    **options: Any,
) -> None:
    """Serve ``app`` in this process until it is told to stop; a worker also takes the
    connections its siblings hand it on ``handoff`` (see :mod:`roomcast.transports.handoff`)."""
    gc.set_threshold(*GC_THRESHOLDS)
    sys.setswitchinterval(SWITCH_INTERVAL)
    config = uvicorn_config(app, **options)
    server = uvicorn.Server(config)
    if handoff is not None:

        def http_protocol() -> Any:
            # What uvicorn gives a connection it accepted: its HTTP protocol, which hands
            # a WebSocket upgrade on to roomcast's (config.ws).
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=server.server_state, app_state=server.lifespan.state
            )

        receiver = HandoffReceiver(handoff, http_protocol)
        app.node.metrics.collector.handoff_receiver = receiver
        app.on_started.append(receiver.start)
    app.on_started.append(freeze_startup_objects)
    server.run(sockets=sockets)
