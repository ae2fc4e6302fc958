"""Frame sources against real files, a real video file and a real MJPEG-over-HTTP server on loopback."""

from __future__ import annotations

import http.server
import itertools
import json
import socketserver
import threading
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from prometheus_client import REGISTRY

from pipeline.capture.sources import (
    FpsLimiter,
    ImageFolderSource,
    LiveSource,
    SourceError,
    VideoFileSource,
    open_source,
)
from pipeline.config import CameraConfig, CaptureSettings


def _solid(value: int, w: int = 64, h: int = 48) -> np.ndarray:
    return np.full((h, w, 3), value, np.uint8)


def _write_png(path: Path, value: int) -> None:
    assert cv2.imwrite(str(path), _solid(value))


def _level(rgb: np.ndarray) -> int:
    return round(float(rgb.mean()))


# -- image folders ------------------------------------------------------------------------------
def test_folder_natural_order_skips_corrupt_and_non_images(tmp_path: Path) -> None:
    for name, value in [("frame10.png", 100), ("frame2.png", 20), ("frame1.png", 10), ("Frame11.PNG", 110)]:
        _write_png(tmp_path / name, value)
    (tmp_path / "frame3.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "sub").mkdir()
    before = REGISTRY.get_sample_value(
        "linewatch_frames_dropped_total", {"camera": "cam-folder", "reason": "unreadable"}
    ) or 0.0

    source = ImageFolderSource(tmp_path, camera_id="cam-folder")
    t0 = time.time()
    frames = list(source)

    assert [_level(rgb) for rgb, _ in frames] == [10, 20, 100, 110]
    assert all(rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8 for rgb, _ in frames)
    stamps = [ts for _, ts in frames]
    assert stamps == sorted(stamps) and t0 <= stamps[0] <= time.time()
    assert source.skipped == 1
    after = REGISTRY.get_sample_value(
        "linewatch_frames_dropped_total", {"camera": "cam-folder", "reason": "unreadable"}
    )
    assert after == before + 1


def test_folder_loop_repeats_and_stop_ends_it(tmp_path: Path) -> None:
    for i in range(3):
        _write_png(tmp_path / f"f{i}.png", 10 * (i + 1))
    stop = threading.Event()
    levels = []
    for rgb, _ in ImageFolderSource(tmp_path, loop=True, stop=stop):
        levels.append(_level(rgb))
        if len(levels) == 7:
            stop.set()
    assert levels == [10, 20, 30, 10, 20, 30, 10]


def test_empty_or_unreadable_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no images"):
        ImageFolderSource(tmp_path)
    (tmp_path / "readme.md").write_text("no frames here")
    with pytest.raises(SourceError, match="no images"):
        ImageFolderSource(tmp_path)
    with pytest.raises(SourceError, match="not found"):
        ImageFolderSource(tmp_path / "missing")
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(SourceError, match="no readable images"):
        list(ImageFolderSource(tmp_path))


def test_index_jsonl_gives_order_and_capture_ts(tmp_path: Path) -> None:
    base = 1_700_000_000.0
    # Name order (a, b, c) differs from capture order (c, a, b); b is missing on disk.
    _write_png(tmp_path / "a.png", 10)
    _write_png(tmp_path / "c.png", 30)
    _write_png(tmp_path / "extra.png", 99)  # not in the index: not part of the recording
    records = [{"file": "a.png", "capture_ts": base + 0.1}, {"file": "b.png", "capture_ts": base + 0.2},
               {"file": "c.png", "capture_ts": base}]
    (tmp_path / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")

    source = ImageFolderSource(tmp_path, realtime=True)
    t0 = time.monotonic()
    frames = list(source)
    elapsed = time.monotonic() - t0

    assert [_level(rgb) for rgb, _ in frames] == [30, 10]
    assert [ts for _, ts in frames] == [base, base + 0.1]
    assert source.skipped == 1
    # realtime replays the recorded 0.1 s gap between c and a.
    assert 0.09 <= elapsed < 0.5

    # Looping a recording keeps timestamps strictly increasing.
    stop = threading.Event()
    stamps = []
    for _, ts in ImageFolderSource(tmp_path, loop=True, stop=stop):
        stamps.append(ts)
        if len(stamps) == 5:
            stop.set()
    assert all(b > a for a, b in itertools.pairwise(stamps)), stamps


def test_bad_index_line_is_a_clear_error(tmp_path: Path) -> None:
    _write_png(tmp_path / "a.png", 10)
    (tmp_path / "index.jsonl").write_text('{"file": "a.png"}\n')
    with pytest.raises(SourceError, match=r"index.jsonl:1"):
        ImageFolderSource(tmp_path)


# -- video files --------------------------------------------------------------------------------
def _write_video(path: Path, levels: list[int], fps: float = 25.0) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (64, 48))
    assert writer.isOpened()
    for v in levels:
        writer.write(_solid(v))
    writer.release()


def test_video_file_round_trip(tmp_path: Path) -> None:
    levels = [20 * i + 10 for i in range(10)]
    path = tmp_path / "clip.avi"
    _write_video(path, levels)

    frames = list(VideoFileSource(path))
    assert len(frames) == 10
    assert all(rgb.shape == (48, 64, 3) for rgb, _ in frames)
    # MJPG is lossy: levels come back within a few grey steps.
    assert all(abs(_level(rgb) - v) <= 3 for (rgb, _), v in zip(frames, levels, strict=True))

    stop = threading.Event()
    looped = []
    for rgb, _ in VideoFileSource(path, loop=True, stop=stop):
        looped.append(_level(rgb))
        if len(looped) == 23:
            stop.set()
    assert len(looped) == 23 and abs(looped[20] - levels[0]) <= 3


def test_video_file_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not found"):
        VideoFileSource(tmp_path / "missing.avi")
    bad = tmp_path / "bad.avi"
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(SourceError, match="cannot open"):
        VideoFileSource(bad)


# -- fps limiter --------------------------------------------------------------------------------
def test_fps_limiter_rate_without_drift() -> None:
    limiter = FpsLimiter(40)
    t0 = time.monotonic()
    for _ in range(21):  # first call passes at once, then 20 intervals of 25 ms
        assert limiter.wait()
    elapsed = time.monotonic() - t0
    assert 0.49 <= elapsed < 0.6, elapsed


def test_fps_limiter_none_and_stop() -> None:
    unlimited = FpsLimiter(None)
    t0 = time.monotonic()
    for _ in range(1000):
        unlimited.wait()
    assert time.monotonic() - t0 < 0.05

    stop = threading.Event()
    slow = FpsLimiter(0.5)
    assert slow.wait(stop)
    threading.Timer(0.1, stop.set).start()
    t0 = time.monotonic()
    assert slow.wait(stop) is False
    assert time.monotonic() - t0 < 0.5
    with pytest.raises(ValueError):
        FpsLimiter(0)


def test_folder_fps_is_playback_rate(tmp_path: Path) -> None:
    for i in range(6):
        _write_png(tmp_path / f"f{i}.png", i)
    t0 = time.monotonic()
    assert len(list(ImageFolderSource(tmp_path, fps=20))) == 6
    assert 0.24 <= time.monotonic() - t0 < 0.4


# -- live MJPEG over HTTP -----------------------------------------------------------------------
class _MjpegServer:
    """multipart/x-mixed-replace JPEG stream of one grey level, started and stopped on demand."""

    def __init__(self, level: int, port: int = 0) -> None:
        self.jpeg = cv2.imencode(".jpg", _solid(level))[1].tobytes()
        self.stopping = threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                try:
                    while not owner.stopping.is_set():
                        part = (b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                % len(owner.jpeg))
                        self.wfile.write(part + owner.jpeg + b"\r\n")
                        time.sleep(0.02)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        # Ending the handlers closes the open streams; shutdown alone would leave them running.
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(2)


def _wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_live_mjpeg_reconnects_after_server_restart() -> None:
    server = _MjpegServer(level=50)
    stop = threading.Event()
    source = LiveSource(f"http://127.0.0.1:{server.port}/stream.mjpg", reconnect_initial_s=0.1,
                        reconnect_max_s=0.4, timeout_s=2.0, stop=stop, camera_id="cam-live")
    levels: list[int] = []
    stamps: list[float] = []

    def consume() -> None:
        for rgb, ts in source:
            levels.append(_level(rgb))
            stamps.append(ts)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    restarted: _MjpegServer | None = None
    try:
        assert _wait_for(lambda: len(levels) >= 5, 5.0), "no frames from the MJPEG server"
        assert all(abs(v - 50) <= 3 for v in levels)
        server.stop()
        time.sleep(0.5)  # a few refused reconnect attempts
        restarted = _MjpegServer(level=200, port=server.port)
        assert _wait_for(lambda: sum(abs(v - 200) <= 3 for v in levels) >= 5, 10.0), "no reconnect"
        assert source.reconnects >= 1
        assert stamps == sorted(stamps)
    finally:
        stop.set()
        consumer.join(3.0)
        if restarted is not None:
            restarted.stop()
    assert not consumer.is_alive(), "LiveSource did not stop after the stop event"


def test_live_stop_interrupts_backoff() -> None:
    # A port nobody listens on: every open is refused and the source sits in a long backoff.
    probe = socketserver.TCPServer(("127.0.0.1", 0), socketserver.BaseRequestHandler)
    port = probe.server_address[1]
    probe.server_close()
    stop = threading.Event()
    source = LiveSource(f"http://127.0.0.1:{port}/x.mjpg", reconnect_initial_s=30.0, stop=stop, timeout_s=1.0)
    done = threading.Event()
    threading.Thread(target=lambda: (list(source), done.set()), daemon=True).start()
    time.sleep(0.3)
    t0 = time.monotonic()
    stop.set()
    assert done.wait(2.0)
    assert time.monotonic() - t0 < 0.5


# -- dispatch -----------------------------------------------------------------------------------
def _camera(source: str, **kw: object) -> CameraConfig:
    return CameraConfig(id="cam-1", product_class="ball_screw", source=source, **kw)


def test_open_source_dispatch(tmp_path: Path) -> None:
    capture = CaptureSettings(reconnect_initial_s=0.2, reconnect_max_s=1.0)
    stop = threading.Event()
    folder = tmp_path / "frames"
    folder.mkdir()
    _write_png(folder / "a.png", 1)
    video = tmp_path / "clip.avi"
    _write_video(video, [10, 20])

    dev = open_source(_camera("0"), capture, stop)
    assert isinstance(dev, LiveSource) and dev.target == 0
    assert dev.reconnect_initial_s == 0.2 and dev.reconnect_max_s == 1.0 and dev.stop is stop
    for url in ("rtsp://user:secret@cam.local/stream", "http://127.0.0.1:1/x.mjpg", "HTTPS://cam/x"):
        live = open_source(_camera(url, fps=5), capture, stop)
        assert isinstance(live, LiveSource) and live.fps == 5
    assert "secret" not in repr(open_source(_camera("rtsp://user:secret@cam.local/s"), capture, stop))

    src = open_source(_camera(str(folder), fps=12, loop=True), capture, stop)
    assert isinstance(src, ImageFolderSource) and src.fps == 12 and src.loop and src.camera_id == "cam-1"
    vid = open_source(_camera(str(video), loop=True), capture, stop)
    assert isinstance(vid, VideoFileSource) and vid.loop

    with pytest.raises(SourceError, match=r"cam-1.*not a device index"):
        open_source(_camera(str(tmp_path / "nope")), capture, stop)
    with pytest.raises(SourceError, match="unsupported URL scheme"):
        open_source(_camera("ftp://cam/x"), capture, stop)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="no images"):
        open_source(_camera(str(empty)), capture, stop)
