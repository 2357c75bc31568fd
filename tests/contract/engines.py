"""URLs of every engine for the contract suites, each namespaced per test and cleaned up."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from tests import services
from tests.redis_server import shared_redis_cluster, shared_redis_sentinel

BROKERS = ["memory", "redis", "redis-cluster", "redis-sentinel", "amqp", "nats"]
PRESENCES = ["memory", "redis", "redis-cluster", "redis-sentinel", "sqlite", "postgresql"]


def unique(label: str = "t") -> str:
    return f"{label}{uuid.uuid4().hex[:12]}"


@contextlib.asynccontextmanager
async def engine_url(kind: str, tmp_path: Path) -> AsyncIterator[str]:
    """A URL for ``kind`` that no other test uses; the engine's leftovers are removed after."""
    prefix = unique()
    if kind == "memory":
        yield f"memory://{prefix}"
    elif kind == "redis":
        services.require("Redis", services.REDIS_HOST, services.REDIS_PORT)
        yield f"{services.REDIS_URL}/0?prefix={prefix}"
        await _redis_cleanup(prefix)
    elif kind == "redis-cluster":
        servers = shared_redis_cluster()
        yield f"{servers.url}&prefix={prefix}"
        await _redis_cleanup(prefix, servers.ports)
    elif kind == "redis-sentinel":
        sentinel = shared_redis_sentinel()
        yield f"{sentinel.url}?prefix={prefix}"
        await _redis_cleanup(prefix, [sentinel.primary()])
    elif kind == "amqp":
        services.require("RabbitMQ", services.RABBITMQ_HOST, services.RABBITMQ_PORT)
        yield f"{services.RABBITMQ_URL}?prefix={prefix}"
    elif kind == "nats":
        services.require("NATS", services.NATS_HOST, services.NATS_PORT)
        yield f"{services.NATS_URL}?prefix={prefix}"
    elif kind == "sqlite":
        yield f"sqlite:///{tmp_path}/{prefix}.db"
    elif kind == "postgresql":
        services.require("PostgreSQL", services.POSTGRES_HOST, services.POSTGRES_PORT)
        yield f"{services.POSTGRES_URL}?schema={prefix}"
        await _postgres_cleanup(prefix)
    else:  # pragma: no cover
        raise ValueError(kind)


async def _redis_cleanup(prefix: str, ports: list[int] | None = None) -> None:
    """Delete the prefix's keys (on every node of a cluster, given their ports)."""
    import redis.asyncio as redis

    for port in ports or [services.REDIS_PORT]:
        client = redis.Redis(host=services.REDIS_HOST, port=port)
        try:
            keys = [key async for key in client.scan_iter(match=f"*{prefix}*", count=1000)]
            for key in keys:  # one by one: on a cluster, keys of one node's slots only
                with contextlib.suppress(redis.ResponseError):  # a replica's: its primary's
                    await client.delete(key)
        except redis.ConnectionError:
            continue  # a node a test killed
        finally:
            await client.aclose()


async def _postgres_cleanup(schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(services.POSTGRES_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
