"""Thin Kafka helpers over kafka-python: topics, clients, DLQ, offsets.

The capture side's dropping frame publisher is ``pipeline.capture.publisher.DroppingPublisher``.

Topic arguments are logical names ("frames") mapped through ``KafkaSettings.topic``; a name that
already carries the prefix is used as is, so passing ``kafka.topic("frames")`` is harmless too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import for_code
from kafka.producer.future import FutureRecordMetadata

from pipeline import kafka_compat
from pipeline.config import KafkaSettings
from pipeline.logging import get_logger
from pipeline.metrics import CONSUMER_LAG, DLQ_RECORDS
from pipeline.runtime.envelope import Envelope
from pipeline.runtime.policy import DLQ_HEADER_KEY, dead_letter_copy, reason_code
from pipeline.runtime.topics import LIVE_TOPICS, full_name
from schemas import DeadLetter

log = get_logger(__name__)
kafka_compat.apply()

TOPICS: tuple[str, ...] = LIVE_TOPICS
Headers = list[tuple[str, bytes]]

_TOPIC_ALREADY_EXISTS = 36


def topic_name(kafka: KafkaSettings, name: str) -> str:
    """Full topic name; idempotent so callers may pass either form (``pipeline.runtime.topics``)."""
    return full_name(kafka, name)


# -- topics and clients -------------------------------------------------------------------------
def create_topics(kafka: KafkaSettings, names: Sequence[str] = TOPICS) -> list[str]:
    """Create the topics that are missing; existing ones are fine. Returns the full names."""
    full = [topic_name(kafka, n) for n in names]
    admin = KafkaAdminClient(**kafka.client_kwargs(), client_id="linewatch-admin")
    try:
        existing = set(admin.list_topics())
        missing = [t for t in full if t not in existing]
        if missing:
            spec = {t: {"num_partitions": kafka.partitions, "replication_factor": kafka.replication_factor}
                    for t in missing}
            # raise_errors=False: another worker creating the same topic concurrently is not an error.
            result = admin.create_topics(spec, raise_errors=False)
            for topic in result["topics"]:
                code = topic["error_code"]
                if code not in (0, _TOPIC_ALREADY_EXISTS):
                    raise for_code(code)(f"creating topic {topic['name']}: {topic.get('error_message')}")
            admin.wait_for_topics(missing)
        log.info("topics_ready", topics=full, created=missing, partitions=kafka.partitions)
    finally:
        admin.close()
    return full


def make_producer(kafka: KafkaSettings, **overrides: Any) -> KafkaProducer:
    config: dict[str, Any] = {
        **kafka.client_kwargs(),
        "acks": "all",
        # A few ms of batching costs nothing against camera frame intervals.
        "linger_ms": 5,
        "max_request_size": kafka.max_message_bytes,
        "retries": 5,
        "retry_backoff_ms": 200,
    }
    config.update(overrides)
    return KafkaProducer(**config)


def make_consumer(
    kafka: KafkaSettings, group_id: str | None, topics: Sequence[str], **overrides: Any
) -> KafkaConsumer:
    """A manually committing consumer; empty ``topics`` leaves assignment to the caller."""
    config: dict[str, Any] = {
        **kafka.client_kwargs(),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "session_timeout_ms": kafka.session_timeout_ms,
        "heartbeat_interval_ms": kafka.heartbeat_interval_ms,
        "max_poll_interval_ms": kafka.max_poll_interval_ms,
        # One partition fetch must fit the largest frame we allow on the wire.
        "max_partition_fetch_bytes": max(kafka.max_message_bytes, 1024 * 1024),
        "fetch_max_bytes": max(4 * kafka.max_message_bytes, 50 * 1024 * 1024),
    }
    config.update(overrides)
    consumer = KafkaConsumer(**config)
    if topics:
        consumer.subscribe([topic_name(kafka, t) for t in topics])
    return consumer


def topic_partitions(consumer: KafkaConsumer, topic: str, timeout_s: float,
                     stop: Callable[[], bool] | None = None) -> list[TopicPartition]:
    """Every partition of ``topic``, waiting up to ``timeout_s`` for it to appear.

    A topic just created (by the admin client or a producer's auto-create) can show in metadata with
    no partitions yet, so an empty answer counts as "not there yet". Empty list on timeout or stop.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        parts = consumer.partitions_for_topic(topic)
        if parts or time.monotonic() >= deadline or (stop is not None and stop()):
            return [TopicPartition(topic, p) for p in sorted(parts or [])]
        time.sleep(0.1)


# -- offsets ------------------------------------------------------------------------------------
def next_offsets(records: Iterable[ConsumerRecord]) -> dict[TopicPartition, int]:
    """Offsets to commit after processing ``records``: last offset + 1 per partition."""
    out: dict[TopicPartition, int] = {}
    for rec in records:
        tp = TopicPartition(rec.topic, rec.partition)
        out[tp] = max(out.get(tp, 0), rec.offset + 1)
    return out


def commit_offsets(consumer: KafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
    """Synchronously commit next-to-read offsets (see ``next_offsets``).

    At-least-once: call only after every record produced for these inputs has been acked.
    """
    if not offsets:
        return
    consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})


def lag(consumer: KafkaConsumer) -> dict[TopicPartition, int]:
    """Records behind the partition end for each assigned partition; updates CONSUMER_LAG."""
    assigned = list(consumer.assignment())
    if not assigned:
        return {}
    ends = consumer.end_offsets(assigned)
    group = str(consumer.config.get("group_id") or "")
    out: dict[TopicPartition, int] = {}
    for tp in assigned:
        # tansu 0.6 answers ListOffsets(latest) with the last batch's base offset + 1, so the
        # high watermark from fetch responses (exact there) wins when it is known.
        end = max(ends.get(tp) or 0, consumer.highwater(tp) or 0)
        behind = max(0, end - consumer.position(tp))
        out[tp] = behind
        CONSUMER_LAG.labels(group=group, topic=tp.topic, partition=str(tp.partition)).set(behind)
    return out


# -- dead letters -------------------------------------------------------------------------------
def send_dead_letter(
    producer: KafkaProducer, kafka: KafkaSettings, record: ConsumerRecord | Envelope, reason: str, stage: str
) -> FutureRecordMetadata:
    """Divert ``record`` to the DLQ with a ``linewatch-dlq`` header explaining why.

    The copy always fits the producer's request limit: a large value is cut and the header records
    the original size and sha256 (``pipeline.runtime.policy.dead_letter_copy``).
    ``reason`` should start with a short code ("bad_header: ..."); the metric label keeps only the
    part before the first colon so free text cannot explode label cardinality.
    Returns the send future: wait on it before committing the source offset.
    """
    env = record if isinstance(record, Envelope) else Envelope.from_record(record)
    value, headers = dead_letter_copy(env, reason, stage, kafka.max_message_bytes)
    future = producer.send(topic_name(kafka, "dlq"), key=env.key, value=value, headers=list(headers))
    DLQ_RECORDS.labels(stage=stage, reason=reason_code(reason)).inc()
    log.warning("dead_letter", stage=stage, reason=reason[:300], topic=env.topic,
                partition=env.partition, offset=env.offset, key=env.key_text, size=env.size)
    return future


def read_dead_letter(headers: Headers | None) -> DeadLetter:
    for k, v in headers or []:
        if k == DLQ_HEADER_KEY:
            return DeadLetter.model_validate_json(v)
    raise ValueError(f"missing record header {DLQ_HEADER_KEY!r}")
