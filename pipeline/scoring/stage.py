"""Turning raw frame records into score messages.

Validation rejects a record with a reason (the worker sends it to the DLQ); scoring groups a
micro-batch by product class so frames of many cameras share one forward; a batch that fails is
retried frame by frame so one bad frame cannot take its neighbours down with it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
from pydantic import ValidationError

from pipeline.config import CameraConfig, ScoringSettings
from pipeline.engine import gpu_decode
from pipeline.engine.engine import AnomalyEngine, FrameScore
from pipeline.engine.tiling import UNTILED, TileGrid
from pipeline.imaging import FrameDecodeError, decode_image_scaled, decode_scale, encode_jpeg, quantize_map
from pipeline.logging import get_logger
from pipeline.metrics import BATCH_SIZE, END_TO_END_SECONDS, FRAMES_SCORED, FRAMES_STALE, SCORING_SECONDS
from schemas import FrameHeader, ScoreMessage

log = get_logger(__name__)

THUMBNAIL_WIDTH = 256


@dataclass(frozen=True)
class Frame:
    """An accepted frame. ``image`` is None until ``ScoringStage.decode`` ran; then it is RGB uint8
    decoded at 1/``scale`` of the header's size (what the model and the thumbnail need, no more)."""

    header: FrameHeader
    image: np.ndarray | None
    source: object  # the consumer record, for offsets and dead letters
    data: bytes | None = None  # the encoded frame, kept until it is decoded
    scale: int = 1


@dataclass(frozen=True)
class Rejected:
    reason: str  # "code: detail"
    source: object


@dataclass(frozen=True)
class Skipped:
    reason: str
    source: object


def thumbnail(image: np.ndarray, width: int = THUMBNAIL_WIDTH) -> bytes:
    h, w = image.shape[:2]
    if w > width:
        image = cv2.resize(image, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)
    return encode_jpeg(image, quality=80)


def tiles_by_camera(cameras: Sequence[CameraConfig]) -> dict[str, TileGrid]:
    """Camera id -> its tile grid, for the cameras configured with more than one tile."""
    return {c.id: TileGrid(c.tiles[0], c.tiles[1], c.tile_overlap) for c in cameras
            if tuple(c.tiles) != (1, 1)}


@dataclass(frozen=True)
class _Ready:
    frame: Frame
    image: object  # np.ndarray on the host, or a (3, H, W) uint8 tensor on the engine's CUDA device
    thumb: np.ndarray  # the picture the thumbnail is made from (the same decode)


class ScoringStage:
    def __init__(self, engine: AnomalyEngine, settings: ScoringSettings, shots_dir: Path | None = None,
                 k_shot: int = 0, clock: Callable[[], float] = time.time,
                 tiles: Mapping[str, TileGrid] | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.shots_dir = shots_dir
        self.k_shot = k_shot
        self.clock = clock
        self.tiles = dict(tiles or {})
        # nvjpeg on the engine's GPU; never on a CPU engine.
        self.gpu_decode = gpu_decode.available(engine.device)
        self._classes: set[str] = set()

    # -- validation ---------------------------------------------------------------------------
    def accept(self, value: bytes | None, headers: list[tuple[str, bytes]] | None, source: object,
               ) -> Frame | Rejected | Skipped:
        if not value:
            return Rejected("empty: record has no value", source)
        if len(value) > self.settings.max_frame_bytes:
            return Rejected(f"oversized: {len(value)} bytes > {self.settings.max_frame_bytes}", source)
        try:
            header = FrameHeader.from_headers(headers)
        except (ValidationError, ValueError) as exc:
            return Rejected(f"bad_header: {_first_line(exc)}", source)
        if header.width * header.height > self.settings.max_frame_pixels:
            return Rejected(f"oversized: {header.width}x{header.height} pixels", source)
        if self._stale(header):
            FRAMES_STALE.labels(camera=header.camera_id).inc()
            return Skipped("stale", source)
        # Decoded later, by `decode` (a worker's decode threads) or by `score` itself.
        return Frame(header, None, source, data=value)

    def _stale(self, header: FrameHeader) -> bool:
        # Replays are scored whatever their age: they exist to look at the past.
        limit = self.settings.staleness_s
        return limit is not None and header.replay_session is None and self.clock() - header.capture_ts > limit

    # -- decoding -----------------------------------------------------------------------------
    def decode_scale(self, header: FrameHeader) -> int:
        """The DCT-domain reduction (1, 2, 4, 8) for this camera: the smallest picture that still
        feeds every tile at model resolution and gives a full-width thumbnail."""
        need_w, need_h = self.engine.pixels_needed(self.tiles.get(header.camera_id, UNTILED))
        return decode_scale(header.width, header.height, max(need_w, THUMBNAIL_WIDTH), need_h)

    def decode(self, frame: Frame) -> Frame | Rejected:
        """Decode an accepted frame at the reduced scale it needs. Thread-safe; OpenCV releases the GIL,
        so a pool of threads decodes the next micro-batch while the model runs. On a CUDA engine a JPEG
        is left encoded here: `score` decodes the whole micro-batch on the GPU (nvjpeg)."""
        if frame.image is not None or frame.data is None:
            return frame
        if self.gpu_decode and gpu_decode.is_jpeg(frame.data):
            return frame
        header = frame.header
        scale = self.decode_scale(header)
        try:
            image = decode_image_scaled(frame.data, scale)
        except FrameDecodeError as exc:
            return Rejected(f"undecodable: {exc}", frame.source)
        h, w = image.shape[:2]
        # libjpeg rounds a reduced size up, area resizing (other formats) down: either is the header's size.
        if abs(h - header.height / scale) >= 1 or abs(w - header.width / scale) >= 1:
            return Rejected(f"dimension_mismatch: header {header.width}x{header.height}, "
                            f"image {w * scale}x{h * scale}", frame.source)
        return replace(frame, image=image, data=None, scale=scale)

    def _ready(self, frames: Sequence[Frame]) -> tuple[list[_Ready], list[Rejected]]:
        """Decode what is not decoded yet; on the GPU path, all pending JPEGs in one nvjpeg call."""
        ready: list[_Ready] = []
        failed: list[Rejected] = []
        on_gpu: list[Frame] = []
        for f in frames:
            d = self.decode(f)
            if isinstance(d, Rejected):
                failed.append(d)
            elif d.image is None:
                on_gpu.append(d)
            else:
                ready.append(_Ready(d, d.image, d.image))
        if on_gpu:
            ready_gpu, failed_gpu = self._decode_on_gpu(on_gpu)
            ready.extend(ready_gpu)
            failed.extend(failed_gpu)
        return ready, failed

    def _decode_on_gpu(self, frames: Sequence[Frame]) -> tuple[list[_Ready], list[Rejected]]:
        device = self.engine.device
        try:
            images = gpu_decode.decode_jpegs([f.data or b"" for f in frames], device)
        except RuntimeError:
            if len(frames) == 1:
                return [], [Rejected("undecodable: nvjpeg could not decode the frame", frames[0].source)]
            ready: list[_Ready] = []
            failed: list[Rejected] = []
            for f in frames:  # find the bad one; the others still go through the GPU
                r, x = self._decode_on_gpu([f])
                ready.extend(r)
                failed.extend(x)
            return ready, failed
        ready, failed = [], []
        for f, image in zip(frames, images, strict=True):
            if tuple(image.shape[1:]) != (f.header.height, f.header.width):
                failed.append(Rejected(f"dimension_mismatch: header {f.header.width}x{f.header.height}, "
                                       f"image {image.shape[2]}x{image.shape[1]}", f.source))
                continue
            thumb = gpu_decode.thumbnail_on_device(image, THUMBNAIL_WIDTH)
            ready.append(_Ready(replace(f, data=None), image, thumb))
        return ready, failed

    # -- scoring ------------------------------------------------------------------------------
    def _ensure_class(self, product_class: str) -> None:
        if product_class in self._classes:
            return
        if self.shots_dir is not None:
            try:
                self.engine.load_references(product_class, self.shots_dir, self.k_shot)
            except FileNotFoundError as exc:
                log.warning("no_references_zero_shot", product_class=product_class, error=str(exc))
        self.engine.prepare(product_class)
        self._classes.add(product_class)

    def score(self, frames: Sequence[Frame]) -> tuple[list[tuple[Frame, ScoreMessage]], list[Rejected]]:
        """Score a micro-batch (decoded or not); returns (frame, message) pairs and frames that failed."""
        ready, failed = self._ready(frames)
        by_class: dict[str, list[_Ready]] = defaultdict(list)
        for r in ready:
            by_class[r.frame.header.product_class].append(r)
        done: list[tuple[Frame, ScoreMessage]] = []
        for product_class, group in by_class.items():
            try:
                self._ensure_class(product_class)
                results = self._timed_score(group, product_class)
            except Exception as exc:
                log.warning("batch_failed_retrying_singly", product_class=product_class, error=_first_line(exc))
                results = []
                for r in group:
                    try:
                        results.extend(self._timed_score([r], product_class))
                    except Exception as single:
                        failed.append(Rejected(f"scoring_failed: {_first_line(single)}", r.frame.source))
                        results.append(None)
            for r, result in zip(group, results, strict=True):
                if result is not None:
                    done.append((r.frame, self._message(r, result)))
        return done, failed

    def _timed_score(self, group: Sequence[_Ready], product_class: str) -> list[FrameScore | None]:
        start = time.perf_counter()
        images = [r.image for r in group]
        grids = [self.tiles.get(r.frame.header.camera_id, UNTILED) for r in group]
        if any(g != UNTILED for g in grids):
            results = self.engine.score(images, product_class, tiles=grids)
        else:
            results = self.engine.score(images, product_class)
        SCORING_SECONDS.observe(time.perf_counter() - start)
        BATCH_SIZE.observe(len(group))
        FRAMES_SCORED.labels(product_class=product_class, method=self.engine.method).inc(len(group))
        return list(results)

    @staticmethod
    def _ingest_ts(frame: Frame) -> float:
        """Capture time for live frames; for replays (recorded hours ago) the broker's append time."""
        broker_ms = getattr(frame.source, "timestamp", None)
        if frame.header.replay_session is not None and isinstance(broker_ms, int) and broker_ms > 0:
            return broker_ms / 1000.0
        return frame.header.capture_ts

    def _message(self, ready: _Ready, result: FrameScore) -> ScoreMessage:
        # The map is at model resolution already: quantised straight to map_size, no frame-size detour.
        frame = ready.frame
        png, lo, hi = quantize_map(result.anomaly_map, self.settings.map_size)
        now = self.clock()
        latency = max(0.0, now - self._ingest_ts(frame))
        END_TO_END_SECONDS.observe(latency)
        return ScoreMessage(
            frame=frame.header.ref(), image_score=result.image_score, anomaly_map_png=png, map_min=lo,
            map_max=hi, thumbnail_jpeg=thumbnail(ready.thumb), model_fingerprint=self.engine.fingerprint,
            method=self.engine.method, latency_ms=latency * 1000.0, scored_ts=now,
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
