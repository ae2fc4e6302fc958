"""The scoring worker (workers/score.py) end to end on the real broker and Redis (see conftest.py).

Every test drives `run_score` itself (in a thread) against topics with a unique prefix; the engine
is a real AnomalyEngine on the small random backbone, only counted where a test needs to observe it.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import redis
from kafka import KafkaConsumer, TopicPartition

from pipeline.bus import create_topics, make_producer, read_dead_letter, topic_name, topic_partitions
from pipeline.config import (
    CameraConfig,
    CaptureSettings,
    EngineSettings,
    KafkaSettings,
    RedisSettings,
    ScoringSettings,
    Settings,
)
from pipeline.embedded import free_port
from pipeline.engine.engine import AnomalyEngine
from pipeline.engine.prompt_cache import PromptCache, decode_bundle
from pipeline.imaging import decode_image, decode_png, encode_jpeg, read_image
from pipeline.redis_store import RedisPromptCache
from schemas import FrameHeader, ScoreMessage
from tests.engine_helpers import SMALL, backbone
from tests.streaming_helpers import Background, read_topic
from workers.capture import run_capture
from workers.score import make_prompt_cache, run_score

CLASS = "ball_screw"
WIDTH = 320  # frames are scaled to this width to keep the CPU forward short
JOIN_TIMEOUT_S = 90.0


# -- helpers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(shared_data: Path) -> list[np.ndarray]:
    """Four normal and four pitted ball screws, 320 px wide (RGB)."""
    paths = sorted((shared_data / "test" / "good").glob("*.jpg"))[:4] + sorted(
        (shared_data / "test" / "pitting").glob("*.jpg"))[:4]
    out = []
    for p in paths:
        rgb = read_image(str(p))
        out.append(cv2.resize(rgb, (WIDTH, round(rgb.shape[0] * WIDTH / rgb.shape[1])), interpolation=cv2.INTER_AREA))
    return out


def make_settings(kafka: KafkaSettings, redis_settings: RedisSettings | None = None,
                  cameras: list[CameraConfig] | None = None, **scoring: Any) -> Settings:
    scoring = {"max_batch": 8, "max_wait_ms": 200, "staleness_s": None,
               "group_id": f"{kafka.topic_prefix}-score", **scoring}
    return Settings(
        kafka=kafka,
        redis=redis_settings or RedisSettings(),
        engine=EngineSettings(backbone=SMALL, pretrained="random", precision="fp32", method="winclip"),
        scoring=ScoringSettings(**scoring),
        capture=CaptureSettings(resize_width=WIDTH),
        cameras=cameras or [],
    )


def make_engine(cache: PromptCache | None = None) -> AnomalyEngine:
    bb, fp = backbone(SMALL)
    settings = EngineSettings(backbone=SMALL, pretrained="random", precision="fp32", method="winclip")
    return AnomalyEngine(settings, backbone=bb, fingerprint=fp, cache=cache)


def header(camera: str, seq: int, image: np.ndarray, product_class: str = CLASS, **kw: Any) -> FrameHeader:
    fields: dict[str, Any] = {"camera_id": camera, "line_id": "line-1", "product_class": product_class,
                              "seq": seq, "capture_ts": time.time(), "width": image.shape[1],
                              "height": image.shape[0]}
    fields.update(kw)
    return FrameHeader(**fields)


Raw = tuple[str, bytes, list[tuple[str, bytes]]]  # key, value, headers


def frame_record(camera: str, seq: int, image: np.ndarray, **kw: Any) -> Raw:
    return camera, encode_jpeg(image), header(camera, seq, image, **kw).to_header()


def publish(kafka: KafkaSettings, records: list[Raw]) -> list[Any]:
    """Raw records -> frames topic, acked; returns their RecordMetadata (partition, offset)."""
    create_topics(kafka)
    producer = make_producer(kafka)
    try:
        futures = [producer.send(topic_name(kafka, "frames"), key=key.encode(), value=value, headers=headers)
                   for key, value, headers in records]
        producer.flush(timeout=30)
        return [f.get(timeout=30) for f in futures]
    finally:
        producer.close()


@pytest.fixture
def workers(start_background: Callable[..., Background]) -> Callable[..., Background]:
    def start(settings: Settings, engine: AnomalyEngine, idle_exit_s: float | None = None) -> Background:
        return start_background(run_score, settings, engine=engine, idle_exit_s=idle_exit_s)

    return start


@pytest.fixture
def count_encode_text() -> Iterator[list[int]]:
    """Counts text-encoder calls on the shared small backbone (restored afterwards)."""
    bb, _ = backbone(SMALL)
    calls: list[int] = []
    original = bb.encode_text

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return original(*args, **kwargs)

    bb.encode_text = counted  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        del bb.encode_text  # back to the class method


def scores_of(records: list) -> list[ScoreMessage]:
    return [ScoreMessage.model_validate_json(r.value) for r in records]


def partitions(consumer: KafkaConsumer, topic: str) -> list[TopicPartition]:
    found = topic_partitions(consumer, topic, 10.0)
    assert found, f"topic {topic} not found"
    return found


def read_all(kafka: KafkaSettings, name: str, min_count: int, settle_s: float = 1.5,
             timeout_s: float = 30.0) -> list:
    """Every record of a topic: from the start until ``min_count`` came and then nothing new for ``settle_s``."""
    consumer = KafkaConsumer(**kafka.client_kwargs(), group_id=None, enable_auto_commit=False)
    try:
        tps = partitions(consumer, topic_name(kafka, name))
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        records: list = []
        deadline = time.monotonic() + timeout_s
        quiet_since = time.monotonic()
        while time.monotonic() < deadline and (len(records) < min_count
                                               or time.monotonic() - quiet_since < settle_s):
            for recs in consumer.poll(timeout_ms=100).values():
                records.extend(recs)
                quiet_since = time.monotonic()
        return records
    finally:
        consumer.close(autocommit=False)


def committed(kafka: KafkaSettings, group_id: str) -> dict[int, int | None]:
    consumer = KafkaConsumer(**kafka.client_kwargs(), group_id=group_id, enable_auto_commit=False)
    try:
        return {tp.partition: consumer.committed(tp) for tp in partitions(consumer, topic_name(kafka, "frames"))}
    finally:
        consumer.close(autocommit=False)


# -- one score per frame --------------------------------------------------------------------------
def test_every_captured_frame_gets_exactly_one_score(kafka_settings: KafkaSettings, shared_data: Path,
                                                     tmp_path: Path, workers: Callable[..., Background]) -> None:
    cameras = []
    for cam, folder in (("cam-a", "good"), ("cam-b", "pitting")):
        d = tmp_path / cam
        d.mkdir()
        for p in sorted((shared_data / "test" / folder).glob("*.jpg"))[:4]:
            shutil.copy(p, d / p.name)
        cameras.append(CameraConfig(id=cam, line="line-1", product_class=CLASS, source=str(d)))
    settings = make_settings(kafka_settings, cameras=cameras, map_size=32)

    capture = run_capture(settings, None, threading.Event())
    assert {c: (s.captured, s.published, s.error) for c, s in capture.items()} == {
        "cam-a": (4, 4, None), "cam-b": (4, 4, None)}
    frames = read_topic(kafka_settings, "frames", 8)
    headers = [FrameHeader.from_headers(r.headers) for r in frames]
    captured = {(h.camera_id, h.seq) for h in headers}
    assert len(captured) == 8 and {h.width for h in headers} == {WIDTH}

    engine = make_engine()
    stats = workers(settings, engine, idle_exit_s=4.0).wait()
    records = read_all(kafka_settings, "scores", 8)  # the worker has exited: this is everything
    # Capture created only the frames topic: the worker made its outputs with the configured
    # partitions rather than leaving them to the broker's auto-creation defaults.
    with KafkaConsumer(**kafka_settings.client_kwargs()) as probe:
        for name in ("scores", "dlq"):
            assert len(partitions(probe, topic_name(kafka_settings, name))) == kafka_settings.partitions
    msgs = scores_of(records)
    keys = [(m.frame.camera_id, m.frame.seq) for m in msgs]
    assert set(keys) == captured
    assert len(keys) == len(set(keys)) == 8  # exactly one score each, no duplicates without a crash
    assert (stats.scored, stats.rejected, stats.stale) == (8, 0, 0)

    by_header = {(h.camera_id, h.seq): h for h in headers}
    for rec, msg in zip(records, msgs, strict=True):
        h = by_header[(msg.frame.camera_id, msg.frame.seq)]
        assert rec.key == msg.frame.camera_id.encode()
        assert msg.frame == h.ref()
        assert decode_png(msg.anomaly_map_png).shape == (32, 32)
        assert msg.map_min <= msg.map_max
        thumb = decode_image(msg.thumbnail_jpeg)
        assert thumb.shape[1] == 256 and thumb.shape[0] == round(h.height * 256 / h.width)
        assert msg.model_fingerprint == engine.fingerprint and msg.model_fingerprint
        assert msg.method == "winclip"
        assert np.isfinite(msg.image_score)
        assert msg.latency_ms >= 0
        # Live frames: latency runs from capture to scoring.
        assert msg.latency_ms == pytest.approx((msg.scored_ts - h.capture_ts) * 1000.0, abs=1.0)

    # Keyed by camera: each camera lives in one partition, where its scores keep capture order.
    homes: dict[str, set[int]] = {}
    seqs: dict[tuple[int, str], list[int]] = {}
    for rec, msg in zip(records, msgs, strict=True):
        homes.setdefault(msg.frame.camera_id, set()).add(rec.partition)
        seqs.setdefault((rec.partition, msg.frame.camera_id), []).append(msg.frame.seq)
    assert all(len(p) == 1 for p in homes.values())
    for (_, cam), got in seqs.items():
        assert got == sorted(s for c, s in captured if c == cam)


# -- micro-batching ---------------------------------------------------------------------------------
def test_frames_of_one_class_from_many_cameras_share_a_forward(
        kafka_settings: KafkaSettings, images: list[np.ndarray], workers: Callable[..., Background]) -> None:
    # Two cameras of one class and a camera of another class, each with its own frame size so a
    # forward shows whose frames it holds: 8 frames waiting before the worker joins, max_batch=8.
    a, b, c = (320, 130), (288, 117), (256, 104)
    records = ([frame_record("cam-a", s, images[s]) for s in range(3)]
               + [frame_record("cam-b", s, cv2.resize(images[4 + s], b)) for s in range(3)]
               + [frame_record("cam-c", s, cv2.resize(images[s], c), product_class="nut") for s in range(2)])
    publish(kafka_settings, records)
    engine = make_engine()
    calls: list[tuple[str, set[tuple[int, int]], int]] = []
    original = engine.score

    def counted(frames: list[np.ndarray], product_class: str) -> Any:
        calls.append((product_class, {(f.shape[1], f.shape[0]) for f in frames}, len(frames)))
        return original(frames, product_class)

    engine.score = counted  # type: ignore[method-assign]
    settings = make_settings(kafka_settings, max_batch=8, max_wait_ms=500)
    w = workers(settings, engine)
    got = read_topic(kafka_settings, "scores", 8, timeout_s=60)
    stats = w.join(30)
    assert len(got) == 8 and stats.scored == 8
    # All eight waiting frames made one micro-batch, scored as one forward per product class,
    # the ball screw forward holding the frames of both its cameras.
    assert stats.batches == 1, calls
    assert sorted(calls) == [(CLASS, {a, b}, 6), ("nut", {c}, 2)]


# -- dead letters -----------------------------------------------------------------------------------
def test_bad_records_go_to_the_dlq_and_the_worker_keeps_going(
        kafka_settings: KafkaSettings, images: list[np.ndarray], workers: Callable[..., Background]) -> None:
    good = images[0]
    noise = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    big = encode_jpeg(noise, quality=95)
    assert len(big) > 150_000
    bad_seq = header("cam", 3, good).model_dump(mode="json") | {"seq": -1}
    sent: list[Raw] = [
        frame_record("cam", 0, good),
        ("cam", b"\xff\xd8not a jpeg", header("cam", 1, good).to_header()),
        ("cam", encode_jpeg(good), []),
        ("cam", encode_jpeg(good), [("linewatch-frame", json.dumps(bad_seq).encode())]),
        ("cam", big, header("cam", 4, noise).to_header()),
        ("cam", encode_jpeg(good), header("cam", 5, good, width=321).to_header()),
        ("cam", b"", header("cam", 6, good).to_header()),
        frame_record("cam", 7, good),
    ]
    expected = {1: "unknown_format", 2: "bad_header", 3: "bad_header", 4: "oversized",
                5: "dimension_mismatch", 6: "empty"}
    metas = publish(kafka_settings, sent)
    assert len({m.partition for m in metas}) == 1  # one key: one partition, offsets 0..7
    offsets = [m.offset for m in metas]
    settings = make_settings(kafka_settings, max_frame_bytes=150_000)
    w = workers(settings, make_engine())
    dlq = read_topic(kafka_settings, "dlq", 6, timeout_s=60)
    scores = read_topic(kafka_settings, "scores", 2, timeout_s=30)
    # The worker is still going: a later frame is scored too.
    publish(kafka_settings, [frame_record("cam", 8, good)])
    scores = read_topic(kafka_settings, "scores", 3, timeout_s=30)
    stats = w.join(30)

    assert sorted(m.frame.seq for m in scores_of(scores)) == [0, 7, 8]
    assert len(dlq) == 6
    frames_topic = topic_name(kafka_settings, "frames")
    for rec in dlq:
        letter = read_dead_letter(rec.headers)
        index = offsets.index(letter.source_offset)
        key, value, headers = sent[index]
        assert letter.reason.split(":", 1)[0] == expected[index], letter.reason
        assert rec.value == value  # the original bytes, unchanged
        assert rec.key == key.encode() and letter.key == key
        assert letter.stage == "score" and letter.source_topic == frames_topic
        assert letter.source_partition == metas[index].partition
        # The original headers ride along beside the reason.
        assert [(k, v) for k, v in rec.headers if not k.startswith("linewatch-dlq")] == headers
        assert letter.original_size == len(value) and not letter.truncated
        assert dict(rec.headers)["linewatch-dlq-original-size"] == str(len(value)).encode()
    assert stats.rejected == 6 and stats.scored == 3
    assert stats.reasons == {"unknown_format": 1, "bad_header": 2, "oversized": 1, "dimension_mismatch": 1,
                             "empty": 1}


# -- staleness --------------------------------------------------------------------------------------
def test_stale_live_frames_are_skipped_replays_and_unlimited_workers_score_them(
        kafka_settings: KafkaSettings, images: list[np.ndarray], workers: Callable[..., Background]) -> None:
    old = time.time() - 3600
    publish(kafka_settings,
            [frame_record("live", s, images[s], capture_ts=old) for s in range(2)]
            + [frame_record("replayed", s, images[s], capture_ts=old, replay_session="r-1") for s in range(2)]
            + [frame_record("fresh", 0, images[2])])
    # Two groups over the same frames, at once: a live limit and none.
    limited = make_settings(kafka_settings, staleness_s=120.0, group_id=f"{kafka_settings.topic_prefix}-limited")
    unlimited = make_settings(kafka_settings, staleness_s=None, group_id=f"{kafka_settings.topic_prefix}-all")
    a = workers(limited, make_engine(), idle_exit_s=4.0)
    b = workers(unlimited, make_engine(), idle_exit_s=4.0)
    stats_a, stats_b = a.wait(), b.wait()
    assert (stats_a.scored, stats_a.stale, stats_a.rejected) == (3, 2, 0)
    assert (stats_b.scored, stats_b.stale, stats_b.rejected) == (5, 0, 0)
    msgs = scores_of(read_all(kafka_settings, "scores", 8))
    per_camera = {cam: sorted(m.frame.seq for m in msgs if m.frame.camera_id == cam)
                  for cam in ("live", "replayed", "fresh")}
    assert per_camera == {"live": [0, 1], "replayed": [0, 0, 1, 1], "fresh": [0, 0]}
    assert all(m.frame.replay_session == "r-1" for m in msgs if m.frame.camera_id == "replayed")


# -- prompt cache -----------------------------------------------------------------------------------
def test_prompt_embeddings_are_computed_once_and_shared_through_redis(
        kafka_settings: KafkaSettings, redis_settings: RedisSettings, redis_client: redis.Redis,
        images: list[np.ndarray], workers: Callable[..., Background], count_encode_text: list[int]) -> None:
    settings = make_settings(kafka_settings, redis_settings)
    publish(kafka_settings, [frame_record("cam", 0, images[0])])
    first_cache = make_prompt_cache(settings)
    assert isinstance(first_cache, RedisPromptCache)
    w = workers(settings, make_engine(first_cache))
    read_topic(kafka_settings, "scores", 1, timeout_s=60)
    w.join(30)
    assert count_encode_text and first_cache.computed == 1  # the first worker did encode the prompts

    keys = [k.decode() for k in redis_client.scan_iter(f"{redis_settings.key_prefix}:prompts:*")]
    assert len(keys) == 1, keys
    key = keys[0]
    assert key.startswith(f"{redis_settings.key_prefix}:prompts:winclip:") and key.endswith(f":{CLASS}")
    bundle = decode_bundle(redis_client.get(key))
    assert bundle["prototypes"].ndim == 2 and bundle["prototypes"].shape[0] == 2  # normal, anomalous

    count_encode_text.clear()
    second_cache = make_prompt_cache(settings)
    publish(kafka_settings, [frame_record("cam", 1, images[1])])
    w = workers(settings, make_engine(second_cache))
    msgs = scores_of(read_topic(kafka_settings, "scores", 2, timeout_s=60))
    w.join(30)
    assert sorted(m.frame.seq for m in msgs) == [0, 1]
    assert count_encode_text == [] and second_cache.computed == 0


def test_scoring_goes_on_when_redis_is_unreachable(
        kafka_settings: KafkaSettings, images: list[np.ndarray], workers: Callable[..., Background],
        capfd: pytest.CaptureFixture[str]) -> None:
    down = RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.2)
    settings = make_settings(kafka_settings, down)
    cache = make_prompt_cache(settings)
    assert isinstance(cache, RedisPromptCache)
    publish(kafka_settings, [frame_record("cam", s, images[s]) for s in range(2)])
    w = workers(settings, make_engine(cache))
    msgs = scores_of(read_topic(kafka_settings, "scores", 2, timeout_s=60))
    stats = w.join(30)
    assert sorted(m.frame.seq for m in msgs) == [0, 1] and stats.scored == 2
    assert cache.computed == 1  # computed locally once, then served from the process tier
    out, err = capfd.readouterr()
    assert "prompt_cache_redis_unavailable" in out + err


# -- offsets ----------------------------------------------------------------------------------------
def test_offsets_are_committed_only_after_the_scores_are_acked(
        kafka_settings: KafkaSettings, images: list[np.ndarray], workers: Callable[..., Background]) -> None:
    metas = publish(kafka_settings, [frame_record(f"cam-{c}", s, images[s + 2 * c]) for c in range(2)
                                     for s in range(2)])
    ends: dict[int, int] = {}
    for m in metas:
        ends[m.partition] = max(ends.get(m.partition, 0), m.offset + 1)
    frames_topic = topic_name(kafka_settings, "frames")

    # A worker whose scores can never be produced (every score is over the producer's size limit)
    # does not crash-loop: each frame goes to the DLQ with the reason, and the offsets move past them.
    broken = make_settings(kafka_settings, group_id=f"{kafka_settings.topic_prefix}-broken")
    broken.kafka = kafka_settings.model_copy(update={"max_message_bytes": 2048})
    broken_stats = workers(broken, make_engine(), idle_exit_s=4.0).wait(120)
    assert broken_stats.scored == 0 and broken_stats.reasons == {"output_refused": 4}, broken_stats
    letters = [read_dead_letter(r.headers) for r in read_topic(kafka_settings, "dlq", 4, timeout_s=30)]
    assert sorted(lt.reason.split(":", 1)[0] for lt in letters) == ["output_refused"] * 4
    assert all(lt.original_size and lt.sha256 for lt in letters)  # the original, identified
    assert {p: c for p, c in committed(kafka_settings, broken.scoring.group_id).items() if c} == ends

    settings = make_settings(kafka_settings)
    w = workers(settings, make_engine())
    read_topic(kafka_settings, "scores", 4, timeout_s=60)
    stats = w.join(30)
    assert stats.scored == 4
    assert {p: c for p, c in committed(kafka_settings, settings.scoring.group_id).items() if c} == ends

    # A fresh member of the group starts at the end: nothing is left to score.
    consumer = KafkaConsumer(**kafka_settings.client_kwargs(), group_id=settings.scoring.group_id,
                             enable_auto_commit=False, auto_offset_reset="earliest",
                             session_timeout_ms=kafka_settings.session_timeout_ms,
                             heartbeat_interval_ms=kafka_settings.heartbeat_interval_ms)
    try:
        consumer.subscribe([frames_topic])
        leftovers: list = []
        deadline = time.monotonic() + 30
        while not consumer.assignment() and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=200).values():
                leftovers.extend(recs)
        assert consumer.assignment(), "no partitions assigned"
        for _ in range(5):
            for recs in consumer.poll(timeout_ms=200).values():
                leftovers.extend(recs)
        assert leftovers == []
        for tp in consumer.assignment():
            assert consumer.position(tp) == ends.get(tp.partition, 0)
    finally:
        consumer.close(autocommit=False)
