"""The API's background loop: defect events and latest camera frames from Kafka into Redis.

Defects are read in the consumer group ``api.group_id`` (replicas share the work): each event is
stored, announced on the live channel (every replica's stream clients see it), and only then is
its offset committed. Scores are read by a second consumer without a group, from the end of the
topic, because only the latest frame per camera matters; it is rendered at most once per
``render_interval_s`` per camera. Both loops run on the stream runtime: a bad defect record goes to
the DLQ, a bad score record is logged and skipped; Redis trouble rewinds and retries with backoff.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import redis
from prometheus_client import Counter
from redis.exceptions import RedisError

from pipeline.api.store import CameraStore, EventStore, publish_live, render_latest
from pipeline.config import Settings
from pipeline.logging import get_logger
from pipeline.redis_store import connect
from pipeline.runtime.envelope import Envelope, Record, RecordError, Reject, StageResult
from pipeline.runtime.loop import RuntimeConfig, Stage, StreamRuntime
from pipeline.runtime.topics import DEFECTS
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


class DefectsStage(Stage):
    """Each event stored, announced on the live channel, and only then committed (by the runtime)."""

    def __init__(self, ingest: Ingest, events: EventStore, client: redis.Redis) -> None:
        self.ingest = ingest
        self.events = events
        self.client = client

    def decode(self, env: Envelope) -> DefectEvent:
        try:
            return DEFECTS.codec(env)
        except RecordError:
            self.ingest.stats.invalid_events += 1
            API_RECORDS.labels(topic="defects", outcome="invalid").inc()
            raise

    def handle(self, records: Sequence[Record[DefectEvent]]) -> StageResult:
        stats = self.ingest.stats
        rejects: list[Reject] = []
        for rec in records:
            event = rec.message
            try:
                summary = self.events.put(event)
                if summary is not None:
                    publish_live(self.client, self.ingest.settings.redis.key_prefix, summary)
            except RedisError:
                raise  # the runtime rewinds and retries: stored again, same keys
            except Exception as exc:  # a record we cannot handle must not stop the loop
                stats.invalid_events += 1
                API_RECORDS.labels(topic="defects", outcome="failed").inc()
                rejects.append(Reject(rec.envelope, f"api_event_failed: {type(exc).__name__}: {str(exc)[:200]}"))
                continue
            API_RECORDS.labels(topic="defects", outcome="stored" if summary is not None else "stale").inc()
            if summary is None:
                stats.stale_events += 1
            else:
                stats.events += 1
        return StageResult(rejects=rejects)


class LatestFramesStage(Stage):
    """Only each camera's newest score matters: kept by key, rendered at most once per interval."""

    def __init__(self, ingest: Ingest, cameras: CameraStore) -> None:
        self.ingest = ingest
        self.cameras = cameras
        self._pending: dict[str, Envelope] = {}
        self._rendered: dict[str, float] = {}

    def decode(self, env: Envelope) -> Envelope:
        return env  # parsed only if it is still the newest of its camera when rendered

    def handle(self, records: Sequence[Record[Envelope]]) -> StageResult:
        for rec in records:
            self._pending[rec.envelope.key_text or ""] = rec.envelope
        self.ingest.stats.scores += len(records)
        return StageResult()

    def on_assigned(self, partitions: set) -> None:
        self.ingest.ready.set()

    def on_tick(self) -> StageResult:
        now = time.monotonic()
        interval = self.ingest.render_interval_s
        for camera, env in list(self._pending.items()):
            if now - self._rendered.get(camera, float("-inf")) < interval:
                continue
            del self._pending[camera]
            self._rendered[camera] = now
            self._render(env)
        return StageResult()

    def _render(self, env: Envelope) -> None:
        stats = self.ingest.stats
        try:
            score = ScoreMessage.model_validate_json(env.value or b"")
            self.cameras.put(score, render_latest(score))
        except Exception as exc:  # bad record, undecodable image or Redis down: the next frame will do
            stats.invalid_scores += 1
            API_RECORDS.labels(topic="scores", outcome="failed").inc()
            log.warning("api_score_failed", partition=env.partition, offset=env.offset, error=repr(exc)[:300])
            return
        stats.frames += 1
        API_RECORDS.labels(topic="scores", outcome="stored").inc()


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

    def alive(self, timeout_s: float = 60.0) -> bool:
        """Both loops went round recently."""
        now = time.monotonic()
        return all(beat is not None and now - beat < timeout_s for beat in (self.last_beat, self.scores_beat))

    def run(self, stop: threading.Event) -> IngestStats:
        """Defects in this thread, scores in a second one (each consumer keeps polling: kafka-python
        3.0 drops a group join that completes while its consumer is not inside poll())."""
        prefix = self.settings.redis.key_prefix
        client = connect(self.settings.redis)
        scores_stop = threading.Event()
        cameras = CameraStore.bounded(client, prefix, self.settings.api)
        scores = threading.Thread(target=self._scores_loop, args=(scores_stop, cameras),
                                  name="api-ingest-scores", daemon=True)
        scores.start()
        try:
            config = RuntimeConfig(name="api", group_id=self.settings.api.group_id, topics=("defects",),
                                   max_batch=self.max_records, poll_timeout_ms=self.poll_timeout_ms)
            stage = DefectsStage(self, EventStore(client, prefix, self.settings.api.max_events), client)
            StreamRuntime(self.settings.kafka, config, stage, stop=stop, beat=self._beat_defects).run()
        finally:
            scores_stop.set()
            scores.join(30)
            client.close()
            self._log.info("api_ingest_stopped", **asdict(self.stats))
        return self.stats

    def _beat_defects(self) -> None:
        self.last_beat = time.monotonic()

    def _beat_scores(self) -> None:
        self.scores_beat = time.monotonic()

    def _scores_loop(self, stop: threading.Event, cameras: CameraStore) -> None:
        config = RuntimeConfig(name="api-frames", group_id=None, topics=("scores",), start="end", producer=False,
                               max_batch=self.max_records, poll_timeout_ms=self.poll_timeout_ms)
        try:
            StreamRuntime(self.settings.kafka, config, LatestFramesStage(self, cameras), stop=stop,
                          beat=self._beat_scores).run()
        except Exception as exc:  # no camera frames is no reason to stop serving events: readiness says it
            self._log.error("api_ingest_scores_failed", error=repr(exc))
