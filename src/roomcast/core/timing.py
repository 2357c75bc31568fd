"""Durations of the steps of the hot path, kept as plain counts.

A :class:`Durations` is a histogram with fixed bounds: an observation is one bisect and
two additions, cheap enough for every batch a node stores. The metrics endpoint reads it
at scrape time (Prometheus histograms); nothing here knows about Prometheus.
"""

from __future__ import annotations

from bisect import bisect_left

BOUNDS = (
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
"""Upper bounds (seconds) of the buckets; a last bucket holds everything slower."""


class Durations:
    """How long one kind of step took: a count per bucket, their number and their sum."""

    __slots__ = ("bounds", "buckets", "count", "total")

    def __init__(self, bounds: tuple[float, ...] = BOUNDS) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("bounds must be strictly increasing")
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)
        """Observations per bucket (not cumulative); the last is above every bound."""
        self.count = 0
        self.total = 0.0
        """Sum of the observations, in seconds."""

    def observe(self, seconds: float) -> None:
        # bisect_left: a duration equal to a bound belongs to that bound's bucket ("le").
        self.buckets[bisect_left(self.bounds, seconds)] += 1
        self.count += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= bound)`` per bucket, ending with ``inf``."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.buckets, strict=True):
            running += n
            out.append((bound, running))
        return out
