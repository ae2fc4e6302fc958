"""What a replay publishes: frames with their original relative timing, from any recorded input.

Inputs: a recording made by `linewatch record` (a root, one camera's folder or one segment), a
folder with an ``index.jsonl`` (file + capture_ts per line), a plain image folder (natural order,
``fps`` spacing) or a video file (its own frame timing).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import cv2

from pipeline import imaging
from pipeline.capture.sources import IMAGE_SUFFIXES, INDEX_FILE, natural_key
from pipeline.cli.units import parse_duration

JPEG_SUFFIXES = frozenset({".jpg", ".jpeg"})


@dataclass(frozen=True)
class ReplayFrame:
    camera_id: str
    line_id: str
    product_class: str
    seq: int
    capture_ts: float  # original capture time (seconds since the epoch, or relative for plain inputs)
    load: Callable[[], bytes]  # JPEG bytes
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class Labels:
    """Camera, line and class for inputs that do not record them (or to override a recording's)."""

    camera_id: str | None = None
    line_id: str | None = None
    product_class: str | None = None


def parse_time(text: str, origin: float) -> float:
    """``--from/--to``: an ISO 8601 time, epoch seconds, or an offset from the input's start (90, 15m)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None:
        return value if value >= 1e9 else origin + value
    try:
        stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return origin + parse_duration(text)
    if stamp.tzinfo is None:
        raise ValueError(f"time {text!r} has no timezone; add Z or +hh:mm")
    return stamp.timestamp()


def _jpeg_loader(path: Path) -> Callable[[], bytes]:
    if path.suffix.lower() in JPEG_SUFFIXES:
        return path.read_bytes
    return lambda: imaging.encode_jpeg(imaging.read_image(str(path)))


def _index_dirs(path: Path) -> list[Path]:
    if (path / INDEX_FILE).is_file():
        return [path]
    return sorted((p.parent for p in path.rglob(INDEX_FILE)), key=lambda p: str(p))


def _read_index(folder: Path, labels: Labels) -> list[ReplayFrame]:
    frames: list[ReplayFrame] = []
    for lineno, line in enumerate((folder / INDEX_FILE).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            # A recorded camera id wins: --camera-id then selects among a recording's cameras.
            camera = rec.get("camera_id") or labels.camera_id or folder.name
            product_class = labels.product_class or rec.get("product_class")
            if not product_class:
                raise ValueError(f"{folder / INDEX_FILE} records no product class; give --class")
            frames.append(ReplayFrame(
                camera_id=str(camera), line_id=str(labels.line_id or rec.get("line_id") or "replay"),
                product_class=str(product_class), seq=int(rec.get("seq", len(frames))),
                capture_ts=float(rec["capture_ts"]), load=_jpeg_loader(folder / str(rec["file"])),
                width=rec.get("width"), height=rec.get("height"),
            ))
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{folder / INDEX_FILE}:{lineno}: bad index record ({exc!r})") from None
    return frames


def _plain_folder(path: Path, labels: Labels, fps: float | None) -> list[ReplayFrame]:
    files = sorted((p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: natural_key(p.name))
    step = 1.0 / fps if fps else 0.0
    return [ReplayFrame(_camera(labels, path), labels.line_id or "replay", _class(labels, path), i, i * step,
                        _jpeg_loader(p)) for i, p in enumerate(files)]


def _camera(labels: Labels, path: Path) -> str:
    return labels.camera_id or path.stem


def _class(labels: Labels, path: Path) -> str:
    if not labels.product_class:
        raise ValueError(f"{path} records no product class; give --class")
    return labels.product_class


def _video(path: Path, labels: Labels) -> Iterator[ReplayFrame]:
    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        raise ValueError(f"cannot open video file {path} (unsupported container or codec?)")
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    camera, product_class = _camera(labels, path), _class(labels, path)
    try:
        seq = 0
        while True:
            ok, bgr = cap.read()
            if not ok:
                break
            jpeg = imaging.encode_jpeg(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            # Frame index over the container rate: positions in ms are unreliable in some containers.
            yield ReplayFrame(camera, labels.line_id or "replay", product_class, seq, seq / fps,
                              lambda data=jpeg: data, bgr.shape[1], bgr.shape[0])
            seq += 1
    finally:
        cap.release()


@dataclass
class ReplayInput:
    frames: Iterable[ReplayFrame]  # capture-time order; lazy for video files
    total: int | None  # for progress display; None when unknown


def _video_length(path: Path) -> int | None:
    cap = cv2.VideoCapture(str(path))
    try:
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
        cap.release()
    return count if count > 0 else None


def _in_range(frames: Iterable[ReplayFrame], t_from: str | None, t_to: str | None) -> Iterator[ReplayFrame]:
    origin: float | None = None
    lo, hi = float("-inf"), float("inf")
    for frame in frames:
        if origin is None:
            origin = frame.capture_ts
            lo = parse_time(t_from, origin) if t_from else lo
            hi = parse_time(t_to, origin) if t_to else hi
        if frame.capture_ts > hi:
            return  # inputs are in time order
        if frame.capture_ts >= lo:
            yield frame


def open_input(path: str | Path, labels: Labels, fps: float | None = None, t_from: str | None = None,
               t_to: str | None = None) -> ReplayInput:
    """The frames to replay, in capture-time order (cameras interleaved), within [t_from, t_to].

    ``labels.camera_id`` selects a camera of a recording that records camera ids, and names the
    camera of inputs that do not; ``labels.product_class`` overrides the recorded class.

    Raises ValueError/FileNotFoundError for inputs that cannot be replayed.
    """
    root = Path(path).expanduser()
    if root.is_file():
        return ReplayInput(_in_range(_video(root, labels), t_from, t_to), _video_length(root))
    if not root.is_dir():
        raise FileNotFoundError(f"nothing to replay at {root}")
    dirs = _index_dirs(root)
    frames = [f for d in dirs for f in _read_index(d, labels)] if dirs else _plain_folder(root, labels, fps)
    if labels.camera_id:
        frames = [f for f in frames if f.camera_id == labels.camera_id]
    frames.sort(key=lambda f: (f.capture_ts, f.camera_id, f.seq))
    frames = list(_in_range(frames, t_from, t_to))
    if not frames:
        raise ValueError(f"no frames to replay in {root} with the given camera and time filters")
    return ReplayInput(frames, len(frames))
