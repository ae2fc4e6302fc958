"""Reading a recording back: its frames in capture-time order, merged across cameras and segments."""

from __future__ import annotations

import heapq
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.capture.sources import INDEX_FILE
from pipeline.logging import get_logger
from pipeline.paths import contained
from pipeline.recording.segments import Segment, discover

_log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class RecordedFrame:
    """One recorded frame as ``iter_recording`` yields it; ``path`` is the JPEG file."""

    camera_id: str
    seq: int
    capture_ts: float
    path: Path
    line_id: str
    product_class: str
    width: int
    height: int

    def jpeg(self) -> bytes:
        return self.path.read_bytes()


def _read_segment(seg: Segment, camera_id: str | None, t_from: float | None,
                  t_to: float | None) -> list[RecordedFrame]:
    index = seg.path / INDEX_FILE
    try:
        text = index.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []  # an empty segment, or deleted by retention meanwhile
    frames: list[RecordedFrame] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            frame = RecordedFrame(
                camera_id=str(rec["camera_id"]), seq=int(rec["seq"]), capture_ts=float(rec["capture_ts"]),
                path=contained(seg.path, str(rec["file"])), line_id=str(rec["line_id"]),
                product_class=str(rec["product_class"]), width=int(rec["width"]), height=int(rec["height"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            _log.warning("recording_bad_index_line", index=str(index), line=lineno, error=str(exc))
            continue
        if camera_id is not None and frame.camera_id != camera_id:
            continue
        if (t_from is not None and frame.capture_ts < t_from) or (t_to is not None and frame.capture_ts >= t_to):
            continue
        frames.append(frame)
    frames.sort(key=lambda f: (f.capture_ts, f.seq))
    return frames


def iter_recording(
    path: str | Path,
    camera_id: str | None = None,
    t_from: float | None = None,
    t_to: float | None = None,
) -> Iterator[RecordedFrame]:
    """Frames of a recording in capture-time order, filtered to ``t_from <= capture_ts < t_to``.

    ``path`` is a recording root (``ROOT``), one camera's folder (``ROOT/<camera_id>``) or one
    segment folder. ``camera_id`` keeps one camera's frames. Frames of several cameras come
    interleaved by capture time (ties by camera id, then seq), so each camera's frames are in
    capture-time order. Segments are read lazily, one index at a time as the merge reaches them;
    unparseable index lines are logged and skipped. Raises FileNotFoundError when ``path`` is not
    a folder.
    """
    segments = discover(Path(path), camera_id)
    if t_to is not None:
        # A segment's name is a lower bound of its capture times.
        segments = [s for s in segments if s.start_ts < t_to]
    segments.sort(key=lambda s: (s.start_ts, s.camera_id, s.suffix))
    heap: list[tuple[float, str, int, int, RecordedFrame, Iterator[RecordedFrame]]] = []
    tie = itertools.count()

    def push(frames: Iterator[RecordedFrame]) -> None:
        frame = next(frames, None)
        if frame is not None:
            heapq.heappush(heap, (frame.capture_ts, frame.camera_id, frame.seq, next(tie), frame, frames))

    pending = iter(segments)
    upcoming = next(pending, None)
    while upcoming is not None or heap:
        # Open every segment that may hold a frame earlier than the earliest one already open.
        while upcoming is not None and (not heap or upcoming.start_ts <= heap[0][0]):
            push(iter(_read_segment(upcoming, camera_id, t_from, t_to)))
            upcoming = next(pending, None)
        if heap:
            *_, frame, frames = heapq.heappop(heap)
            yield frame
            push(frames)


