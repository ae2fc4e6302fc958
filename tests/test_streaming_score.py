"""The scoring worker against a real broker and Redis."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.bus import create_topics, make_producer, read_dead_letter, topic_name
from pipeline.config import KafkaSettings, RedisSettings
from pipeline.imaging import decode_image, decode_png, encode_jpeg, read_image
from pipeline.redis_store import RedisPromptCache
from schemas import ScoreMessage
from tests.streaming_helpers import (
    Background,
    frame_header,
    publish_frames,
    read_topic,
    site_settings,
    small_engine,
)
from workers.score import make_prompt_cache, run_score


@pytest.fixture(scope="module")
def images(shared_data: Path) -> list[np.ndarray]:
    paths = sorted((shared_data / "test" / "good").glob("*.jpg"))[:3] + sorted(
        (shared_data / "test" / "pitting").glob("*.jpg"))[:3]
    return [cv2.resize(read_image(str(p)), (320, 130)) for p in paths]


def scores_of(records: list) -> list[ScoreMessage]:
    return [ScoreMessage.model_validate_json(r.value) for r in records]


def test_every_frame_gets_exactly_one_score(kafka_settings: KafkaSettings, images: list[np.ndarray]) -> None:
    frames = [(cam, seq, images[(seq + i) % len(images)]) for i, cam in enumerate(["cam-a", "cam-b"])
              for seq in range(4)]
    publish_frames(kafka_settings, frames)
    settings = site_settings(kafka_settings)
    engine = small_engine()
    batches: list[int] = []
    original = engine.score
    engine.score = lambda fr, pc: batches.append(len(fr)) or original(fr, pc)  # type: ignore[method-assign]
    with Background(run_score, settings, engine=engine):
        records = read_topic(kafka_settings, "scores", 8)
    msgs = scores_of(records)
    keys = [(m.frame.camera_id, m.frame.seq) for m in msgs]
    assert sorted(set(keys)) == sorted((c, s) for c, s, _ in frames)
    assert len(keys) == len(set(keys)) == 8
    for rec, msg in zip(records, msgs, strict=True):
        assert rec.key == msg.frame.camera_id.encode()
        assert decode_png(msg.anomaly_map_png).shape == (64, 64)
        assert decode_image(msg.thumbnail_jpeg).shape[1] == 256
        assert msg.model_fingerprint == engine.fingerprint and msg.method == "winclip"
        assert msg.latency_ms >= 0 and 0 <= msg.image_score <= 1
    by_partition: dict[tuple[int, str], list[int]] = {}
    for rec, msg in zip(records, msgs, strict=True):
        by_partition.setdefault((rec.partition, msg.frame.camera_id), []).append(msg.frame.seq)
    assert all(seqs == sorted(seqs) for seqs in by_partition.values())
    # Frames of two cameras of one product class share forwards.
    assert max(batches) > 1


def test_bad_records_go_to_the_dlq_and_the_worker_keeps_going(
        kafka_settings: KafkaSettings, images: list[np.ndarray]) -> None:
    create_topics(kafka_settings)
    producer = make_producer(kafka_settings)
    frames_topic = topic_name(kafka_settings, "frames")
    good = images[0]
    jpeg = encode_jpeg(good)

    def send(key: str, value: bytes, headers: list) -> None:
        producer.send(frames_topic, key=key.encode(), value=value, headers=headers)

    send("cam", jpeg, frame_header("cam", 0, good).to_header())
    send("cam", b"\xff\xd8not a jpeg", frame_header("cam", 1, good).to_header())
    send("cam", jpeg, [])
    send("cam", jpeg, [("linewatch-frame", b'{"camera_id": "cam", "seq": -1}')])
    send("cam", jpeg, frame_header("cam", 4, good, width=999).to_header())
    send("cam", b"x" * 300_000, frame_header("cam", 5, good).to_header())
    send("cam", jpeg, frame_header("cam", 6, good).to_header())
    producer.flush()
    producer.close()
    settings = site_settings(kafka_settings, max_frame_bytes=200_000)
    with Background(run_score, settings, engine=small_engine()) as worker:
        dlq = read_topic(kafka_settings, "dlq", 5)
        scores = read_topic(kafka_settings, "scores", 2)
    stats = worker.result
    reasons = sorted(read_dead_letter(r.headers).reason.split(":")[0] for r in dlq)
    assert reasons == ["bad_header", "bad_header", "dimension_mismatch", "oversized", "undecodable"]
    letters = {read_dead_letter(r.headers).source_offset: r for r in dlq}
    assert letters[1].value == b"\xff\xd8not a jpeg"  # original bytes ride along
    assert all(read_dead_letter(r.headers).stage == "score" for r in dlq)
    assert sorted(m.frame.seq for m in scores_of(scores)) == [0, 6]
    assert stats.rejected == 5 and stats.scored == 2


def test_stale_live_frames_are_skipped_but_replays_are_scored(
        kafka_settings: KafkaSettings, images: list[np.ndarray]) -> None:
    old = time.time() - 3600
    publish_frames(kafka_settings, [("live", s, images[0]) for s in range(2)], capture_ts=old)
    publish_frames(kafka_settings, [("replayed", s, images[0]) for s in range(2)], capture_ts=old,
                   replay_session="r-1")
    settings = site_settings(kafka_settings, staleness_s=10.0)
    # Runs until idle, so every record (stale or not) has been seen before the counts are read.
    stats = run_score(settings, threading.Event(), engine=small_engine(), idle_exit_s=4.0)
    records = read_topic(kafka_settings, "scores", 2)
    assert {m.frame.camera_id for m in scores_of(records)} == {"replayed"}
    assert stats.stale == 2


def test_prompt_cache_is_shared_through_redis(kafka_settings: KafkaSettings, redis_settings: RedisSettings,
                                              redis_client: object, images: list[np.ndarray]) -> None:
    settings = site_settings(kafka_settings, redis_settings)
    publish_frames(kafka_settings, [("cam", 0, images[0])])
    with Background(run_score, settings, engine=small_engine(cache=make_prompt_cache(settings))):
        read_topic(kafka_settings, "scores", 1)
    keys = [k.decode() for k in redis_client.scan_iter(f"{redis_settings.key_prefix}:prompts:*")]
    assert len(keys) == 1 and keys[0].endswith(":ball_screw") and ":winclip:" in keys[0]

    second_cache = make_prompt_cache(settings)
    assert isinstance(second_cache, RedisPromptCache)
    engine = small_engine(cache=second_cache)
    calls: list[int] = []
    original = engine.backbone.encode_text
    engine.backbone.encode_text = lambda *a, **k: calls.append(1) or original(*a, **k)  # type: ignore[method-assign]
    try:
        publish_frames(kafka_settings, [("cam", 1, images[1])])
        with Background(run_score, settings, engine=engine):
            read_topic(kafka_settings, "scores", 2)
    finally:
        engine.backbone.encode_text = original  # type: ignore[method-assign]
    assert calls == [] and second_cache.computed == 0


def test_scoring_continues_without_redis(kafka_settings: KafkaSettings, images: list[np.ndarray]) -> None:
    from pipeline.embedded import free_port

    settings = site_settings(kafka_settings, RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0",
                                                           socket_timeout_s=0.2))
    publish_frames(kafka_settings, [("cam", 0, images[0])])
    with Background(run_score, settings, engine=small_engine(cache=make_prompt_cache(settings))):
        records = read_topic(kafka_settings, "scores", 1)
    assert len(records) == 1


def test_offsets_are_committed_after_scores(kafka_settings: KafkaSettings, images: list[np.ndarray]) -> None:
    from kafka import KafkaConsumer, TopicPartition

    publish_frames(kafka_settings, [("cam", s, images[s % 3]) for s in range(4)])
    settings = site_settings(kafka_settings)
    with Background(run_score, settings, engine=small_engine()):
        read_topic(kafka_settings, "scores", 4)
        time.sleep(0.5)
    consumer = KafkaConsumer(bootstrap_servers=kafka_settings.bootstrap_servers,
                             group_id=settings.scoring.group_id, enable_auto_commit=False)
    topic = topic_name(kafka_settings, "frames")
    tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    committed = sum(consumer.committed(tp) or 0 for tp in tps)
    consumer.close()
    assert committed == 4
