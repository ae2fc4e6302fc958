"""`linewatch eval`: score a category's test set, compute metrics, draw overlays."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.engine.engine import AnomalyEngine
from pipeline.evaluation.metrics import aupro, auroc, f1_max
from pipeline.evaluation.mvtec import Item
from pipeline.imaging import heat_overlay, read_image

PIXEL_EVAL_LONG_SIDE = 256  # pixel metrics at a bounded size: memory stays flat on big datasets


def _eval_size(shape: tuple[int, int]) -> tuple[int, int]:
    h, w = shape
    scale = PIXEL_EVAL_LONG_SIDE / max(h, w)
    return max(1, round(w * scale)), max(1, round(h * scale))


def _mask(item: Item, shape: tuple[int, int]) -> np.ndarray:
    if item.mask is None:
        return np.zeros(shape, dtype=np.uint8)
    mask = cv2.imread(str(item.mask), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise FileNotFoundError(f"unreadable mask {item.mask}")
    if mask.shape != shape:
        mask = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return (mask > 127).astype(np.uint8)


def overlay(image: np.ndarray, anomaly_map: np.ndarray, mask: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Heat map over the image with the ground-truth contour in white."""
    out = heat_overlay(image, anomaly_map, vmin, vmax)
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (255, 255, 255), 2)
    return out


def evaluate(engine: AnomalyEngine, items: list[Item], product_class: str, out_dir: Path, batch_size: int = 4,
             n_overlays: int = 8, progress: bool = True) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    sample = {int(i) for i in np.linspace(0, len(items) - 1, min(n_overlays, len(items)))}
    scores, labels, maps, masks = [], [], [], []
    overlays: list[tuple[Item, np.ndarray, np.ndarray, np.ndarray]] = []
    start = time.perf_counter()
    bar = tqdm(total=len(items), desc=f"eval {product_class}", unit="img", disable=not progress)
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        images = [read_image(str(it.path)) for it in chunk]
        for j, (item, image, result) in enumerate(zip(chunk, images, engine.score(images, product_class),
                                                      strict=True)):
            mask = _mask(item, image.shape[:2])
            size = _eval_size(image.shape[:2])
            maps.append(cv2.resize(result.anomaly_map, size, interpolation=cv2.INTER_LINEAR))
            masks.append(cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST))
            scores.append(result.image_score)
            labels.append(item.label)
            if i + j in sample:
                overlays.append((item, image, result.anomaly_map, mask))
        bar.update(len(chunk))
    bar.close()
    seconds = time.perf_counter() - start
    # Pixel metrics need one array: pad each map to the largest eval size (padding is normal, low).
    h = max(m.shape[0] for m in maps)
    w = max(m.shape[1] for m in maps)
    floor = float(min(m.min() for m in maps))
    all_maps = np.full((len(maps), h, w), floor, dtype=np.float32)
    all_masks = np.zeros((len(maps), h, w), dtype=np.uint8)
    for k, (m, g) in enumerate(zip(maps, masks, strict=True)):
        all_maps[k, : m.shape[0], : m.shape[1]] = m
        all_masks[k, : g.shape[0], : g.shape[1]] = g
    y = np.array(labels)
    metrics = {
        "image_auroc": auroc(np.array(scores), y),
        "pixel_auroc": auroc(all_maps.ravel(), all_masks.ravel()),
        "aupro": aupro(all_maps, all_masks, 0.3),
        "f1_max": f1_max(np.array(scores), y),
        "pixel_f1_max": f1_max(all_maps.ravel(), all_masks.ravel()),
        "n_images": len(items),
        "seconds_per_image": seconds / len(items),
        "method": engine.method,
        "backbone": engine.settings.backbone,
        "pretrained": engine.settings.pretrained,
        "precision": engine.precision.name,
        "k_shot": engine.k_shot(product_class),
        "pixel_eval_size": f"long side {PIXEL_EVAL_LONG_SIDE}",
        "aupro_definition": "MVTec official, exact thresholds, fpr_limit 0.3",
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    vmin, vmax = float(np.min([m.min() for m in maps])), float(np.max([m.max() for m in maps]))
    (out_dir / "overlays").mkdir(exist_ok=True)
    for item, image, amap, mask in overlays:
        picture = overlay(image, amap, mask, vmin, vmax)
        cv2.imwrite(str(out_dir / "overlays" / f"{item.defect}_{item.path.stem}.png"),
                    cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    return metrics
