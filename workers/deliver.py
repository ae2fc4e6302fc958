"""Deliver worker: defects topic -> subscriptions (webhook, Kafka topic, Redis stream).

The loop polls in its own consumer group, hands each event to the dispatcher's per-subscription
lanes, and commits only offsets that every matching lane has settled (delivered, coalesced or
dead-lettered). While too many events are in flight it pauses fetching instead of buffering.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import CommitFailedError, KafkaError
from pydantic import ValidationError

from pipeline.bus import (
    close_clients,
    commit_offsets,
    create_topics,
    lag,
    make_consumer,
    make_producer,
    send_dead_letter,
)
from pipeline.config import Settings
from pipeline.delivery.camera_status import CameraStatusDelivery
from pipeline.delivery.channels import SenderFactory
from pipeline.delivery.dispatch import Dispatcher
from pipeline.delivery.store import DeliveryLedger, ReplayAlerts, SubscriptionStore
from pipeline.health import Health, watch_dependencies
from pipeline.logging import get_logger
from pipeline.redis_store import connect
from schemas.events import DefectEvent

log = get_logger(__name__)

LAG_EVERY_S = 15.0


@dataclass
class DeliverStats:
    records: int = 0
    invalid: int = 0
    fanned_out: int = 0
    commits: int = 0


def run_deliver(settings: Settings, stop: threading.Event, idle_exit_s: float | None = None,
                poll_timeout_ms: int = 200, max_records: int = 200, health: Health | None = None) -> DeliverStats:
    """Run until ``stop`` is set (or idle for ``idle_exit_s`` with nothing in flight).

    ``health`` gets the broker and Redis readiness checks and a beat per loop iteration.
    """
    kafka = settings.kafka
    if health is not None:
        watch_dependencies(health, settings)
    stats = DeliverStats()
    wlog = log.bind(worker="deliver", group=settings.deliver.group_id)
    client = connect(settings.redis)
    prefix = settings.redis.key_prefix
    store = SubscriptionStore(client, prefix)
    senders = SenderFactory(settings, client)
    # Lanes stop retrying on their own stop event, set only after the loop ends.
    lanes_stop = threading.Event()
    dispatcher = Dispatcher(settings.deliver, DeliveryLedger(client, prefix, settings.deliver.ledger_ttl_s),
                            ReplayAlerts(client, prefix), senders, lanes_stop)
    # Camera health (camera_down/up) to subscriptions: its own consumer and thread, only started here.
    camera_status = CameraStatusDelivery(settings, client, senders, threading.Event()).start()
    try:
        create_topics(kafka, names=("defects", "dlq"))
    except KafkaError as exc:
        wlog.warning("topic_check_failed", error=repr(exc))
    consumer = make_consumer(kafka, settings.deliver.group_id, ["defects"])
    dlq = make_producer(kafka)
    assigned: set[TopicPartition] = set()
    committed: dict[TopicPartition, int] = {}
    paused = False
    last_record = time.monotonic()
    last_reload = last_lag = 0.0
    wlog.info("deliver_worker_started", topic=kafka.topic("defects"))
    try:
        while not stop.is_set():
            if health is not None:
                health.beat()
            if time.monotonic() - last_reload >= settings.deliver.reload_s:
                dispatcher.set_subscriptions(store.all())
                last_reload = time.monotonic()
            busy = dispatcher.tracker.in_flight() >= settings.deliver.max_in_flight
            if busy != paused and assigned:
                # Pausing keeps the group membership alive (polls continue) without fetching more.
                (consumer.pause if busy else consumer.resume)(*assigned)
                paused = busy
            polled = consumer.poll(timeout_ms=poll_timeout_ms, max_records=max_records)
            now_assigned = set(consumer.assignment())
            if now_assigned != assigned:
                dispatcher.tracker.forget(assigned - now_assigned)
                for tp in assigned - now_assigned:
                    committed.pop(tp, None)
                if not assigned:
                    last_record = time.monotonic()
                assigned = now_assigned
                paused = False
                wlog.info("deliver_assignment", partitions=sorted(f"{tp.topic}:{tp.partition}" for tp in assigned))
            for records in polled.values():
                for rec in records:
                    stats.records += 1
                    stats.fanned_out += dispatcher.submit(TopicPartition(rec.topic, rec.partition), rec.offset,
                                                          _parse(rec, dlq, settings, stats))
                    last_record = time.monotonic()
            stats.commits += _commit(consumer, dispatcher, assigned, committed)
            if time.monotonic() - last_lag >= LAG_EVERY_S and assigned:
                lag(consumer)
                last_lag = time.monotonic()
            if (idle_exit_s is not None and assigned and dispatcher.tracker.in_flight() == 0
                    and time.monotonic() - last_record >= idle_exit_s):
                wlog.info("deliver_worker_idle_exit", idle_s=idle_exit_s)
                break
    finally:
        camera_status.close()
        lanes_stop.set()
        dispatcher.close()
        # Whatever the lanes settled before stopping is committed; the rest is redelivered.
        stats.commits += _commit(consumer, dispatcher, assigned, committed)
        close_clients(consumer, dlq, "deliver")
        senders.close()
        client.close()
        wlog.info("deliver_worker_stopped", **asdict(stats))
    return stats


def _parse(rec: object, dlq: KafkaProducer, settings: Settings, stats: DeliverStats) -> DefectEvent | None:
    try:
        return DefectEvent.model_validate_json(rec.value)  # type: ignore[attr-defined]
    except (ValidationError, ValueError, TypeError) as exc:
        stats.invalid += 1
        send_dead_letter(dlq, settings.kafka, rec, f"invalid_event: {str(exc)[:200]}",  # type: ignore[arg-type]
                         stage="deliver").get(timeout=30)
        return None


def _commit(consumer: KafkaConsumer, dispatcher: Dispatcher, assigned: set[TopicPartition],
            committed: dict[TopicPartition, int]) -> int:
    offsets = {tp: off for tp, off in dispatcher.tracker.committable().items()
               if tp in assigned and committed.get(tp) != off}  # type: ignore[call-overload]
    if not offsets:
        return 0
    try:
        commit_offsets(consumer, offsets)  # type: ignore[arg-type]
    except CommitFailedError as exc:
        log.warning("deliver_commit_failed", error=str(exc))
        return 0
    committed.update(offsets)  # type: ignore[arg-type]
    return 1

