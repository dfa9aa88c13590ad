"""Uncertainty of a mean score: percentile bootstrap confidence intervals (Efron & Tibshirani, "An
Introduction to the Bootstrap", 1993, ch. 13), per-group scores, and the paired bootstrap test of two
systems scored on the same items (ch. 16; Koehn, "Statistical Significance Tests for Machine Translation
Evaluation", EMNLP 2004). Everything is seeded: the same scores give the same interval on every machine."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 1000
CONFIDENCE = 0.95
SEED = 0
_CHUNK_CELLS = 1 << 22  # indices drawn at once (32 MiB): memory stays flat however many items there are


@dataclass(frozen=True)
class Estimate:
    """A mean score, its percentile bootstrap interval [low, high] and the number of items."""

    score: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class Comparison:
    """B against A on the same n items: the mean scores, the difference B - A with its bootstrap interval,
    and the two-sided p-value of "no difference"."""

    score_a: float
    score_b: float
    difference: float
    low: float
    high: float
    p_value: float
    n: int


def _resampled_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """The means of `resamples` samples drawn with replacement from `values` (n,): (resamples,)."""
    rng = np.random.default_rng(seed)
    n = len(values)
    rows = max(1, _CHUNK_CELLS // n)
    means = [values[rng.integers(0, n, size=(min(rows, resamples - start), n))].mean(axis=1)
             for start in range(0, resamples, rows)]  # fmt: skip
    return np.concatenate(means)


def _as_scores(scores: Sequence[float], what: str) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"{what}: no scores")
    return values


def _check(resamples: int, confidence: float) -> None:
    if not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")


def bootstrap_ci(
    scores: Sequence[float], *, resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = SEED
) -> Estimate:
    """The mean of per-item scores with its percentile bootstrap interval: the (1 - confidence) / 2 and
    (1 + confidence) / 2 quantiles of the means of `resamples` resamples of the items."""
    _check(resamples, confidence)
    values = _as_scores(scores, "bootstrap_ci")
    means = _resampled_means(values, resamples, seed)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Estimate(float(values.mean()), float(low), float(high), len(values))


def group_scores(
    scores: Sequence[float], groups: Sequence[Hashable], **bootstrap
) -> dict[Hashable, Estimate]:
    """`bootstrap_ci` of each group's items, the groups in order of first appearance."""
    if len(scores) != len(groups):
        raise ValueError(f"{len(scores)} scores but {len(groups)} group labels")
    members: dict[Hashable, list[float]] = {}
    for score, group in zip(scores, groups, strict=True):
        members.setdefault(group, []).append(score)
    return {group: bootstrap_ci(values, **bootstrap) for group, values in members.items()}


def paired_bootstrap(
    scores_a: Sequence[float],
    scores_b: Sequence[float],
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = SEED,
) -> Comparison:
    """B - A on the same items (scores_a[i] and scores_b[i] belong to item i): items are resampled together,
    so what the two systems share cancels out. The interval is the percentile interval of the resampled mean
    differences; the p-value is that of the bootstrap test of "no difference": the share of resampled
    differences, centred on the observed one, at least as far from it as it is from 0 (two-sided, counted as
    (k + 1) / (resamples + 1), so it is never 0)."""
    _check(resamples, confidence)
    a, b = _as_scores(scores_a, "paired_bootstrap"), _as_scores(scores_b, "paired_bootstrap")
    if len(a) != len(b):
        raise ValueError(f"paired scores differ in length: {len(a)} and {len(b)}")
    differences = b - a
    observed = float(differences.mean())
    means = _resampled_means(differences, resamples, seed)
    low, high = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    tolerance = 1e-12  # a difference of exactly 0 counts every resample as extreme (p = 1)
    extreme = int(np.sum(np.abs(means - observed) >= abs(observed) - tolerance))
    p_value = (extreme + 1) / (resamples + 1)
    return Comparison(float(a.mean()), float(b.mean()), observed, float(low), float(high), p_value, len(a))
