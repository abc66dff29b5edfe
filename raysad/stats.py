"""The statistics a comparison of students needs: success-rate intervals and paired differences.

Every method is evaluated on the same test tasks with the same seeds, so two methods are compared task by task
(paired): the difference of their success on each task, averaged over seeds, with a bootstrap interval over
tasks, and McNemar's exact test on the (seed, task) pairs where exactly one of them succeeded.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Mapping

BOOTSTRAP_SAMPLES = 10_000


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate (sound at 0 and at small counts, unlike p ± 2·SE)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre, half = p + z * z / (2 * n), z * ((p * (1 - p) + z * z / (4 * n)) / n) ** 0.5
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs (a succeeded alone, b succeeded alone)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@dataclass
class PairedDifference:
    mean: float                 # mean over tasks of (success a - success b), each task averaged over seeds
    low: float                  # 95% paired-bootstrap interval (tasks resampled)
    high: float
    tasks: int                  # tasks both sides played (with the same seeds)
    pairs: int                  # (seed, task) pairs
    only_a: int                 # pairs a solved and b did not
    only_b: int
    p_value: float              # McNemar, exact

    def line(self, a: str, b: str) -> str:
        return (f"{a} - {b}: {100 * self.mean:+.1f} pts [95% CI {100 * self.low:+.1f}, {100 * self.high:+.1f}] over "
                f"{self.tasks} tasks ({self.pairs} seed-task pairs; {self.only_a} solved only by {a}, "
                f"{self.only_b} only by {b}; McNemar p = {self.p_value:.3g})")


def paired_difference(a: Mapping[tuple[int, str], float], b: Mapping[tuple[int, str], float],
                      samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> PairedDifference | None:
    """a, b: outcome (0/1 success, or a score) per (seed, task_id). Only the pairs both have count; None when
    there are none."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    per_task: dict[str, list[float]] = {}
    for key in common:
        per_task.setdefault(key[1], []).append(float(a[key]) - float(b[key]))
    diffs = [sum(v) / len(v) for v in per_task.values()]
    n = len(diffs)
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    only_a = sum(1 for k in common if a[k] >= 1 > b[k])
    only_b = sum(1 for k in common if b[k] >= 1 > a[k])
    return PairedDifference(mean=sum(diffs) / n, low=means[int(0.025 * samples)],
                            high=means[min(samples - 1, int(0.975 * samples))], tasks=n, pairs=len(common),
                            only_a=only_a, only_b=only_b, p_value=mcnemar_exact(only_a, only_b))
