"""The Redis engine: a broker on sharded pub/sub and presence shared by every node.

``redis://HOST:PORT/DB?prefix=NAME`` (or ``rediss://`` for TLS). Every key and channel
starts with ``NAME`` (default ``roomcast``), so several clusters or test runs can share one
Redis; the other query parameters are redis-py connection options. The layout of keys and
channels is written in :mod:`.broker` and :mod:`.presence`.
"""

from __future__ import annotations

from .broker import RedisBroker
from .presence import RedisPresence

__all__ = ["RedisBroker", "RedisPresence"]
