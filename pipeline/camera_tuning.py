"""Per-camera tuning changed live: a threshold override and ignore regions (polygons).

The configuration's ``cameras[].threshold`` / ``cameras[].ignore_regions`` are the defaults; the
API writes overrides into one Redis hash (``p:camera_tuning``: camera id -> JSON) that the alert
stage reads once per batch, like the class thresholds, so a change applies within a batch.

Ignore regions are polygons of ``[x, y]`` points in 0..1 of the frame's width and height (so they
survive a resolution change). Inside them the anomaly map is zeroed before thresholds, regions and
masks; the image score is capped by the highest map value left outside them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import cv2
import numpy as np
import redis
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline import imaging
from pipeline.config import CameraConfig
from schemas.scores import ScoreMessage

Polygon = list[tuple[float, float]]


def check_polygons(polygons: Sequence[Sequence[Sequence[float]]]) -> list[Polygon]:
    out: list[Polygon] = []
    for i, poly in enumerate(polygons):
        if len(poly) < 3:
            raise ValueError(f"ignore region {i} has {len(poly)} points; a polygon needs at least 3")
        points = []
        for x, y in poly:
            if not (0.0 <= x <= 1.0 and 0.0 <= y <= 1.0):
                raise ValueError(f"ignore region {i}: point ({x}, {y}) is outside 0..1 (fractions of the frame)")
            points.append((float(x), float(y)))
        out.append(points)
    return out


class CameraTuning(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(default=None, allow_inf_nan=False)
    # None: the configuration's regions; [] means "none" even if the configuration has some.
    ignore_regions: list[Polygon] | None = None
    updated_ts: float = Field(default_factory=time.time)
    by: str | None = None

    @field_validator("ignore_regions")
    @classmethod
    def _valid(cls, value: list[Polygon] | None) -> list[Polygon] | None:
        return None if value is None else check_polygons(value)


class CameraTuningStore:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._client = client
        self._key = f"{prefix}:camera_tuning"

    def all(self) -> dict[str, CameraTuning]:
        return {k.decode(): CameraTuning.model_validate_json(v) for k, v in self._client.hgetall(self._key).items()}

    def get(self, camera_id: str) -> CameraTuning:
        raw = self._client.hget(self._key, camera_id)
        return CameraTuning.model_validate_json(raw) if raw is not None else CameraTuning()

    def update(self, camera_id: str, **changes: object) -> CameraTuning:
        """Change some fields (others kept); a read-modify-write watched so concurrent edits don't mix."""

        def write(pipe: redis.client.Pipeline) -> CameraTuning:
            raw = pipe.hget(self._key, camera_id)
            current = CameraTuning.model_validate_json(raw) if raw is not None else CameraTuning()
            tuned = CameraTuning.model_validate({**current.model_dump(), **changes, "updated_ts": time.time()})
            pipe.multi()
            pipe.hset(self._key, camera_id, tuned.model_dump_json())
            return tuned

        return self._client.transaction(write, self._key, value_from_callable=True)


def effective(camera: CameraConfig | None, tuning: CameraTuning | None) -> tuple[float | None, list[Polygon]]:
    """(threshold override or None, ignore polygons) from the configuration and the live overrides."""
    threshold = tuning.threshold if tuning is not None and tuning.threshold is not None else (
        camera.threshold if camera is not None else None)
    if tuning is not None and tuning.ignore_regions is not None:
        regions = tuning.ignore_regions
    else:
        regions = check_polygons(camera.ignore_regions) if camera is not None else []
    return threshold, regions


def ignore_mask(polygons: Sequence[Polygon], width: int, height: int) -> np.ndarray:
    """(height, width) bool, True inside any polygon."""
    mask = np.zeros((height, width), np.uint8)
    for poly in polygons:
        pts = np.array([[round(x * (width - 1)), round(y * (height - 1))] for x, y in poly], np.int32)
        cv2.fillPoly(mask, [pts], 1)
    return mask.astype(bool)


def apply_ignore(score: ScoreMessage, polygons: Sequence[Polygon]) -> ScoreMessage:
    """The score with its map zeroed inside the polygons and its image score capped accordingly."""
    if not polygons:
        return score
    amap = imaging.dequantize_map(score.anomaly_map_png, score.map_min, score.map_max)
    inside = ignore_mask(polygons, amap.shape[1], amap.shape[0])
    if not inside.any():
        return score
    amap = np.where(inside, 0.0, amap).astype(np.float32)
    png, lo, hi = imaging.quantize_map(amap, amap.shape[0])
    outside_max = float(amap[~inside].max()) if (~inside).any() else 0.0
    return score.model_copy(update={"anomaly_map_png": png, "map_min": lo, "map_max": hi,
                                    "image_score": min(score.image_score, outside_max)})
