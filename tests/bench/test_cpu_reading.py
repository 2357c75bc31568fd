"""The bench's reading of the machine's CPU time: busy and steal, from /proc/stat."""

from __future__ import annotations

from bench.targets import cpu_seconds_of, machine_cpu_seconds

STAT = """cpu  5159 7 2787 26085 516 11 137 158 0 0
cpu0 2580 3 1390 13040 258 5 70 80 0 0
intr 1 2 3
"""


def test_busy_counts_user_nice_system_irq_softirq_and_steal_but_not_idle_or_iowait() -> None:
    busy, steal = cpu_seconds_of(STAT, 100)
    assert busy == (5159 + 7 + 2787 + 11 + 137 + 158) / 100
    assert steal == 1.58


def test_this_machine_reads_steal_as_part_of_busy() -> None:
    busy, steal = machine_cpu_seconds()
    assert 0 <= steal <= busy
