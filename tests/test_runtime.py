"""The stream runtime through the real broker: the error policy, dead-letter cutting, infrastructure waits."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import redis
from kafka import KafkaConsumer, TopicPartition

from pipeline.bus import create_topics, make_producer, read_dead_letter, topic_name
from pipeline.config import KafkaSettings
from pipeline.health import Health
from pipeline.runtime.envelope import Envelope, Output, Record, RecordError, StageResult
from pipeline.runtime.loop import RuntimeConfig, Stage, StreamRuntime
from pipeline.runtime.policy import DLQ_SHA256_HEADER, DLQ_SIZE_HEADER, dead_letter_copy
from tests.streaming_helpers import read_topic

LIMIT = 256 * 1024


class EchoStage(Stage):
    """Upper-cases values into the "echo" topic; ``poison`` raises in handle, ``big`` is refused in decode,
    and the first ``outages`` calls raise a Redis connection error (infrastructure, not the record)."""

    def __init__(self, outages: int = 0) -> None:
        self.outages = outages
        self.calls = 0
        self.rollbacks = 0
        self.degraded_seen: list[str | None] = []
        self.runtime: StreamRuntime | None = None

    def decode(self, env: Envelope) -> bytes:
        if len(env.value or b"") > 100_000:
            raise RecordError("oversized", f"{len(env.value or b'')} bytes")
        return env.value or b""

    def handle(self, records: Sequence[Record[bytes]]) -> StageResult:
        self.calls += 1
        if self.runtime is not None:
            self.degraded_seen.append(self.runtime.degraded)
        if self.outages > 0:
            self.outages -= 1
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
        if any(r.message == b"poison" for r in records):
            raise ValueError("cannot handle poison")
        return StageResult(outputs=[Output("echo", r.message.upper(), key=r.envelope.key, source=r.envelope)
                                    for r in records])

    def rollback(self) -> None:
        self.rollbacks += 1


def send(kafka: KafkaSettings, values: list[bytes]) -> None:
    create_topics(kafka, names=("in", "echo", "dlq"))
    producer = make_producer(kafka, max_request_size=4 * 1024 * 1024)
    try:
        for v in values:
            producer.send(topic_name(kafka, "in"), key=b"k", value=v)  # one key: one partition, in order
        producer.flush(timeout=30)
    finally:
        producer.close()


def committed(kafka: KafkaSettings, group: str) -> int:
    consumer = KafkaConsumer(**kafka.client_kwargs(), group_id=group, enable_auto_commit=False)
    try:
        topic = topic_name(kafka, "in")
        return sum(consumer.committed(TopicPartition(topic, p)) or 0 for p in range(kafka.partitions))
    finally:
        consumer.close(autocommit=False)


def run(kafka: KafkaSettings, stage: EchoStage, start_background: Callable[..., Any], **config: Any) -> Any:
    cfg = RuntimeConfig(**{"name": "echo", "group_id": f"{kafka.topic_prefix}-echo", "topics": ("in",),
                           "output_topics": ("echo",), "max_batch": 10, "max_wait_ms": 200, "idle_exit_s": 3.0,
                           **config})

    def worker(stop: threading.Event) -> Any:
        runtime = StreamRuntime(kafka, cfg, stage, stop=stop, health=Health())
        stage.runtime = runtime
        return runtime.run()

    return start_background(worker)


def test_a_poison_record_goes_to_the_dlq_once_and_the_rest_goes_on(
        kafka_settings: KafkaSettings, start_background: Callable[..., Any]) -> None:
    big = bytes(range(256)) * 2400  # 600 KiB: over the worker's 256 KiB producer limit
    kafka = kafka_settings.model_copy(update={"max_message_bytes": LIMIT})
    send(kafka_settings, [b"a", b"poison", b"b", big, b"c"])
    stage = EchoStage()
    stats = run(kafka, stage, start_background).wait(90)

    echoed = read_topic(kafka, "echo", 3, timeout_s=30)
    assert sorted(r.value for r in echoed) == [b"A", b"B", b"C"]  # the next valid records were handled
    letters = read_topic(kafka, "dlq", 2, timeout_s=30)
    assert len(letters) == 2  # each poison record exactly once
    by_reason = {read_dead_letter(r.headers).reason.split(":", 1)[0]: r for r in letters}
    assert set(by_reason) == {"stage_failed", "oversized"}
    assert by_reason["stage_failed"].value == b"poison"
    cut = by_reason["oversized"]
    letter = read_dead_letter(cut.headers)
    # The copy fits the producer's limit: cut, with the original's size and hash beside it.
    assert letter.truncated and len(cut.value) < LIMIT and big.startswith(cut.value)
    assert letter.original_size == len(big) and letter.sha256 == hashlib.sha256(big).hexdigest()
    headers = dict(cut.headers)
    assert headers[DLQ_SIZE_HEADER] == str(len(big)).encode()
    assert headers[DLQ_SHA256_HEADER] == hashlib.sha256(big).hexdigest().encode()
    assert stage.rollbacks >= 1 and stats.rejected == 2 and stats.outputs == 3
    assert committed(kafka, f"{kafka.topic_prefix}-echo") == 5  # offsets moved past every record


def test_infrastructure_trouble_waits_and_retries_instead_of_dead_lettering(
        kafka_settings: KafkaSettings, start_background: Callable[..., Any]) -> None:
    send(kafka_settings, [b"x", b"y"])
    stage = EchoStage(outages=3)
    stats = run(kafka_settings, stage, start_background).wait(90)
    assert sorted(r.value for r in read_topic(kafka_settings, "echo", 2, timeout_s=30)) == [b"X", b"Y"]
    assert stats.rejected == 0 and stats.outputs == 2
    # While waiting, readiness said why; it cleared once the stage worked again.
    assert any(d and "ConnectionError" in d for d in stage.degraded_seen), stage.degraded_seen
    assert stage.degraded_seen[-1] is not None  # the successful call still ran in the degraded state
    assert stage.runtime is not None and stage.runtime.degraded is None


def test_dead_letter_copy_always_fits() -> None:
    env = Envelope("t", 0, 7, b"\x00" * 9_000_000, key=b"cam", headers=(("linewatch-frame", b"{}" * 40_000),))
    value, headers = dead_letter_copy(env, "oversized: 9000000 bytes", "score", 8 * 1024 * 1024)
    total = len(value or b"") + sum(len(k) + len(v) for k, v in headers) + len(env.key or b"")
    assert total < 8 * 1024 * 1024
    assert all(k != "linewatch-frame" for k, _ in headers)  # an 80 KB header is left out, not cut
    small, small_headers = dead_letter_copy(Envelope("t", 0, 1, b"abc"), "x: y", "alert", 8 * 1024 * 1024)
    assert small == b"abc" and read_dead_letter(list(small_headers)).truncated is False


@pytest.mark.parametrize("outages", [0])
def test_runtime_stops_on_request(kafka_settings: KafkaSettings, start_background: Callable[..., Any],
                                  outages: int) -> None:
    send(kafka_settings, [b"q"])
    worker = run(kafka_settings, EchoStage(outages), start_background, idle_exit_s=None)
    read_topic(kafka_settings, "echo", 1, timeout_s=60)
    time.sleep(0.5)
    assert worker.join(30).outputs == 1


def test_pipelined_runtime_handles_every_record_once(kafka_settings: KafkaSettings,
                                                     start_background: Callable[..., Any]) -> None:
    values = [f"v{i:02d}".encode() for i in range(30)]
    send(kafka_settings, values)
    stats = run(kafka_settings, EchoStage(), start_background, max_batch=2, max_wait_ms=50, decode_workers=2,
                max_pending_batches=2).wait(120)
    echoed = read_topic(kafka_settings, "echo", 30, timeout_s=30)
    assert sorted(r.value for r in echoed) == sorted(v.upper() for v in values)
    assert stats.outputs == 30 and committed(kafka_settings, f"{kafka_settings.topic_prefix}-echo") == 30
