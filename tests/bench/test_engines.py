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

    quick = ["--rounds", "1", "--rates", "100,400", "--seconds", "0.3", "--warmup", "0.1"]
    engines.main([*quick, "--output", str(output)])

    results = json.loads(output.read_text())
    assert set(results["rates"]) == {"100", "400"}
    for rate, expected in (("100", 30), ("400", 120)):
        at = results["rates"][rate]
        assert set(at["brokers"]) == {"redis", "rabbitmq", "nats"}
        for name, (one,) in at["brokers"].items():
            assert one["lost"] == 0, (rate, name)
            assert one["hop"]["n"] == expected, (rate, name)
            assert one["publish"]["n"] == expected, (rate, name)
            assert 0 < one["hop"]["p50_ms"] <= one["hop"]["p99_ms"], (rate, name)
        assert set(at["stores"]) == {"sqlite", "postgresql"}
        for name, (one,) in at["stores"].items():
            assert one["append"]["n"] == expected, (rate, name)
            assert 0 < one["append"]["p50_ms"] <= one["append"]["p99_ms"], (rate, name)
    assert results["table"].startswith(
        "| engine | step | p50 ms at 100/s | p99 ms at 100/s | p50 ms at 400/s | p99 ms at 400/s |"
    )
    assert "| rabbitmq | broker hop |" in results["table"]
