"""The RabbitMQ engine: a :class:`~roomcast.core.ports.Broker` on a topic exchange, with one
exclusive queue per node and a binding per room (see :mod:`.broker` for the layout).

Opened by ``amqp://USER:PASS@HOST:PORT/VHOST?prefix=NAME`` (or ``amqps://``); needs the
``rabbitmq`` extra (aio-pika).
"""

from __future__ import annotations

from .broker import RabbitBroker

__all__ = ["RabbitBroker"]
