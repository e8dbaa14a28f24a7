"""Bootstrap statistics: percentile CIs over items (2,000 resamples, a fixed seed), the average of task means
with every task resampled on its own, and the verdict a CI gives a claim."""

from __future__ import annotations

import numpy as np

RESAMPLES = 2000
SEED = 0


def bootstrap_mean_ci(values: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    if len(values) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def bootstrap_average_ci(
    per_task: list[np.ndarray], resamples: int = RESAMPLES, seed: int = SEED
) -> tuple[float, float]:
    """CI of the mean of task means, resampling each task's items independently."""
    rng = np.random.default_rng(seed)
    averages = np.zeros(resamples)
    for values in per_task:
        averages += values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    averages /= len(per_task)
    return float(np.percentile(averages, 2.5)), float(np.percentile(averages, 97.5))


def mean_ci(values: np.ndarray) -> dict:
    low, high = bootstrap_mean_ci(values)
    return {"mean": float(values.mean()) if len(values) else float("nan"), "ci": [low, high]}


def verdict(low: float, high: float) -> str:
    """held: the whole CI favours the claim; not held: the whole CI goes against it; else inconclusive."""
    if low > 0:
        return "held"
    if high < 0:
        return "not held"
    return "inconclusive"
