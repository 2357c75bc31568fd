"""Removing what a benchmark cluster left in the shared engines after its processes stopped.

Every cluster works under a unique name (``bench<hex>``), so only its own state goes:

- Redis: roomcast's keys ``<prefix>:*`` (pub/sub channels, python-socketio's and the
  redis-adapter's, hold no keys);
- RabbitMQ: roomcast's exchange ``<prefix>`` (auto-delete; removed if still there), and the
  python-socketio manager's exchange ``<prefix>`` with the queues its processes declared
  (they would otherwise linger until their ``x-expires``);
- PostgreSQL: the schema ``<prefix>`` (roomcast's shared history);
- NATS: core NATS keeps nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .targets import TargetSpec

Step = Callable[[], None]


def steps(spec: TargetSpec, prefix: str, queues: list[str], shared_store: str) -> list[Step]:
    """The cleanup steps for one cluster, each safe to run when there is nothing to do."""
    from .targets import POSTGRES_URL

    out: list[Step] = []
    if spec.broker == "redis":

        def redis_keys() -> None:
            import redis

            client = redis.Redis(host="127.0.0.1", port=6379, db=0, socket_timeout=5)
            try:
                batch = list(client.scan_iter(match=f"{prefix}:*", count=1000))
                for i in range(0, len(batch), 500):
                    client.delete(*batch[i : i + 500])
            finally:
                client.close()

        out.append(redis_keys)
    if spec.broker == "rabbitmq":

        def rabbitmq() -> None:
            asyncio.run(asyncio.wait_for(rabbit_delete(prefix, queues), 15))

        out.append(rabbitmq)
    if spec.server == "roomcast" and spec.processes > 1 and shared_store == "postgres":

        def postgres_schema() -> None:
            asyncio.run(asyncio.wait_for(drop_schema(POSTGRES_URL, prefix), 15))

        out.append(postgres_schema)
    return out


async def rabbit_delete(exchange: str, queues: list[str]) -> None:
    """Delete a RabbitMQ exchange and the named queues, each if it is still there."""
    import aio_pika

    connection = await aio_pika.connect("amqp://guest:guest@127.0.0.1:5672/")
    try:
        for queue in queues:
            channel = await connection.channel()
            try:
                await channel.queue_delete(queue)
            except aio_pika.exceptions.ChannelClosed:
                pass  # already gone
        channel = await connection.channel()
        try:
            await channel.exchange_delete(exchange)
        except aio_pika.exceptions.ChannelClosed:
            pass
    finally:
        await connection.close()


async def drop_schema(url: str, schema: str) -> None:
    """Drop a PostgreSQL schema and everything in it, if it exists."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
