"""`linewatch eval`: score a category's test set, compute image and pixel metrics, draw overlays."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.engine.engine import AnomalyEngine
from pipeline.evaluation.metrics import aupro, auroc, f1_max
from pipeline.evaluation.mvtec import EvalItem
from pipeline.imaging import encode_png, read_image
from pipeline.logging import get_logger
from pipeline.overlay import heat_view, is_random

log = get_logger(__name__)

# Pixel metrics at a bounded size: memory and sort time stay flat however large the images are.
PIXEL_EVAL_LONG_SIDE = 256
AUPRO_FPR_LIMIT = 0.3


def eval_size(shape: tuple[int, int], long_side: int = PIXEL_EVAL_LONG_SIDE) -> tuple[int, int]:
    """(H, W) -> (H', W') with the long side at long_side and the aspect ratio kept."""
    h, w = shape
    scale = long_side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def read_mask(item: EvalItem, shape: tuple[int, int]) -> np.ndarray:
    """Ground truth (H, W) uint8 in {0, 1} at the image's size; all zeros for normal images."""
    if item.mask is None:
        return np.zeros(shape, dtype=np.uint8)
    mask = cv2.imread(str(item.mask), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise FileNotFoundError(f"unreadable ground-truth mask {item.mask}")
    if mask.shape != shape:
        mask = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return (mask > 127).astype(np.uint8)


def overlay(image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray, vmin: float, vmax: float,
            random_weights: bool = False) -> np.ndarray:
    """RGB (H, W, 3) image with the heat map (H', W') in linewatch's overlay style (legend, and a banner
    when the weights are random) and the ground-truth mask (H, W) outlined in white."""
    out = heat_view(image, anomaly_map, vmin, vmax, legend=True, random_weights=random_weights)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (255, 255, 255), 2)
    return out


def overlay_sample(labels: list[int], n: int) -> set[int]:
    """Indices of about n items spread evenly over each label, half normal and half anomalous."""
    by_label = {lab: [i for i, v in enumerate(labels) if v == lab] for lab in (0, 1)}
    want = {0: n // 2, 1: n - n // 2}
    # A short label gives its unused share to the other.
    for lab, other in ((0, 1), (1, 0)):
        spare = want[lab] - len(by_label[lab])
        if spare > 0:
            want[lab] -= spare
            want[other] += spare
    picked: set[int] = set()
    for lab, idx in by_label.items():
        k = min(want[lab], len(idx))
        if k > 0:
            picked.update(idx[int(j)] for j in np.linspace(0, len(idx) - 1, k).round())
    return picked


def evaluate(engine: AnomalyEngine, items: list[EvalItem], product_class: str, out_dir: Path, batch_size: int = 4,
             n_overlays: int = 8, progress: bool = True) -> dict[str, Any]:
    """Score every test item, write out_dir/metrics.json and out_dir/overlays/<stem>.png; return the metrics.

    Pixel metrics (pixel_auroc, pixel_f1_max, aupro) use maps and masks resized to PIXEL_EVAL_LONG_SIDE
    on the long side (`pixel_eval_size` in metrics.json). seconds_per_image counts the engine's time only
    (no file decoding).
    """
    if not items:
        raise ValueError("no test images to evaluate")
    # Fail before minutes of scoring: image metrics are undefined without both kinds.
    if len({it.label for it in items}) < 2:
        raise ValueError("evaluation needs both normal (test/good) and anomalous test images")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    out_dir = Path(out_dir)
    labels = [it.label for it in items]
    sample = overlay_sample(labels, n_overlays)
    scores: list[float] = []
    maps: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    kept: list[tuple[EvalItem, np.ndarray, np.ndarray, np.ndarray]] = []
    model_seconds = 0.0
    with tqdm(total=len(items), desc=f"eval {product_class}", unit="img", disable=not progress) as bar:
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            images = [read_image(str(it.path)) for it in chunk]
            t0 = time.perf_counter()
            results = engine.score(images, product_class)
            model_seconds += time.perf_counter() - t0
            for offset, (item, image, result) in enumerate(zip(chunk, images, results, strict=True)):
                mask = read_mask(item, image.shape[:2])
                h, w = eval_size(image.shape[:2])
                maps.append(result.frame_map((h, w)))  # model-resolution map, bilinear to the eval size
                masks.append(cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST))
                scores.append(result.image_score)
                if start + offset in sample:
                    kept.append((item, image, result.anomaly_map, mask))
            bar.update(len(chunk))

    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    pixel_scores = np.concatenate([m.ravel() for m in maps])
    pixel_labels = np.concatenate([g.ravel() for g in masks])
    metrics: dict[str, Any] = {
        "image_auroc": auroc(s, y),
        "f1_max": f1_max(s, y),
        "pixel_auroc": auroc(pixel_scores, pixel_labels),
        "pixel_f1_max": f1_max(pixel_scores, pixel_labels),
        "aupro": aupro(maps, masks, AUPRO_FPR_LIMIT),
        "aupro_fpr_limit": AUPRO_FPR_LIMIT,
        "pixel_eval_size": PIXEL_EVAL_LONG_SIDE,
        "n_images": len(items),
        "n_anomalous": int(y.sum()),
        "seconds_per_image": model_seconds / len(items),
        "method": engine.method,
        "backbone": engine.settings.backbone,
        "pretrained": engine.settings.pretrained,
        "precision": engine.precision.name,
        "k_shot": engine.k_shot(product_class),
        "model_fingerprint": engine.fingerprint,
        "n_overlays": len(kept),
    }
    if is_random(engine.fingerprint):
        metrics["warning"] = "RANDOM WEIGHTS: made with a randomly initialised model; these figures mean nothing"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    # One colour scale for every overlay, so heat is comparable between pictures.
    vmin = float(min(m.min() for m in maps))
    vmax = float(max(m.max() for m in maps))
    overlay_dir = out_dir / "overlays"
    overlay_dir.mkdir(exist_ok=True)
    used: set[str] = set()
    for item, image, amap, mask in kept:
        picture = overlay(image, amap, mask, vmin, vmax, random_weights=is_random(engine.fingerprint))
        # MVTec reuses file names across defect folders (000.png); the defect prefix keeps both.
        name = item.path.stem if item.path.stem not in used else f"{item.defect}_{item.path.stem}"
        used.add(name)
        (overlay_dir / f"{name}.png").write_bytes(encode_png(cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)))
    log.info("eval_done", product_class=product_class, n_images=len(items), overlays=len(kept),
             image_auroc=metrics["image_auroc"], aupro=metrics["aupro"])
    return metrics
