"""Turning raw frame records into score messages.

Validation rejects a record with a reason (the worker sends it to the DLQ); scoring groups a
micro-batch by product class so frames of many cameras share one forward; a batch that fails is
retried frame by frame so one bad frame cannot take its neighbours down with it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
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
from pipeline.runtime.envelope import Envelope, Output, Record, Reject, Skip, StageResult
from pipeline.runtime.loop import Stage
from schemas import FrameHeader, ScoreMessage

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


class ScoringStage(Stage):
    def __init__(self, engine: AnomalyEngine, settings: ScoringSettings, shots_dir: Path | None = None,
                 k_shot: int = 0, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.settings = settings
        self.shots_dir = shots_dir
        self.k_shot = k_shot
        self.clock = clock
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
    def prepare_classes(self, product_classes: Iterable[str]) -> None:
        """Prepare classes ahead of their first frame (prompts, references); a failure is left to scoring."""
        for product_class in sorted(set(product_classes)):
            try:
                self._ensure_class(product_class)
            except Exception as exc:
                log.warning("class_prepare_failed", product_class=product_class, error=_first_line(exc))

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
        """Score a micro-batch; returns (frame, message) pairs and frames that failed scoring."""
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
                if r is None:
                    continue
                try:
                    done.append((f, self._message(f, r)))
                except Exception as exc:  # e.g. a thumbnail that cannot be encoded: this frame only
                    failed.append(Rejected(f"message_failed: {type(exc).__name__}: {_first_line(exc)}", f.source))
        return done, failed

    # -- on the stream runtime ------------------------------------------------------------------
    def decode(self, env: Envelope) -> Frame | Reject | Skip:
        """Runs in the runtime's decode pool: validate and decode the image of one frame record."""
        verdict = self.accept(env.value, list(env.headers), env)
        if isinstance(verdict, Rejected):
            return Reject(env, verdict.reason)
        if isinstance(verdict, Skipped):
            return Skip(env, verdict.reason)
        return verdict

    def handle(self, records: Sequence[Record[Frame]]) -> StageResult:
        """Score a micro-batch of decoded frames: one score message per frame, or its reject."""
        scored, failed = self.score([r.message for r in records])
        return StageResult(
            outputs=[Output("scores", msg.model_dump_json().encode(), key=f.header.camera_id.encode(),
                            source=f.source if isinstance(f.source, Envelope) else None)
                     for f, msg in scored],
            rejects=[Reject(r.source, r.reason) for r in failed if isinstance(r.source, Envelope)],
        )

    def _timed_score(self, group: Sequence[Frame], product_class: str) -> list[FrameScore | None]:
        start = time.perf_counter()
        results = self.engine.score([f.image for f in group], product_class)
        SCORING_SECONDS.observe(time.perf_counter() - start)
        BATCH_SIZE.observe(len(group))
        FRAMES_SCORED.labels(product_class=product_class, method=self.engine.method).inc(len(group))
        return list(results)

    @staticmethod
    def _ingest_ts(frame: Frame) -> float:
        """Capture time for live frames; for replays (recorded hours ago) the broker's append time."""
        broker_ms = getattr(frame.source, "timestamp_ms", getattr(frame.source, "timestamp", None))
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
