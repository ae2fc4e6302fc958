"""Evaluation metrics against sklearn, hand-computed cases and a slow explicit-threshold AUPRO."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from pipeline.evaluation.metrics import aupro, auroc, f1_max, pro_curve


def _random_case(seed: int, n: int = 300, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    scores = rng.normal(size=n) + labels * rng.uniform(0, 2)
    if ties:
        scores = np.round(scores, 1)  # many exact ties, also across classes
    return scores, labels.astype(int)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn(seed: int, ties: bool) -> None:
    scores, labels = _random_case(seed, ties=ties)
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_f1_max_matches_sklearn(seed: int, ties: bool) -> None:
    scores, labels = _random_case(seed, ties=ties)
    precision, recall, _ = precision_recall_curve(labels, scores)
    expected = np.max(2 * precision * recall / (precision + recall + 1e-12))
    assert f1_max(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_auroc_and_f1_known_values() -> None:
    assert auroc([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == 1.0
    assert auroc([0.4, 0.3, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auroc([0.5, 0.5], [0, 1]) == 0.5
    # Threshold 0.4: tp 0; 0.3 flags {0.3, 0.4}: P 1/2, R 1 -> F1 2/3; lower thresholds only add false positives.
    assert f1_max([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 0]) == pytest.approx(2 / 3, abs=1e-9)


@pytest.mark.parametrize("metric", [auroc, f1_max])
def test_image_metric_errors(metric) -> None:
    with pytest.raises(ValueError, match="both"):
        metric([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="both"):
        metric([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="shape"):
        metric([0.1, 0.2, 0.3], [0, 1])


def _blob_case(seed: int, n: int = 4, size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Masks with a few rectangular and diagonal regions; maps correlated with them, with ties."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=np.uint8)
    for i in range(n - 1):  # the last image is normal
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 6, 2)
            h, w = rng.integers(1, 6, 2)
            masks[i, y : y + h, x : x + w] = 1
        d = rng.integers(0, size - 4)
        masks[i, np.arange(d, d + 4), np.arange(d, d + 4)] = 1  # 8-connected only
    maps = rng.normal(size=masks.shape) + 1.5 * masks + ndimage.uniform_filter(masks.astype(float), 3)
    return np.round(maps, 2), masks


def slow_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    """Reference: an explicit loop over every distinct score as threshold, regions labelled per image."""
    regions = []
    for m, g in zip(maps, masks, strict=True):
        labelled, count = ndimage.label(g, structure=np.ones((3, 3)))
        regions += [m[labelled == k] for k in range(1, count + 1)]
    normal = maps[masks == 0]
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        fpr = float(np.mean(normal >= t))
        pro = float(np.mean([np.mean(r >= t) for r in regions]))
        points.append((fpr, pro))
    fprs = np.array([p[0] for p in points])
    pros = np.array([p[1] for p in points])
    area = 0.0
    for i in range(1, len(points)):
        x0, x1, y0, y1 = fprs[i - 1], fprs[i], pros[i - 1], pros[i]
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:  # clip the last segment at the limit
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("seed", range(3))
def test_aupro_matches_slow_reference(seed: int, fpr_limit: float) -> None:
    maps, masks = _blob_case(seed)
    assert aupro(maps, masks, fpr_limit) == pytest.approx(slow_aupro(maps, masks, fpr_limit), abs=1e-3)


def test_aupro_perfect_map_is_one() -> None:
    _, masks = _blob_case(0)
    assert aupro(masks.astype(np.float32), masks) == pytest.approx(1.0, abs=1e-12)
    assert aupro(-masks.astype(np.float32), masks) == pytest.approx(0.0, abs=1e-12)


def test_aupro_hand_computed_with_diagonal_region() -> None:
    # Regions: A = {(0,0), (1,1)} (one region only with 8-connectivity), B = {(2,3)}; 9 normal pixels.
    mask = np.zeros((3, 4), dtype=np.uint8)
    mask[0, 0] = mask[1, 1] = mask[2, 3] = 1
    amap = np.full((3, 4), 0.1)
    amap[0, 0], amap[1, 1], amap[2, 3], amap[0, 3] = 0.9, 0.5, 0.7, 0.8  # (0,3) is a normal pixel
    # t=0.9: PRO (1/2 + 0)/2 = 0.25, FPR 0; t=0.8: FPR 1/9; t=0.7: PRO 0.75; t=0.5: PRO 1; t=0.1: FPR 1.
    fpr, pro = pro_curve(amap[None], mask[None])
    np.testing.assert_allclose(fpr, [0, 0, 1 / 9, 1 / 9, 1 / 9, 1])
    np.testing.assert_allclose(pro, [0, 0.25, 0.25, 0.75, 1, 1])
    expected = (1 / 9 * 0.25 + (0.3 - 1 / 9) * 1.0) / 0.3
    assert aupro(amap[None], mask[None], 0.3) == pytest.approx(expected, abs=1e-12)
    assert aupro(amap[None], mask[None], 1.0) == pytest.approx(1 / 9 * 0.25 + 8 / 9, abs=1e-12)


def test_aupro_invariant_to_monotonic_transform() -> None:
    maps, masks = _blob_case(1)
    base = aupro(maps, masks)
    assert aupro(np.exp(2 * maps) + 5.0, masks) == pytest.approx(base, abs=1e-12)
    assert aupro(np.arctan(maps) * 10, masks) == pytest.approx(base, abs=1e-12)


def test_aupro_accepts_images_of_different_sizes() -> None:
    maps, masks = _blob_case(2)
    small_maps = [maps[0], maps[1][:10, :15], maps[2], maps[3][:7]]
    small_masks = [masks[0], masks[1][:10, :15], masks[2], masks[3][:7]]
    value = aupro(small_maps, small_masks)
    assert 0.0 <= value <= 1.0
    assert value == pytest.approx(slow_aupro_list(small_maps, small_masks, 0.3), abs=1e-3)


def slow_aupro_list(maps: list[np.ndarray], masks: list[np.ndarray], fpr_limit: float) -> float:
    """Reference for ragged inputs: the images side by side in one canvas, separated by a column and
    padded with cells marked "not a pixel" (2), so regions cannot merge and padding never counts."""
    h = max(m.shape[0] for m in maps)
    cols_m, cols_g = [], []
    for m, g in zip(maps, masks, strict=True):
        pad = ((0, h - m.shape[0]), (0, 1))
        cols_m.append(np.pad(m, pad, constant_values=np.nan))
        cols_g.append(np.pad(g, pad, constant_values=2))  # 2 marks "not a pixel"
    big_m, big_g = np.hstack(cols_m), np.hstack(cols_g)
    valid = big_g != 2
    regions_mask = (big_g == 1).astype(np.uint8)
    labelled, count = ndimage.label(regions_mask, structure=np.ones((3, 3)))
    regions = [big_m[labelled == k] for k in range(1, count + 1)]
    normal = big_m[valid & (big_g == 0)]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(big_m[valid])[::-1]:
        fprs.append(float(np.mean(normal >= t)))
        pros.append(float(np.mean([np.mean(r >= t) for r in regions])))
    x, y = np.array(fprs), np.array(pros)
    keep = x < fpr_limit
    k = int(keep.sum())
    y_lim = y[k - 1] + (y[k] - y[k - 1]) * (fpr_limit - x[k - 1]) / (x[k] - x[k - 1])
    return float(np.trapezoid(np.r_[y[keep], y_lim], np.r_[x[keep], fpr_limit]) / fpr_limit)


def test_aupro_errors() -> None:
    maps, masks = _blob_case(0)
    with pytest.raises(ValueError, match="anomalous"):
        aupro(maps, np.zeros_like(masks))
    with pytest.raises(ValueError, match="normal"):
        aupro(maps, np.ones_like(masks))
    with pytest.raises(ValueError, match="shape"):
        aupro(maps[:, :-1], masks)
    with pytest.raises(ValueError, match="masks"):
        aupro(maps[:2], masks)
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(maps, masks, 0.0)


def test_aupro_matches_anomalib_fixture() -> None:
    # tests/reference/make_fixtures.py: anomalib's AUPRO on synthetic maps, exact and with tied (quantized) scores.
    fixture = np.load(Path(__file__).parent / "reference" / "fixtures" / "aupro.npz")
    limit = float(fixture["fpr_limit"])
    assert aupro(fixture["maps"], fixture["masks"], limit) == pytest.approx(float(fixture["aupro"]), abs=1e-5)
    assert aupro(fixture["maps_quantized"], fixture["masks"], limit) == pytest.approx(
        float(fixture["aupro_quantized"]), abs=1e-5)
