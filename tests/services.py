"""The external services the service tests use, and a guard that skips or fails without them.

The machine (and CI) runs PostgreSQL, Redis, RabbitMQ and NATS on their default ports on
loopback. Locally a test that needs a missing service is skipped; under ``CI=true`` it fails,
so CI can never pass by skipping.
"""

from __future__ import annotations

import os
import socket

import pytest

POSTGRES_HOST = "127.0.0.1"
POSTGRES_PORT = 5432
POSTGRES_URL = f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/test"
"""Trust authentication, user ``postgres``, database ``test``."""

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}"

RABBITMQ_HOST = "127.0.0.1"
RABBITMQ_PORT = 5672
RABBITMQ_URL = f"amqp://guest:guest@{RABBITMQ_HOST}:{RABBITMQ_PORT}/"

NATS_HOST = "127.0.0.1"
NATS_PORT = 4222
NATS_URL = f"nats://{NATS_HOST}:{NATS_PORT}"


def require(service: str, host: str, port: int) -> None:
    """Skip the calling test unless ``host:port`` accepts TCP connections (fail under CI)."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return
    except OSError:
        pass
    reason = f"{service} not reachable at {host}:{port}"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)
