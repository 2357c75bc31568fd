"""Durations: the histogram the metrics endpoint exports for the hot path's steps."""

from __future__ import annotations

import pytest

from roomcast.core.timing import Durations


def test_each_duration_lands_in_the_first_bucket_whose_bound_it_does_not_exceed():
    d = Durations((0.001, 0.01))
    for seconds in (0.0, 0.001, 0.0011, 0.01, 0.5):
        d.observe(seconds)
    assert d.buckets == [2, 2, 1]
    assert d.count == 5
    assert d.total == pytest.approx(0.5121)


def test_cumulative_counts_end_with_everything_under_infinity():
    d = Durations((0.001, 0.01))
    for seconds in (0.0005, 0.002, 0.003, 7.0):
        d.observe(seconds)
    assert d.cumulative() == [(0.001, 1), (0.01, 3), (float("inf"), 4)]


@pytest.mark.parametrize("bounds", [(0.01, 0.001), (0.001, 0.001)])
def test_bounds_must_increase(bounds):
    with pytest.raises(ValueError, match="strictly increasing"):
        Durations(bounds)
