"""How a later run of scenario A finds its knee, starting from the first run's."""

from __future__ import annotations

import pytest
from bench.sweep import later_knee


def search(prior: int, passes_up_to: int, budget: int = 3, most: int = 13):
    tried: list[int] = []

    def run(k: int) -> bool:
        tried.append(k)
        return k <= passes_up_to

    return later_knee(prior, run, budget=budget, most=most), tried


def test_a_run_like_the_first_climbs_one_step_at_a_time_within_its_budget() -> None:
    assert search(27, passes_up_to=28) == (28, [27, 28, 29])
    assert search(27, passes_up_to=40) == (29, [27, 28, 29])


def test_a_slightly_slower_run_steps_down_one_step_at_a_time() -> None:
    assert search(27, passes_up_to=25) == (25, [27, 26, 25])


def test_a_run_far_below_the_first_halves_then_bisects_instead_of_reporting_nothing() -> None:
    knee, tried = search(27, passes_up_to=10)
    assert knee == 10
    assert tried[:3] == [27, 26, 25]
    assert tried[3:5] == [12, 6]  # halved until a step passed
    assert len(tried) <= 13


@pytest.mark.parametrize("passes_up_to", range(0, 30))
def test_the_knee_found_is_the_highest_passing_step_tried_and_the_budget_holds(
    passes_up_to: int,
) -> None:
    knee, tried = search(27, passes_up_to)
    passed = [k for k in tried if k <= passes_up_to]
    assert knee == (max(passed) if passed else None)
    assert len(tried) <= 13
    if 1 <= passes_up_to <= 29 and passes_up_to < 27 - 2:
        # Below the one-step descent, the halving and bisection find the exact knee.
        assert knee == passes_up_to


def test_with_no_budget_beyond_the_descent_a_far_slower_run_reports_none() -> None:
    assert search(27, passes_up_to=10, most=3) == (None, [27, 26, 25])
