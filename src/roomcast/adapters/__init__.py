"""Engines behind the ports, chosen by URL scheme and imported only when used.

=============================  =========================================  ============
URL                            what                                       extra
=============================  =========================================  ============
``memory://[NAME]``            in-process broker / presence / history     (none)
``sqlite:///PATH``             durable history in SQLite                  (none)
``postgresql://...``           durable history in PostgreSQL              ``postgres``
``redis://HOST:PORT/DB``       broker (sharded pub/sub) and presence      ``redis``
``redis://HOST:PORT?cluster=   the same on a Redis Cluster (any node's    ``redis``
true``                         address)
``redis+sentinel://HOST:PORT   the same on the primary that Redis         ``redis``
/SERVICE``                     Sentinel names for SERVICE
``amqp://USER:PASS@HOST/VH``   broker (RabbitMQ topic exchange)           ``rabbitmq``
``nats://HOST:PORT``           broker (a subject per room)                ``nats``
=============================  =========================================  ============

Every network URL takes ``?prefix=NAME`` to namespace its keys, channels, exchanges or
subjects, so several roomcast clusters (or test runs) can share one engine.

Nodes in one process that open the same ``memory://NAME`` share one broker bus and one
presence table, which is how tests run a cluster without a network; a plain ``memory://``
is private to the node that opens it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from ..core.ports import Broker, History, Presence
from ..exceptions import ConfigError

REDIS_SCHEMES = ("redis", "rediss", "redis+sentinel", "rediss+sentinel")
"""The URL schemes of the Redis engine (one server, a cluster, or Sentinel's primary)."""

_memory_presence: dict[str, Presence] = {}


def _scheme(url: str) -> str:
    scheme = urlsplit(url).scheme.lower()
    if not scheme:
        raise ConfigError(f"{url!r} is not a URL (expected scheme://...)")
    return scheme


def _missing(extra: str, exc: ImportError) -> ConfigError:
    return ConfigError(
        f"this engine needs an optional dependency: pip install 'roomcast[{extra}]' ({exc})"
    )


def open_broker(url: str) -> Broker:
    """A broker for the URL (not started)."""
    scheme = _scheme(url)
    if scheme == "memory":
        from .memory import MemoryBroker

        return MemoryBroker(urlsplit(url).netloc)
    if scheme in REDIS_SCHEMES:
        try:
            from .redis import RedisBroker, RedisClusterBroker, is_cluster
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise _missing("redis", exc) from exc
        return RedisClusterBroker(url) if is_cluster(url) else RedisBroker(url)
    if scheme in ("amqp", "amqps"):
        try:
            from .rabbitmq import RabbitBroker
        except ImportError as exc:  # pragma: no cover
            raise _missing("rabbitmq", exc) from exc
        return RabbitBroker(url)
    if scheme in ("nats", "tls"):
        try:
            from .nats import NatsBroker
        except ImportError as exc:  # pragma: no cover
            raise _missing("nats", exc) from exc
        return NatsBroker(url)
    raise ConfigError(
        f"unknown broker URL scheme {scheme!r} (expected memory://, redis://, amqp:// or nats://)"
    )


def open_history(url: str) -> History:
    """A history store for the URL (not started)."""
    scheme = _scheme(url)
    if scheme == "memory":
        from .memory import MemoryHistory

        return MemoryHistory()
    if scheme in ("sqlite", "postgresql", "postgres"):
        try:
            from .sql import SqlHistory
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise _missing("postgres", exc) from exc
        return SqlHistory(url)
    raise ConfigError(
        f"unknown store URL scheme {scheme!r} (expected sqlite:///, postgresql:// or memory://)"
    )


def open_presence(url: str) -> Presence:
    """A presence engine for the URL (not started)."""
    scheme = _scheme(url)
    if scheme == "memory":
        from .memory import MemoryPresence

        name = urlsplit(url).netloc
        if not name:
            return MemoryPresence()
        if name not in _memory_presence:
            _memory_presence[name] = MemoryPresence()
        return _memory_presence[name]
    if scheme in REDIS_SCHEMES:
        try:
            from .redis import RedisPresence
        except ImportError as exc:  # pragma: no cover
            raise _missing("redis", exc) from exc
        return RedisPresence(url)
    if scheme in ("sqlite", "postgresql", "postgres"):
        try:
            from .sql import SqlPresence
        except ImportError as exc:  # pragma: no cover
            raise _missing("postgres", exc) from exc
        return SqlPresence(url)
    raise ConfigError(
        f"unknown presence URL scheme {scheme!r} (expected memory://, redis://, sqlite:/// "
        "or postgresql://)"
    )
