"""The API's background loop: defect events and latest camera frames from Kafka into Redis.

Defects are read in the consumer group ``api.group_id`` (replicas share the work): each event is
stored, announced on the live channel (every replica's stream clients see it), and only then is
its offset committed. Scores are read by a second consumer without a group, from the end of the
topic, because only the latest frame per camera matters; it is rendered at most once per
``render_interval_s`` per camera. A bad record is logged and skipped; Redis trouble rewinds and retries.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import KafkaError
from prometheus_client import Counter
from redis.exceptions import RedisError

from pipeline.api.store import CameraStore, EventStore, publish_live, render_latest
from pipeline.bus import close_clients, commit_offsets, create_topics, make_consumer, next_offsets, topic_name
from pipeline.config import Settings
from pipeline.logging import get_logger
from pipeline.redis_store import connect
from schemas.events import DefectEvent
from schemas.scores import ScoreMessage

log = get_logger(__name__)

API_RECORDS = Counter("linewatch_api_records_total", "Records read by the API ingest loop", ["topic", "outcome"])

RETRY_S = 1.0


@dataclass
class IngestStats:
    events: int = 0
    stale_events: int = 0
    invalid_events: int = 0
    scores: int = 0  # records read
    invalid_scores: int = 0
    frames: int = 0  # latest frames rendered and stored
    commits: int = 0


class Ingest:
    """Run with ``run(stop)`` in a thread; ``ready`` is set once both topics are being read."""

    def __init__(self, settings: Settings, poll_timeout_ms: int = 100, render_interval_s: float = 1.0,
                 max_records: int = 200) -> None:
        self.settings = settings
        self.poll_timeout_ms = poll_timeout_ms
        self.render_interval_s = render_interval_s
        self.max_records = max_records
        self.ready = threading.Event()
        self.stats = IngestStats()
        self.last_beat: float | None = None
        self.scores_beat: float | None = None
        self._log = log.bind(worker="api-ingest", group=settings.api.group_id)
        self._pending: dict[str, ConsumerRecord] = {}
        self._rendered: dict[str, float] = {}

    def alive(self, timeout_s: float = 60.0) -> bool:
        """Both loops went round recently."""
        now = time.monotonic()
        return all(beat is not None and now - beat < timeout_s for beat in (self.last_beat, self.scores_beat))

    def run(self, stop: threading.Event) -> IngestStats:
        """Defects in this thread, scores in a second one (each consumer keeps polling: kafka-python
        3.0 drops a group join that completes while its consumer is not inside poll())."""
        kafka = self.settings.kafka
        prefix = self.settings.redis.key_prefix
        client = connect(self.settings.redis)
        try:
            create_topics(kafka, names=("defects", "scores"))
        except KafkaError as exc:
            self._log.warning("topic_check_failed", error=repr(exc))
        scores_stop = threading.Event()
        cameras = CameraStore.bounded(client, prefix, self.settings.api)
        scores = threading.Thread(target=self._scores_loop, args=(scores_stop, cameras),
                                  name="api-ingest-scores", daemon=True)
        scores.start()
        try:
            self._defects_loop(stop, EventStore(client, prefix, self.settings.api.max_events), client)
        finally:
            scores_stop.set()
            scores.join(30)
            client.close()
            self._log.info("api_ingest_stopped", **asdict(self.stats))
        return self.stats

    def _defects_loop(self, stop: threading.Event, events: EventStore, client: redis.Redis) -> None:
        consumer = make_consumer(self.settings.kafka, self.settings.api.group_id, ["defects"])
        self._log.info("api_ingest_started", topic=topic_name(self.settings.kafka, "defects"))
        try:
            while not stop.is_set():
                self.last_beat = time.monotonic()
                try:
                    self._defects(consumer, events, client, stop)
                except KafkaError as exc:
                    self._log.warning("api_ingest_kafka_error", topic="defects", error=repr(exc))
                    stop.wait(RETRY_S)
        finally:
            close_clients(consumer, None, "api-ingest")

    def _scores_loop(self, stop: threading.Event, cameras: CameraStore) -> None:
        topic = topic_name(self.settings.kafka, "scores")
        consumer: KafkaConsumer | None = None
        try:
            consumer = make_consumer(self.settings.kafka, None, [])
            while not stop.is_set():
                self.scores_beat = time.monotonic()
                try:
                    if not consumer.assignment() and not _assign_at_end(consumer, topic):
                        stop.wait(RETRY_S)
                        continue
                    self.ready.set()
                    self._scores(consumer, cameras)
                except KafkaError as exc:
                    self._log.warning("api_ingest_kafka_error", topic="scores", error=repr(exc))
                    stop.wait(RETRY_S)
        except Exception as exc:  # no camera frames is no reason to stop serving events: readiness says it
            self._log.error("api_ingest_scores_failed", error=repr(exc))
        finally:
            if consumer is not None:
                close_clients(consumer, None, "api-ingest")

    # -- defects -------------------------------------------------------------------------------
    def _defects(self, consumer: KafkaConsumer, events: EventStore, client: redis.Redis,
                 stop: threading.Event) -> None:
        polled = consumer.poll(timeout_ms=self.poll_timeout_ms, max_records=self.max_records)
        records = [rec for recs in polled.values() for rec in recs]
        done: list[ConsumerRecord] = []
        for i, rec in enumerate(records):
            try:
                self._event(rec, events, client)
            except RedisError as exc:
                # Not stored, so not committed: rewind every partition to its first unhandled record.
                self._log.warning("api_ingest_redis_error", error=repr(exc))
                rewind: dict[TopicPartition, int] = {}
                for r in records[i:]:
                    tp = TopicPartition(r.topic, r.partition)
                    rewind[tp] = min(rewind.get(tp, r.offset), r.offset)
                for tp, offset in rewind.items():
                    consumer.seek(tp, offset)
                stop.wait(RETRY_S)
                break
            done.append(rec)
        if done:
            try:
                commit_offsets(consumer, next_offsets(done))
                self.stats.commits += 1
            except KafkaError as exc:  # a rebalance: the next owner re-reads and overwrites the same keys
                self._log.warning("api_ingest_commit_failed", error=repr(exc))

    def _event(self, rec: ConsumerRecord, events: EventStore, client: redis.Redis) -> None:
        try:
            event = DefectEvent.model_validate_json(rec.value)
        except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
            self.stats.invalid_events += 1
            API_RECORDS.labels(topic="defects", outcome="invalid").inc()
            self._log.warning("api_event_invalid", partition=rec.partition, offset=rec.offset, error=str(exc)[:300])
            return
        try:
            summary = events.put(event)
            if summary is not None:
                publish_live(client, self.settings.redis.key_prefix, summary)
        except RedisError:
            raise
        except Exception as exc:  # a record we cannot handle must not stop the loop
            self.stats.invalid_events += 1
            API_RECORDS.labels(topic="defects", outcome="failed").inc()
            self._log.error("api_event_failed", event_id=event.event_id, offset=rec.offset, error=repr(exc))
            return
        outcome = "stored" if summary is not None else "stale"
        API_RECORDS.labels(topic="defects", outcome=outcome).inc()
        if summary is None:
            self.stats.stale_events += 1
        else:
            self.stats.events += 1

    # -- scores --------------------------------------------------------------------------------
    def _scores(self, consumer: KafkaConsumer, cameras: CameraStore) -> None:
        polled = consumer.poll(timeout_ms=self.poll_timeout_ms, max_records=self.max_records)
        for recs in polled.values():
            for rec in recs:
                # The key is the camera id: only each camera's newest record is worth parsing.
                self._pending[_key(rec)] = rec
                self.stats.scores += 1
        now = time.monotonic()
        for camera, rec in list(self._pending.items()):
            if now - self._rendered.get(camera, float("-inf")) < self.render_interval_s:
                continue
            del self._pending[camera]
            self._rendered[camera] = now
            self._score(rec, cameras)

    def _score(self, rec: ConsumerRecord, cameras: CameraStore) -> None:
        try:
            score = ScoreMessage.model_validate_json(rec.value)
            jpeg = render_latest(score)
            cameras.put(score, jpeg)
        except Exception as exc:  # bad record, undecodable image or Redis down: the next frame will do
            self.stats.invalid_scores += 1
            API_RECORDS.labels(topic="scores", outcome="failed").inc()
            self._log.warning("api_score_failed", partition=rec.partition, offset=rec.offset, error=repr(exc)[:300])
            return
        self.stats.frames += 1
        API_RECORDS.labels(topic="scores", outcome="stored").inc()


def _key(rec: ConsumerRecord) -> str:
    key: Any = rec.key
    return key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)


def _assign_at_end(consumer: KafkaConsumer, topic: str) -> bool:
    """Assign every partition of ``topic`` positioned at its end; False while its metadata is unknown."""
    parts = consumer.partitions_for_topic(topic)
    if not parts:
        return False
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    consumer.seek_to_end(*tps)
    for tp in tps:
        consumer.position(tp)  # resolve the lazy seek now: frames published after `ready` are seen
    return True
