"""Recording from a camera: the capture stage, with the recorder as its publisher.

Frames are read, resized and encoded exactly as the capture worker publishes them (one capture
loop for both); instead of the frames topic they go to a :class:`Recorder`.
"""

from __future__ import annotations

import threading
from pathlib import Path

from pipeline.capture.stage import CaptureStage
from pipeline.config import CameraConfig, Settings
from pipeline.logging import get_logger
from pipeline.recording.segments import DEFAULT_SEGMENT_S
from pipeline.recording.writer import Recorder, RecordStats
from schemas.frames import FrameHeader

_log = get_logger(__name__)


class RecorderPublisher:
    """A capture publisher that writes each offered frame to the recorder.

    ``max_frames`` counts frames written (not frames read): reaching it sets ``stop``, which ends
    the capture stage after this frame."""

    def __init__(self, recorder: Recorder, stop: threading.Event, max_frames: int | None = None) -> None:
        self.recorder = recorder
        self.stop = stop
        self.max_frames = max_frames

    def offer(self, camera_id: str, value: bytes, headers: list[tuple[str, bytes]]) -> bool:
        written = self.recorder.write(value, FrameHeader.from_headers(headers).ref())
        if self.max_frames is not None and self.recorder.stats.frames >= self.max_frames:
            self.stop.set()
        return written


def record_from_source(
    settings: Settings,
    camera: CameraConfig,
    root: str | Path,
    stop: threading.Event,
    max_frames: int | None = None,
    *,
    segment_s: float = DEFAULT_SEGMENT_S,
    max_bytes: int | None = None,
    max_age_s: float | None = None,
) -> RecordStats:
    """Record ``camera``'s source until it ends, ``stop`` is set or ``max_frames`` were written.

    Frames are resized and encoded with the capture settings (``resize_width``, ``jpeg_quality``),
    like the capture worker publishes them. Sequence numbers continue above the highest one
    already recorded for the camera under ``root`` (0 for a new recording). Recorded times are kept
    (a folder source is not stamped with the present). Raises SourceError when the source cannot be
    opened.
    """
    recorder = Recorder(root, camera.id, segment_s=segment_s, max_bytes=max_bytes, max_age_s=max_age_s)
    seq = recorder.next_seq(camera.id)
    stage = CaptureStage(camera, settings.capture, RecorderPublisher(recorder, stop, max_frames), seq_start=seq,
                         live=False)
    _log.info("record_started", camera=camera.id, root=str(root), first_seq=seq)
    try:
        captured = stage.run(stop)
    finally:
        recorder.close()
    recorder.stats.skipped += captured.skipped  # unreadable source files and encode errors
    return recorder.stats
