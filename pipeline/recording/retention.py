"""Retention: whole closed segments deleted by age, then oldest first by total size."""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from pipeline.capture.sources import INDEX_FILE
from pipeline.logging import get_logger
from pipeline.recording.segments import Segment, discover, tail_records

_log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    """A segment folder as retention sees it."""

    path: Path
    camera_id: str
    start_ts: float
    bytes: int
    last_ts: float


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


def _segment_info(seg: Segment) -> SegmentInfo:
    stamps = [float(rec["capture_ts"]) for rec in tail_records(seg.path / INDEX_FILE)]
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
    by_camera: dict[str, list[Segment]] = {}
    for seg in discover(Path(root)):
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


