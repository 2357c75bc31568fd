"""``python -m bench.reads``: history reads many at once, per store, over the real
services, every read answered with the room's real contents."""

from __future__ import annotations

import json
from pathlib import Path

from bench import reads
from tests import services


def test_every_store_is_measured_at_every_concurrency(tmp_path: Path) -> None:
    services.require("PostgreSQL", services.POSTGRES_HOST, services.POSTGRES_PORT)
    output = tmp_path / "reads.json"

    reads.main(["--rounds", "1", "--concurrency", "1,8", "--reads", "80", "--output", str(output)])

    results = json.loads(output.read_text())
    assert set(results["concurrency"]) == {"1", "8"}
    for level in ("1", "8"):
        at = results["concurrency"][level]
        assert set(at) == {"sqlite", "postgresql"}
        for name, (one,) in at.items():
            assert one["reads"] == 80, (level, name)
            assert one["reads_per_s"] > 0 and one["cpu_us_per_read"] > 0, (level, name)
    assert results["table"].startswith(
        "| store | reads/s, 1 at once | CPU µs per read, 1 at once | reads/s, 8 at once |"
    )
    assert "| postgresql | " in results["table"]
    assert results["tree"]["commit"]
