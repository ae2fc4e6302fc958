"""`linewatch record`: segments on disk from an image folder and from the real broker, retention, reading back."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.bus import make_producer, topic_name
from pipeline.capture.sources import INDEX_FILE, ImageFolderSource
from pipeline.cli import main
from pipeline.config import CameraConfig, CaptureSettings, KafkaSettings, Settings
from pipeline.imaging import encode_jpeg, read_image
from pipeline.recording import (
    Recorder,
    RecordStats,
    enforce_retention,
    iter_recording,
    record_from_source,
    record_from_topic,
)
from schemas.frames import FrameRef
from tests.streaming_helpers import Background, publish_frames

# 2027-01-15T08:00:00Z, a multiple of 60 s: slot boundaries fall on whole offsets below.
BASE = 1_800_000_000.0
SLOT0, SLOT1, SLOT2, SLOT3, SLOT4 = (f"20270115T080{m}00Z" for m in range(5))
JPEG = encode_jpeg(np.full((24, 32, 3), 128, np.uint8))


def _image(i: int) -> np.ndarray:
    """A smooth 32x24 pattern, different for each i (smooth: JPEG keeps it close)."""
    y, x = np.mgrid[0:24, 0:32]
    return np.stack([x * 6 + i * 20, y * 8 + i * 30, np.full_like(x, i * 40)], axis=-1).astype(np.uint8)


def _image_folder(path: Path, offsets: list[float]) -> Path:
    """Small JPEGs with an index giving capture times BASE + offset."""
    path.mkdir(parents=True)
    lines = []
    for i, offset in enumerate(offsets):
        (path / f"img{i}.jpg").write_bytes(encode_jpeg(_image(i)))
        lines.append(json.dumps({"file": f"img{i}.jpg", "capture_ts": BASE + offset}))
    (path / INDEX_FILE).write_text("\n".join(lines) + "\n")
    return path


def _index(segment: Path) -> list[dict]:
    return [json.loads(line) for line in (segment / INDEX_FILE).read_text().splitlines()]


def _segments(camera_dir: Path) -> list[str]:
    return sorted(p.name for p in camera_dir.iterdir())


def _ref(camera: str, seq: int, ts: float) -> FrameRef:
    return FrameRef(camera_id=camera, line_id="line-1", product_class="ball_screw", seq=seq, capture_ts=ts,
                    width=32, height=24)


def _camera(folder: Path, camera_id: str = "cam-1") -> CameraConfig:
    return CameraConfig(id=camera_id, line="line-7", product_class="ball_screw", source=str(folder))


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- recording a source -------------------------------------------------------------------------
def test_source_recording_splits_segments_by_capture_time_and_replays(tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "src", [0, 20, 40, 61, 62, 125])
    camera = _camera(folder)
    settings = Settings(capture=CaptureSettings(jpeg_quality=95), cameras=[camera])
    out = tmp_path / "rec"

    stats = record_from_source(settings, camera, out, threading.Event())

    assert (stats.frames, stats.segments, stats.skipped, stats.deleted_segments) == (6, 3, 0, 0)
    cam_dir = out / "cam-1"
    assert _segments(cam_dir) == [SLOT0, SLOT1, SLOT2]
    per_segment = {name: _index(cam_dir / name) for name in _segments(cam_dir)}
    assert [[r["seq"] for r in lines] for lines in per_segment.values()] == [[0, 1, 2], [3, 4], [5]]
    assert [r["capture_ts"] for lines in per_segment.values() for r in lines] == [BASE + o for o in
                                                                                   (0, 20, 40, 61, 62, 125)]
    first = per_segment[SLOT0][0]
    assert first == {"file": "0000000000.jpg", "seq": 0, "capture_ts": BASE, "width": 32, "height": 24,
                     "camera_id": "cam-1", "line_id": "line-7", "product_class": "ball_screw"}
    for name, lines in per_segment.items():
        # Exactly the indexed JPEGs plus the index: no temp files left behind.
        assert sorted(p.name for p in (cam_dir / name).iterdir()) == sorted([r["file"] for r in lines] + [INDEX_FILE])
    assert stats.bytes == _tree_bytes(out)
    # Re-encoded at quality 95: close to the source pixels.
    recorded = read_image(str(cam_dir / SLOT0 / "0000000001.jpg"))
    assert np.abs(recorded.astype(int) - read_image(str(folder / "img1.jpg")).astype(int)).mean() < 8

    # One segment folder is a replayable image folder with the recorded capture times.
    replayed = list(ImageFolderSource(cam_dir / SLOT0))
    assert [ts for _, ts in replayed] == [BASE, BASE + 20, BASE + 40]
    assert all(rgb.shape == (24, 32, 3) for rgb, _ in replayed)


def test_source_recording_continues_seq_in_new_segments_and_stops_at_max_frames(tmp_path: Path) -> None:
    folder = _image_folder(tmp_path / "src", [0, 20, 40, 61, 62, 125])
    camera = _camera(folder)
    settings = Settings(cameras=[camera])
    out = tmp_path / "rec"
    first = record_from_source(settings, camera, out, threading.Event(), max_frames=4)
    assert (first.frames, first.segments) == (4, 2)

    second = record_from_source(settings, camera, out, threading.Event())

    assert (second.frames, second.segments) == (6, 3)
    # Same slots again: new folders with a suffix; the closed ones are never appended to.
    assert _segments(out / "cam-1") == [SLOT0, f"{SLOT0}-2", SLOT1, f"{SLOT1}-2", SLOT2]
    assert [r["seq"] for r in _index(out / "cam-1" / SLOT1)] == [3]
    assert [r["seq"] for r in _index(out / "cam-1" / f"{SLOT0}-2")] == [4, 5, 6]
    # Read back interleaved by capture time across the two runs.
    frames = list(iter_recording(out))
    assert [f.seq for f in frames] == [0, 4, 1, 5, 2, 6, 3, 7, 8, 9]
    assert all(f.path.is_file() and f.camera_id == "cam-1" and f.line_id == "line-7" for f in frames)


# -- recording the frames topic -----------------------------------------------------------------
def _run_until_idle(settings: Settings, camera: str | None, root: Path, **kw: object) -> RecordStats:
    with Background(record_from_topic, settings, camera, root, idle_exit_s=2.0, **kw) as bg:
        bg.thread.join(60)
        assert not bg.thread.is_alive(), "recorder did not exit after going idle"
    return bg.result


def test_topic_recording_keeps_one_camera_and_resumes(kafka_settings: KafkaSettings, tmp_path: Path) -> None:
    images = {i: _image(i) for i in range(4)}
    publish_frames(kafka_settings, [("cam-a", 0, images[0])], capture_ts=BASE)
    producer = make_producer(kafka_settings)
    # A record without a frame header, between two good frames of the same partition.
    producer.send(topic_name(kafka_settings, "frames"), key=b"cam-a", value=b"not a frame")
    producer.flush()
    producer.close()
    publish_frames(kafka_settings, [("cam-b", 0, images[1])], capture_ts=BASE + 1)
    publish_frames(kafka_settings, [("cam-a", 1, images[1])], capture_ts=BASE + 30)
    publish_frames(kafka_settings, [("cam-a", 7, images[2])], capture_ts=BASE + 61, replay_session="replay-1")
    publish_frames(kafka_settings, [("cam-b", 1, images[2]), ("cam-a", 2, images[2])], capture_ts=BASE + 62)
    settings = Settings(kafka=kafka_settings)
    root = tmp_path / "rec"

    stats = _run_until_idle(settings, "cam-a", root)

    assert (stats.frames, stats.segments, stats.skipped, stats.ignored, stats.duplicates) == (3, 2, 1, 3, 0)
    assert sorted(p.name for p in root.iterdir()) == ["cam-a"]
    assert _segments(root / "cam-a") == [SLOT0, SLOT1]
    frames = list(iter_recording(root))
    assert [(f.camera_id, f.seq, f.capture_ts) for f in frames] == [
        ("cam-a", 0, BASE), ("cam-a", 1, BASE + 30), ("cam-a", 2, BASE + 62)]
    # Values are stored as published, not re-encoded.
    assert [f.jpeg() for f in frames] == [encode_jpeg(images[i]) for i in range(3)]

    # Same group: resumes after the committed offsets and records only the new frame.
    publish_frames(kafka_settings, [("cam-a", 3, images[3])], capture_ts=BASE + 63)
    again = _run_until_idle(settings, "cam-a", root)
    assert (again.frames, again.duplicates, again.skipped) == (1, 0, 0)
    # A new group reads everything again; every frame is already on disk and dropped by seq.
    fresh = _run_until_idle(settings, "cam-a", root, group_id=f"{kafka_settings.topic_prefix}-other")
    assert (fresh.frames, fresh.duplicates, fresh.skipped) == (0, 4, 1)
    assert [f.seq for f in iter_recording(root)] == [0, 1, 2, 3]


def test_topic_recording_of_all_cameras(kafka_settings: KafkaSettings, tmp_path: Path) -> None:
    image = _image(0)
    publish_frames(kafka_settings, [("cam-a", 0, image), ("cam-b", 0, image), ("cam-a", 1, image)], capture_ts=BASE)
    stats = _run_until_idle(Settings(kafka=kafka_settings), None, tmp_path / "rec", max_frames=3)
    assert (stats.frames, stats.segments) == (3, 2)
    assert [(f.camera_id, f.seq) for f in iter_recording(tmp_path / "rec", camera_id="cam-a")] == [
        ("cam-a", 0), ("cam-a", 1)]
    assert [f.seq for f in iter_recording(tmp_path / "rec" / "cam-b")] == [0]


# -- retention ----------------------------------------------------------------------------------
def _record(root: Path, slots: int, **kw: object) -> Recorder:
    """Two frames per 60 s slot: at +0 and +30."""
    recorder = Recorder(root, "cam-1", **kw)
    for seq in range(2 * slots):
        recorder.write(JPEG, _ref("cam-1", seq, BASE + 30 * seq))
    recorder.close()
    return recorder


def test_retention_by_size_deletes_oldest_closed_segments_only(tmp_path: Path) -> None:
    _record(tmp_path / "ref", 5)
    ref = tmp_path / "ref" / "cam-1"
    sizes = [_tree_bytes(ref / name) for name in (SLOT0, SLOT1, SLOT2, SLOT3, SLOT4)]

    deleted = enforce_retention(ref, sizes[3] + sizes[4], None, now=BASE)

    assert [d.path.name for d in deleted] == [SLOT0, SLOT1, SLOT2]
    assert [d.bytes for d in deleted] == sizes[:3]
    assert _segments(ref) == [SLOT3, SLOT4]
    # Nothing left to delete: the newest segment is kept even when it alone is over the limit.
    assert enforce_retention(ref, 0, None, now=BASE) != [] and _segments(ref) == [SLOT4]
    assert enforce_retention(ref, 0, None, now=BASE) == [] and _segments(ref) == [SLOT4]

    # While recording: checked as each segment closes, never touching the one being written.
    recorder = _record(tmp_path / "live", 5, max_bytes=sizes[3] + sizes[4])
    assert (recorder.stats.deleted_segments, recorder.stats.deleted_bytes) == (3, sum(sizes[:3]))
    assert _segments(tmp_path / "live" / "cam-1") == [SLOT3, SLOT4]


def test_retention_spares_active_segments_and_foreign_folders(tmp_path: Path) -> None:
    _record(tmp_path, 4)
    cam_dir = tmp_path / "cam-1"
    (cam_dir / "notes").mkdir()

    deleted = enforce_retention(tmp_path, 0, None, now=BASE, active=[cam_dir / SLOT1])

    assert [d.path.name for d in deleted] == [SLOT0, SLOT2]
    assert _segments(cam_dir) == [SLOT1, SLOT3, "notes"]


def test_retention_by_age_uses_last_capture_time(tmp_path: Path) -> None:
    _record(tmp_path, 4)
    cam_dir = tmp_path / "cam-1"
    # Last capture times: +30, +90, +150, +210. Older than 100 s at +200: the first two.
    deleted = enforce_retention(cam_dir, None, 100.0, now=BASE + 200)
    assert [(d.path.name, d.last_ts) for d in deleted] == [(SLOT0, BASE + 30), (SLOT1, BASE + 90)]
    assert _segments(cam_dir) == [SLOT2, SLOT3]
    # Everything is old a day later, but the newest segment stays.
    assert [d.path.name for d in enforce_retention(cam_dir, None, 3600.0, now=BASE + 86400)] == [SLOT2]
    assert _segments(cam_dir) == [SLOT3]


@pytest.mark.parametrize(("every", "left"), [(2, [SLOT1]), (100, [SLOT0, SLOT1])])
def test_recorder_checks_the_size_limit_every_n_frames(tmp_path: Path, every: int, left: list[str]) -> None:
    # Each frame is the JPEG plus an index line of 150..250 bytes, and the JPEG is bigger than 250
    # bytes: four frames fit the limit, five do not.
    assert len(JPEG) > 250
    recorder = Recorder(tmp_path, "cam-1", max_bytes=4 * len(JPEG) + 1000, retention_every=every)
    for seq, offset in enumerate([0, 10, 60, 70, 80]):  # the third frame closes the first segment
        recorder.write(JPEG, _ref("cam-1", seq, BASE + offset))
    # Two frames after the last check (at the roll): a check every 2 frames has dropped the closed segment.
    assert _segments(tmp_path / "cam-1") == left
    recorder.close()
    assert _segments(tmp_path / "cam-1") == [SLOT1]


def test_recorder_age_limit_uses_the_wall_clock(tmp_path: Path) -> None:
    past = 1_500_000_000.0  # 2017, on a minute boundary
    recorder = Recorder(tmp_path, "cam-1", max_age_s=3600.0)
    for seq in range(3):
        recorder.write(JPEG, _ref("cam-1", seq, past + 60 * seq))
    # Each roll deleted the closed, years-old segment; the one being written stays.
    assert _segments(tmp_path / "cam-1") == ["20170714T024200Z"]
    recorder.close()
    assert (recorder.stats.frames, recorder.stats.segments, recorder.stats.deleted_segments) == (3, 3, 2)
    assert _segments(tmp_path / "cam-1") == ["20170714T024200Z"]


# -- reading back -------------------------------------------------------------------------------
def test_iter_recording_orders_and_filters_by_capture_time(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path)
    for camera, seq, offset in [("cam-a", 0, 0), ("cam-b", 0, 10), ("cam-a", 1, 50), ("cam-b", 1, 66),
                                ("cam-b", 2, 65), ("cam-a", 2, 70), ("cam-a", 3, 130), ("cam-b", 3, 200)]:
        assert recorder.write(JPEG, _ref(camera, seq, BASE + offset))
    assert not recorder.write(JPEG, _ref("cam-a", 3, BASE + 131))  # seq already recorded
    recorder.close()
    # A torn last line, as a crash mid-write leaves it, is skipped.
    with (tmp_path / "cam-b" / SLOT3 / INDEX_FILE).open("a") as fh:
        fh.write('{"file": "0000000009.jpg", "seq"')

    def key(frames: object) -> list[tuple[str, float]]:
        return [(f.camera_id, f.capture_ts - BASE) for f in frames]

    assert key(iter_recording(tmp_path)) == [("cam-a", 0), ("cam-b", 10), ("cam-a", 50), ("cam-b", 65),
                                             ("cam-b", 66), ("cam-a", 70), ("cam-a", 130), ("cam-b", 200)]
    assert key(iter_recording(tmp_path, camera_id="cam-b")) == [("cam-b", 10), ("cam-b", 65), ("cam-b", 66),
                                                                ("cam-b", 200)]
    # Half-open range: t_from included, t_to excluded.
    assert key(iter_recording(tmp_path, t_from=BASE + 50, t_to=BASE + 130)) == [
        ("cam-a", 50), ("cam-b", 65), ("cam-b", 66), ("cam-a", 70)]
    assert key(iter_recording(tmp_path / "cam-a", t_from=BASE + 60)) == [("cam-a", 70), ("cam-a", 130)]
    assert key(iter_recording(tmp_path / "cam-b" / SLOT1)) == [("cam-b", 65), ("cam-b", 66)]
    assert list(iter_recording(tmp_path, camera_id="cam-c")) == []
    frame = next(iter_recording(tmp_path / "cam-a"))
    assert (frame.seq, frame.width, frame.height, frame.product_class, frame.jpeg()) == (0, 32, 24, "ball_screw", JPEG)
    with pytest.raises(FileNotFoundError):
        next(iter_recording(tmp_path / "missing"))


# -- command line -------------------------------------------------------------------------------
def _cli(*argv: str) -> int:
    return main(["--log-level", "warning", *argv])


@pytest.fixture
def screw_camera(shared_data: Path, tmp_path: Path) -> Path:
    """A config with one camera over four real ball screw images, 30 s apart."""
    folder = tmp_path / "screws"
    folder.mkdir()
    lines = []
    for i, src in enumerate(sorted((shared_data / "train" / "good").glob("*.jpg"))[:4]):
        shutil.copy(src, folder / src.name)
        lines.append(json.dumps({"file": src.name, "capture_ts": BASE + 30 * i}))
    (folder / INDEX_FILE).write_text("\n".join(lines) + "\n")
    config = tmp_path / "linewatch.yaml"
    config.write_text(f"cameras:\n  - id: screw-1\n    product_class: ball_screw\n    source: {folder}\n")
    return config


def test_cli_records_a_configured_camera(screw_camera: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "rec"
    assert _cli("--config", str(screw_camera), "record", "--camera", "screw-1", "--out", str(out),
                "--max-bytes", "1", "--max-age", "7d", "--max-frames", "3") == 0

    line = capsys.readouterr().out
    assert line.startswith("recorded 3 frames of screw-1 in 2 segments (") and line.count("\n") == 1
    assert "retention deleted 1 segments" in line
    # The byte limit removed the closed segment (capture times are in 2027: none is 7 days old); the newest
    # one is always kept.
    assert _segments(out / "screw-1") == [SLOT1]
    (entry,) = _index(out / "screw-1" / SLOT1)
    source = cv2.imread(str(sorted((screw_camera.parent / "screws").glob("*.jpg"))[2]))
    assert (entry["seq"], entry["capture_ts"], entry["height"], entry["width"]) == (2, BASE + 60, *source.shape[:2])


def test_cli_records_from_the_topic(kafka_settings: KafkaSettings, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LINEWATCH_KAFKA__BOOTSTRAP_SERVERS", raising=False)
    image = _image(0)
    publish_frames(kafka_settings, [("cam-b", 0, image), *[("cam-a", seq, image) for seq in range(3)]],
                   capture_ts=BASE)
    config = tmp_path / "linewatch.yaml"
    config.write_text(f"kafka:\n  bootstrap_servers: {kafka_settings.bootstrap_servers}\n"
                      f"  topic_prefix: {kafka_settings.topic_prefix}\n")
    out = tmp_path / "rec"
    capsys.readouterr()  # what setting up logged

    assert _cli("--config", str(config), "record", "--from-topic", "--camera", "cam-a", "--out", str(out),
                "--max-frames", "2") == 0

    assert capsys.readouterr().out.startswith("recorded 2 frames of cam-a in 1 segments (")
    assert [(f.camera_id, f.seq) for f in iter_recording(out)] == [("cam-a", 0), ("cam-a", 1)]


@pytest.mark.parametrize(("args", "message"), [
    (["--max-bytes", "12Q"], "bad size '12Q'"),
    (["--max-age", "soon"], "bad duration 'soon'"),
    (["--max-age", "0"], "--max-age must be > 0"),
    (["--max-bytes", "2G", "--max-frames", "0"], "--max-frames must be >= 1"),
    (["--segment-s", "0"], "--segment-s must be > 0"),
    (["--camera", "cam-x"], "camera 'cam-x' is not configured (configured cameras: screw-1)"),
    (["--from-topic"], "needs Kafka bootstrap servers"),
    (["--from-topic", "--camera", "../up"], "bad camera id '../up'"),
])
def test_cli_bad_input_is_one_line_exit_2(screw_camera: Path, tmp_path: Path, args: list[str], message: str,
                                          capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LINEWATCH_KAFKA__BOOTSTRAP_SERVERS", raising=False)
    camera = [] if "--camera" in args else ["--camera", "screw-1"]
    out = tmp_path / "rec"

    assert _cli("--config", str(screw_camera), "record", "--out", str(out), *camera, *args) == 2

    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("linewatch record: error: ") and captured.err.count("\n") == 1
    assert message in captured.err
    assert not out.exists()
