"""The load generator's latency histograms: fine enough to tell 1.05 ms from 1.15 ms.

A latency (in ns) falls in a bucket named by its lower bound: 10 µs wide below 8.4 ms,
then 64 buckets per doubling (under 1.6 % of the value) up to any length, so a histogram
of a failing step, with latencies up to seconds, still has at most a few thousand buckets.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

FINE_NS = 10_000
"""Bucket width below :data:`FINE_LIMIT_NS`: 10 µs."""
FINE_LIMIT_NS = 1 << 23
"""8.4 ms: a power of two, so that every coarser bucket starts at or above it."""
SUB_BITS = 6
"""Above the fine range, 2**SUB_BITS buckets per doubling."""


def bucket(ns: int) -> int:
    """The bucket of a latency: the lower bound of its bucket, in ns."""
    if ns < FINE_LIMIT_NS:
        return ns - ns % FINE_NS
    size = 1 << (ns.bit_length() - 1 - SUB_BITS)
    return ns - ns % size


def width(start: int) -> int:
    """The width in ns of the bucket that starts at ``start``."""
    if start < FINE_LIMIT_NS:
        return FINE_NS
    return 1 << (start.bit_length() - 1 - SUB_BITS)


def histogram(latencies_ns: Iterable[int]) -> Counter[int]:
    """Count latencies (ns) per bucket."""
    return Counter(bucket(ns) for ns in latencies_ns)


def merge(histograms: Iterable[Mapping[int | str, int]]) -> Counter[int]:
    """One histogram from several (keys may arrive as JSON strings)."""
    total: Counter[int] = Counter()
    for one in histograms:
        total.update({int(k): v for k, v in one.items()})
    return total


def percentile_ms(counts: Mapping[int, int], q: float) -> float | None:
    """The ``q`` quantile (0..1) in milliseconds: the middle of the bucket it falls in."""
    n = sum(counts.values())
    if n == 0:
        return None
    rank, seen = q * (n - 1), 0
    for start in sorted(counts):
        seen += counts[start]
        if seen > rank:
            return (start + width(start) / 2) / 1e6
    raise AssertionError("unreachable: the last bucket brings seen to n > rank")
