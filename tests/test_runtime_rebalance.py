"""The stream runtime across rebalances, on the real broker.

What a member has done is committed before its partitions move, so the next owner does not handle
it again; records a member had polled but not handled when the rebalance began are not skipped when
the partition comes back to it (kafka-python keeps the position of such a partition), nor does a
paused partition stay paused. The member under test is stepped by hand so that the rebalance
begins exactly where the test needs it; the member that joins runs in the background.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from structlog.testing import capture_logs

from pipeline.bus import create_topics, make_producer, topic_name
from pipeline.config import KafkaSettings
from pipeline.runtime.envelope import Envelope, Output, Record, StageResult
from pipeline.runtime.loop import RuntimeConfig, Stage, StreamRuntime
from tests.streaming_helpers import read_topic


class RecordingStage(Stage):
    """Upper-cases values into "echo" and remembers what it handled and when it was rebalanced."""

    def __init__(self) -> None:
        self.handled: list[bytes] = []
        self.assigned: list[set[TopicPartition]] = []
        self.revoked: list[set[TopicPartition]] = []
        self.is_busy = False

    def decode(self, env: Envelope) -> bytes:
        return env.value or b""

    def handle(self, records: Sequence[Record[bytes]]) -> StageResult:
        self.handled.extend(r.message for r in records)
        return StageResult(outputs=[Output("echo", r.message.upper(), source=r.envelope) for r in records])

    def on_assigned(self, partitions: set[TopicPartition]) -> None:
        self.assigned.append(set(partitions))

    def on_revoked(self, partitions: set[TopicPartition]) -> None:
        self.revoked.append(set(partitions))

    def busy(self) -> bool:
        return self.is_busy


def group(kafka: KafkaSettings) -> str:
    return f"{kafka.topic_prefix}-g"


def send(kafka: KafkaSettings, by_partition: dict[int, list[bytes]]) -> None:
    create_topics(kafka, names=("in", "other", "echo", "dlq"))
    producer = make_producer(kafka)
    try:
        for partition, values in by_partition.items():
            for v in values:
                producer.send(topic_name(kafka, "in"), value=v, partition=partition)
        producer.flush(timeout=30)
    finally:
        producer.close()


def committed(kafka: KafkaSettings) -> int:
    consumer = KafkaConsumer(**kafka.client_kwargs(), group_id=group(kafka), enable_auto_commit=False)
    try:
        topic = topic_name(kafka, "in")
        return sum(consumer.committed(TopicPartition(topic, p)) or 0 for p in range(kafka.partitions))
    finally:
        consumer.close(autocommit=False)


def runtime(kafka: KafkaSettings, stage: Stage, name: str, topics: Sequence[str] = ("in",),
            stop: threading.Event | None = None, **config: Any) -> StreamRuntime:
    cfg = RuntimeConfig(**{"name": name, "group_id": group(kafka), "topics": tuple(topics),
                           "output_topics": ("echo",), "poll_timeout_ms": 200, **config})
    return StreamRuntime(kafka, cfg, stage, stop=stop)


def join_group(kafka: KafkaSettings, stage: Stage, start_background: Callable[..., Any],
               topics: Sequence[str]) -> Any:
    """A second member of the group, running in the background."""
    return start_background(lambda stop: runtime(kafka, stage, "b", topics, stop=stop).run())


def step_until(rt: StreamRuntime, done: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        rt.step()


def wait_for(done: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def hand_over(kafka: KafkaSettings, a: StreamRuntime, a_stage: RecordingStage, b_stage: RecordingStage) -> None:
    """After A's step that began the rebalance: all six records are committed before B gets a
    partition, and B, polling from the committed offsets, finds nothing left to handle."""
    step_until(a, lambda: len(a_stage.assigned) >= 2, "A's new assignment")
    wait_for(lambda: any(b_stage.assigned), "B to get a partition")
    assert committed(kafka) == 6  # before B could handle (and commit) anything
    time.sleep(3.0)  # B polls its partition from the committed offset: nothing left
    assert b_stage.handled == []


def rebalance_pending(rt: StreamRuntime) -> bool:
    # kafka-python's own flag (set by a heartbeat answered "rebalance in progress"): the next poll of
    # this member begins the rebalance. Peeked at so that the test knows which poll that is.
    return bool(rt.consumer is not None and rt.consumer._coordinator.need_rejoin())


def test_what_is_done_is_committed_before_the_partitions_move(kafka_settings: KafkaSettings,
                                                               start_background: Callable[..., Any]) -> None:
    values = {0: [b"a0", b"a1", b"a2"], 1: [b"b0", b"b1", b"b2"]}
    everything = sorted(v for vs in values.values() for v in vs)
    send(kafka_settings, values)
    a_stage, b_stage = RecordingStage(), RecordingStage()
    with capture_logs() as logs:
        # max_pending_batches=2: the last batch's outputs stay in flight, its offsets uncommitted, until
        # the next step settles them; B joins before that step, whose poll begins the rebalance.
        a = runtime(kafka_settings, a_stage, "a", max_batch=6, max_wait_ms=2000, max_pending_batches=2)
        try:
            a.start()
            step_until(a, lambda: len(a_stage.handled) == 6, "A to handle every record")
            assert sorted(a_stage.handled) == everything
            assert committed(kafka_settings) < 6  # done, not committed
            join_group(kafka_settings, b_stage, start_background, ("in",))
            wait_for(lambda: rebalance_pending(a), "A to learn of the rebalance")
            a.step()  # settles and commits the batch, then its poll revokes A's partitions
            hand_over(kafka_settings, a, a_stage, b_stage)
        finally:
            a.close()
    a_logs = [e for e in logs if e.get("worker") == "a"]
    assert not [e for e in a_logs if e["event"] == "commit_on_revoke_failed"], a_logs
    # Committed by that step before its poll (the batch's acks were in) or, if the broker had not
    # confirmed that commit yet, on revoke: either way before B's first poll.
    assert a_stage.revoked and a_stage.revoked[-1]
    echoed = read_topic(kafka_settings, "echo", 6, timeout_s=30)
    assert sorted(r.value for r in echoed) == [v.upper() for v in everything]  # handled once


class SettlingStage(RecordingStage):
    """Settles records itself, as the deliver worker's lanes do: their offsets are committable once
    ``released`` says so, whenever that is (between two steps, here)."""

    def __init__(self) -> None:
        super().__init__()
        self.released: dict[TopicPartition, int] = {}

    def handle(self, records: Sequence[Record[bytes]]) -> StageResult:
        self.handled.extend(r.message for r in records)
        return StageResult()

    def committable(self) -> dict[TopicPartition, int] | None:
        return dict(self.released)


def test_what_a_stage_settled_between_steps_is_committed_on_revoke(kafka_settings: KafkaSettings,
                                                                    start_background: Callable[..., Any]) -> None:
    send(kafka_settings, {0: [b"a0", b"a1", b"a2"], 1: [b"b0", b"b1", b"b2"]})
    a_stage, b_stage = SettlingStage(), RecordingStage()
    topic = topic_name(kafka_settings, "in")
    with capture_logs() as logs:
        a = runtime(kafka_settings, a_stage, "a", max_batch=6, max_wait_ms=2000)
        try:
            a.start()
            step_until(a, lambda: len(a_stage.handled) == 6, "A to handle every record")
            assert committed(kafka_settings) == 0  # handled, not settled
            join_group(kafka_settings, b_stage, start_background, ("in",))
            wait_for(lambda: rebalance_pending(a), "A to learn of the rebalance")
            a_stage.released = {TopicPartition(topic, 0): 3, TopicPartition(topic, 1): 3}
            a.step()  # nothing in flight: its poll revokes A's partitions first
            hand_over(kafka_settings, a, a_stage, b_stage)
        finally:
            a.close()
    a_logs = [e for e in logs if e.get("worker") == "a"]
    assert not [e for e in a_logs if e["event"] == "commit_on_revoke_failed"], a_logs
    revoke_commits = [e for e in a_logs if e["event"] == "committed_on_revoke"]
    assert len(revoke_commits) == 1 and sum(revoke_commits[0]["offsets"].values()) == 6, a_logs


def test_records_polled_but_not_handled_when_a_rebalance_begins_are_not_skipped(
        kafka_settings: KafkaSettings, start_background: Callable[..., Any]) -> None:
    values = [b"v0", b"v1", b"v2", b"v3"]
    send(kafka_settings, {0: values})
    stage = RecordingStage()
    tp = TopicPartition(topic_name(kafka_settings, "in"), 0)
    with capture_logs() as logs:
        # decode_workers: each step polls (prefetches) the next batch before handling its own.
        a = runtime(kafka_settings, stage, "a", max_batch=2, decode_workers=1)
        try:
            a.start()
            step_until(a, lambda: bool(stage.handled), "A's first batch")
            assert stage.handled == values[:2]
            assert a.consumer is not None and a.consumer.position(tp) == 4  # v2, v3 polled, not handled
            # B subscribes to another topic of the same group: A's partitions are revoked, and all
            # handed back to A when the rebalance completes.
            join_group(kafka_settings, RecordingStage(), start_background, ("other",))
            wait_for(lambda: rebalance_pending(a), "A to learn of the rebalance")
            # The next step takes v2, v3 from the prefetch; its poll (timeout 0) begins the rebalance.
            step_until(a, lambda: len(stage.assigned) >= 2, "A's new assignment")
            assert stage.assigned[-1] >= {tp}
            step_until(a, lambda: len(stage.handled) >= 4, "A to handle v2 and v3", timeout_s=20)
            assert stage.handled == values
        finally:
            a.close()
    assert [e for e in logs if e["event"] == "revoked_records_unread"]  # the case under test happened


def test_a_partition_paused_when_revoked_is_not_left_paused(kafka_settings: KafkaSettings,
                                                            start_background: Callable[..., Any]) -> None:
    send(kafka_settings, {0: [b"first"]})
    stage = RecordingStage()
    a = runtime(kafka_settings, stage, "a")
    try:
        a.start()
        step_until(a, lambda: bool(stage.handled), "the first record")
        stage.is_busy = True
        a.step()  # backpressure: A's partitions paused
        assert a.consumer is not None and a.consumer.paused()
        join_group(kafka_settings, RecordingStage(), start_background, ("other",))
        step_until(a, lambda: len(stage.assigned) >= 2, "A's new assignment")
        stage.is_busy = False  # before A's next step: the runtime sees no change of backpressure
        send(kafka_settings, {0: [b"second"]})
        step_until(a, lambda: len(stage.handled) >= 2, "the record sent after the rebalance", timeout_s=60)
        assert stage.handled == [b"first", b"second"]
    finally:
        a.close()
