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
from pipeline.capture.sources import IMAGE_SUFFIXES, INDEX_FILE, ImageFolderSource, SourceError
from pipeline.cli.units import parse_duration
from pipeline.recording import iter_recording

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


def _from_recording(root: Path, labels: Labels) -> list[ReplayFrame]:
    """Frames of a `linewatch record` recording (root, camera folder or segment), read by its reader."""
    return [ReplayFrame(camera_id=f.camera_id, line_id=labels.line_id or f.line_id,
                        product_class=labels.product_class or f.product_class, seq=f.seq, capture_ts=f.capture_ts,
                        load=f.path.read_bytes, width=f.width, height=f.height)
            for f in iter_recording(root, labels.camera_id)]


def _from_folder(root: Path, labels: Labels, fps: float | None) -> list[ReplayFrame]:
    """An image folder as the capture worker reads it: its ``index.jsonl`` (file + capture_ts) when
    present, else natural name order spaced ``1/fps`` apart (0 without fps)."""
    try:
        entries = ImageFolderSource(root).entries
    except SourceError as exc:
        raise ValueError(str(exc)) from None
    step = 1.0 / fps if fps else 0.0
    camera, product_class = labels.camera_id or root.name, _class(labels, root)
    return [ReplayFrame(camera, labels.line_id or "replay", product_class, i,
                        e.capture_ts if e.capture_ts is not None else i * step, _jpeg_loader(e.path))
            for i, e in enumerate(entries)]


def _is_recording(root: Path) -> bool:
    """A segment of `linewatch record` has an index whose lines name their camera; a recording root
    or camera folder holds folders only. Anything else is an image folder."""
    index = root / INDEX_FILE
    if not index.is_file():
        return not any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir())
    with index.open(encoding="utf-8") as fh:
        first = next((line for line in fh if line.strip()), "")
    try:
        return "camera_id" in json.loads(first)
    except (ValueError, TypeError):
        return False


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
    # Whether a frame's loader reads it again from disk; a video's loaders hold the encoded bytes.
    reloadable: bool = True


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
        return ReplayInput(_in_range(_video(root, labels), t_from, t_to), _video_length(root), reloadable=False)
    if not root.is_dir():
        raise FileNotFoundError(f"nothing to replay at {root}")
    frames = _from_recording(root, labels) if _is_recording(root) else _from_folder(root, labels, fps)
    frames.sort(key=lambda f: (f.capture_ts, f.camera_id, f.seq))
    frames = list(_in_range(frames, t_from, t_to))
    if not frames:
        raise ValueError(f"no frames to replay in {root} with the given camera and time filters")
    return ReplayInput(frames, len(frames))
