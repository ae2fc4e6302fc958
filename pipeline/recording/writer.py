"""Writing frames into segment folders: one open segment per camera, duplicates dropped by seq."""

from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pipeline.capture.sources import INDEX_FILE
from pipeline.logging import get_logger
from pipeline.paths import contained
from pipeline.recording.retention import SegmentInfo, enforce_retention
from pipeline.recording.segments import DEFAULT_SEGMENT_S, last_recorded, segment_name, slot_start
from schemas.frames import FrameRef

# Retention also runs every this many frames, not only when a segment closes, so a long segment
# cannot overshoot the size limit by much.
DEFAULT_RETENTION_EVERY = 100

_log = get_logger(__name__)


@dataclass
class RecordStats:
    frames: int = 0
    segments: int = 0
    bytes: int = 0
    # Frames whose seq is not above the last one recorded for their camera (redelivered records).
    duplicates: int = 0
    # Unusable input: records without a valid frame header, unreadable source files, encode errors.
    skipped: int = 0
    # Records of other cameras or of replay sessions, left out on purpose.
    ignored: int = 0
    deleted_segments: int = 0
    deleted_bytes: int = 0


class SegmentWriter:
    """One open segment of one camera: JPEG files plus an append-only ``index.jsonl``."""

    def __init__(self, camera_dir: Path, start_ts: float) -> None:
        self.start_ts = start_ts
        self.path = self._create(camera_dir, segment_name(start_ts))
        self.frames = 0
        self.bytes = 0
        self._index: IO[str] = (self.path / INDEX_FILE).open("a", encoding="utf-8")

    @staticmethod
    def _create(camera_dir: Path, name: str) -> Path:
        camera_dir.mkdir(parents=True, exist_ok=True)
        for n in itertools.count(1):
            path = camera_dir / (name if n == 1 else f"{name}-{n}")
            try:
                # mkdir without exist_ok is atomic: two writers can never share a segment.
                path.mkdir()
                return path
            except FileExistsError:
                continue
        raise AssertionError("unreachable")

    def write(self, jpeg: bytes, frame: FrameRef) -> int:
        """Write one frame (JPEG first, then its index line); returns the bytes written."""
        name = f"{frame.seq:010d}.jpg"
        if (self.path / name).exists():  # the camera's numbering restarted within this segment
            name = f"{frame.seq:010d}-{self.frames}.jpg"
        tmp = self.path / f".{name}.tmp"
        tmp.write_bytes(jpeg)
        os.replace(tmp, self.path / name)
        line = json.dumps({
            "file": name, "seq": frame.seq, "capture_ts": frame.capture_ts, "width": frame.width,
            "height": frame.height, "camera_id": frame.camera_id, "line_id": frame.line_id,
            "product_class": frame.product_class,
        }) + "\n"
        self._index.write(line)
        self._index.flush()
        self.frames += 1
        written = len(jpeg) + len(line.encode())
        self.bytes += written
        return written

    def close(self) -> None:
        self._index.close()


@dataclass
class _CameraState:
    camera_dir: Path
    last_seq: int | None
    last_capture_ts: float | None = None
    writer: SegmentWriter | None = None


class Recorder:
    """Writes frames of one camera (``camera_id``) or of any camera (None) under ``root``.

    Frames go to ``root/<camera_id>/<segment>/``; a new segment starts when a frame's capture
    time falls in another ``segment_s`` slot. A frame whose seq is not above the last one
    recorded for its camera (also across restarts, read from disk) is a duplicate and dropped.
    Retention (see ``enforce_retention``) runs when a segment closes and every
    ``retention_every`` frames, over ``root/<camera_id>`` for a one-camera recorder and over
    ``root`` otherwise. Not thread-safe: one thread writes.
    """

    def __init__(
        self,
        root: str | Path,
        camera_id: str | None = None,
        *,
        segment_s: float = DEFAULT_SEGMENT_S,
        max_bytes: int | None = None,
        max_age_s: float | None = None,
        retention_every: int = DEFAULT_RETENTION_EVERY,
    ) -> None:
        if segment_s <= 0:
            raise ValueError(f"segment_s must be > 0, got {segment_s}")
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        if max_age_s is not None and max_age_s <= 0:
            raise ValueError(f"max_age_s must be > 0, got {max_age_s}")
        if retention_every < 1:
            raise ValueError(f"retention_every must be >= 1, got {retention_every}")
        self.root = Path(root)
        self.camera_id = camera_id
        self.segment_s = segment_s
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.retention_every = retention_every
        self.stats = RecordStats()
        self.root.mkdir(parents=True, exist_ok=True)
        self._cameras: dict[str, _CameraState] = {}
        self._since_retention = 0
        self._retention_cache: dict[Path, SegmentInfo] = {}
        self._log = _log.bind(root=str(self.root), camera=self.camera_id or "*")

    def _camera(self, camera_id: str) -> _CameraState:
        state = self._cameras.get(camera_id)
        if state is None:
            # Camera ids come from frame headers: the folder must stay under the recording root.
            camera_dir = contained(self.root, camera_id)
            last = last_recorded(camera_dir)
            state = _CameraState(camera_dir, *(last if last is not None else (None, None)))
            self._cameras[camera_id] = state
        return state

    def next_seq(self, camera_id: str) -> int:
        """The seq that continues this camera's recording: 0 for a new one."""
        last = self._camera(camera_id).last_seq
        return 0 if last is None else last + 1

    def write(self, jpeg: bytes, frame: FrameRef) -> bool:
        """Record one frame; False when it was a duplicate and was dropped."""
        if self.camera_id is not None and frame.camera_id != self.camera_id:
            raise ValueError(f"recorder for camera {self.camera_id!r} got a frame of {frame.camera_id!r}")
        state = self._camera(frame.camera_id)
        # The last seq again, or a lower one not newer: a redelivery. A lower seq captured later is a restarted
        # numbering (or follows a glitched huge seq) and is recorded, as alerting does.
        if (state.last_seq is not None and frame.seq <= state.last_seq
                and (frame.seq == state.last_seq or state.last_capture_ts is None
                     or frame.capture_ts <= state.last_capture_ts)):
            self.stats.duplicates += 1
            self._log.debug("frame_duplicate", frame_camera=frame.camera_id, seq=frame.seq, last_seq=state.last_seq)
            return False
        slot = slot_start(frame.capture_ts, self.segment_s)
        rolled = state.writer is not None and state.writer.start_ts != slot
        if rolled:
            self._close_writer(state)
        if state.writer is None:
            state.writer = SegmentWriter(state.camera_dir, slot)
            self.stats.segments += 1
            self._log.info("segment_opened", frame_camera=frame.camera_id, segment=state.writer.path.name)
        self.stats.bytes += state.writer.write(jpeg, frame)
        self.stats.frames += 1
        state.last_seq = frame.seq
        state.last_capture_ts = frame.capture_ts
        self._since_retention += 1
        # After the write, so the segment just opened is the active one and the closed one may go.
        if rolled or self._since_retention >= self.retention_every:
            self.enforce_retention()
        return True

    def _close_writer(self, state: _CameraState) -> None:
        writer = state.writer
        if writer is None:
            return
        writer.close()
        state.writer = None
        self._log.info("segment_closed", segment=writer.path.name, frames=writer.frames, bytes=writer.bytes)

    def enforce_retention(self) -> list[SegmentInfo]:
        """Apply the size and age limits now; returns the deleted segments."""
        self._since_retention = 0
        if self.max_bytes is None and self.max_age_s is None:
            return []
        scope = self.root / self.camera_id if self.camera_id is not None else self.root
        if not scope.is_dir():
            return []
        active = [s.writer.path for s in self._cameras.values() if s.writer is not None]
        deleted = enforce_retention(scope, self.max_bytes, self.max_age_s, time.time(), active=active,
                                    cache=self._retention_cache)
        self.stats.deleted_segments += len(deleted)
        self.stats.deleted_bytes += sum(d.bytes for d in deleted)
        return deleted

    def close(self) -> None:
        """Close open segments, then apply retention once more."""
        for state in self._cameras.values():
            self._close_writer(state)
        self.enforce_retention()
        self._log.info("recording_closed", frames=self.stats.frames, segments=self.stats.segments,
                       bytes=self.stats.bytes, deleted_segments=self.stats.deleted_segments)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


