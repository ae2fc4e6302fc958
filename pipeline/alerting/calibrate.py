"""Per-class threshold calibration from scores of known-good frames."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def threshold_from_scores(scores: Sequence[float], quantile: float = 0.99, margin: float = 0.0) -> float:
    """The ``quantile`` of normal-frame scores plus ``margin``: about 1 - quantile of good frames alarm.

    Uses linear interpolation between order statistics (numpy's default); quantile 1.0 is the max.
    """
    if len(scores) == 0:
        raise ValueError("threshold_from_scores needs at least one score")
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    values = np.asarray(scores, dtype=np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("scores must be finite numbers")
    if not math.isfinite(margin):
        raise ValueError(f"margin must be finite, got {margin}")
    return float(np.quantile(values, quantile)) + float(margin)


def score_spread(scores: Sequence[float]) -> dict[str, float]:
    """What a calibration saw: count, min, mean, standard deviation, quantiles and max of the scores."""
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        raise ValueError("score_spread needs at least one score")
    q = np.quantile(values, [0.5, 0.9, 0.99])
    return {"n": float(values.size), "min": float(values.min()), "mean": float(values.mean()),
            "std": float(values.std()), "p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]),
            "max": float(values.max())}


def spread_line(spread: dict[str, float]) -> str:
    return (f"scores of {int(spread['n'])} normal frames: min {spread['min']:.4f}  p50 {spread['p50']:.4f}  "
            f"p90 {spread['p90']:.4f}  p99 {spread['p99']:.4f}  max {spread['max']:.4f}  "
            f"(mean {spread['mean']:.4f}, std {spread['std']:.4f})")
