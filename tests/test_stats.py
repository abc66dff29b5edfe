"""raysad.stats: intervals and paired comparisons, against hand computations."""
from __future__ import annotations

import math

import pytest

from raysad.stats import mcnemar_exact, paired_difference, wilson


def test_wilson_matches_the_formula_and_stays_in_range():
    lo, hi = wilson(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson(5, 10)
    assert (lo, hi) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_mcnemar_exact_by_hand():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)          # 2 * P(X <= 0), X ~ Bin(6, 1/2)
    assert mcnemar_exact(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert mcnemar_exact(5, 5) == 1.0                              # capped at 1


def test_paired_difference_pairs_by_seed_and_task():
    # a solves tasks t0..t3 on both seeds, b only t0; a task only one side played does not count
    a = {(s, f"t{i}"): 1.0 for s in (0, 1) for i in range(4)}
    b = {(s, f"t{i}"): float(i == 0) for s in (0, 1) for i in range(4)} | {(0, "t9"): 1.0}
    d = paired_difference(a, b)
    assert (d.tasks, d.pairs, d.only_a, d.only_b) == (4, 8, 6, 0)
    assert d.mean == pytest.approx(0.75)
    assert d.low <= d.mean <= d.high and d.low >= 0.0 and d.high <= 1.0
    assert d.p_value == pytest.approx(mcnemar_exact(6, 0))
    same = paired_difference(a, a)
    assert (same.mean, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert paired_difference(a, {(5, "x"): 1.0}) is None
    assert "solved only by a" in d.line("a", "b") and "+75.0 pts" in d.line("a", "b")


def test_paired_bootstrap_interval_covers_what_a_normal_approximation_gives():
    # 200 tasks, differences +1 on 60, -1 on 20, 0 elsewhere: mean 0.2, se = sd/sqrt(n)
    diffs = [1.0] * 60 + [-1.0] * 20 + [0.0] * 120
    a = {(0, f"t{i}"): float(d > 0) for i, d in enumerate(diffs)}
    b = {(0, f"t{i}"): float(d < 0) for i, d in enumerate(diffs)}
    d = paired_difference(a, b)
    mean = sum(diffs) / len(diffs)
    se = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (len(diffs) - 1) / len(diffs))
    assert d.low == pytest.approx(mean - 1.96 * se, abs=0.02)
    assert d.high == pytest.approx(mean + 1.96 * se, abs=0.02)
