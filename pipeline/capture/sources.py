"""Frame sources: recorded image folders, video files and live cameras.

Every source is an iterable of ``(rgb, capture_ts)`` where ``rgb`` is an (H, W, 3) uint8 array and
``capture_ts`` is seconds since the epoch. Iterating a source opens it; closing the iterator (or
breaking out of the loop) releases it.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.config import CameraConfig, CaptureSettings, ConfigError
from pipeline.imaging import FrameDecodeError, read_image
from pipeline.logging import get_logger
from pipeline.metrics import FRAMES_DROPPED
from pipeline.paths import contained

Frame = tuple[np.ndarray, float]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
INDEX_FILE = "index.jsonl"
LIVE_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://")

_log = get_logger(__name__)


class SourceError(RuntimeError):
    """A source cannot be opened or has nothing to yield."""


class FpsLimiter:
    """Caps a loop at ``fps`` iterations per second on a monotonic clock.

    Deadlines advance by exactly one interval from the previous deadline, not from "now", so
    sleep overshoot does not accumulate into drift. After falling behind by more than one
    interval the schedule restarts from now instead of bursting to catch up.
    """

    def __init__(self, fps: float | None) -> None:
        if fps is not None and fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.interval: float | None = 1.0 / fps if fps else None
        self._next: float | None = None

    def wait(self, stop: threading.Event | None = None) -> bool:
        """Sleep until the next slot; returns False when ``stop`` was set while waiting."""
        if self.interval is None:
            return not (stop and stop.is_set())
        now = time.monotonic()
        if self._next is None:
            self._next = now
        delay = self._next - now
        if delay > 0:
            if stop is not None:
                if stop.wait(delay):
                    return False
            else:
                time.sleep(delay)
        elif -delay > self.interval:
            self._next = now
        self._next += self.interval
        return not (stop and stop.is_set())

    def due(self) -> bool:
        """Non-blocking variant for live streams: True when a frame may pass now.

        Live cameras must be drained at their own rate (or the driver buffers and latency grows),
        so surplus frames are skipped rather than slept on.
        """
        if self.interval is None:
            return True
        now = time.monotonic()
        if self._next is None or now >= self._next:
            # Same anti-drift rule as wait(): step from the deadline unless far behind.
            base = now if self._next is None or now - self._next > self.interval else self._next
            self._next = base + self.interval
            return True
        return False


class FrameSource(ABC):
    """An iterable of frames; ``stop`` ends iteration promptly between frames and during waits."""

    def __init__(self, *, stop: threading.Event | None = None, camera_id: str = "-") -> None:
        self.stop = stop if stop is not None else threading.Event()
        self.camera_id = camera_id
        # Frames the source could not read (corrupt files, missing index entries).
        self.skipped = 0
        self._log = _log.bind(camera=camera_id)

    @abstractmethod
    def __iter__(self) -> Iterator[Frame]: ...

    def _skip(self, reason: str, **fields: object) -> None:
        self.skipped += 1
        FRAMES_DROPPED.labels(camera=self.camera_id, reason=reason).inc()
        self._log.warning("frame_skipped", reason=reason, **fields)


def natural_key(name: str) -> list[int | str]:
    # "frame2" before "frame10": digit runs compare as numbers.
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class _Entry:
    path: Path
    capture_ts: float | None


class ImageFolderSource(FrameSource):
    """A recorded stream: the images of one folder in natural name order.

    With an ``index.jsonl`` beside the frames (lines of ``{"file": ..., "capture_ts": ...}``) the
    index gives order and capture timestamps; ``realtime=True`` then also replays the recorded gaps.
    Otherwise ``capture_ts`` is the wall clock when the frame is emitted. ``fps`` is the playback
    rate (None: as fast as possible).
    """

    def __init__(
        self,
        path: str | Path,
        fps: float | None = None,
        loop: bool = False,
        *,
        realtime: bool = False,
        restamp: bool = False,
        stop: threading.Event | None = None,
        camera_id: str = "-",
    ) -> None:
        super().__init__(stop=stop, camera_id=camera_id)
        self.path = Path(path)
        # Played as a live camera: frames carry the time they are emitted, not the recorded time
        # (a months-old capture time would make every frame stale for live scoring).
        self.restamp = restamp
        self.fps = fps
        self.loop = loop
        self.realtime = realtime
        if not self.path.is_dir():
            raise SourceError(f"image folder not found: {self.path}")
        index = self.path / INDEX_FILE
        self.entries = self._read_index(index) if index.is_file() else self._scan()
        if not self.entries:
            raise SourceError(f"no images in {self.path} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")

    def __repr__(self) -> str:
        return f"ImageFolderSource({str(self.path)!r}, frames={len(self.entries)}, fps={self.fps})"

    def _scan(self) -> list[_Entry]:
        files = [p for p in self.path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        return [_Entry(p, None) for p in sorted(files, key=lambda p: natural_key(p.name))]

    def _read_index(self, index: Path) -> list[_Entry]:
        entries: list[_Entry] = []
        for lineno, line in enumerate(index.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                # Index entries name files of this folder only (an index is data, not a path list).
                entries.append(_Entry(contained(self.path, str(rec["file"])), float(rec["capture_ts"])))
            except (ValueError, KeyError, TypeError) as exc:
                raise SourceError(f"{index}:{lineno}: bad index record ({exc})") from None
        # A recording is replayed in capture order even if lines were appended out of order.
        entries.sort(key=lambda e: e.capture_ts or 0.0)
        return entries

    def __iter__(self) -> Iterator[Frame]:
        limiter = FpsLimiter(self.fps)
        stamped = [e.capture_ts for e in self.entries if e.capture_ts is not None]
        # Looping a recording shifts its timestamps by one span per pass so they keep increasing.
        span = 0.0
        if len(stamped) > 1:
            span = (stamped[-1] - stamped[0]) * len(stamped) / (len(stamped) - 1)
        elif stamped:
            span = 1.0
        passes = 0
        while not self.stop.is_set():
            emitted = 0
            pace_origin: tuple[float, float] | None = None  # (recorded ts, monotonic) of first frame
            for entry in self.entries:
                if self.stop.is_set():
                    return
                try:
                    rgb = read_image(str(entry.path))
                except (OSError, FrameDecodeError) as exc:
                    self._skip("unreadable", file=str(entry.path), error=str(exc))
                    continue
                if self.realtime and entry.capture_ts is not None:
                    if pace_origin is None:
                        pace_origin = (entry.capture_ts, time.monotonic())
                    delay = pace_origin[1] + (entry.capture_ts - pace_origin[0]) - time.monotonic()
                    if delay > 0 and self.stop.wait(delay):
                        return
                if not limiter.wait(self.stop):
                    return
                recorded = entry.capture_ts if not self.restamp else None
                ts = time.time() if recorded is None else recorded + passes * span
                emitted += 1
                yield rgb, ts
            if emitted == 0:
                raise SourceError(f"no readable images in {self.path} ({self.skipped} skipped)")
            passes += 1
            if not self.loop:
                return


class VideoFileSource(FrameSource):
    """A video file played back through cv2; ``fps`` is the playback rate (None: as fast as possible)."""

    def __init__(
        self,
        path: str | Path,
        loop: bool = False,
        *,
        fps: float | None = None,
        stop: threading.Event | None = None,
        camera_id: str = "-",
    ) -> None:
        super().__init__(stop=stop, camera_id=camera_id)
        self.path = Path(path)
        self.loop = loop
        self.fps = fps
        if not self.path.is_file():
            raise SourceError(f"video file not found: {self.path}")
        # Fail at construction, not on first iteration, so a bad camera config is reported early.
        self._open().release()

    def __repr__(self) -> str:
        return f"VideoFileSource({str(self.path)!r}, fps={self.fps}, loop={self.loop})"

    def _open(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open video file {self.path} (unsupported container or codec?)")
        return cap

    def __iter__(self) -> Iterator[Frame]:
        limiter = FpsLimiter(self.fps)
        while not self.stop.is_set():
            cap = self._open()
            emitted = 0
            try:
                while not self.stop.is_set():
                    ok, bgr = cap.read()
                    if not ok:
                        break
                    if not limiter.wait(self.stop):
                        return
                    emitted += 1
                    yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), time.time()
            finally:
                cap.release()
            if emitted == 0:
                raise SourceError(f"no decodable frames in {self.path}")
            if not self.loop:
                return


class LiveSource(FrameSource):
    """An RTSP/HTTP(MJPEG) URL or a device index, reconnecting with exponential backoff.

    A failed open, a read error or the end of the stream all lead to a reconnect after
    ``reconnect_initial_s`` doubling up to ``reconnect_max_s`` (with jitter, so cameras that drop
    together do not reconnect in lockstep); the delay resets after a frame is read. ``fps`` caps the
    rate by skipping surplus frames. ``timeout_s`` bounds a stalled open or read (network streams),
    which is also the worst-case latency of noticing ``stop`` while blocked inside cv2.
    """

    def __init__(
        self,
        url_or_device: str | int,
        *,
        fps: float | None = None,
        reconnect_initial_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        timeout_s: float = 10.0,
        stop: threading.Event | None = None,
        camera_id: str = "-",
    ) -> None:
        super().__init__(stop=stop, camera_id=camera_id)
        if isinstance(url_or_device, str) and url_or_device.isdigit():
            url_or_device = int(url_or_device)
        self.target = url_or_device
        self.fps = fps
        self.reconnect_initial_s = max(reconnect_initial_s, 0.0)
        self.reconnect_max_s = max(reconnect_max_s, self.reconnect_initial_s)
        self.timeout_s = timeout_s
        # Reconnects after the first connection, for observability and tests.
        self.reconnects = 0

    def __repr__(self) -> str:
        return f"LiveSource({self._display()!r}, fps={self.fps})"

    def _display(self) -> str:
        # Never log credentials embedded in a camera URL (rtsp://user:pass@host/...).
        return re.sub(r"//[^/@]*@", "//***@", str(self.target))

    def _open(self) -> cv2.VideoCapture | None:
        if isinstance(self.target, int):
            cap = cv2.VideoCapture(self.target)
        else:
            ms = int(self.timeout_s * 1000)
            cap = cv2.VideoCapture(
                self.target, cv2.CAP_FFMPEG,
                [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms],
            )
        if cap.isOpened():
            return cap
        cap.release()
        return None

    def _backoff(self, delay: float) -> float:
        # "Equal jitter": at least half the nominal delay, never more than it.
        return delay / 2 + random.uniform(0, delay / 2)

    def __iter__(self) -> Iterator[Frame]:
        limiter = FpsLimiter(self.fps)
        delay = self.reconnect_initial_s
        attempt = 0
        connected_before = False
        while not self.stop.is_set():
            attempt += 1
            cap = self._open()
            if cap is None:
                wait = self._backoff(delay)
                self._log.warning("source_open_failed", source=self._display(), attempt=attempt,
                                  retry_in_s=round(wait, 3))
                if self.stop.wait(wait):
                    return
                delay = min(delay * 2, self.reconnect_max_s)
                continue
            if connected_before:
                self.reconnects += 1
            connected_before = True
            self._log.info("source_connected", source=self._display(), attempt=attempt)
            try:
                while not self.stop.is_set():
                    ok, bgr = cap.read()
                    if not ok or bgr is None:
                        break
                    if attempt:
                        # A frame proves the connection healthy: the next outage starts backoff afresh.
                        delay, attempt = self.reconnect_initial_s, 0
                    ts = time.time()
                    if not limiter.due():
                        continue
                    yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), ts
            finally:
                cap.release()
            if self.stop.is_set():
                return
            wait = self._backoff(delay)
            self._log.warning("source_lost", source=self._display(), retry_in_s=round(wait, 3))
            if self.stop.wait(wait):
                return
            delay = min(delay * 2, self.reconnect_max_s)


def open_source(camera: CameraConfig, capture: CaptureSettings, stop: threading.Event, *,
                live: bool = False) -> FrameSource:
    """Pick a source by the camera source string: digits: device, URL: live, dir: folder, file: video.

    ``live``: the frames feed live monitoring, so a recorded folder is stamped with the present.
    """
    src = camera.source.strip()
    if src.isdigit():
        return LiveSource(int(src), fps=camera.fps, reconnect_initial_s=capture.reconnect_initial_s,
                          reconnect_max_s=capture.reconnect_max_s, stop=stop, camera_id=camera.id)
    if src.lower().startswith(LIVE_SCHEMES):
        return LiveSource(src, fps=camera.fps, reconnect_initial_s=capture.reconnect_initial_s,
                          reconnect_max_s=capture.reconnect_max_s, stop=stop, camera_id=camera.id)
    if "://" in src:
        raise SourceError(
            f"camera {camera.id}: unsupported URL scheme in {src.split('://')[0]}:// "
            f"(supported: {', '.join(LIVE_SCHEMES)})"
        )
    path = Path(src).expanduser()
    if path.is_dir():
        return ImageFolderSource(path, fps=camera.fps, loop=camera.loop, restamp=live, stop=stop,
                                 camera_id=camera.id)
    if path.is_file():
        return VideoFileSource(path, loop=camera.loop, fps=camera.fps, stop=stop, camera_id=camera.id)
    raise SourceError(
        f"camera {camera.id}: source {src!r} does not exist (it is not a device index, rtsp/http URL, "
        f"directory or file)"
    )


def check_sources(cameras: list[CameraConfig]) -> None:
    """Fail before anything starts when a camera's file or folder source is not there.

    Live URLs and device indexes are not probed (cameras come and go; capture reconnects).
    """
    for camera in cameras:
        src = camera.source.strip()
        if src.isdigit() or src.lower().startswith(LIVE_SCHEMES):
            continue
        if "://" in src:
            raise ConfigError(f"camera {camera.id}: unsupported URL scheme in {src!r} "
                              f"(supported: {', '.join(LIVE_SCHEMES)})")
        path = Path(src).expanduser()
        if not path.exists():
            raise ConfigError(f"camera {camera.id}: source {src} does not exist "
                              f"(relative paths are read from the config file's folder)")
        if path.is_dir() and not (path / INDEX_FILE).is_file() and not any(
                p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()):
            raise ConfigError(f"camera {camera.id}: source folder {src} holds no images "
                              f"({', '.join(sorted(IMAGE_SUFFIXES))}) and no {INDEX_FILE}")
