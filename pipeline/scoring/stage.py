"""Turning raw frame records into score messages.

Validation rejects a record with a reason (the worker sends it to the DLQ) before any work is done
with it: header fields, class allowlist, magic bytes and the real image size from the encoded
header are checked before a pixel is decoded. Scoring groups a micro-batch by product class so
frames of many cameras share one forward; a batch that fails is retried frame by frame so one bad
frame cannot take its neighbours down with it.

Classes: configured classes are prepared by ``prepare_classes`` when the worker starts. A class
seen for the first time is prepared on the spot, or, with ``defer_new_classes``, in a background
thread while its frames are *held* by the stage (never dropped): they are scored by a later
``score`` call once the class is ready, and ``commit_floor`` keeps the offsets of their partitions
from being committed past them, so a crash meanwhile redelivers them. Other classes' frames go on
being scored meanwhile. Before any class is prepared (a worker without ``scoring.classes`` that
just started) there is nothing to hold up, so the first classes are prepared in place.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import CameraConfig, ScoringSettings
from pipeline.engine import gpu_decode
from pipeline.engine.engine import AnomalyEngine, FrameScore
from pipeline.engine.threads import pin_intra_op_threads
from pipeline.engine.tiling import UNTILED, TileGrid
from pipeline.imaging import FrameDecodeError, decode_image_scaled, decode_scale, quantize_map, thumbnail_jpeg
from pipeline.logging import get_logger
from pipeline.metrics import (
    BATCH_SIZE,
    CAMERA_LABEL,
    CLASS_LABEL,
    END_TO_END_SECONDS,
    FRAMES_SCORED,
    FRAMES_STALE,
    SCORING_SECONDS,
)
from pipeline.paths import PathEscapeError
from pipeline.references.sync import ReferenceSync
from pipeline.runtime.envelope import Envelope, Output, Record, Reject, Skip, StageResult
from pipeline.runtime.loop import Stage
from pipeline.scoring import checks
from pipeline.scoring.checks import FrameCheckError, first_line
from schemas import FrameHeader, ScoreMessage
from schemas.scores import FrameSource

log = get_logger(__name__)

# Thumbnails fit this square whatever the frame's shape (a 256x65000 frame must not make a 10 MB one).
THUMBNAIL_BOX = 256


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


def thumbnail(image: np.ndarray, box: int = THUMBNAIL_BOX) -> bytes:
    return thumbnail_jpeg(image, box=box, quality=80)


def _partition(source: object) -> tuple[str, int] | None:
    topic, partition = getattr(source, "topic", None), getattr(source, "partition", None)
    return (topic, partition) if isinstance(topic, str) and isinstance(partition, int) else None


def tiles_by_camera(cameras: Sequence[CameraConfig]) -> dict[str, TileGrid]:
    """Camera id -> its tile grid, for the cameras configured with more than one tile."""
    return {c.id: TileGrid(c.tiles[0], c.tiles[1], c.tile_overlap) for c in cameras
            if tuple(c.tiles) != (1, 1)}


@dataclass(frozen=True)
class _Ready:
    frame: Frame
    image: object  # np.ndarray on the host, or a (3, H, W) uint8 tensor on the engine's CUDA device
    thumb: np.ndarray  # the picture the thumbnail is made from (the same decode)


class ScoringStage(Stage):
    def __init__(self, engine: AnomalyEngine, settings: ScoringSettings, shots_dir: Path | None = None,
                 k_shot: int = 0, clock: Callable[[], float] = time.time,
                 defer_new_classes: bool = False, references: ReferenceSync | None = None,
                 tiles: Mapping[str, TileGrid] | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.shots_dir = shots_dir
        self.k_shot = k_shot
        self.clock = clock
        self.allowed: frozenset[str] | None = (
            frozenset(settings.classes) if settings.classes is not None else None)
        if settings.classes:
            CLASS_LABEL.configure(settings.classes)
        # Prepared classes, least recently scored first; beyond the cap the oldest is forgotten.
        self._cap = max(settings.max_classes, len(settings.classes or ()))
        self._classes: OrderedDict[str, None] = OrderedDict()
        self.defer_new_classes = defer_new_classes
        self._preparing: dict[str, Future[None]] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._held: list[_Ready] = []  # decoded frames waiting for their class
        self._lock = threading.Lock()
        # Next offsets processed per partition, kept until they could be committed whole.
        self._wanted: dict[tuple[str, int], tuple[Any, int]] = {}
        # Versioned reference sets in Redis win over shots_dir; versions are followed live.
        self.references = references
        self.reference_versions: dict[str, str | None] = {}
        self.tiles = dict(tiles or {})
        # nvjpeg on the engine's GPU; never on a CPU engine.
        # (engine None: a stage used for checking records only, as in the memory-bound tests.)
        self.gpu_decode = engine is not None and gpu_decode.available(engine.device)

    # -- validation ---------------------------------------------------------------------------
    def accept(self, value: bytes | None, headers: list[tuple[str, bytes]] | None, source: object,
               ) -> Frame | Rejected | Skipped:
        try:
            return self._accept(value, headers, source)
        except FrameCheckError as exc:
            return Rejected(exc.reason, source)

    def _accept(self, value: bytes | None, headers: list[tuple[str, bytes]] | None, source: object,
                ) -> Frame | Skipped:
        if not value:
            raise FrameCheckError(checks.EMPTY, "record has no value")
        if len(value) > self.settings.max_frame_bytes:
            raise FrameCheckError(checks.OVERSIZED, f"{len(value)} bytes > {self.settings.max_frame_bytes}")
        header = checks.parse_header(headers)
        if self.allowed is not None and header.product_class not in self.allowed:
            raise FrameCheckError(checks.UNKNOWN_CLASS, f"{header.product_class!r} is not in scoring.classes")
        if header.width * header.height > self.settings.max_frame_pixels:
            raise FrameCheckError(checks.OVERSIZED, f"{header.width}x{header.height} pixels "
                                                  f"> {self.settings.max_frame_pixels}")
        now = self.clock()
        if header.replay_session is None and header.capture_ts - now > self.settings.max_future_s:
            # Replays are stamped relative to their start and may run ahead of the clock at --speed max.
            raise FrameCheckError(checks.FUTURE_CAPTURE_TS, f"capture_ts {header.capture_ts:.3f} is "
                                                          f"{header.capture_ts - now:.0f} s ahead of the clock")
        if self._stale(header, now):
            FRAMES_STALE.labels(camera=CAMERA_LABEL(header.camera_id)).inc()
            return Skipped("stale", source)
        checks.check_encoded(value, header, self.settings.max_frame_pixels)
        # Decoded later, by `decode_frame` (the runtime's decode threads) or by `score` itself.
        return Frame(header, None, source, data=value)

    def _stale(self, header: FrameHeader, now: float) -> bool:
        # Replays are scored whatever their age: they exist to look at the past.
        limit = self.settings.staleness_s
        return limit is not None and header.replay_session is None and now - header.capture_ts > limit

    # -- decoding -----------------------------------------------------------------------------
    def decode_scale(self, header: FrameHeader) -> int:
        """The DCT-domain reduction (1, 2, 4, 8) for this camera: the smallest picture that still
        feeds every tile at model resolution and gives a full-width thumbnail."""
        need_w, need_h = self.engine.pixels_needed(self.tiles.get(header.camera_id, UNTILED))
        return decode_scale(header.width, header.height, max(need_w, THUMBNAIL_BOX), max(need_h, THUMBNAIL_BOX))

    def decode_frame(self, frame: Frame) -> Frame | Rejected:
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
            return Rejected(f"{checks.UNDECODABLE}: {exc}", frame.source)
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
            d = self.decode_frame(f)
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
            thumb = gpu_decode.thumbnail_on_device(image, THUMBNAIL_BOX)
            ready.append(_Ready(replace(f, data=None), image, thumb))
        return ready, failed

    # -- classes ------------------------------------------------------------------------------
    def prepare_classes(self, classes: Iterable[str] | None = None) -> list[str]:
        """Prepare classes now (default: ``scoring.classes``); returns those that failed (logged)."""
        failed = []
        for product_class in self.settings.classes or [] if classes is None else classes:
            try:
                self._prepare(product_class)
            except Exception as exc:
                # A class that cannot be prepared now is tried again when its first frame comes.
                log.error("class_preparation_failed", product_class=product_class, error=first_line(exc))
                failed.append(product_class)
            else:
                self._mark_ready(product_class)
        return failed

    def _prepare(self, product_class: str) -> None:
        started = time.perf_counter()
        version = self.references.load(self.engine, product_class) if self.references is not None else None
        previous = self.reference_versions.get(product_class)
        if version is None and previous is not None and previous != "dir":
            self.engine.clear_references(product_class)  # its set was removed: back to shots_dir/zero-shot
        if version is None and self.shots_dir is not None:
            try:
                self.engine.load_references(product_class, self.shots_dir, self.k_shot)
                version = "dir"
            except (FileNotFoundError, PathEscapeError) as exc:
                log.warning("no_references_zero_shot", product_class=product_class, error=str(exc))
        self.reference_versions[product_class] = version
        self.engine.prepare(product_class)
        log.info("class_prepared", product_class=product_class,
                 seconds=round(time.perf_counter() - started, 3))

    def _mark_ready(self, product_class: str) -> None:
        with self._lock:
            self._classes[product_class] = None
            self._classes.move_to_end(product_class)
            evicted = []
            while len(self._classes) > self._cap:
                evicted.append(self._classes.popitem(last=False)[0])
        for old in evicted:
            self.engine.forget_class(old)
            log.info("class_forgotten", product_class=old, cap=self._cap)

    def ready(self, product_class: str) -> bool:
        with self._lock:
            return product_class in self._classes

    def _ensure_class(self, product_class: str) -> None:
        if self.ready(product_class):
            return
        self._prepare(product_class)
        self._mark_ready(product_class)

    def _start_preparing(self, product_class: str) -> Future[None]:
        with self._lock:
            future = self._preparing.get(product_class)
            if future is None:
                if self._executor is None:
                    # Its forwards (prompts, references) keep the thread count of this thread.
                    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="class-prepare",
                                                        initializer=pin_intra_op_threads,
                                                        initargs=(torch.get_num_threads(),))
                log.info("class_preparing_in_background", product_class=product_class)
                future = self._executor.submit(self._prepare, product_class)
                self._preparing[product_class] = future
            return future

    @property
    def held(self) -> int:
        """Frames waiting for their class to be prepared."""
        with self._lock:
            return len(self._held)

    def commit_floor(self, offsets: Mapping[Any, int]) -> dict[Any, int]:
        """Offsets safe to commit, given ``offsets`` processed now (``{TopicPartition: next offset}``).

        A partition with held frames commits up to its earliest held frame; once they are scored
        (a later call) the rest of what was processed is returned again, so nothing is left behind.
        """
        with self._lock:
            for tp, offset in offsets.items():
                key = (tp.topic, tp.partition) if hasattr(tp, "topic") else tuple(tp)
                current = self._wanted.get(key)
                if current is None or offset > current[1]:
                    self._wanted[key] = (tp, offset)
            floors: dict[tuple[str, int], int] = {}
            for r in self._held:
                src = r.frame.source
                part = _partition(src)
                if part is not None:
                    floors[part] = min(floors.get(part, src.offset), src.offset)  # type: ignore[attr-defined]
            out = {}
            for key, (tp, offset) in list(self._wanted.items()):
                floor = floors.get(key)
                out[tp] = offset if floor is None else min(offset, floor)
                if floor is None:
                    del self._wanted[key]
            return out

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # -- scoring ------------------------------------------------------------------------------
    def score(self, frames: Sequence[Frame]) -> tuple[list[tuple[Frame, ScoreMessage]], list[Rejected]]:
        """Score a micro-batch, decoded or not (plus held frames whose class became ready).

        Returns (frame, message) pairs and frames that failed; frames of a class still being
        prepared in the background are held and come back from a later call.
        """
        if self.references is not None:
            # A class whose reference version moved is prepared again before its frames are scored.
            changed = self.references.changed()
            with self._lock:
                for product_class in changed:
                    self._classes.pop(product_class, None)
        ready, failed = self._ready(frames)
        with self._lock:
            ready = [*self._held, *ready]
            self._held = []
        by_class: dict[str, list[_Ready]] = defaultdict(list)
        for r in ready:
            by_class[r.frame.header.product_class].append(r)
        done: list[tuple[Frame, ScoreMessage]] = []
        with self._lock:
            # Before any class is prepared there is nothing to hold up: the first are prepared in place.
            defer = self.defer_new_classes and bool(self._classes)
        for product_class, group in by_class.items():
            if not self.ready(product_class):
                if defer:
                    future = self._start_preparing(product_class)
                    if not future.done():
                        with self._lock:
                            self._held.extend(group)
                        continue
                    with self._lock:
                        self._preparing.pop(product_class, None)
                    error = future.exception()
                    if error is not None:
                        failed.extend(Rejected(f"{checks.CLASS_PREPARATION_FAILED}: {first_line(error)}",
                                               r.frame.source) for r in group)
                        continue
                    self._mark_ready(product_class)
                else:
                    try:
                        self._ensure_class(product_class)
                    except Exception as exc:
                        failed.extend(Rejected(f"{checks.CLASS_PREPARATION_FAILED}: {first_line(exc)}",
                                               r.frame.source) for r in group)
                        continue
            self._mark_ready(product_class)  # most recently used
            try:
                results = self._timed_score(group, product_class)
            except Exception as exc:
                log.warning("batch_failed_retrying_singly", product_class=product_class, error=first_line(exc))
                results = []
                for r in group:
                    try:
                        results.extend(self._timed_score([r], product_class))
                    except Exception as single:
                        failed.append(Rejected(f"{checks.SCORING_FAILED}: {first_line(single)}", r.frame.source))
                        results.append(None)
            for r, result in zip(group, results, strict=True):
                if result is None:
                    continue
                try:
                    done.append((r.frame, self._stamp(r.frame, self._message(r, result))))
                except Exception as exc:  # building the message (map, thumbnail) is per frame too
                    failed.append(Rejected(f"{checks.SCORING_FAILED}: {first_line(exc)}", r.frame.source))
        return done, failed

    # -- on the stream runtime ------------------------------------------------------------------
    def decode(self, env: Envelope) -> Frame | Reject | Skip:
        """Runs in the runtime's decode pool: validate and decode the image of one frame record."""
        verdict = self.accept(env.value, list(env.headers), env)
        if isinstance(verdict, Frame):
            verdict = self.decode_frame(verdict)  # in the pool: overlaps the model's current batch
        if isinstance(verdict, Rejected):
            return Reject(env, verdict.reason)
        if isinstance(verdict, Skipped):
            return Skip(env, verdict.reason)
        return verdict

    def handle(self, records: Sequence[Record[Frame]]) -> StageResult:
        """Score a micro-batch of decoded frames: one score message per frame, or its reject.

        Frames of a class still being prepared are held (see ``commit_floor``) and come out of a
        later ``handle`` or ``on_tick``."""
        return self._result(*self.score([r.message for r in records]))

    def on_tick(self) -> StageResult:
        # Held frames whose class became ready are scored even when no new record arrives.
        return self._result(*self.score([])) if self.held else StageResult()

    def settled(self) -> bool:
        return self.held == 0

    @staticmethod
    def _result(scored: list[tuple[Frame, ScoreMessage]], failed: list[Rejected]) -> StageResult:
        return StageResult(
            outputs=[Output("scores", msg.model_dump_json().encode(), key=f.header.camera_id.encode(),
                            source=f.source if isinstance(f.source, Envelope) else None)
                     for f, msg in scored],
            rejects=[Reject(r.source, r.reason) for r in failed if isinstance(r.source, Envelope)],
        )

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
        FRAMES_SCORED.labels(product_class=CLASS_LABEL(product_class), method=self.engine.method).inc(len(group))
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
        broker_ms = getattr(frame.source, "timestamp_ms", getattr(frame.source, "timestamp", None))
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

