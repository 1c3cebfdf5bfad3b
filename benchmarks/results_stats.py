"""Paired statistics for ``benchmarks/results.py``: is one model's top-1 really above another's?

Two models scored on the same test images are compared image by image, not as two
independent accuracies (which would hide that most images are right or wrong for both):

* discordant counts ``b`` (A right, B wrong) and ``c`` (A wrong, B right); the accuracy
  difference is ``(b - c) / n``;
* the exact McNemar test: under "equal accuracy" each discordant image is A's with
  probability 1/2, so the two-sided p-value is ``min(1, 2 * P(Binomial(b + c, 1/2) <= min(b, c)))``;
* a 95% confidence interval of the difference by a paired percentile bootstrap over images
  (fixed seed; images resampled with replacement, both models' results kept together).

Seed summaries (mean, sample std, min) are here too, so the printed table and its tests share them.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

BOOTSTRAP_RESAMPLES = 10000
BOOTSTRAP_SEED = 0
CI_METHOD = (f"paired percentile bootstrap over the test images ({BOOTSTRAP_RESAMPLES} resamples, "
             f"numpy seed {BOOTSTRAP_SEED})")


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for ``b`` and ``c`` discordant pairs (binomial, p=1/2).

    1.0 when there is no discordant pair. Raises ValueError on a negative count.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**n)  # exact integers; one rounding in the division


def bootstrap_ci(d: np.ndarray, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(d)`` for per-image differences ``d`` ``[n]``.

    ``d`` takes few distinct values (-1, 0, 1 for one pair of models; multiples of 1/S for
    means over S seeds), so a resample is drawn as multinomial counts of those values, which
    is the same distribution as resampling the images and far cheaper at n = 10000.
    """
    d = np.asarray(d, dtype=np.float64).ravel()
    if d.size == 0:
        raise ValueError("`d` is empty")
    vals, counts = np.unique(d, return_inverse=False, return_counts=True)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(d.size, counts / d.size, size=resamples)  # [resamples, len(vals)]
    means = draws @ vals / d.size
    a = (1.0 - level) / 2
    lo, hi = np.quantile(means, [a, 1.0 - a])
    return float(lo), float(hi)


@dataclass
class Paired:
    """A versus B on the same ``n`` images. Accuracies and the difference are fractions."""

    a: str
    b_name: str
    seed: str  # the QAT seed, or "mean" for per-image means over seeds
    n: int
    acc_a: float
    acc_b: float
    diff: float  # acc_a - acc_b
    b: int | None  # A right, B wrong (None for seed means)
    c: int | None  # A wrong, B right
    p: float | None  # exact McNemar, two-sided
    ci: tuple[float, float]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired(a_correct: np.ndarray, b_correct: np.ndarray, a: str, b_name: str, seed: str) -> Paired:
    """Compare per-image correctness ``[n]`` (bool, or ``[S, n]`` over S seeds: then A/B are the
    per-image means over seeds and no McNemar test applies). Raises ValueError on a shape mismatch."""
    ac, bc = np.asarray(a_correct, dtype=np.float64), np.asarray(b_correct, dtype=np.float64)
    binary = ac.ndim == 1 and bc.ndim == 1  # seed means are fractions: no McNemar test
    if ac.ndim == 2:
        ac = ac.mean(0)
    if bc.ndim == 2:
        bc = bc.mean(0)
    if ac.shape != bc.shape or ac.ndim != 1:
        raise ValueError(f"{a} vs {b_name}: per-image results of shapes {ac.shape} and {bc.shape}")
    d = ac - bc
    if binary and not (np.isin(ac, (0.0, 1.0)).all() and np.isin(bc, (0.0, 1.0)).all()):
        raise ValueError(f"{a} vs {b_name}: per-image correctness must be 0/1 (or [seeds, n])")
    b = int(((ac == 1) & (bc == 0)).sum()) if binary else None
    c = int(((ac == 0) & (bc == 1)).sum()) if binary else None
    return Paired(a, b_name, seed, int(d.size), float(ac.mean()), float(bc.mean()), float(d.mean()), b, c,
                  mcnemar_exact(b, c) if binary else None, bootstrap_ci(d))


def seed_summary(values: list[float]) -> dict[str, float]:
    """mean, sample std (0 for one seed), min and max of per-seed accuracies."""
    if not values:
        raise ValueError("no per-seed values")
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}
