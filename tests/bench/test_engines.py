"""``python -m bench.engines``: one broker hop and one store append per engine, over the
real services, each operation accounted for."""

from __future__ import annotations

import json
from pathlib import Path

from bench import engines
from tests import services


def test_every_engine_is_measured_with_nothing_lost(tmp_path: Path) -> None:
    services.require("Redis", services.REDIS_HOST, services.REDIS_PORT)
    services.require("RabbitMQ", services.RABBITMQ_HOST, services.RABBITMQ_PORT)
    services.require("NATS", services.NATS_HOST, services.NATS_PORT)
    services.require("PostgreSQL", services.POSTGRES_HOST, services.POSTGRES_PORT)
    output = tmp_path / "engines.json"

    quick = ["--rounds", "1", "--rate", "100", "--seconds", "0.3", "--warmup", "0.1"]
    engines.main([*quick, "--output", str(output)])

    results = json.loads(output.read_text())
    assert set(results["brokers"]) == {"redis", "rabbitmq", "nats"}
    for name, (one,) in results["brokers"].items():
        assert one["lost"] == 0, name
        assert one["hop"]["n"] == 30, name
        assert one["publish"]["n"] == 30, name
        assert 0 < one["hop"]["p50_ms"] <= one["hop"]["p99_ms"], name
    assert set(results["stores"]) == {"sqlite", "postgresql"}
    for name, (one,) in results["stores"].items():
        assert one["append"]["n"] == 30, name
        assert 0 < one["append"]["p50_ms"] <= one["append"]["p99_ms"], name
    assert "| rabbitmq | broker hop |" in results["table"]
