"""`linewatch rescore`: frames still retained in the frames topic, scored again with the current model.

Reads the given offset range of each partition (manual assignment, no consumer group, nothing
committed), scores in micro-batches in this process, writes the new scores to a separate results
topic and runs alerting in memory for the report. Nothing reaches the live scores or defects
topics, live alert state or subscriptions.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from kafka import KafkaConsumer, TopicPartition
from tqdm import tqdm

from pipeline.alerting.stage import AlertStage
from pipeline.alerting.state_store import CameraStateStore
from pipeline.bus import create_topics, make_consumer, make_producer, topic_name
from pipeline.config import Settings
from pipeline.engine.engine import AnomalyEngine
from pipeline.logging import get_logger
from pipeline.redis_store import ThresholdStore, connect
from pipeline.replay.report import RunSummary, write_report
from pipeline.scoring.stage import Frame, ScoringStage, tiles_by_camera
from schemas.events import DefectEvent
from schemas.scores import ScoreMessage

log = get_logger(__name__)

# An hour of in-memory alert state is plenty for a report; Redis forgets it afterwards.
STATE_TTL_S = 3600.0


@dataclass(frozen=True)
class OffsetRange:
    partition: int
    start: int
    end: int | None  # exclusive; None: the partition's end when the run starts


def parse_offsets(values: list[str], what: str) -> dict[int | None, int]:
    """``P:O`` per partition, or a bare ``O`` for every partition (key None)."""
    out: dict[int | None, int] = {}
    for value in values:
        part, _, off = value.rpartition(":")
        try:
            offset = int(off)
            partition = int(part) if part else None
        except ValueError:
            raise ValueError(f"bad {what} {value!r}: use PARTITION:OFFSET or OFFSET") from None
        if offset < 0 or (partition is not None and partition < 0):
            raise ValueError(f"bad {what} {value!r}: negative")
        out[partition] = offset
    return out


def plan_ranges(consumer: KafkaConsumer, topic: str, starts: dict[int | None, int],
                ends: dict[int | None, int]) -> list[OffsetRange]:
    partitions = sorted(consumer.partitions_for_topic(topic) or [])
    if not partitions:
        raise ValueError(f"topic {topic} does not exist")
    named = {p for p in (*starts, *ends) if p is not None}
    unknown = named - set(partitions)
    if unknown:
        raise ValueError(f"topic {topic} has partitions {partitions}, not {sorted(unknown)}")
    chosen = sorted(named) if named and None not in starts else partitions
    tps = [TopicPartition(topic, p) for p in chosen]
    beginnings, high = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
    ranges: list[OffsetRange] = []
    for tp in tps:
        start = starts.get(tp.partition, starts.get(None, 0))
        end = ends.get(tp.partition, ends.get(None))
        if start < beginnings[tp]:
            raise ValueError(f"partition {tp.partition}: offset {start} is no longer retained "
                             f"(earliest is {beginnings[tp]})")
        end = high[tp] if end is None else min(end, high[tp])
        if end > start:
            ranges.append(OffsetRange(tp.partition, start, end))
    return ranges


def rescore(settings: Settings, engine: AnomalyEngine, starts: dict[int | None, int], ends: dict[int | None, int],
            results_topic: str, report_dir: Path, session: str, stop: threading.Event | None = None,
            progress: bool = True) -> tuple[RunSummary, Path]:
    stop = stop or threading.Event()
    started = time.monotonic()
    kafka = settings.kafka
    frames_topic = topic_name(kafka, "frames")
    summary = RunSummary(kind="rescore", session=session, source=frames_topic)
    if topic_name(kafka, results_topic) in {topic_name(kafka, t) for t in ("frames", "scores", "defects", "dlq")}:
        raise ValueError(f"results topic {results_topic!r} is a live topic; re-scores go to a separate one")
    results_topic = create_topics(kafka, names=(results_topic,))[0]
    consumer = make_consumer(kafka, None, [])
    try:
        ranges = plan_ranges(consumer, frames_topic, starts, ends)
        summary.notes.append("ranges: " + ", ".join(f"{r.partition}:{r.start}..{r.end}" for r in ranges))
        scoring = settings.scoring.model_copy(update={"staleness_s": None})  # old frames are the point
        stage = ScoringStage(engine, scoring, settings.engine.shots_dir, settings.engine.k_shot,
                             tiles=tiles_by_camera(settings.cameras))
        client = connect(settings.redis)
        alerts = AlertStage(settings.alert, ThresholdStore(client, settings.redis.key_prefix),
                            CameraStateStore(client, f"{settings.redis.key_prefix}:rescore:{session}", STATE_TTL_S),
                            idle_evict_s=None)
        scores, events = _run(consumer, ranges, stage, alerts, settings, results_topic, summary, stop, progress)
        _drop_states(client, f"{settings.redis.key_prefix}:rescore:{session}")
        client.close()
    finally:
        consumer.close()
    summary.frames_scored = len(scores)
    summary.events = len(events)
    if scores:
        ts = [s.frame.capture_ts for s in scores]
        summary.span_s = max(ts) - min(ts)
    summary.wall_s = time.monotonic() - started
    path = write_report(report_dir, summary, scores, list(events.values()))
    return summary, path


def _run(consumer: KafkaConsumer, ranges: list[OffsetRange], stage: ScoringStage, alerts: AlertStage,
         settings: Settings, results_topic: str, summary: RunSummary, stop: threading.Event,
         progress: bool) -> tuple[list[ScoreMessage], dict[str, DefectEvent]]:
    frames_topic = topic_name(settings.kafka, "frames")
    todo = {TopicPartition(frames_topic, r.partition): r for r in ranges}
    consumer.assign(list(todo))
    for tp, r in todo.items():
        consumer.seek(tp, r.start)
    producer = make_producer(settings.kafka)
    scores: list[ScoreMessage] = []
    events: dict[str, DefectEvent] = {}
    total = sum(r.end - r.start for r in ranges if r.end is not None)
    bar = tqdm(total=total, unit="frame", desc=summary.session, disable=not progress, file=sys.stderr)
    try:
        while todo and not stop.is_set():
            batch: list[Frame] = []
            read = 0
            for tp, records in consumer.poll(timeout_ms=500, max_records=settings.scoring.max_batch).items():
                r = todo.get(tp)
                for rec in records:
                    if r is None or rec.offset >= (r.end or 0):
                        break
                    read += 1
                    verdict = stage.accept(rec.value, rec.headers, rec)
                    if isinstance(verdict, Frame):
                        batch.append(verdict)
                    else:
                        summary.frames_rejected += 1
                if r is not None and consumer.position(tp) >= (r.end or 0):
                    consumer.pause(tp)
                    del todo[tp]
            scored, failed = stage.score(batch) if batch else ([], [])
            summary.frames_rejected += len(failed)
            messages = [m for _, m in sorted(scored, key=lambda fm: (fm[1].frame.camera_id, fm[1].frame.seq))]
            for msg in messages:
                producer.send(results_topic, key=msg.frame.camera_id.encode(), value=msg.model_dump_json().encode())
            scores.extend(messages)
            for ev in alerts.process(messages):
                events[ev.event_id] = ev
            summary.frames_published += read  # frames read back, in rescore terms
            bar.update(read)
        # Close what is still open as if the cameras went quiet after the range.
        for ev in alerts.tick(now=time.time() + 1e9):
            events[ev.event_id] = ev
        producer.flush(timeout=30)
    finally:
        bar.close()
        producer.close(timeout=5)
    if stop.is_set() and todo:
        summary.complete = False
        summary.notes.append("interrupted")
    return scores, events


def _drop_states(client: redis.Redis, prefix: str) -> None:
    for key in client.scan_iter(match=f"{prefix}:*", count=500):
        client.delete(key)
