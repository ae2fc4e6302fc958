"""Alert stage and worker against the real broker and Redis (see conftest.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import redis
from kafka import KafkaConsumer, TopicPartition

from pipeline import imaging
from pipeline.alerting.stage import AlertStage
from pipeline.alerting.state_store import CameraStateStore
from pipeline.bus import create_topics, make_producer, read_dead_letter
from pipeline.config import AlertSettings, KafkaSettings, RedisSettings, Settings
from pipeline.redis_store import ThresholdStore
from schemas.events import DefectEvent
from schemas.frames import FrameRef
from schemas.scores import ScoreMessage
from tests.streaming_helpers import Background
from workers.alert import run_alert

T0 = 1_700_000_000.0
DT = 0.1
THUMB = imaging.encode_jpeg(np.full((24, 32, 3), 90, np.uint8))


def make_score(camera: str, seq: int, score: float, *, ts: float | None = None, session: str | None = None,
               product_class: str = "screw") -> ScoreMessage:
    capture_ts = T0 + seq * DT if ts is None else ts
    m = np.full((32, 32), 0.05, np.float32)
    m[8:16, 20:28] = score  # the blob is as hot as the frame score
    png, lo, hi = imaging.quantize_map(m, 16)
    return ScoreMessage(
        frame=FrameRef(camera_id=camera, line_id="line-1", product_class=product_class, seq=seq,
                       capture_ts=capture_ts, width=64, height=64, replay_session=session),
        image_score=score, anomaly_map_png=png, map_min=lo, map_max=hi,
        thumbnail_jpeg=THUMB, model_fingerprint="test", method="winclip",
        latency_ms=3.0, scored_ts=time.time(),
    )


def stream(camera: str, scores: list[float], *, start: int = 0, session: str | None = None,
           product_class: str = "screw") -> list[ScoreMessage]:
    return [make_score(camera, start + i, s, session=session, product_class=product_class)
            for i, s in enumerate(scores)]


def produce(kafka: KafkaSettings, scores: list[ScoreMessage], raw: Sequence[tuple[str, bytes]] = ()) -> None:
    producer = make_producer(kafka)
    try:
        for s in scores:
            producer.send(kafka.topic("scores"), key=s.frame.camera_id.encode(),
                          value=s.model_dump_json().encode())
        for key, value in raw:
            producer.send(kafka.topic("scores"), key=key.encode(), value=value)
        producer.flush(timeout=20)
    finally:
        producer.close()


def read_topic(kafka: KafkaSettings, name: str) -> list[tuple[bytes, bytes, list[tuple[str, bytes]]]]:
    """Every record currently in the topic, partition by partition (order within a camera holds)."""
    consumer = KafkaConsumer(**kafka.client_kwargs(), group_id=None, enable_auto_commit=False)
    try:
        topic = kafka.topic(name)
        tps = [TopicPartition(topic, p) for p in range(kafka.partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        out: list[tuple[bytes, bytes, list[tuple[str, bytes]]]] = []
        deadline = time.monotonic() + 20
        while any(consumer.position(tp) < ends[tp] for tp in tps) and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=200).values():
                out.extend((r.key, r.value, list(r.headers or [])) for r in recs)
        return out
    finally:
        consumer.close()


def read_events(kafka: KafkaSettings) -> dict[tuple[str, str | None], list[DefectEvent]]:
    events: dict[tuple[str, str | None], list[DefectEvent]] = {}
    for key, value, _ in read_topic(kafka, "defects"):
        ev = DefectEvent.model_validate_json(value)
        assert key == ev.camera_id.encode()
        events.setdefault((ev.camera_id, ev.replay_session), []).append(ev)
    return events


def summary(evs: list[DefectEvent]) -> list[tuple[str, int, int, int, int]]:
    return [(e.status, e.first_seq, e.last_seq, e.n_frames, e.peak_seq) for e in evs]


@pytest.fixture
def start_worker(start_background: Callable[..., Background]) -> Callable[..., Background]:
    def start(settings: Settings, idle_exit_s: float | None = None) -> Background:
        return start_background(run_alert, settings, idle_exit_s=idle_exit_s, poll_timeout_ms=100)

    return start


def make_settings(kafka: KafkaSettings, redis_settings: RedisSettings, **alert: object) -> Settings:
    defaults: dict[str, object] = {"k": 2, "n": 3, "quiet_s": 1.5, "silence_s": 1.5, "default_threshold": 0.5,
                                   "min_region_area": 4, "group_id": f"{kafka.topic_prefix}-alert"}
    return Settings(kafka=kafka, redis=redis_settings, alert=AlertSettings(**{**defaults, **alert}))


# -- worker -------------------------------------------------------------------------------------
def test_worker_debounces_merges_and_closes(kafka_settings: KafkaSettings, redis_settings: RedisSettings,
                                            start_worker: Callable[..., Background]) -> None:
    settings = make_settings(kafka_settings, redis_settings)
    create_topics(kafka_settings)
    a = [0.1, 0.1, 0.1, 0.9, 0.1, 0.1, 0.8, 0.9, 0.1, 0.1, 0.1, 0.95, 0.1]  # s3 alone; s6.. one event
    scores = stream("cam-a", a)
    scores.append(make_score("cam-a", 13, 0.1, ts=T0 + 11 * DT + 5.0))  # quiet period over: closes
    scores += stream("cam-a", a, session="replay-1")  # same seqs, separate state and event id
    scores += stream("cam-b", [0.1, 0.9, 0.1, 0.1, 0.9, 0.1])  # never 2 of 3: no event
    scores += stream("cam-c", [0.1, 0.7, 0.8])  # opens; never closed by a message: tick closes it
    produce(kafka_settings, scores, raw=[("cam-a", b"{not json")])

    stats = start_worker(settings, idle_exit_s=settings.alert.quiet_s + 1.5).wait(40)

    events = read_events(kafka_settings)
    assert set(events) == {("cam-a", None), ("cam-a", "replay-1"), ("cam-c", None)}
    assert summary(events[("cam-a", None)]) == [("open", 6, 7, 2, 7), ("closed", 6, 11, 3, 11)]
    # The replay got no frame after its event, so the wall-clock tick closed it; it has its own id.
    assert summary(events[("cam-a", "replay-1")]) == [("open", 6, 7, 2, 7), ("closed", 6, 11, 3, 11)]
    assert summary(events[("cam-c", None)]) == [("open", 1, 2, 2, 2), ("closed", 1, 2, 2, 2)]
    live_open, live_closed = events[("cam-a", None)]
    assert live_open.event_id == live_closed.event_id == DefectEvent.make_id("cam-a", 6)
    assert events[("cam-a", "replay-1")][0].event_id == DefectEvent.make_id("cam-a", 6, "replay-1")
    assert live_closed.peak_score == pytest.approx(0.95) and live_closed.threshold == 0.5
    mask = imaging.decode_png(live_closed.mask_png)
    assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}
    (region,) = live_closed.regions  # the blob at map rows 8-15, cols 20-27 of 32 -> frame x2
    assert 14 <= region.y <= 18 and 38 <= region.x <= 42
    assert imaging.decode_image(live_closed.thumbnail_jpeg).shape == (24, 32, 3)

    dlq = read_topic(kafka_settings, "dlq")
    assert len(dlq) == 1 and dlq[0][1] == b"{not json"
    letter = read_dead_letter(dlq[0][2])
    assert letter.stage == "alert" and letter.reason.startswith("invalid_score")
    assert (stats.records, stats.invalid, stats.events_opened, stats.events_closed) == (
        len(scores) + 1, 1, 3, 3)


def test_worker_restart_mid_event_opens_once_and_closes_once(
    kafka_settings: KafkaSettings, redis_settings: RedisSettings, redis_client: redis.Redis,
    start_worker: Callable[..., Background],
) -> None:
    # quiet_s is long so the first worker's tick cannot close the event before it is stopped.
    settings = make_settings(kafka_settings, redis_settings, quiet_s=20.0)
    create_topics(kafka_settings)
    produce(kafka_settings, stream("cam-r", [0.1, 0.9, 0.9, 0.8]))  # opens at s2, s3 extends

    state_key = f"{redis_settings.key_prefix}:alert:state:cam-r:live"

    def stored() -> dict[str, Any] | None:
        raw = redis_client.get(state_key)
        return json.loads(raw) if raw is not None else None

    first = start_worker(settings)
    deadline = time.monotonic() + 30
    while (stored() or {}).get("last_seq") != 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    # Stop mid-event; the worker finishes the batch in hand (persist, then commit) before it exits.
    first.join(15)
    assert [e.status for e in read_events(kafka_settings)[("cam-r", None)]] == ["open"]
    state = stored()
    assert state is not None and state["last_seq"] == 3 and state["event"]["first_seq"] == 1

    # The rest of the stream, led by a redelivery of s2-s3 (as a producer retry would cause).
    rest = stream("cam-r", [0.9, 0.8], start=2) + stream("cam-r", [0.99, 0.1], start=4)
    rest.append(make_score("cam-r", 6, 0.1, ts=T0 + 4 * DT + 25.0))  # quiet period over: closes
    produce(kafka_settings, rest)
    second = start_worker(settings, idle_exit_s=1.5)
    stats = second.wait(40)

    events = read_events(kafka_settings)
    assert list(events) == [("cam-r", None)]
    assert summary(events[("cam-r", None)]) == [("open", 1, 2, 2, 1), ("closed", 1, 4, 4, 4)]
    assert {e.event_id for e in events[("cam-r", None)]} == {DefectEvent.make_id("cam-r", 1)}
    # The second worker resumed after the first one's committed offsets: only the new records.
    assert stats.records == len(rest)


def test_worker_uses_calibrated_threshold(kafka_settings: KafkaSettings, redis_settings: RedisSettings,
                                         redis_client: redis.Redis,
                                         start_worker: Callable[..., Background]) -> None:
    settings = make_settings(kafka_settings, redis_settings, quiet_s=0.5)
    ThresholdStore(redis_client, redis_settings.key_prefix).set("screw", 0.8)
    create_topics(kafka_settings)
    scores = (stream("cam-x", [0.7, 0.7, 0.7])  # above the default, below the calibrated value
              + stream("cam-y", [0.7, 0.7], product_class="nut")  # uncalibrated class: default 0.5
              + stream("cam-z", [0.85, 0.85]))
    produce(kafka_settings, scores)

    start_worker(settings, idle_exit_s=2.0).wait(40)

    events = read_events(kafka_settings)
    assert set(events) == {("cam-y", None), ("cam-z", None)}
    assert [(e.status, e.threshold) for e in events[("cam-y", None)]] == [("open", 0.5), ("closed", 0.5)]
    assert [(e.status, e.threshold) for e in events[("cam-z", None)]] == [("open", 0.8), ("closed", 0.8)]


# -- stage with real Redis ----------------------------------------------------------------------
def _stage(redis_client: redis.Redis, prefix: str, **alert: object) -> AlertStage:
    settings = AlertSettings(**{"k": 2, "n": 3, "quiet_s": 2.0, "silence_s": 2.0, **alert})
    return AlertStage(settings, ThresholdStore(redis_client, prefix), CameraStateStore(redis_client, prefix))


def test_stage_replays_batch_after_crash_without_duplicates(redis_settings: RedisSettings,
                                                            redis_client: redis.Redis) -> None:
    prefix = redis_settings.key_prefix
    batch1 = stream("cam-1", [0.1, 0.9, 0.9])
    batch2 = stream("cam-1", [0.9, 0.1], start=3)
    stage = _stage(redis_client, prefix)
    assert [e.status for e in stage.process(batch1, now=T0)] == ["open"]
    assert stage.persist() == 1
    # Crash after persisting batch2's state but before committing its offsets: batch2 is redelivered.
    assert stage.process(batch2, now=T0) == []
    stage.persist()

    fresh = _stage(redis_client, prefix)
    assert fresh.process(batch1 + batch2, now=T0 + 1) == []  # everything is a redelivery
    state = fresh.states[("cam-1", None)]
    assert state.event is not None and (state.event.first_seq, state.event.last_seq) == (1, 3)
    (closed,) = fresh.tick(now=T0 + 10)
    assert (closed.status, closed.first_seq, closed.last_seq, closed.n_frames) == ("closed", 1, 3, 3)


def test_stage_keeps_replay_session_apart_from_live(redis_settings: RedisSettings,
                                                    redis_client: redis.Redis) -> None:
    prefix = redis_settings.key_prefix
    stage = _stage(redis_client, prefix)
    live = stream("cam-1", [0.9, 0.1, 0.1, 0.1])  # one anomalous live frame
    replay = stream("cam-1", [0.1, 0.9], session="r1")  # and one in the replay: no 2-of-3 anywhere
    assert stage.process(live[:1] + replay[:1] + live[1:2] + replay[1:2], now=T0) == []
    (ev,) = stage.process(stream("cam-1", [0.9], start=2, session="r1"), now=T0)
    assert (ev.replay_session, ev.first_seq, ev.event_id) == ("r1", 1, DefectEvent.make_id("cam-1", 1, "r1"))
    stage.persist()
    store = CameraStateStore(redis_client, prefix)
    keys = sorted(k.decode() for k in redis_client.scan_iter(f"{prefix}:alert:state:*"))
    assert keys == [f"{prefix}:alert:state:cam-1:live", f"{prefix}:alert:state:cam-1:r1"]
    assert store.load(("cam-1", None)).event is None  # type: ignore[union-attr]
    assert store.load(("cam-1", "r1")).event.first_seq == 1  # type: ignore[union-attr]


def test_stage_evicts_idle_states_and_reloads_them(redis_settings: RedisSettings,
                                                   redis_client: redis.Redis) -> None:
    prefix = redis_settings.key_prefix
    settings = AlertSettings(k=2, n=3, quiet_s=2.0, silence_s=2.0)
    stage = AlertStage(settings, ThresholdStore(redis_client, prefix), CameraStateStore(redis_client, prefix),
                       idle_evict_s=60.0)
    stage.process(stream("cam-1", [0.9, 0.9]), now=T0)  # opens
    assert [e.status for e in stage.tick(now=T0 + 5)] == ["closed"]
    stage.persist()
    assert stage.tick(now=T0 + 59) == [] and ("cam-1", None) in stage.states
    assert stage.tick(now=T0 + 61) == [] and ("cam-1", None) not in stage.states
    # Back from Redis on its next frame: old seqs stay ignored, new ones count.
    assert stage.process(stream("cam-1", [0.9, 0.9]), now=T0 + 62) == []
    assert [e.first_seq for e in stage.process(stream("cam-1", [0.9, 0.9], start=2), now=T0 + 62)] == [2]
