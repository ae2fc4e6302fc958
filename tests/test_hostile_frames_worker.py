"""Hostile frame records among valid frames, through the real broker to the scoring worker's public
entry point (`run_score`): each hostile record lands in the DLQ once with its reason, every valid
frame is scored, and the worker goes on (issue 9, "What was found")."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
from kafka import KafkaConsumer, TopicPartition

from pipeline.bus import create_topics, make_producer, read_dead_letter, topic_name
from pipeline.config import EngineSettings, KafkaSettings, ScoringSettings, Settings
from pipeline.engine.engine import AnomalyEngine
from pipeline.imaging import decode_image, encode_jpeg, encode_png
from schemas import ScoreMessage
from tests.engine_helpers import SMALL, backbone
from tests.hostile_frames import jpeg_bomb, raw_header, small_image, tall_png
from tests.streaming_helpers import Background, read_topic
from workers.score import run_score

CLASS = "ball_screw"


def make_engine() -> AnomalyEngine:
    bb, fp = backbone(SMALL)
    settings = EngineSettings(backbone=SMALL, pretrained="random", precision="fp32", method="winclip")
    return AnomalyEngine(settings, backbone=bb, fingerprint=fp)


def publish(kafka: KafkaSettings, records: list[tuple[str, bytes, list[tuple[str, bytes]]]]) -> list[Any]:
    create_topics(kafka)
    producer = make_producer(kafka)
    try:
        futures = [producer.send(topic_name(kafka, "frames"), key=key.encode(), value=value, headers=headers)
                   for key, value, headers in records]
        producer.flush(timeout=60)
        return [f.get(timeout=60) for f in futures]
    finally:
        producer.close()


def test_hostile_records_go_to_the_dlq_once_with_their_reason_and_valid_frames_are_scored(
        kafka_settings: KafkaSettings, start_background: Callable[..., Background]) -> None:
    image = small_image(96, 72)
    jpeg, png = encode_jpeg(image), encode_png(image)
    ok = {"width": 96, "height": 72}

    def valid(seq: int) -> tuple[str, bytes, list[tuple[str, bytes]]]:
        return "cam-ok", jpeg, raw_header(camera="cam-ok", seq=seq, **ok)

    hostile: list[tuple[str, tuple[str, bytes, list[tuple[str, bytes]]]]] = [
        ("encoding_mismatch", ("cam-a", png, raw_header(camera="cam-a", encoding="jpeg", **ok))),
        ("bad_header", (".", jpeg, raw_header(camera=".", **ok))),
        ("bad_header", ("..", jpeg, raw_header(camera="..", **ok))),
        ("oversized", ("cam-b", jpeg_bomb(16000, 16000), raw_header(camera="cam-b", width=64, height=48))),
        ("oversized", ("cam-c", jpeg, raw_header(camera="cam-c", width=16000, height=16000))),
        ("bad_header", ("cam-d", jpeg, raw_header(camera="cam-d", seq=10**30, **ok))),
        ("bad_header", ("cam-e", jpeg, raw_header(camera="cam-e", capture_ts=math.nan, **ok))),
        ("bad_header", ("cam-f", jpeg, raw_header(camera="cam-f", capture_ts=1e300, **ok))),
        ("bad_header", ("cam-g", jpeg, raw_header(camera="cam-g", replay_session="r" * 5000, **ok))),
        ("bad_header", ("cam-h", jpeg, raw_header(camera="cam-h", product_class="../../etc/passwd", **ok))),
        ("unknown_class", ("cam-i", jpeg, raw_header(camera="cam-i", product_class="walnut", **ok))),
        ("future_capture_ts", ("cam-j", jpeg, raw_header(camera="cam-j", capture_ts=time.time() + 86_400, **ok))),
        ("unknown_format", ("cam-k", b"GIF89a" + bytes(64), raw_header(camera="cam-k", **ok))),
    ]
    tall = ("cam-tall", tall_png(), raw_header(camera="cam-tall", width=256, height=65_000, encoding="png"))
    # Hostile records between valid ones, so each batch mixes both.
    sent: list[tuple[str | None, tuple[str, bytes, list[tuple[str, bytes]]]]] = []
    seq = 0
    for reason, record in hostile:
        sent.append((None, valid(seq)))
        sent.append((reason, record))
        seq += 1
    sent.append((None, tall))
    sent.append((None, valid(seq)))
    metas = publish(kafka_settings, [record for _, record in sent])
    expected = {(m.partition, m.offset): reason for m, (reason, _) in zip(metas, sent, strict=True) if reason}
    n_valid = sum(1 for reason, _ in sent if reason is None)

    settings = Settings(
        kafka=kafka_settings,
        engine=EngineSettings(backbone=SMALL, pretrained="random", precision="fp32", method="winclip"),
        scoring=ScoringSettings(max_batch=8, max_wait_ms=200, staleness_s=None, classes=[CLASS],
                                group_id=f"{kafka_settings.topic_prefix}-score"),
    )
    worker = start_background(run_score, settings, engine=make_engine())
    dlq = read_topic(kafka_settings, "dlq", len(hostile), timeout_s=180)
    scores = read_topic(kafka_settings, "scores", n_valid, timeout_s=180)
    # Still alive: one more frame is scored after all of that.
    publish(kafka_settings, [valid(1000)])
    scores = read_topic(kafka_settings, "scores", n_valid + 1, timeout_s=120)
    stats = worker.join(60)

    got = {}
    for rec in dlq:
        letter = read_dead_letter(rec.headers)
        key = (letter.source_partition, letter.source_offset)
        assert key not in got, f"dead-lettered twice: {letter.reason}"
        got[key] = letter.reason
    assert {k: r.split(":", 1)[0] for k, r in got.items()} == expected, got
    messages = [ScoreMessage.model_validate_json(r.value) for r in scores]
    assert Counter(m.frame.camera_id for m in messages) == {"cam-ok": len(hostile) + 2, "cam-tall": 1}
    assert len({(m.frame.camera_id, m.frame.seq) for m in messages}) == len(messages)
    (tall_score,) = [m for m in messages if m.frame.camera_id == "cam-tall"]
    thumb = decode_image(tall_score.thumbnail_jpeg)
    assert max(thumb.shape[:2]) <= 256 and len(tall_score.thumbnail_jpeg) < 20_000
    assert stats.rejected == len(hostile) and stats.scored == n_valid + 1
    assert stats.reasons == dict(Counter(expected.values()))


def test_a_class_outside_the_prepared_ones_is_scored_later_not_lost(
        kafka_settings: KafkaSettings, start_background: Callable[..., Background]) -> None:
    """Without an allowlist a new class is prepared in the background; its frames come out scored."""
    image = small_image(96, 72)
    jpeg = encode_jpeg(image)
    metas = publish(kafka_settings, [("cam-1", jpeg, raw_header(camera="cam-1", seq=0, width=96, height=72))])
    records = []
    for seq in range(1, 4):
        records.append(("cam-1", jpeg, raw_header(camera="cam-1", seq=seq, width=96, height=72)))
        records.append(("cam-2", jpeg, raw_header(camera="cam-2", seq=seq, width=96, height=72,
                                                  product_class="metal_nut")))
    settings = Settings(
        kafka=kafka_settings,
        engine=EngineSettings(backbone=SMALL, pretrained="random", precision="fp32", method="winclip"),
        scoring=ScoringSettings(max_batch=8, max_wait_ms=200, staleness_s=None, classes=None,
                                group_id=f"{kafka_settings.topic_prefix}-score"),
    )
    worker = start_background(run_score, settings, engine=make_engine(), idle_exit_s=10.0)
    read_topic(kafka_settings, "scores", 1, timeout_s=120)  # ball_screw is prepared now
    metas += publish(kafka_settings, records)  # metal_nut is new: prepared in the background
    stats = worker.wait(240)
    scores = read_topic(kafka_settings, "scores", 7, timeout_s=30)
    messages = [ScoreMessage.model_validate_json(r.value) for r in scores]
    got = sorted((m.frame.camera_id, m.frame.seq) for m in messages)
    assert got == sorted([("cam-1", s) for s in range(4)] + [("cam-2", s) for s in range(1, 4)])
    assert stats.rejected == 0 and stats.scored == 7
    # Every frame was committed in the end: a fresh member of the group has nothing left to read.
    ends: dict[int, int] = {}
    for m in metas:
        ends[m.partition] = max(ends.get(m.partition, 0), m.offset + 1)
    assert _committed_ends(kafka_settings, settings.scoring.group_id) == ends
    assert np.isfinite([m.image_score for m in messages]).all()


def _committed_ends(kafka: KafkaSettings, group: str) -> dict[int, int]:
    consumer = KafkaConsumer(**kafka.client_kwargs(), group_id=group, enable_auto_commit=False)
    try:
        topic = topic_name(kafka, "frames")
        parts = sorted(consumer.partitions_for_topic(topic) or [])
        found = {p: consumer.committed(TopicPartition(topic, p)) for p in parts}
        return {p: c for p, c in found.items() if c}
    finally:
        consumer.close()
