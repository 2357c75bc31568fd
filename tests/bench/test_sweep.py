"""How scenario A finds its knee: the first run from scratch, later runs from the first's."""

from __future__ import annotations

import pytest
from bench.sweep import first_knee, later_knee


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


def first(passes_up_to: int, most: int = 13):
    tried: list[int] = []

    def run(k: int) -> bool:
        tried.append(k)
        return k <= passes_up_to

    return first_knee(run, passed=0, start=12, jump=6, most=most), tried


def test_the_first_run_doubles_then_bisects_to_the_exact_grid_step() -> None:
    # 12, 18, 24, 30 pass, 36 fails; 33, 34, 35 resolve the last doubling to one step.
    assert first(35) == (35, [12, 18, 24, 30, 36, 33, 34, 35])
    assert first(31) == (31, [12, 18, 24, 30, 36, 33, 31, 32])


@pytest.mark.parametrize("passes_up_to", range(0, 50))
def test_the_first_runs_knee_is_the_highest_passing_step_within_the_budget(
    passes_up_to: int,
) -> None:
    knee, tried = first(passes_up_to)
    assert len(tried) <= 13
    assert knee == max([0] + [k for k in tried if k <= passes_up_to])
    if passes_up_to < 12 + 6 * 6:
        # Within reach of the doubling, the knee is exact: a step above it was tried and failed.
        assert knee == passes_up_to


def test_a_first_run_that_keeps_passing_stops_at_its_budget() -> None:
    knee, tried = first(1000, most=5)
    assert tried == [12, 18, 24, 30, 36]
    assert knee == 36
