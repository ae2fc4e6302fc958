"""Segment folders of a recording: their names, discovery, and the tail of their index.

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
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.capture.sources import INDEX_FILE

DEFAULT_SEGMENT_S = 60.0

_SEGMENT_RE = re.compile(r"^(?P<start>\d{8}T\d{6}Z)(?:-(?P<n>\d+))?$")
_NAME_FORMAT = "%Y%m%dT%H%M%SZ"
# Enough for the last few index lines (each ~200 bytes) without reading a whole index.
_TAIL_BYTES = 8192


@dataclass(frozen=True, slots=True)
class Segment:
    """A segment folder found on disk (named by us, or a bare folder with an index)."""

    path: Path
    camera_id: str
    # -inf for a folder not named by us: no ordering assumption can be made about it.
    start_ts: float
    suffix: int


def slot_start(capture_ts: float, segment_s: float) -> float:
    """Start of the segment slot holding ``capture_ts``: slots are aligned to the epoch."""
    return math.floor(capture_ts / segment_s) * segment_s


def segment_name(start_ts: float) -> str:
    # Floor, so the name stays a lower bound of the slot's capture times for fractional slots too.
    return time.strftime(_NAME_FORMAT, time.gmtime(math.floor(start_ts)))


def parse_segment(path: Path, camera_id: str) -> Segment | None:
    match = _SEGMENT_RE.fullmatch(path.name)
    if match is None:
        return None
    start = calendar.timegm(time.strptime(match["start"], _NAME_FORMAT))
    return Segment(path, camera_id, float(start), int(match["n"] or 1))


def segments_of_camera(camera_dir: Path) -> list[Segment]:
    found = (parse_segment(p, camera_dir.name) for p in camera_dir.iterdir() if p.is_dir())
    return sorted((s for s in found if s is not None), key=lambda s: (s.start_ts, s.suffix))


def discover(path: Path, camera_id: str | None = None) -> list[Segment]:
    """Segments under a recording root, a camera folder or one segment folder."""
    if not path.is_dir():
        raise FileNotFoundError(f"recording not found: {path}")
    if (path / INDEX_FILE).is_file():
        seg = parse_segment(path, path.parent.name)
        return [seg or Segment(path, path.parent.name, -math.inf, 1)]
    children = [p for p in path.iterdir() if p.is_dir()]
    if any(_SEGMENT_RE.fullmatch(p.name) for p in children):
        return segments_of_camera(path)
    cameras = [p for p in children if camera_id is None or p.name == camera_id]
    return [seg for cam in sorted(cameras) for seg in segments_of_camera(cam)]


def _parse_line(line: str | bytes) -> dict[str, Any] | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def tail_records(index: Path) -> list[dict[str, Any]]:
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
    last = last_recorded(camera_dir)
    return None if last is None else last[0]


def last_recorded(camera_dir: Path) -> tuple[int, float] | None:
    """(highest seq, latest capture time) recorded in a camera folder, from each segment index's tail."""
    if not camera_dir.is_dir():
        return None
    recs = [rec for seg in segments_of_camera(camera_dir) for rec in tail_records(seg.path / INDEX_FILE)]
    if not recs:
        return None
    return max(int(r["seq"]) for r in recs), max(float(r["capture_ts"]) for r in recs)


