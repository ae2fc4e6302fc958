"""Anomaly-detection metrics in plain numpy: AUROC, F1-max and the MVTec AUPRO.

All three use exact thresholds (every distinct score), so they are invariant to any strictly
increasing transform of the scores and need no binning choices.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

# MVTec counts diagonal neighbours as connected when splitting masks into defect regions.
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

MapsLike = np.ndarray | Sequence[np.ndarray]


def _scores_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flatten to float64 scores (n,) and bool labels (n,); both classes must be present."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in shape")
    s, y = s.ravel(), y.ravel().astype(bool)
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    if y.all() or not y.any():
        raise ValueError("metric needs both normal (0) and anomalous (1) samples")
    return s, y


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks (n,) with tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    counts = np.diff(np.r_[first, values.size])
    mean_rank = first + (counts + 1) / 2.0  # mean of ranks first+1 .. first+count
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U; a tie counts one half, as sklearn's trapezoids do).

    scores, labels: same shape (any), labels 0/1.
    """
    s, y = _scores_labels(scores, labels)
    ranks = _average_ranks(s)
    n_pos = float(y.sum())
    n_neg = float(y.size) - n_pos
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _descending_counts(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives (k,) at each distinct threshold, highest threshold first ("score >= t")."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    return np.cumsum(y)[last_of_tie], np.cumsum(~y)[last_of_tie]


def f1_max(scores: np.ndarray, labels: np.ndarray, eps: float = 1e-12) -> float:
    """Best F1 over every threshold of the precision-recall curve.

    scores, labels: same shape (any), labels 0/1.
    """
    s, y = _scores_labels(scores, labels)
    tp, fp = _descending_counts(s, y)
    precision = tp / (tp + fp)
    recall = tp / y.sum()
    return float((2 * precision * recall / (precision + recall + eps)).max())


def _as_list(maps: MapsLike, masks: MapsLike) -> list[tuple[np.ndarray, np.ndarray]]:
    """(N, H, W) arrays or equal-length sequences of (H_i, W_i) arrays -> pairs, shapes checked."""
    if isinstance(maps, np.ndarray) and isinstance(masks, np.ndarray) and maps.shape != masks.shape:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} differ in shape")
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} maps but {len(masks)} masks")
    if len(maps) == 0:
        raise ValueError("no maps to evaluate")
    pairs = []
    for i, (m, g) in enumerate(zip(maps, masks, strict=True)):
        m, g = np.asarray(m, dtype=np.float64), np.asarray(g)
        if m.ndim != 2 or m.shape != g.shape:
            raise ValueError(f"map {i} {m.shape} and mask {i} {g.shape} must be the same (H, W)")
        pairs.append((m, g.astype(bool)))
    return pairs


def pro_curve(maps: MapsLike, masks: MapsLike) -> tuple[np.ndarray, np.ndarray]:
    """Exact (FPR, PRO) curve points (k+1,), starting at (0, 0), one point per distinct score.

    maps, masks: (N, H, W) or sequences of (H_i, W_i). PRO(t) is the mean over every ground-truth
    region (8-connected, counted over the whole set) of the fraction of its pixels scoring >= t;
    FPR(t) the fraction of all normal pixels scoring >= t. Each anomalous pixel carries weight
    1 / (size of its region), so in descending score order PRO is a cumulative sum.
    """
    pairs = _as_list(maps, masks)
    weights = []
    n_regions = 0
    for _, mask in pairs:
        labelled, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
        sizes = np.bincount(labelled.ravel()).astype(np.float64)
        w = np.zeros(mask.shape, dtype=np.float64)
        w[mask] = 1.0 / sizes[labelled[mask]]
        weights.append(w.ravel())
        n_regions += count
    normal = np.concatenate([~g.ravel() for _, g in pairs])
    n_normal = int(normal.sum())
    if n_regions == 0:
        raise ValueError("AUPRO needs at least one anomalous pixel in the masks")
    if n_normal == 0:
        raise ValueError("AUPRO needs normal pixels in the masks")
    s = np.concatenate([m.ravel() for m, _ in pairs])
    if not np.all(np.isfinite(s)):
        raise ValueError("anomaly maps must be finite")
    order = np.argsort(-s, kind="mergesort")
    s, w, normal = s[order], np.concatenate(weights)[order], normal[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    fpr = np.cumsum(normal)[last_of_tie] / n_normal
    pro = np.cumsum(w)[last_of_tie] / n_regions
    return np.r_[0.0, fpr], np.r_[0.0, pro]


def aupro(maps: MapsLike, masks: MapsLike, fpr_limit: float = 0.3) -> float:
    """Area under the PRO-vs-FPR curve for FPR in [0, fpr_limit], divided by fpr_limit (1.0 is perfect).

    maps, masks: (N, H, W) arrays, or sequences of (H_i, W_i) arrays when image sizes differ.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(maps, masks)
    # fpr is non-decreasing and ends at 1.0, so a point at or beyond the limit always exists.
    beyond = int(np.argmax(fpr >= fpr_limit))
    x, y = fpr[:beyond], pro[:beyond]
    x0, x1, y0, y1 = fpr[beyond - 1], fpr[beyond], pro[beyond - 1], pro[beyond]
    y_limit = y0 + (fpr_limit - x0) / (x1 - x0) * (y1 - y0)  # x0 < fpr_limit <= x1
    x, y = np.r_[x, fpr_limit], np.r_[y, y_limit]
    return float(np.trapezoid(y, x) / fpr_limit)
