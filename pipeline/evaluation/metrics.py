"""Anomaly detection metrics in plain numpy (rank-based, threshold-free)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _binary(labels: np.ndarray) -> np.ndarray:
    labels = np.asarray(labels).astype(bool).ravel()
    if labels.all() or not labels.any():
        raise ValueError("metric needs both normal and anomalous samples")
    return labels


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count one half)."""
    y = _binary(labels)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in shape")
    ranks = rankdata(s)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def f1_max(scores: np.ndarray, labels: np.ndarray, eps: float = 1e-12) -> float:
    """Best F1 over every threshold of the precision-recall curve."""
    y = _binary(labels)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in shape")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(y)[last_of_tie]
    fp = np.cumsum(~y)[last_of_tie]
    precision = tp / (tp + fp)
    recall = tp / y.sum()
    return float((2 * precision * recall / (precision + recall + eps)).max())


def pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact (FPR, PRO) points over every threshold, MVTec definition.

    maps, masks: (N, H, W). PRO(t) is the mean over all ground-truth components (8-connected, over
    the whole set) of the fraction of their pixels scoring >= t; FPR(t) the fraction of normal
    pixels scoring >= t. Walking the pixels in descending score order, PRO is a cumulative sum of
    1 / (size of the pixel's component), so every threshold costs O(1).
    """
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks).astype(bool)
    if maps.shape != masks.shape or maps.ndim != 3:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} must both be (N, H, W)")
    weights = np.zeros(masks.shape, dtype=np.float64)
    n_components = 0
    for i in range(masks.shape[0]):
        labelled, count = ndimage.label(masks[i], structure=EIGHT_CONNECTED)
        if count:
            sizes = np.bincount(labelled.ravel())
            weights[i][labelled > 0] = 1.0 / sizes[labelled[labelled > 0]]
            n_components += count
    n_normal = int((~masks).sum())
    if n_components == 0 or n_normal == 0:
        raise ValueError("AUPRO needs anomalous regions and normal pixels")
    s = maps.ravel()
    order = np.argsort(-s, kind="stable")
    s, w, normal = s[order], weights.ravel()[order], ~masks.ravel()[order]
    last_of_tie = np.r_[s[1:] != s[:-1], True]
    fpr = np.cumsum(normal)[last_of_tie] / n_normal
    pro = np.cumsum(w)[last_of_tie] / n_components
    return np.r_[0.0, fpr], np.r_[0.0, pro]


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to fpr_limit, normalised by fpr_limit (1.0 is perfect)."""
    if not 0 < fpr_limit <= 1:
        raise ValueError("fpr_limit must be in (0, 1]")
    fpr, pro = pro_curve(maps, masks)
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < fpr_limit:
        nxt = int(np.argmax(fpr > fpr_limit))
        frac = (fpr_limit - fpr[nxt - 1]) / (fpr[nxt] - fpr[nxt - 1])
        x = np.r_[x, fpr_limit]
        y = np.r_[y, pro[nxt - 1] + frac * (pro[nxt] - pro[nxt - 1])]
    return float(np.trapezoid(y, x) / fpr_limit)
