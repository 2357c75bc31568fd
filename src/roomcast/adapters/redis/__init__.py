"""The Redis engine: a broker on sharded pub/sub and presence shared by every node.

``redis://HOST:PORT/DB?prefix=NAME`` (or ``rediss://`` for TLS). Every key and channel
starts with ``NAME`` (default ``roomcast``), so several clusters or test runs can share one
Redis; the other query parameters are redis-py connection options. With ``cluster=true`` the
address is any node of a Redis Cluster (see :mod:`.cluster`). The layout of keys and
channels is written in :mod:`.broker` and :mod:`.presence`.
"""

from __future__ import annotations

from .broker import RedisBroker, is_cluster
from .cluster import RedisClusterBroker
from .presence import RedisPresence

__all__ = ["RedisBroker", "RedisClusterBroker", "RedisPresence", "is_cluster"]
