"""Scoring worker: a thin loop of consume -> micro-batch -> score -> produce -> commit.

At least once: offsets are committed only after every score and dead letter produced for the
batch has been acknowledged by the broker. A crash before the commit re-scores the batch; the
alert stage ignores scores it has already seen.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from kafka import KafkaConsumer
from kafka.errors import CommitFailedError, KafkaError

from pipeline.bus import (
    commit_offsets,
    create_topics,
    lag,
    make_consumer,
    make_producer,
    next_offsets,
    send_dead_letter,
    topic_name,
)
from pipeline.config import Settings
from pipeline.engine.engine import AnomalyEngine
from pipeline.engine.prompt_cache import MemoryCache, PromptCache
from pipeline.health import Health, watch_dependencies
from pipeline.logging import get_logger
from pipeline.scoring.stage import Frame, Rejected, ScoringStage, Skipped, tiles_by_camera

log = get_logger(__name__)

LAG_EVERY_S = 5.0


@dataclass
class ScoreStats:
    scored: int = 0
    rejected: int = 0
    stale: int = 0
    batches: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


def make_prompt_cache(settings: Settings) -> PromptCache:
    """Redis-backed when Redis is configured (shared by all workers), else in-process only."""
    local = MemoryCache()
    if settings.redis.url is None:
        return local
    from pipeline.redis_store import RedisPromptCache

    return RedisPromptCache.from_settings(settings.redis, local=local)


def poll_batch(consumer: KafkaConsumer, max_batch: int, max_wait_ms: int, idle_timeout_ms: int = 500) -> list:
    """Up to max_batch records: wait for the first, then at most max_wait_ms more for the rest."""
    records: list = []
    deadline: float | None = None
    while len(records) < max_batch:
        timeout = idle_timeout_ms if deadline is None else int(max(0.0, deadline - time.monotonic()) * 1000)
        polled = consumer.poll(timeout_ms=timeout, max_records=max_batch - len(records))
        for recs in polled.values():
            records.extend(recs)
        if not records:
            return records
        if deadline is None:
            deadline = time.monotonic() + max_wait_ms / 1000.0
        if time.monotonic() >= deadline:
            break
    return records


def run_score(settings: Settings, stop: threading.Event, engine: AnomalyEngine | None = None,
              idle_exit_s: float | None = None, health: Health | None = None) -> ScoreStats:
    """Run until `stop` is set (or, with idle_exit_s, after that long without frames).

    ``health`` gets broker/Redis readiness checks, a ``model_loaded`` flag and a beat per loop iteration.
    """
    kafka = settings.kafka
    model_loaded: threading.Event | None = None
    if health is not None:
        # Registered before the (slow) model load so /readyz explains why the worker is not ready yet.
        watch_dependencies(health, settings)
        model_loaded = health.add_flag("model_loaded", "model not loaded yet")
    if engine is None:
        engine = AnomalyEngine(settings.engine, settings.llm, cache=make_prompt_cache(settings))
    if model_loaded is not None:
        model_loaded.set()
    stage = ScoringStage(engine, settings.scoring, settings.engine.shots_dir, settings.engine.k_shot,
                         tiles=tiles_by_camera(settings.cameras))
    try:
        # Output topics with the configured partitions; left to broker auto-creation they would get
        # the broker's default count (or not exist at all where auto-creation is off).
        create_topics(kafka, names=("frames", "scores", "dlq"))
    except KafkaError as exc:
        log.warning("topic_check_failed", error=repr(exc))
    consumer = make_consumer(kafka, settings.scoring.group_id, [topic_name(kafka, "frames")])
    producer = make_producer(kafka)
    scores_topic = topic_name(kafka, "scores")
    stats = ScoreStats()
    last_activity = time.monotonic()
    last_lag = 0.0
    log.info("score_worker_started", group=settings.scoring.group_id, method=engine.method)
    try:
        while not stop.is_set():
            if health is not None:
                health.beat()
            records = poll_batch(consumer, settings.scoring.max_batch, settings.scoring.max_wait_ms)
            if not records:
                if idle_exit_s is not None and time.monotonic() - last_activity > idle_exit_s:
                    break
                continue
            last_activity = time.monotonic()
            _handle(records, stage, producer, consumer, settings, scores_topic, stats)
            if time.monotonic() - last_lag >= LAG_EVERY_S:
                # A metadata round trip: per batch it would idle the model for nothing.
                lag(consumer)
                last_lag = time.monotonic()
    finally:
        producer.flush(timeout=10)
        producer.close(timeout=5)
        consumer.close()
        log.info("score_worker_stopped", scored=stats.scored, rejected=stats.rejected, stale=stats.stale)
    return stats


def _handle(records: list, stage: ScoringStage, producer: object, consumer: KafkaConsumer, settings: Settings,
            scores_topic: str, stats: ScoreStats) -> None:
    frames: list[Frame] = []
    rejected: list[Rejected] = []
    for rec in records:
        verdict = stage.accept(rec.value, rec.headers, rec)
        if isinstance(verdict, Frame):
            frames.append(verdict)
        elif isinstance(verdict, Rejected):
            rejected.append(verdict)
        elif isinstance(verdict, Skipped):
            stats.stale += 1
    scored, failed = stage.score(frames) if frames else ([], [])
    rejected.extend(failed)
    futures = [
        producer.send(scores_topic, key=f.header.camera_id.encode(), value=msg.model_dump_json().encode())
        for f, msg in scored
    ]
    for r in rejected:
        code = r.reason.split(":", 1)[0]
        stats.reasons[code] = stats.reasons.get(code, 0) + 1
        futures.append(send_dead_letter(producer, settings.kafka, r.source, r.reason, stage="score"))
    producer.flush(timeout=30)
    for fut in futures:
        fut.get(timeout=30)  # raises if the broker refused: the batch will be redelivered
    try:
        commit_offsets(consumer, next_offsets(records))
    except CommitFailedError as exc:
        # The group rebalanced meanwhile: the partition's new owner scores these frames again and
        # alerting drops the duplicate scores by seq. Not worth stopping the worker for.
        log.warning("score_commit_failed", error=str(exc), records=len(records))
    stats.scored += len(scored)
    stats.rejected += len(rejected)
    stats.batches += 1
