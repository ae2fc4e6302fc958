"""Capture stage and worker against the real broker, with real ball screw images."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from kafka.consumer.fetcher import ConsumerRecord

from pipeline.bus import create_topics, make_consumer, topic_partitions
from pipeline.capture.publisher import DroppingPublisher
from pipeline.capture.sources import natural_key
from pipeline.capture.stage import CaptureStage, resize_to_width
from pipeline.config import CameraConfig, CaptureSettings, KafkaSettings, Settings
from pipeline.imaging import decode_image, read_image
from schemas.frames import FrameHeader
from workers.capture import run_capture, select_cameras


@pytest.fixture
def screw_folder(shared_data: Path, tmp_path: Path) -> Path:
    """Five real ball screw images copied into a camera folder."""
    folder = tmp_path / "cam"
    folder.mkdir()
    for src in sorted((shared_data / "train" / "good").glob("*.jpg"))[:5]:
        shutil.copy(src, folder / src.name)
    return folder


def _consume(kafka: KafkaSettings, expected: int, timeout: float = 15.0) -> list[ConsumerRecord]:
    """Read the frames topic from the beginning (no group: no join delay) until ``expected`` records."""
    consumer = make_consumer(kafka, None, [])
    try:
        topic = kafka.topic("frames")
        parts = topic_partitions(consumer, topic, 10.0)
        assert parts, f"topic {topic} has no partitions"
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
        # One more short poll catches duplicates that would otherwise go unnoticed.
        for batch in consumer.poll(timeout_ms=300).values():
            records.extend(batch)
        return records
    finally:
        consumer.close()


def test_stage_publishes_every_frame_once_in_order(kafka_settings: KafkaSettings, screw_folder: Path) -> None:
    create_topics(kafka_settings, names=("frames",))
    camera = CameraConfig(id="cam-a", line="line-7", product_class="ball_screw", source=str(screw_folder))
    capture = CaptureSettings(jpeg_quality=85, resize_width=320)
    with DroppingPublisher(kafka_settings, "frames", max_buffered=16) as publisher:
        stage = CaptureStage(camera, capture, publisher, replay_session="rs-1")
        stats = stage.run(threading.Event())
        assert publisher.flush(10.0)
        assert publisher.published == {"cam-a": 5}
    assert (stats.captured, stats.skipped) == (5, 0)
    assert stats.seconds > 0

    records = _consume(kafka_settings, 5)
    assert len(records) == 5
    assert {r.key for r in records} == {b"cam-a"}
    assert len({r.partition for r in records}) == 1  # keyed by camera: one partition, in order
    headers = [FrameHeader.from_headers(r.headers) for r in records]
    assert [h.seq - headers[0].seq for h in headers] == [0, 1, 2, 3, 4]
    assert {(h.camera_id, h.line_id, h.product_class, h.replay_session, h.encoding) for h in headers} == {
        ("cam-a", "line-7", "ball_screw", "rs-1", "jpeg")
    }
    stamps = [h.capture_ts for h in headers]
    assert stamps == sorted(stamps)

    originals = sorted(screw_folder.glob("*.jpg"), key=lambda p: natural_key(p.name))
    for rec, header, original in zip(records, headers, originals, strict=True):
        rgb = decode_image(rec.value)
        assert (header.height, header.width) == rgb.shape[:2]
        # 1130x460 at resize_width=320 keeps the aspect ratio: 320x130.
        assert (header.width, header.height) == (320, 130)
        # The seq-th frame is the seq-th image of the folder, not just any image.
        expected = resize_to_width(read_image(str(original)), 320).astype(np.int16)
        assert np.abs(rgb.astype(np.int16) - expected).mean() < 4.0


def test_stage_skips_a_frame_that_cannot_be_encoded(kafka_settings: KafkaSettings, tmp_path: Path) -> None:
    """A bad frame (here: wider than JPEG allows) is logged and skipped; seq stays gap-free."""
    for name, width in [("f1.png", 8), ("f2.png", 70_000), ("f3.png", 8)]:
        assert cv2.imwrite(str(tmp_path / name), np.full((4, width, 3), 7, np.uint8))
    create_topics(kafka_settings, names=("frames",))
    camera = CameraConfig(id="cam-x", product_class="p", source=str(tmp_path))
    with DroppingPublisher(kafka_settings, "frames", max_buffered=4) as publisher:
        stats = CaptureStage(camera, CaptureSettings(), publisher, seq_start=0).run(threading.Event())
        assert publisher.flush(10.0)
    assert (stats.captured, stats.skipped) == (3, 1)

    records = _consume(kafka_settings, 2)
    assert [FrameHeader.from_headers(r.headers).seq for r in records] == [0, 1]
    assert all(decode_image(r.value).shape == (4, 8, 3) for r in records)


def test_worker_isolates_a_broken_camera(kafka_settings: KafkaSettings, screw_folder: Path) -> None:
    settings = Settings(
        kafka=kafka_settings,
        capture=CaptureSettings(resize_width=256),
        cameras=[
            CameraConfig(id="good-cam", product_class="ball_screw", source=str(screw_folder)),
            CameraConfig(id="broken-cam", product_class="ball_screw", source=str(screw_folder / "missing")),
        ],
    )
    stats = run_capture(settings, None, threading.Event(), replay_session="rs-2")

    assert stats["broken-cam"].error is not None and "SourceError" in stats["broken-cam"].error
    assert stats["broken-cam"].captured == 0
    good = stats["good-cam"]
    assert (good.error, good.captured, good.published, good.dropped) == (None, 5, 5, 0)

    records = _consume(kafka_settings, 5)
    assert len(records) == 5
    assert {r.key for r in records} == {b"good-cam"}
    assert sorted(FrameHeader.from_headers(r.headers).seq for r in records) == [0, 1, 2, 3, 4]
    assert all(FrameHeader.from_headers(r.headers).width == 256 for r in records)


def test_worker_camera_selection(kafka_settings: KafkaSettings) -> None:
    cameras = [CameraConfig(id=i, product_class="p", source=str(n)) for n, i in enumerate("ab")]
    settings = Settings(kafka=kafka_settings, cameras=cameras)
    assert [c.id for c in select_cameras(settings, None)] == ["a", "b"]
    assert [c.id for c in select_cameras(settings, ["b"])] == ["b"]
    with pytest.raises(ValueError, match="unknown camera"):
        select_cameras(settings, ["c"])
    with pytest.raises(ValueError, match="no cameras"):
        select_cameras(Settings(kafka=kafka_settings), None)


def test_worker_stops_looping_cameras_on_stop(kafka_settings: KafkaSettings, screw_folder: Path) -> None:
    settings = Settings(
        kafka=kafka_settings,
        capture=CaptureSettings(resize_width=128),
        cameras=[CameraConfig(id=f"loop-{i}", product_class="ball_screw", source=str(screw_folder), fps=20,
                              loop=True) for i in range(2)],
    )
    stop = threading.Event()
    threading.Timer(0.6, stop.set).start()
    t0 = time.monotonic()
    stats = run_capture(settings, ["loop-1"], stop)
    assert time.monotonic() - t0 < 3.0
    assert list(stats) == ["loop-1"]
    s = stats["loop-1"]
    # More than one pass over the 5 images at 20 fps, and everything accounted for after the flush.
    assert 8 <= s.captured <= 16, s
    assert s.error is None and s.published + s.dropped == s.captured


def test_live_sequence_continues_above_a_previous_run() -> None:
    """A restarted live capture must not reuse sequence numbers (alerting ignores seen ones)."""
    camera = CameraConfig(id="cam-r", product_class="p", source="0")
    first = CaptureStage(camera, CaptureSettings(), publisher=None)  # type: ignore[arg-type]
    first.seq += 5  # frames the first run published within ~10 ms (below 1000 fps)
    time.sleep(0.01)
    second = CaptureStage(camera, CaptureSettings(), publisher=None)  # type: ignore[arg-type]
    assert second.seq > first.seq
    assert CaptureStage(camera, CaptureSettings(), None, replay_session="r1").seq == 0  # type: ignore[arg-type]
