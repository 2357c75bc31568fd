"""The load generator's latency histogram: what the benchmark's p50 and p99 are read from."""

from __future__ import annotations

import random

from bench.histogram import bucket, histogram, merge, percentile_ms, width


def test_latencies_under_8_ms_are_told_apart_to_10_us() -> None:
    counts = histogram([1_050_000] * 99 + [1_150_000])
    assert percentile_ms(counts, 0.5) == 1.055
    assert percentile_ms(counts, 1.0) == 1.155


def test_every_latency_lies_in_its_bucket_and_long_ones_within_2_percent() -> None:
    rng = random.Random(7)
    for ns in [0, 9_999, 10_000, 6_400_000, (1 << 23) - 1, 1 << 23, 2_500_000_000] + [
        rng.randrange(0, 5_000_000_000) for _ in range(5000)
    ]:
        start = bucket(ns)
        assert start <= ns < start + width(start)
        assert width(start) <= max(10_000, ns * 0.016)


def test_a_failing_step_with_latencies_up_to_seconds_stays_small() -> None:
    counts = histogram(range(0, 3_000_000_000, 1_000))
    assert len(counts) < 2000


def test_quantiles_of_merged_replies_match_the_sorted_latencies() -> None:
    rng = random.Random(11)
    parts = [[rng.randrange(200_000, 40_000_000) for _ in range(3000)] for _ in range(3)]
    # Replies cross a pipe as JSON: bucket keys arrive as strings.
    merged = merge([{str(k): v for k, v in histogram(p).items()} for p in parts])
    ordered = sorted(ns for p in parts for ns in p)
    for q in (0.5, 0.9, 0.99):
        exact_ms = ordered[int(q * (len(ordered) - 1))] / 1e6
        measured = percentile_ms(merged, q)
        assert measured is not None
        assert abs(measured - exact_ms) <= max(0.01, exact_ms * 0.016)


def test_no_latency_no_quantile() -> None:
    assert percentile_ms(histogram([]), 0.99) is None
