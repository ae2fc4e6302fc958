"""Turning raw frame records into score messages.

Validation rejects a record with a reason (the worker sends it to the DLQ); scoring groups a
micro-batch by product class so frames of many cameras share one forward; a batch that fails is
retried frame by frame so one bad frame cannot take its neighbours down with it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from pydantic import ValidationError

from pipeline.config import ScoringSettings
from pipeline.engine.engine import AnomalyEngine, FrameScore
from pipeline.imaging import FrameDecodeError, decode_image, encode_jpeg, quantize_map
from pipeline.logging import get_logger
from pipeline.metrics import BATCH_SIZE, END_TO_END_SECONDS, FRAMES_SCORED, FRAMES_STALE, SCORING_SECONDS
from pipeline.references.sync import ReferenceSync
from schemas import FrameHeader, ScoreMessage
from schemas.scores import FrameSource

log = get_logger(__name__)

THUMBNAIL_WIDTH = 256


@dataclass(frozen=True)
class Frame:
    header: FrameHeader
    image: np.ndarray  # RGB uint8 (H, W, 3)
    source: object  # the consumer record, for offsets and dead letters


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


class ScoringStage:
    def __init__(self, engine: AnomalyEngine, settings: ScoringSettings, shots_dir: Path | None = None,
                 k_shot: int = 0, clock: Callable[[], float] = time.time,
                 references: ReferenceSync | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.shots_dir = shots_dir
        self.k_shot = k_shot
        self.clock = clock
        self._classes: set[str] = set()
        # Versioned reference sets in Redis win over shots_dir; versions are followed live.
        self.references = references
        self.reference_versions: dict[str, str | None] = {}

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
        try:
            image = decode_image(value)
        except FrameDecodeError as exc:
            return Rejected(f"undecodable: {exc}", source)
        if image.shape[:2] != (header.height, header.width):
            return Rejected(f"dimension_mismatch: header {header.width}x{header.height}, "
                            f"image {image.shape[1]}x{image.shape[0]}", source)
        return Frame(header, image, source)

    def _stale(self, header: FrameHeader) -> bool:
        # Replays are scored whatever their age: they exist to look at the past.
        limit = self.settings.staleness_s
        return limit is not None and header.replay_session is None and self.clock() - header.capture_ts > limit

    # -- scoring ------------------------------------------------------------------------------
    def _ensure_class(self, product_class: str) -> None:
        if product_class in self._classes:
            return
        version = self.references.load(self.engine, product_class) if self.references is not None else None
        previous = self.reference_versions.get(product_class)
        if version is None and previous is not None and previous != "dir":
            self.engine.clear_references(product_class)  # its set was removed: back to shots_dir/zero-shot
        if version is None and self.shots_dir is not None:
            try:
                self.engine.load_references(product_class, self.shots_dir, self.k_shot)
                version = "dir"
            except FileNotFoundError as exc:
                log.warning("no_references_zero_shot", product_class=product_class, error=str(exc))
        self.reference_versions[product_class] = version
        self.engine.prepare(product_class)
        self._classes.add(product_class)

    def score(self, frames: Sequence[Frame]) -> tuple[list[tuple[Frame, ScoreMessage]], list[Rejected]]:
        """Score a micro-batch; returns (frame, message) pairs and frames that failed scoring."""
        if self.references is not None:
            # A class whose reference version moved is reloaded before this batch is scored.
            self._classes -= self.references.changed()
        by_class: dict[str, list[Frame]] = defaultdict(list)
        for f in frames:
            by_class[f.header.product_class].append(f)
        done: list[tuple[Frame, ScoreMessage]] = []
        failed: list[Rejected] = []
        for product_class, group in by_class.items():
            try:
                self._ensure_class(product_class)
                results = self._timed_score(group, product_class)
            except Exception as exc:
                log.warning("batch_failed_retrying_singly", product_class=product_class, error=_first_line(exc))
                results = []
                for f in group:
                    try:
                        results.extend(self._timed_score([f], product_class))
                    except Exception as single:
                        failed.append(Rejected(f"scoring_failed: {_first_line(single)}", f.source))
                        results.append(None)
            for f, r in zip(group, results, strict=True):
                if r is not None:
                    done.append((f, self._stamp(f, self._message(f, r))))
        return done, failed

    def _timed_score(self, group: Sequence[Frame], product_class: str) -> list[FrameScore | None]:
        start = time.perf_counter()
        results = self.engine.score([f.image for f in group], product_class)
        SCORING_SECONDS.observe(time.perf_counter() - start)
        BATCH_SIZE.observe(len(group))
        FRAMES_SCORED.labels(product_class=product_class, method=self.engine.method).inc(len(group))
        return list(results)

    def _stamp(self, frame: Frame, msg: ScoreMessage) -> ScoreMessage:
        """Where the frame lies in Kafka and which prompts and references scored it (traceability)."""
        src = frame.source
        topic, partition, offset = (getattr(src, a, None) for a in ("topic", "partition", "offset"))
        if isinstance(topic, str) and isinstance(partition, int) and isinstance(offset, int):
            msg.source = FrameSource(topic=topic, partition=partition, offset=offset)
        msg.prompt_version = self.engine.prompt_version(frame.header.product_class)
        msg.reference_version = self.reference_versions.get(frame.header.product_class)
        return msg

    @staticmethod
    def _ingest_ts(frame: Frame) -> float:
        """Capture time for live frames; for replays (recorded hours ago) the broker's append time."""
        broker_ms = getattr(frame.source, "timestamp", None)
        if frame.header.replay_session is not None and isinstance(broker_ms, int) and broker_ms > 0:
            return broker_ms / 1000.0
        return frame.header.capture_ts

    def _message(self, frame: Frame, result: FrameScore) -> ScoreMessage:
        png, lo, hi = quantize_map(result.anomaly_map, self.settings.map_size)
        now = self.clock()
        latency = max(0.0, now - self._ingest_ts(frame))
        END_TO_END_SECONDS.observe(latency)
        return ScoreMessage(
            frame=frame.header.ref(), image_score=result.image_score, anomaly_map_png=png, map_min=lo,
            map_max=hi, thumbnail_jpeg=thumbnail(frame.image), model_fingerprint=self.engine.fingerprint,
            method=self.engine.method, latency_ms=latency * 1000.0, scored_ts=now,
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
