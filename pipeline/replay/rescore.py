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
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from tqdm import tqdm

from pipeline.alerting.stage import AlertStage
from pipeline.alerting.state_store import MemoryStateStore, MemoryThresholds
from pipeline.bus import create_topics, make_consumer, topic_name
from pipeline.camera_tuning import CameraTuningStore
from pipeline.config import Settings
from pipeline.engine.engine import AnomalyEngine
from pipeline.logging import get_logger
from pipeline.redis_store import ThresholdStore, connect
from pipeline.references.sync import ReferenceSync
from pipeline.replay.report import RunSummary, write_report
from pipeline.runtime.envelope import Envelope, Record, StageResult
from pipeline.runtime.loop import RuntimeConfig, Stage, StreamRuntime
from pipeline.scoring.stage import Frame, ScoringStage, tiles_by_camera
from schemas.events import DefectEvent
from schemas.scores import ScoreMessage

log = get_logger(__name__)


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


class RescoreStage(Stage):
    """Scoring as the live worker does, into the results topic, with alerting in memory for the report."""

    def __init__(self, scoring: ScoringStage, alerts: AlertStage, results_topic: str, summary: RunSummary,
                 bar: tqdm) -> None:
        self.scoring = scoring
        self.alerts = alerts
        self.results_topic = results_topic
        self.summary = summary
        self.bar = bar
        self.scores: list[ScoreMessage] = []
        self.events: dict[str, DefectEvent] = {}

    def decode(self, env: Envelope) -> Any:
        verdict = self.scoring.decode(env)
        if not isinstance(verdict, Frame):
            self._read(1, rejected=1)
        return verdict

    def handle(self, records: Sequence[Record[Frame]]) -> StageResult:
        result = self.scoring.handle(records)
        messages = sorted((ScoreMessage.model_validate_json(o.value) for o in result.outputs),
                          key=lambda m: (m.frame.camera_id, m.frame.seq))
        self.scores.extend(messages)
        for ev in self.alerts.process(messages):
            self.events[ev.event_id] = ev
        self._read(len(records), rejected=len(result.rejects))
        return StageResult(outputs=[replace(o, topic=self.results_topic) for o in result.outputs],
                           rejects=result.rejects)

    def _read(self, n: int, rejected: int) -> None:
        self.summary.frames_rejected += rejected
        self.summary.frames_published += n  # frames read back, in rescore terms
        self.bar.update(n)


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
    finally:
        consumer.close()
    summary.notes.append("ranges: " + ", ".join(f"{r.partition}:{r.start}..{r.end}" for r in ranges))
    scoring = settings.scoring.model_copy(update={"staleness_s": None})  # old frames are the point
    # The current reference sets, camera thresholds and ignore regions, as live scoring uses them.
    scoring_stage = ScoringStage(engine, scoring, settings.engine.shots_dir, settings.engine.k_shot,
                                 references=ReferenceSync.from_settings(settings),
                                 tiles=tiles_by_camera(settings.cameras))
    thresholds: dict[str, float] = {}
    client = connect(settings.redis) if settings.redis.url else None
    if client is not None:
        thresholds = dict(ThresholdStore(client, settings.redis.key_prefix).all())
    # Alert state in memory only: nothing of a rescore reaches live alert state.
    alerts = AlertStage(settings.alert, MemoryThresholds(thresholds), MemoryStateStore(), idle_evict_s=None,
                        cameras=settings.cameras,
                        tuning=CameraTuningStore(client, settings.redis.key_prefix) if client is not None else None)
    total = sum(r.end - r.start for r in ranges if r.end is not None)
    bar = tqdm(total=total, unit="frame", desc=summary.session, disable=not progress, file=sys.stderr)
    stage = RescoreStage(scoring_stage, alerts, results_topic, summary, bar)
    tps = {TopicPartition(frames_topic, r.partition): r for r in ranges}
    config = RuntimeConfig(name="rescore", group_id=None, topics=("frames",), dead_letters=False,
                           max_batch=settings.scoring.max_batch, poll_timeout_ms=500,
                           start_offsets={tp: r.start for tp, r in tps.items()},
                           end_offsets={tp: r.end or 0 for tp, r in tps.items()})
    runtime = StreamRuntime(kafka, config, stage, stop=stop)
    try:
        if tps:
            runtime.run()
        # Close what is still open as if the cameras went quiet after the range.
        for ev in alerts.tick(now=time.time() + 1e9):
            stage.events[ev.event_id] = ev
    finally:
        bar.close()
        if client is not None:
            client.close()
    if stop.is_set() and not runtime.ranges_done:
        summary.complete = False
        summary.notes.append("interrupted")
    scores, events = stage.scores, stage.events
    summary.frames_scored = len(scores)
    summary.events = len(events)
    if scores:
        ts = [s.frame.capture_ts for s in scores]
        summary.span_s = max(ts) - min(ts)
    summary.wall_s = time.monotonic() - started
    path = write_report(report_dir, summary, scores, list(events.values()))
    return summary, path
