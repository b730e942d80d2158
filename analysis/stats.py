"""The uncertainty of a number (DESIGN.md §6): spread over training seeds, bootstrap intervals over
eval items, the standard error of a difference, the verdict on it, and the at-chance test.

A metric column ``m`` of a seed-aggregated frame (:func:`analysis.frame.seed_cells`) has these
companions, all kept in a table's CSV and folded into the ``m`` cell of its Markdown/LaTeX:

- ``m_std``: sample standard deviation over the cell's seeds, ``ddof`` = :data:`DDOF` (1) everywhere;
- ``m_ci_lo``, ``m_ci_hi``: the :data:`LEVEL` percentile bootstrap interval over eval items;
- ``m_at_chance``: that interval contains the task's chance accuracy;
- ``m_se``: the standard error of a difference of two cells.
"""

from __future__ import annotations

import math
import re

import numpy as np

DDOF = 1  # sample standard deviation: n - 1 in the denominator
SAMPLES = 2000  # bootstrap resamples
SEED = 0  # every interval draws from a fresh Generator with this seed: tables are reproducible
LEVEL = 0.95
CHUNK = 250  # resamples drawn at once: CHUNK x items indices in memory, not SAMPLES x items
STD, SE, CI_LO, CI_HI, AT_CHANCE = "_std", "_se", "_ci_lo", "_ci_hi", "_at_chance"
COMPANIONS = (STD, SE, CI_LO, CI_HI, AT_CHANCE)
N = "n"  # the column counting a cell's seeds
EXCEEDS, WITHIN = "exceeds noise", "within noise"
ONE_SEED, NO_ITEMS = "one seed: noise unknown", "no paired items: noise unknown"
# A per-item accuracy and the chance rate of its task (original-model keys share the task's rate).
ACCURACY = re.compile(r"^(original/)?(eval/[^/]+)/acc(_norm)?$")


def bootstrap_means(*vectors: np.ndarray, samples: int = SAMPLES, seed: int = SEED) -> np.ndarray:
    """The means of equally long per-item vectors over ``samples`` resamples of their items, shape
    (vectors, samples). Every resample draws item indices with replacement and uses the same indices
    for every vector, so arms scored on the same items are compared item by item (paired)."""
    values = np.stack(vectors).astype(float)  # (vectors, items)
    n = values.shape[1]
    rng = np.random.default_rng(seed)
    sizes = [min(CHUNK, samples - start) for start in range(0, samples, CHUNK)]
    return np.concatenate([values[:, rng.integers(0, n, size=(size, n))].mean(axis=2) for size in sizes], axis=1)


def percentile_interval(statistics: np.ndarray) -> tuple[float, float]:
    """The central :data:`LEVEL` percentile interval of bootstrap statistics."""
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(statistics, [tail, 100 - tail])
    return float(low), float(high)


def interval(matrix: np.ndarray) -> tuple[float, float]:
    """Bootstrap interval of the mean over seeds and items of a (seeds, items) 0/1 matrix, the same
    items for every seed: item indices are resampled, each drawn item brings all its seeds."""
    return percentile_interval(bootstrap_means(matrix.mean(axis=0))[0])


def difference_interval(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Bootstrap interval of mean(a) - mean(b) for two (seeds, items) matrices on the same items,
    resampling the items jointly; NaNs when their item counts differ (not the same items)."""
    if a.shape[1] != b.shape[1]:
        return math.nan, math.nan
    means = bootstrap_means(a.mean(axis=0), b.mean(axis=0))
    return percentile_interval(means[0] - means[1])


def chance_key(metric: str) -> str | None:
    """The chance-rate metric (``eval/<task>/chance``) of an accuracy key, or None for other keys."""
    match = ACCURACY.match(metric)
    return f"{match[2]}/chance" if match else None


def at_chance(low: float, high: float, chance: float) -> bool:
    """Whether an interval contains the chance rate: the score is no evidence the task was done."""
    return bool(low <= chance <= high)


def difference_se(std_a: float, n_a: float, std_b: float, n_b: float) -> float:
    """Standard error of the difference of two means over independent seeds,
    sqrt(s_a²/n_a + s_b²/n_b); NaN when a side has one seed (its spread is unknown)."""
    return math.sqrt(std_a**2 / n_a + std_b**2 / n_b) if min(n_a, n_b) >= 2 else math.nan


def seed_verdict(difference: float, se: float) -> str | None:
    """Whether a difference of seed means exceeds its noise (|d| > 2 se); None without a difference."""
    if math.isnan(difference):
        return None
    if math.isnan(se):
        return ONE_SEED
    return EXCEEDS if abs(difference) > 2 * se else WITHIN


def interval_verdict(difference: float, low: float, high: float) -> str | None:
    """Whether a difference's bootstrap interval excludes 0; None without a difference."""
    if math.isnan(difference):
        return None
    if math.isnan(low):
        return NO_ITEMS
    return EXCEEDS if low > 0 or high < 0 else WITHIN
