"""Recording camera frames to disk as time segments, with retention by size and age.

Layout::

    ROOT/<camera_id>/<segment>/0000000000.jpg ...   one JPEG per frame, named by sequence number
    ROOT/<camera_id>/<segment>/index.jsonl          one JSON line per frame, in write order

A segment is named by the UTC start of its time slot (``20261124T153000Z``, slots are multiples of
``segment_s`` seconds of capture time since the epoch), with ``-2``, ``-3`` ... appended when that
name is taken (a restarted recorder never appends to an existing segment). Every frame of a segment
has a capture time in ``[slot start, slot start + segment_s)``, so the name is a lower bound of the
segment's capture times. Index lines are
``{"file", "seq", "capture_ts", "width", "height", "camera_id", "line_id", "product_class"}``, the
format ``pipeline.capture.sources.ImageFolderSource`` reads, so one segment folder replays as an
image folder. The JPEG is written (atomically, by rename) before its index line, so an index line
never points to a missing file.
"""

from __future__ import annotations

import calendar
import heapq
import itertools
import json
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import cv2

from pipeline.capture.sources import INDEX_FILE, open_source
from pipeline.capture.stage import resize_to_width
from pipeline.config import CameraConfig, KafkaSettings, Settings
from pipeline.imaging import encode_jpeg, sniff_encoding
from pipeline.logging import get_logger
from pipeline.paths import contained
from pipeline.runtime.envelope import Envelope, Record, RecordError, Skip, StageResult
from pipeline.runtime.loop import RuntimeConfig, Stage, StreamRuntime
from pipeline.runtime.topics import FRAMES
from schemas.frames import FrameRef

DEFAULT_SEGMENT_S = 60.0
# Retention also runs every this many frames, not only when a segment closes, so a long segment
# cannot overshoot the size limit by much.
DEFAULT_RETENTION_EVERY = 100

_SEGMENT_RE = re.compile(r"^(?P<start>\d{8}T\d{6}Z)(?:-(?P<n>\d+))?$")
_NAME_FORMAT = "%Y%m%dT%H%M%SZ"
# Enough for the last few index lines (each ~200 bytes) without reading a whole index.
_TAIL_BYTES = 8192

_log = get_logger(__name__)


# -- data ---------------------------------------------------------------------------------------
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


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    """A segment folder as retention sees it."""

    path: Path
    camera_id: str
    start_ts: float
    bytes: int
    last_ts: float


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


@dataclass(frozen=True, slots=True)
class _Segment:
    path: Path
    camera_id: str
    # -inf for a folder not named by us: no ordering assumption can be made about it.
    start_ts: float
    suffix: int


# -- segment names ------------------------------------------------------------------------------
def slot_start(capture_ts: float, segment_s: float) -> float:
    """Start of the segment slot holding ``capture_ts``: slots are aligned to the epoch."""
    return math.floor(capture_ts / segment_s) * segment_s


def segment_name(start_ts: float) -> str:
    # Floor, so the name stays a lower bound of the slot's capture times for fractional slots too.
    return time.strftime(_NAME_FORMAT, time.gmtime(math.floor(start_ts)))


def _parse_segment(path: Path, camera_id: str) -> _Segment | None:
    match = _SEGMENT_RE.fullmatch(path.name)
    if match is None:
        return None
    start = calendar.timegm(time.strptime(match["start"], _NAME_FORMAT))
    return _Segment(path, camera_id, float(start), int(match["n"] or 1))


def _segments_of_camera(camera_dir: Path) -> list[_Segment]:
    found = (_parse_segment(p, camera_dir.name) for p in camera_dir.iterdir() if p.is_dir())
    return sorted((s for s in found if s is not None), key=lambda s: (s.start_ts, s.suffix))


def _discover(path: Path, camera_id: str | None = None) -> list[_Segment]:
    """Segments under a recording root, a camera folder or one segment folder."""
    if not path.is_dir():
        raise FileNotFoundError(f"recording not found: {path}")
    if (path / INDEX_FILE).is_file():
        seg = _parse_segment(path, path.parent.name)
        return [seg or _Segment(path, path.parent.name, -math.inf, 1)]
    children = [p for p in path.iterdir() if p.is_dir()]
    if any(_SEGMENT_RE.fullmatch(p.name) for p in children):
        return _segments_of_camera(path)
    cameras = [p for p in children if camera_id is None or p.name == camera_id]
    return [seg for cam in sorted(cameras) for seg in _segments_of_camera(cam)]


# -- index reading ------------------------------------------------------------------------------
def _parse_line(line: str | bytes) -> dict[str, Any] | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def _tail_records(index: Path) -> list[dict[str, Any]]:
    """The last few parseable index lines (a crash can leave a partial last line)."""
    try:
        with index.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - _TAIL_BYTES))
            lines = fh.read().split(b"\n")
    except FileNotFoundError:
        return []
    if size > _TAIL_BYTES:
        lines = lines[1:]  # starts mid-line
    return [rec for rec in map(_parse_line, lines) if rec is not None and _has_seq_and_ts(rec)]


def _has_seq_and_ts(rec: dict[str, Any]) -> bool:
    return isinstance(rec.get("seq"), int) and isinstance(rec.get("capture_ts"), int | float)


def last_recorded_seq(camera_dir: Path) -> int | None:
    """Highest sequence number recorded in a camera folder, from the tail of each segment index."""
    last = _last_recorded(camera_dir)
    return None if last is None else last[0]


def _last_recorded(camera_dir: Path) -> tuple[int, float] | None:
    """(highest seq, latest capture time) recorded in a camera folder, from each segment index's tail."""
    if not camera_dir.is_dir():
        return None
    recs = [rec for seg in _segments_of_camera(camera_dir) for rec in _tail_records(seg.path / INDEX_FILE)]
    if not recs:
        return None
    return max(int(r["seq"]) for r in recs), max(float(r["capture_ts"]) for r in recs)


def _read_segment(seg: _Segment, camera_id: str | None, t_from: float | None,
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
    segments = _discover(Path(path), camera_id)
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


# -- retention ----------------------------------------------------------------------------------
def _tree_bytes(path: Path) -> int:
    total = 0
    for entry in os.scandir(path):
        try:
            if entry.is_dir(follow_symlinks=False):
                total += _tree_bytes(Path(entry.path))
            else:
                total += entry.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            continue  # removed while we looked
    return total


def _segment_info(seg: _Segment) -> SegmentInfo:
    stamps = [float(rec["capture_ts"]) for rec in _tail_records(seg.path / INDEX_FILE)]
    return SegmentInfo(seg.path, seg.camera_id, seg.start_ts, _tree_bytes(seg.path), max(stamps, default=seg.start_ts))


def _delete(info: SegmentInfo, reason: str) -> bool:
    try:
        shutil.rmtree(info.path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        _log.warning("retention_delete_failed", path=str(info.path), error=str(exc))
        return False
    _log.info("retention_deleted", camera=info.camera_id, segment=info.path.name, reason=reason,
              bytes=info.bytes, last_ts=info.last_ts)
    return True


def enforce_retention(
    root: str | Path,
    max_bytes: int | None,
    max_age_s: float | None,
    now: float | None = None,
    *,
    active: Collection[Path] = (),
    cache: dict[Path, SegmentInfo] | None = None,
) -> list[SegmentInfo]:
    """Delete whole closed segments under ``root`` (a recording root or one camera's folder).

    First segments whose last capture time is more than ``max_age_s`` before ``now`` (default: the
    wall clock), then the oldest segments until the total size of ``root``'s segments is at most
    ``max_bytes``. The segments in ``active`` and the newest segment of each camera (the one a
    running recorder writes to) are never deleted, so the total can stay above ``max_bytes`` when
    they alone exceed it. Only folders named like segments are considered. ``cache`` keeps the
    sizes of closed segments between calls (they no longer change). Returns the deleted segments.
    """
    now = time.time() if now is None else now
    protected = {Path(p) for p in active}
    by_camera: dict[str, list[_Segment]] = {}
    for seg in _discover(Path(root)):
        if seg.start_ts > -math.inf:
            by_camera.setdefault(seg.camera_id, []).append(seg)
    closed: list[SegmentInfo] = []
    total = 0
    for segments in by_camera.values():
        protected.add(segments[-1].path)  # sorted oldest first
        for seg in segments:
            info = cache.get(seg.path) if cache is not None else None
            if info is None:
                info = _segment_info(seg)
                if cache is not None and seg.path not in protected:
                    cache[seg.path] = info
            total += info.bytes
            if seg.path not in protected:
                closed.append(info)
    closed.sort(key=lambda i: (i.start_ts, i.path.name))
    deleted: list[SegmentInfo] = []

    def delete(info: SegmentInfo, reason: str) -> None:
        nonlocal total
        if _delete(info, reason):
            deleted.append(info)
            total -= info.bytes
            if cache is not None:
                cache.pop(info.path, None)

    # Age first: what it frees counts against the size limit, sparing younger segments.
    if max_age_s is not None:
        for info in closed:
            if now - info.last_ts > max_age_s:
                delete(info, "age")
    if max_bytes is not None:
        for info in closed:
            if total <= max_bytes:
                break
            if info not in deleted:
                delete(info, "size")
        if total > max_bytes:
            _log.warning("retention_over_limit", root=str(root), bytes=total, max_bytes=max_bytes,
                         reason="only the newest or active segments are left")
    return deleted


# -- writing ------------------------------------------------------------------------------------
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
            last = _last_recorded(camera_dir)
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


# -- sources ------------------------------------------------------------------------------------
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
    already recorded for the camera under ``root`` (0 for a new recording). Raises SourceError
    when the source cannot be opened.
    """
    recorder = Recorder(root, camera.id, segment_s=segment_s, max_bytes=max_bytes, max_age_s=max_age_s)
    seq = recorder.next_seq(camera.id)
    source = open_source(camera, settings.capture, stop)
    frames = iter(source)
    _log.info("record_started", camera=camera.id, source=repr(source), root=str(root), first_seq=seq)
    try:
        for rgb, capture_ts in frames:
            try:
                image = resize_to_width(rgb, settings.capture.resize_width)
                jpeg = encode_jpeg(image, settings.capture.jpeg_quality)
            except (cv2.error, ValueError) as exc:
                recorder.stats.skipped += 1
                _log.warning("frame_encode_failed", camera=camera.id, error=str(exc))
                continue
            h, w = image.shape[:2]
            frame = FrameRef(camera_id=camera.id, line_id=camera.line, product_class=camera.product_class,
                             seq=seq, capture_ts=capture_ts, width=w, height=h)
            if recorder.write(jpeg, frame):
                seq += 1
            if stop.is_set() or (max_frames is not None and recorder.stats.frames >= max_frames):
                break
    finally:
        # Closing the generator releases cv2 captures promptly instead of at garbage collection.
        close = getattr(frames, "close", None)
        if close is not None:
            close()
        recorder.close()
    recorder.stats.skipped += source.skipped
    return recorder.stats


def default_group_id(kafka: KafkaSettings, camera_id: str | None) -> str:
    """The recorder's consumer group: one per topic prefix and camera, so a restart resumes."""
    return f"{kafka.topic_prefix}-record-{camera_id or 'all'}"


class RecordStage(Stage):
    """Frames of the wanted camera(s) -> the recorder; other cameras and replays are skipped."""

    def __init__(self, recorder: Recorder, camera_id: str | None, max_frames: int | None,
                 stop: threading.Event) -> None:
        self.recorder = recorder
        self.camera_id = camera_id
        self.max_frames = max_frames
        self.stop = stop

    def decode(self, env: Envelope) -> Record[FrameRef] | Skip:
        stats = self.recorder.stats
        key = env.key_text
        if self.camera_id is not None and key is not None and key != self.camera_id:
            stats.ignored += 1  # cheap check first: most records of a busy topic are other cameras'
            return Skip(env, "other_camera")
        try:
            header = FRAMES.codec(env)
        except RecordError:
            stats.skipped += 1
            raise
        if (self.camera_id is not None and header.camera_id != self.camera_id) or header.replay_session is not None:
            # Replayed frames are re-published recordings, not camera footage.
            stats.ignored += 1
            return Skip(env, "not_recorded")
        # Files are written as .jpg and replayed as JPEG: the bytes must be one, whatever the header says.
        if not env.value or header.encoding != "jpeg" or sniff_encoding(env.value) != "jpeg":
            stats.skipped += 1
            raise RecordError("unusable_frame", f"encoding {header.encoding}, {len(env.value or b'')} bytes")
        return Record(env, header.ref())

    def handle(self, records: Sequence[Record[FrameRef]]) -> StageResult:
        for rec in records:
            if self.max_frames is not None and self.recorder.stats.frames >= self.max_frames:
                break
            self.recorder.write(rec.envelope.value or b"", rec.message)
        if self.max_frames is not None and self.recorder.stats.frames >= self.max_frames:
            self.stop.set()
        return StageResult()


def record_from_topic(
    settings: Settings,
    camera_id: str | None,
    root: str | Path,
    stop: threading.Event,
    max_frames: int | None = None,
    *,
    segment_s: float = DEFAULT_SEGMENT_S,
    max_bytes: int | None = None,
    max_age_s: float | None = None,
    group_id: str | None = None,
    idle_exit_s: float | None = None,
    poll_timeout_ms: int = 200,
) -> RecordStats:
    """Record frames of ``camera_id`` (None: every camera) from the frames topic.

    Runs on the stream runtime in its own consumer group (default ``default_group_id``): offsets
    are committed after the frames of a batch are written, so a restarted recorder resumes where it
    stopped; a new group starts at the earliest retained record. Redelivered frames are dropped by
    seq. JPEG values are written as received. Records without a valid frame header go to the DLQ;
    frames of replay sessions are ignored. Runs until ``stop`` is set, ``max_frames`` were written,
    or no record arrived for ``idle_exit_s`` once partitions were assigned.
    """
    kafka = settings.kafka
    if kafka.bootstrap_servers is None:
        raise ValueError("no Kafka bootstrap servers configured (LINEWATCH_KAFKA__BOOTSTRAP_SERVERS)")
    group = group_id or default_group_id(kafka, camera_id)
    recorder = Recorder(root, camera_id, segment_s=segment_s, max_bytes=max_bytes, max_age_s=max_age_s)
    _log.info("record_started", root=str(root), camera=camera_id or "*", group=group)
    # With a frame limit, one record per batch: the runtime commits whole batches.
    config = RuntimeConfig(name="record", group_id=group, topics=("frames",), idle_exit_s=idle_exit_s,
                           poll_timeout_ms=poll_timeout_ms, max_batch=1 if max_frames is not None else 100)
    try:
        StreamRuntime(kafka, config, RecordStage(recorder, camera_id, max_frames, stop), stop=stop).run()
    finally:
        recorder.close()
    return recorder.stats
