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
