"""How scenario A searches for its knee on the rate grid (no I/O: the measuring is passed in)."""

from __future__ import annotations

from collections.abc import Callable


class _Steps:
    """``run`` that counts the steps it has measured."""

    def __init__(self, run: Callable[[int], bool]) -> None:
        self._run = run
        self.calls = 0

    def __call__(self, k: int) -> bool:
        self.calls += 1
        return self._run(k)


def _bisect(step: _Steps, passed: int, failed: int, most: int) -> int:
    """The highest passing step between ``passed`` and ``failed``, down to one grid step
    apart unless ``most`` steps have been measured first."""
    while failed - passed > 1 and step.calls < most:
        mid = (passed + failed) // 2
        if step(mid):
            passed = mid
        else:
            failed = mid
    return passed


def first_knee(run: Callable[[int], bool], *, passed: int, start: int, jump: int, most: int) -> int:
    """The knee (grid index) of the first run, which knows nothing of the target.

    ``run(k)`` measures step ``k`` and says whether it passed; step ``passed`` is known to
    have passed (B's fixed rate). From ``start`` the rate doubles (``jump`` steps of the
    grid) while steps pass, then bisects between the highest step that passed and the
    lowest that failed until they are one grid step apart — the knee is exact on the
    grid, not a step or two short — all within ``most`` steps.
    """
    step = _Steps(run)
    knee, k = passed, start
    while step.calls < most:
        if not step(k):
            return _bisect(step, knee, k, most)
        knee, k = k, k + jump
    return knee


def later_knee(prior: int, run: Callable[[int], bool], *, budget: int, most: int) -> int | None:
    """The knee (grid index) of a run after the first, searched from the first run's knee.

    ``run(k)`` measures step ``k`` and says whether it passed. From ``prior`` the search
    moves one step at a time — up while steps pass, down while they fail — for at most
    ``budget`` steps. When every step down failed (a run far below the first, which would
    otherwise report only B's rate), it halves the rate until a step passes and bisects
    between that step and the lowest failed one, within ``most`` steps in all. None when
    no step above B's passed.
    """
    step = _Steps(run)
    k = max(1, prior)
    if step(k):
        knee = k
        while step.calls < budget and step(k + 1):
            k += 1
            knee = k
        return knee
    while k > 1 and step.calls < budget:
        k -= 1
        if step(k):
            return k
    failed = k  # the lowest step that failed
    while True:
        if k <= 1 or step.calls >= most:
            return None
        k //= 2
        if step(k):
            break
        failed = k
    return _bisect(step, k, failed, most)
