"""Metric code against scikit-learn and anomalib's AUPRO (reference fixture)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve, roc_auc_score

from pipeline.evaluation.metrics import aupro, auroc, f1_max, pro_curve

FIXTURE = Path(__file__).parent / "reference" / "fixtures" / "aupro.npz"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_and_f1_match_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.normal(labels * 0.7, 1.0), 1)  # rounding makes many ties
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    p, r, _ = precision_recall_curve(labels, scores)
    assert f1_max(scores, labels) == pytest.approx((2 * p * r / (p + r + 1e-12)).max(), abs=1e-9)


def test_aupro_matches_anomalib() -> None:
    with np.load(FIXTURE, allow_pickle=False) as data:
        ours = aupro(data["maps"], data["masks"], float(data["fpr_limit"]))
        assert ours == pytest.approx(float(data["aupro"]), abs=1e-4)


def slow_aupro(maps: np.ndarray, masks: np.ndarray, limit: float) -> float:
    """Literal definition with explicit thresholds, independent of the cumulative-sum trick."""
    from scipy import ndimage

    comps = []
    for i in range(len(masks)):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        comps += [(i, lab == k) for k in range(1, n + 1)]
    normal = ~masks.astype(bool)
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        fpr = (maps[normal] >= t).mean()
        pro = np.mean([(maps[i][c] >= t).mean() for i, c in comps])
        points.append((fpr, pro))
    x, y = np.array(points).T
    inside = x <= limit
    after = int(np.argmax(~inside))  # first point past the limit: interpolate the segment into it
    frac = (limit - x[after - 1]) / (x[after] - x[after - 1])
    xs = np.r_[x[inside], limit]
    ys = np.r_[y[inside], y[after - 1] + frac * (y[after] - y[after - 1])]
    return float(np.trapezoid(ys, xs) / limit)


def test_aupro_equals_the_literal_definition() -> None:
    rng = np.random.default_rng(5)
    masks = np.zeros((3, 12, 12), np.uint8)
    masks[0, 2:5, 2:6] = 1
    masks[1, 7:11, 1:3] = 1
    masks[1, 0:2, 9:12] = 1
    maps = np.round(rng.random((3, 12, 12)) + masks * 0.4, 2)
    assert aupro(maps, masks, 0.3) == pytest.approx(slow_aupro(maps, masks, 0.3), abs=1e-9)


def test_aupro_perfect_and_monotonic_invariance() -> None:
    masks = np.zeros((2, 16, 16), np.uint8)
    masks[0, 3:7, 3:7] = 1
    maps = masks.astype(np.float32) + np.random.default_rng(0).random(masks.shape) * 0.5
    assert aupro(maps, masks) == pytest.approx(1.0)
    noisy = np.random.default_rng(1).random(masks.shape)
    assert aupro(noisy, masks) == pytest.approx(aupro(np.exp(3 * noisy), masks))
    fpr, pro = pro_curve(noisy, masks)
    assert fpr[0] == 0 and pro[0] == 0 and fpr[-1] == 1 and pro[-1] == pytest.approx(1)


def test_degenerate_inputs_are_errors() -> None:
    with pytest.raises(ValueError, match="both"):
        auroc(np.ones(4), np.ones(4))
    with pytest.raises(ValueError, match="shape"):
        auroc(np.ones(3), np.array([0, 1]))
    with pytest.raises(ValueError, match="anomalous regions"):
        aupro(np.ones((1, 4, 4)), np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="N, H, W"):
        aupro(np.ones((4, 4)), np.zeros((4, 4)))
