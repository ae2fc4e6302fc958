"""Alert worker: scores topic -> debounced DefectEvents on the defects topic.

Per batch: poll -> parse (bad records to the DLQ) -> stage.process + tick -> produce events and
wait for acks -> persist camera states -> commit offsets. Anything failing before the commit
replays the batch onto the last persisted states, where already-seen seqs are dropped.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

from kafka import KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CommitFailedError, KafkaError
from kafka.producer.future import FutureRecordMetadata
from pydantic import ValidationError

from pipeline.alerting.stage import AlertStage, score_key
from pipeline.alerting.state_store import CameraStateStore, StateKey
from pipeline.bus import (
    close_clients,
    commit_offsets,
    create_topics,
    lag,
    make_consumer,
    make_producer,
    next_offsets,
    send_dead_letter,
)
from pipeline.camera_tuning import CameraTuningStore
from pipeline.config import Settings
from pipeline.health import Health, watch_dependencies
from pipeline.logging import get_logger
from pipeline.redis_store import ThresholdStore, connect
from schemas.scores import ScoreMessage

log = get_logger(__name__)

# How long one wait for a produced event's ack may take before the batch counts as failed.
ACK_TIMEOUT_S = 30.0
LAG_EVERY_S = 15.0


@dataclass
class AlertStats:
    records: int = 0
    scores: int = 0
    invalid: int = 0
    events_opened: int = 0
    events_closed: int = 0
    batches: int = 0


def run_alert(
    settings: Settings,
    stop: threading.Event,
    idle_exit_s: float | None = None,
    poll_timeout_ms: int = 200,
    max_records: int = 500,
    health: Health | None = None,
) -> AlertStats:
    """Run until ``stop`` is set, or until no record arrived for ``idle_exit_s`` while partitions
    were assigned. Open events are left open on exit (their state is persisted for the next worker).
    ``health`` gets the broker and Redis readiness checks and a beat per loop iteration.
    """
    kafka = settings.kafka
    if health is not None:
        watch_dependencies(health, settings)
    stats = AlertStats()
    wlog = log.bind(worker="alert", group=settings.alert.group_id)
    client = connect(settings.redis)
    stage = AlertStage(
        settings.alert,
        ThresholdStore(client, settings.redis.key_prefix),
        CameraStateStore(client, settings.redis.key_prefix),
        cameras=settings.cameras, tuning=CameraTuningStore(client, settings.redis.key_prefix),
    )
    try:
        # The defects topic with the configured partitions, not the broker's auto-creation default.
        create_topics(kafka, names=("scores", "defects", "dlq"))
    except KafkaError as exc:
        wlog.warning("topic_check_failed", error=repr(exc))
    consumer = make_consumer(kafka, settings.alert.group_id, ["scores"])
    producer = make_producer(kafka)
    defects_topic = kafka.topic("defects")
    owners: dict[StateKey, TopicPartition] = {}
    assigned: set[TopicPartition] = set()
    last_record = time.monotonic()
    last_lag = 0.0
    wlog.info("alert_worker_started", topic=kafka.topic("scores"), defects=defects_topic)
    try:
        while not stop.is_set():
            if health is not None:
                health.beat()
            polled = consumer.poll(timeout_ms=poll_timeout_ms, max_records=max_records)
            now_assigned = set(consumer.assignment())
            if now_assigned != assigned:
                _evict_revoked(stage, owners, now_assigned)
                if not assigned:
                    last_record = time.monotonic()  # idle time counts from the first assignment
                assigned = now_assigned
                wlog.info("alert_assignment",
                          partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned))
            records = [rec for recs in polled.values() for rec in recs]
            # Called with no records too: idle cameras still need their events closed by wall clock.
            _handle_batch(records, stage, producer, settings, defects_topic, owners, stats)
            if records:
                last_record = time.monotonic()
                try:
                    commit_offsets(consumer, next_offsets(records))
                except CommitFailedError as exc:
                    # The group rebalanced meanwhile: the partition's next owner gets these records
                    # again and drops them by seq against the state persisted above.
                    wlog.warning("alert_commit_failed", error=str(exc), records=len(records))
            if time.monotonic() - last_lag >= LAG_EVERY_S and assigned:
                lag(consumer)
                last_lag = time.monotonic()
            if idle_exit_s is not None and assigned and time.monotonic() - last_record >= idle_exit_s:
                wlog.info("alert_worker_idle_exit", idle_s=idle_exit_s)
                break
    finally:
        close_clients(consumer, producer, "alert")
        client.close()
        wlog.info("alert_worker_stopped", **asdict(stats))
    return stats


def _handle_batch(
    records: list[ConsumerRecord],
    stage: AlertStage,
    producer: KafkaProducer,
    settings: Settings,
    defects_topic: str,
    owners: dict[StateKey, TopicPartition],
    stats: AlertStats,
) -> None:
    """Everything up to (not including) the offset commit; raises if any send was not acked."""
    futures: list[FutureRecordMetadata] = []
    scores: list[ScoreMessage] = []
    for rec in records:
        stats.records += 1
        try:
            score = ScoreMessage.model_validate_json(rec.value)
        except (ValidationError, ValueError, TypeError) as exc:
            stats.invalid += 1
            futures.append(send_dead_letter(producer, settings.kafka, rec, f"invalid_score: {_brief(exc)}",
                                            stage="alert"))
            continue
        scores.append(score)
        owners[score_key(score)] = TopicPartition(rec.topic, rec.partition)
    stats.scores += len(scores)
    events = stage.process(scores) + stage.tick()
    for event in events:
        futures.append(producer.send(defects_topic, key=event.camera_id.encode(),
                                     value=event.model_dump_json().encode()))
        if event.status == "open":
            stats.events_opened += 1
        else:
            stats.events_closed += 1
    if futures:
        producer.flush(timeout=ACK_TIMEOUT_S)
        for future in futures:
            future.get(timeout=ACK_TIMEOUT_S)  # raises the delivery error: no commit, records replay
    # States after the events they caused are acked, before the offsets that produced them commit.
    stage.persist()
    if records:
        stats.batches += 1


def _evict_revoked(stage: AlertStage, owners: dict[StateKey, TopicPartition],
                   assigned: set[TopicPartition]) -> None:
    """Drop cached states of cameras whose partition this worker no longer owns."""
    gone = [key for key, tp in owners.items() if tp not in assigned]
    if gone:
        stage.evict(gone)
        for key in gone:
            del owners[key]
        log.info("alert_states_evicted", cameras=len(gone))


def _brief(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "<root>"
        return f"{exc.error_count()} error(s), first at {where}: {first['msg']}"
    return str(exc)[:200]

