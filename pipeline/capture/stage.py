"""One camera's capture loop: source -> resize -> JPEG -> FrameHeader -> publisher."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from pipeline.capture.sources import FrameSource, open_source
from pipeline.config import CameraConfig, CaptureSettings
from pipeline.imaging import encode_jpeg
from pipeline.logging import get_logger
from pipeline.metrics import FRAMES_CAPTURED, FRAMES_DROPPED
from schemas.frames import FrameHeader


class FramePublisher(Protocol):
    """What the stage needs from its publisher (`pipeline.capture.publisher.DroppingPublisher`, or
    `pipeline.recording.from_camera.RecorderPublisher`): a non-blocking offer."""

    def offer(self, camera_id: str, value: bytes, headers: list[tuple[str, bytes]]) -> bool | None: ...


@dataclass
class CaptureStats:
    camera_id: str
    captured: int = 0
    # Acknowledged / dropped by the publisher; final only after the publisher is flushed.
    published: int = 0
    dropped: int = 0
    # Frames lost before publishing: unreadable source files and encode errors.
    skipped: int = 0
    seconds: float = 0.0
    error: str | None = None


def resize_to_width(rgb: np.ndarray, width: int | None) -> np.ndarray:
    """Scale to ``width`` keeping the aspect ratio; None or the same width is a no-op."""
    h, w = rgb.shape[:2]
    if not width or w == width:
        return rgb
    height = max(1, round(h * width / w))
    # INTER_AREA avoids aliasing when shrinking; it is blocky when enlarging.
    interp = cv2.INTER_AREA if width < w else cv2.INTER_LINEAR
    return cv2.resize(rgb, (width, height), interpolation=interp)


def _counter(publisher: object, name: str, camera_id: str) -> int:
    counts = getattr(publisher, name, None)
    try:
        return int(counts.get(camera_id, 0)) if counts is not None else 0
    except (AttributeError, TypeError, ValueError):
        return 0


class CaptureStage:
    """Reads one camera and offers each encoded frame to the publisher.

    ``seq`` only counts frames actually offered, so downstream sees a gap-free sequence unless
    the publisher drops. A replay starts at 0 (its session keeps it apart); a live camera starts
    at the epoch in milliseconds, so a restarted capture worker continues above the sequence
    numbers it used before (alerting ignores numbers it has already seen) at up to 1000 fps.
    """

    def __init__(
        self,
        camera: CameraConfig,
        capture_settings: CaptureSettings,
        publisher: FramePublisher,
        replay_session: str | None = None,
        seq_start: int | None = None,
        on_frame: Callable[[float], None] | None = None,
        live: bool | None = None,
    ) -> None:
        self.camera = camera
        self.settings = capture_settings
        self.publisher = publisher
        self.replay_session = replay_session
        if seq_start is None:
            seq_start = 0 if replay_session else int(time.time() * 1000)
        self.seq = seq_start
        # Health tracking (managed capture): called with the capture time of every frame read.
        self.on_frame = on_frame
        # Live capture stamps a recorded folder with the present; a replay or a recording keeps its
        # recorded times. None: live unless replaying.
        self.live = replay_session is None if live is None else live
        self.source: FrameSource | None = None
        self._log = get_logger(__name__).bind(camera=camera.id)

    def open(self, stop: threading.Event) -> FrameSource:
        return open_source(self.camera, self.settings, stop, live=self.live)

    def run(self, stop: threading.Event, max_frames: int | None = None) -> CaptureStats:
        """Capture until the source ends, ``stop`` is set, or ``max_frames`` were captured.

        Raises SourceError when the source cannot be opened at all.
        """
        stats = CaptureStats(camera_id=self.camera.id)
        started = time.monotonic()
        source = self.source = self.open(stop)
        self._log.info("capture_started", source=repr(source), replay_session=self.replay_session)
        frames = iter(source)
        try:
            for rgb, capture_ts in frames:
                stats.captured += 1
                FRAMES_CAPTURED.labels(camera=self.camera.id).inc()
                if self.on_frame is not None:
                    self.on_frame(capture_ts)
                try:
                    self._publish(rgb, capture_ts)
                except (cv2.error, ValueError) as exc:
                    stats.skipped += 1
                    FRAMES_DROPPED.labels(camera=self.camera.id, reason="encode_error").inc()
                    self._log.warning("frame_encode_failed", error=str(exc), shape=getattr(rgb, "shape", ""))
                if stop.is_set() or (max_frames is not None and stats.captured >= max_frames):
                    break
        finally:
            # Closing the generator releases cv2 captures promptly instead of at garbage collection.
            close = getattr(frames, "close", None)
            if close is not None:
                close()
        stats.skipped += source.skipped
        stats.published = _counter(self.publisher, "published", self.camera.id)
        stats.dropped = _counter(self.publisher, "dropped", self.camera.id)
        stats.seconds = time.monotonic() - started
        self._log.info("capture_finished", captured=stats.captured, skipped=stats.skipped,
                       seconds=round(stats.seconds, 3), next_seq=self.seq)
        return stats

    def _publish(self, rgb: np.ndarray, capture_ts: float) -> None:
        image = resize_to_width(rgb, self.settings.resize_width)
        jpeg = encode_jpeg(image, self.settings.jpeg_quality)
        h, w = image.shape[:2]
        header = FrameHeader(
            camera_id=self.camera.id,
            line_id=self.camera.line,
            product_class=self.camera.product_class,
            seq=self.seq,
            capture_ts=capture_ts,
            width=w,
            height=h,
            encoding="jpeg",
            replay_session=self.replay_session,
        )
        self.publisher.offer(self.camera.id, jpeg, header.to_header())
        # Only a frame that reached the publisher consumes a sequence number.
        self.seq += 1
