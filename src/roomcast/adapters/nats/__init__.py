"""The NATS engine: a :class:`~roomcast.core.ports.Broker` on core NATS, with a subject per
room and one per node's inbox (see :mod:`.broker` for the layout).

Opened by ``nats://HOST:PORT?prefix=NAME`` (or ``tls://``; several servers comma-separated);
needs the ``nats`` extra (nats-py).
"""

from __future__ import annotations

from .broker import NatsBroker

__all__ = ["NatsBroker"]
