"""Kafka helpers against a real tansu broker."""

from __future__ import annotations

import itertools
import logging
import time

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from prometheus_client import REGISTRY

from pipeline.bus import (
    DLQ_HEADER_KEY,
    TOPICS,
    commit_offsets,
    create_topics,
    lag,
    make_consumer,
    make_producer,
    next_offsets,
    read_dead_letter,
    send_dead_letter,
)
from pipeline.capture.publisher import DroppingPublisher
from pipeline.config import KafkaSettings
from pipeline.embedded import EmbeddedBroker, free_port
from schemas import FrameHeader


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _header(camera: str, seq: int) -> FrameHeader:
    return FrameHeader(camera_id=camera, line_id="line-1", product_class="ball_screw", seq=seq,
                       capture_ts=time.time(), width=64, height=48)


def _poll(consumer: KafkaConsumer, n: int, timeout_s: float = 20.0) -> list[ConsumerRecord]:
    """Poll until ``n`` records arrived (group joins on tansu take ~session_timeout/2)."""
    out: list[ConsumerRecord] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=200).values():
            out.extend(records)
    assert len(out) >= n, f"got {len(out)} of {n} records within {timeout_s}s"
    return out


def _read_all(kafka: KafkaSettings, topic: str, n: int) -> list[ConsumerRecord]:
    """Read a topic by manual assignment: no group join, no waiting."""
    consumer = make_consumer(kafka, None, [])
    try:
        full = kafka.topic(topic)
        consumer.assign([TopicPartition(full, p) for p in range(kafka.partitions)])
        return _poll(consumer, n)
    finally:
        consumer.close()


def test_create_topics_is_idempotent(kafka_settings: KafkaSettings) -> None:
    first = create_topics(kafka_settings)
    second = create_topics(kafka_settings)
    assert first == second == [kafka_settings.topic(t) for t in TOPICS]
    admin = KafkaAdminClient(**kafka_settings.client_kwargs())
    try:
        described = {t["name"]: t for t in admin.describe_topics(first)}
    finally:
        admin.close()
    assert set(described) == set(first)
    assert all(len(t["partitions"]) == kafka_settings.partitions for t in described.values())


def test_frame_round_trips_with_header(kafka_settings: KafkaSettings) -> None:
    create_topics(kafka_settings, ["frames"])
    header = _header("cam-7", 42)
    payload = bytes(range(256)) * 1000  # binary, not text
    producer = make_producer(kafka_settings)
    producer.send(kafka_settings.topic("frames"), key=b"cam-7", value=payload,
                  headers=header.to_header()).get(timeout=10)
    producer.close()

    consumer = make_consumer(kafka_settings, "g-roundtrip", ["frames"])
    try:
        (record,) = _poll(consumer, 1)
    finally:
        consumer.close()
    assert record.key == b"cam-7"
    assert record.value == payload
    assert FrameHeader.from_headers(record.headers) == header


def test_publisher_counts_only_acked_frames(kafka_settings: KafkaSettings) -> None:
    create_topics(kafka_settings, ["frames"])
    before = _metric("linewatch_frames_published_total", camera="cam-a")
    with DroppingPublisher(kafka_settings, max_buffered=16, max_in_flight=4) as publisher:
        for seq in range(10):
            camera = "cam-a" if seq % 2 == 0 else "cam-b"
            assert publisher.offer(camera, b"jpeg-%d" % seq, _header(camera, seq).to_header())
        assert publisher.flush(timeout=20)
        assert publisher.published == {"cam-a": 5, "cam-b": 5}
        assert publisher.dropped == {}
    assert _metric("linewatch_frames_published_total", camera="cam-a") - before == 5

    records = _read_all(kafka_settings, "frames", 10)
    by_camera: dict[bytes, list[int]] = {}
    for r in records:
        by_camera.setdefault(r.key, []).append(FrameHeader.from_headers(r.headers).seq)
    # Keyed by camera: each camera lands on one partition, in order.
    assert by_camera == {b"cam-a": [0, 2, 4, 6, 8], b"cam-b": [1, 3, 5, 7, 9]}


def test_publisher_drops_oldest_while_broker_is_down(kafka_settings: KafkaSettings) -> None:
    port = free_port()  # nothing listens here yet
    settings = kafka_settings.model_copy(update={"bootstrap_servers": f"127.0.0.1:{port}"})
    before = _metric("linewatch_frames_dropped_total", camera="cam-d", reason="backpressure")
    frame = b"\xff" * 100_000
    publisher = DroppingPublisher(settings, max_buffered=5, max_in_flight=2, connect_retry_s=0.2)
    try:
        results = [publisher.offer("cam-d", frame, _header("cam-d", seq).to_header()) for seq in range(200)]
        # offer() never blocked and memory stayed at max_buffered frames.
        assert results[:5] == [True] * 5 and not any(results[5:])
        assert publisher.buffered == 5
        assert publisher.dropped == {"cam-d": 195}
        assert publisher.published == {}
        assert publisher.flush(timeout=0.5) is False
        after = _metric("linewatch_frames_dropped_total", camera="cam-d", reason="backpressure")
        assert after - before == 195

        # The broker comes (back) up on that port: the five newest frames get through.
        with EmbeddedBroker(port=port):
            create_topics(settings, ["frames"])
            assert publisher.flush(timeout=30)
            assert publisher.published == {"cam-d": 5}
            seqs = sorted(FrameHeader.from_headers(r.headers).seq for r in _read_all(settings, "frames", 5))
            publisher.close()
    finally:
        publisher.close(timeout=1)
    assert seqs == [195, 196, 197, 198, 199]


def test_dead_letter_keeps_original_bytes_and_reason(kafka_settings: KafkaSettings) -> None:
    create_topics(kafka_settings, ["frames", "dlq"])
    producer = make_producer(kafka_settings)
    original_headers = [("x-trace", b"abc")]
    producer.send(kafka_settings.topic("frames"), key=b"cam-x", value=b"not a jpeg",
                  headers=original_headers).get(timeout=10)
    (record,) = _read_all(kafka_settings, "frames", 1)

    before = _metric("linewatch_dlq_total", stage="score", reason="bad_header")
    send_dead_letter(producer, kafka_settings, record, "bad_header: missing linewatch-frame", "score").get(10)
    producer.close()

    (dead,) = _read_all(kafka_settings, "dlq", 1)
    assert dead.value == b"not a jpeg"
    assert dead.key == b"cam-x"
    assert ("x-trace", b"abc") in dead.headers
    assert [k for k, _ in dead.headers].count(DLQ_HEADER_KEY) == 1
    letter = read_dead_letter(dead.headers)
    assert letter.reason == "bad_header: missing linewatch-frame"
    assert letter.stage == "score"
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == (
        record.topic, record.partition, record.offset)
    assert letter.key == "cam-x"
    assert _metric("linewatch_dlq_total", stage="score", reason="bad_header") - before == 1


def test_committed_group_resumes_after_commit(kafka_settings: KafkaSettings) -> None:
    create_topics(kafka_settings, ["scores"])
    topic = kafka_settings.topic("scores")
    producer = make_producer(kafka_settings)
    for i in range(6):
        producer.send(topic, value=b"%d" % i, partition=0)
    producer.flush(10)
    producer.close()

    first = make_consumer(kafka_settings, "g-resume", ["scores"])
    try:
        records = sorted(_poll(first, 6), key=lambda r: r.offset)
        commit_offsets(first, next_offsets(records[:3]))  # processed (and acked) only three
    finally:
        first.close()

    second = make_consumer(kafka_settings, "g-resume", ["scores"])
    try:
        resumed = _poll(second, 3)
        time.sleep(0.3)
        resumed += [r for rs in second.poll(timeout_ms=300).values() for r in rs]
    finally:
        second.close()
    assert [r.value for r in resumed] == [b"3", b"4", b"5"]


def test_lag_reports_records_behind_end(kafka_settings: KafkaSettings) -> None:
    create_topics(kafka_settings, ["scores"])
    topic = kafka_settings.topic("scores")
    producer = make_producer(kafka_settings)
    for i in range(5):
        producer.send(topic, value=b"%d" % i, partition=1)
    producer.flush(10)
    producer.close()

    consumer = make_consumer(kafka_settings, None, [], max_poll_records=1)
    try:
        tp = TopicPartition(topic, 1)
        consumer.assign([tp])
        consumer.seek(tp, 1)
        (record,) = _poll(consumer, 1)
        assert record.offset == 1
        assert lag(consumer) == {tp: 3}
        assert REGISTRY.get_sample_value(
            "linewatch_consumer_lag", {"group": "", "topic": topic, "partition": "1"}) == 3
        _poll(consumer, 3)
        assert lag(consumer) == {tp: 0}
    finally:
        consumer.close()


class _ConnectAttempts(logging.Handler):
    """When kafka-python set out to connect to the broker (it logs each attempt)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Initializing connection for node_id"):
            self.times.append(time.monotonic())


def test_publisher_finds_a_returning_broker_within_seconds(kafka_settings: KafkaSettings) -> None:
    """A producer that lost its broker retries with a backoff capped at ``reconnect_backoff_max_ms``
    (kafka-python's own cap is 30 s: a broker back after a 30 s outage went unnoticed that long)."""
    port = free_port()
    settings = kafka_settings.model_copy(update={"bootstrap_servers": f"127.0.0.1:{port}"})
    frame = _header("cam-r", 0)
    publisher = DroppingPublisher(settings, connect_retry_s=0.2)
    try:
        with EmbeddedBroker(port=port):
            create_topics(settings, ["frames"])
            publisher.offer("cam-r", b"\xff" * 1000, frame.to_header())
            assert publisher.flush(timeout=30)
        # The broker is gone (connections refused) while frames keep coming.
        attempts = _ConnectAttempts()
        kafka_log = logging.getLogger("kafka.net.manager")
        level = kafka_log.level
        kafka_log.addHandler(attempts)
        kafka_log.setLevel(logging.INFO)
        try:
            for seq in range(1, 41):
                publisher.offer("cam-r", b"\xff" * 1000, _header("cam-r", seq).to_header())
                time.sleep(0.5)
        finally:
            kafka_log.removeHandler(attempts)
            kafka_log.setLevel(level)
        late = [t for t in attempts.times if t >= attempts.times[0] + 5] if attempts.times else []
        gaps = [b - a for a, b in itertools.pairwise(late)]
        cap_s = settings.reconnect_backoff_max_ms / 1000
        # kafka-python adds up to 20% jitter; a second more for a busy machine.
        assert len(late) >= 3 and max(gaps) <= cap_s * 1.2 + 1.0, (len(attempts.times), [round(g, 1) for g in gaps])

        with EmbeddedBroker(port=port):  # back, and empty
            create_topics(settings, ["frames"])
            publisher.offer("cam-r", b"\xff" * 1000, _header("cam-r", 99).to_header())
            deadline = time.monotonic() + 15
            while publisher.published.get("cam-r", 0) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert publisher.published.get("cam-r", 0) >= 2, publisher.dropped
    finally:
        publisher.close(timeout=1)
