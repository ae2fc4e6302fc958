"""Micro-batches across partitions (one partition's backlog never blinds the others) and commits as
soon as a batch's outputs are acknowledged, through the real broker."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence

import pytest
from kafka import KafkaConsumer, TopicPartition

from pipeline.bus import create_topics, make_producer, topic_name
from pipeline.config import KafkaSettings
from pipeline.runtime.envelope import Envelope, Output, Record, StageResult
from pipeline.runtime.loop import RuntimeConfig, Stage, StreamRuntime


class PartitionsStage(Stage):
    """Remembers the partitions of each batch; ``handle_s`` stands for a slow (CPU) model."""

    def __init__(self, handle_s: float = 0.0) -> None:
        self.batches: list[list[int]] = []
        self.handle_s = handle_s
        self.on_handle: list[int] = []  # what ``probe`` saw, per batch
        self.probe: object = None

    def decode(self, env: Envelope) -> bytes:
        return env.value or b""

    def handle(self, records: Sequence[Record[bytes]]) -> StageResult:
        self.batches.append([r.envelope.partition for r in records])
        if callable(self.probe):
            self.on_handle.append(self.probe())
        time.sleep(self.handle_s)
        return StageResult(outputs=[Output("echo", r.message, source=r.envelope) for r in records])

    @property
    def handled(self) -> int:
        return sum(len(b) for b in self.batches)


def send(kafka: KafkaSettings, by_partition: dict[int, int]) -> None:
    create_topics(kafka, names=("in", "echo", "dlq"))
    producer = make_producer(kafka)
    try:
        for partition, count in by_partition.items():
            for i in range(count):
                producer.send(topic_name(kafka, "in"), value=b"%d-%06d" % (partition, i) + b"x" * 100,
                              partition=partition)
        producer.flush(timeout=30)
    finally:
        producer.close()


def group(kafka: KafkaSettings) -> str:
    return f"{kafka.topic_prefix}-fair"


def committed(kafka: KafkaSettings, partition: int) -> int:
    consumer = KafkaConsumer(**kafka.client_kwargs(), group_id=group(kafka), enable_auto_commit=False)
    try:
        return consumer.committed(TopicPartition(topic_name(kafka, "in"), partition)) or 0
    finally:
        consumer.close(autocommit=False)


def runtime(kafka: KafkaSettings, stage: Stage, **config: object) -> StreamRuntime:
    cfg = RuntimeConfig(**{"name": "fair", "group_id": group(kafka), "topics": ("in",), "output_topics": ("echo",),
                           "poll_timeout_ms": 200, **config})  # type: ignore[arg-type]
    return StreamRuntime(kafka, cfg, stage)


def step_until(rt: StreamRuntime, done: object, what: str, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        rt.step()


@pytest.mark.parametrize("decode_workers", [0, 2])
def test_every_partition_with_records_waiting_is_served_about_every_batch(
        kafka_settings: KafkaSettings, decode_workers: int) -> None:
    # Both backlogs fit one fetch of either partition (300 small records): kafka-python alone hands
    # out one partition's 300 before any of the other's, 30 batches of one partition.
    per_partition = 300
    send(kafka_settings, {0: per_partition, 1: per_partition})
    stage = PartitionsStage()
    rt = runtime(kafka_settings, stage, max_batch=10, max_wait_ms=50, decode_workers=decode_workers,
                 max_pending_batches=2)
    try:
        rt.start()
        step_until(rt, lambda: stage.handled >= 2 * per_partition, "every record")
    finally:
        rt.close()
    batches = stage.batches
    assert stage.handled == 2 * per_partition
    assert all(len(b) <= 10 for b in batches)
    for p in (0, 1):
        served = [i for i, b in enumerate(batches) if p in b]
        assert served[0] <= 2, f"partition {p} first served in batch {served[0]}: {batches[:5]}"
        # While it has records left, a partition waits at most two batches (a fetch in flight).
        gaps = [b - a - 1 for a, b in itertools.pairwise(served)]
        assert max(gaps, default=0) <= 2, f"partition {p} skipped {max(gaps)} batches in a row"
    # Round-robin: batches drawn while both partitions had records waiting carry both.
    both = sum(1 for b in batches if set(b) == {0, 1})
    assert both >= len(batches) // 2, [sorted(set(b)) for b in batches]
    assert committed(kafka_settings, 0) == per_partition and committed(kafka_settings, 1) == per_partition


def test_a_batch_is_committed_before_the_next_is_handled_once_its_outputs_are_acknowledged(
        kafka_settings: KafkaSettings) -> None:
    # A slow model (0.5 s a batch) and max_pending_batches=2, as the scoring worker: a worker killed
    # while handling batch n must not handle batch n-1 again, so batch n-1 is committed first.
    send(kafka_settings, {0: 6})
    stage = PartitionsStage(handle_s=0.5)
    stage.probe = lambda: committed(kafka_settings, 0)
    rt = runtime(kafka_settings, stage, max_batch=2, max_wait_ms=200, max_pending_batches=2)
    try:
        rt.start()
        step_until(rt, lambda: stage.handled >= 6, "every record")
    finally:
        rt.close()
    assert stage.batches == [[0, 0], [0, 0], [0, 0]]
    # What the broker had committed as each batch began: the previous batch, not the one before it.
    assert stage.on_handle == [0, 2, 4]
    assert committed(kafka_settings, 0) == 6
