"""Scoring worker: wiring of the scoring stage onto the stream runtime (frames -> scores).

At least once: the runtime commits frame offsets only after every score and dead letter of the
batch is acknowledged. A crash before the commit re-scores the batch; the alert stage ignores
scores it has already seen. The next micro-batch is fetched and decoded in a thread pool while
the current one is on the model (``scoring.decode_workers``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from pipeline.config import Settings
from pipeline.engine.engine import AnomalyEngine
from pipeline.engine.prompt_cache import MemoryCache, PromptCache
from pipeline.health import Health, watch_dependencies
from pipeline.logging import get_logger
from pipeline.references.sync import ReferenceSync
from pipeline.runtime.failover import member_leases
from pipeline.runtime.loop import RuntimeConfig, StreamRuntime
from pipeline.scoring.stage import ScoringStage, tiles_by_camera

log = get_logger(__name__)


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


def score_runtime_config(settings: Settings, idle_exit_s: float | None = None) -> RuntimeConfig:
    return RuntimeConfig(
        name="score", group_id=settings.scoring.group_id, topics=("frames",), output_topics=("scores",),
        max_batch=settings.scoring.max_batch, max_wait_ms=settings.scoring.max_wait_ms, poll_timeout_ms=500,
        idle_exit_s=idle_exit_s, decode_workers=settings.scoring.decode_workers, max_pending_batches=2, lag_every_s=5.0,
    )


def run_score(settings: Settings, stop: threading.Event, engine: AnomalyEngine | None = None,
              idle_exit_s: float | None = None, health: Health | None = None) -> ScoreStats:
    """Run until `stop` is set (or, with idle_exit_s, after that long without frames).

    ``health`` gets broker/Redis readiness checks, a ``model_loaded`` flag and a beat per loop iteration.
    """
    model_loaded: threading.Event | None = None
    if health is not None:
        # Registered before the (slow) model load so /readyz explains why the worker is not ready yet.
        watch_dependencies(health, settings)
        model_loaded = health.add_flag("model_loaded", "model not loaded yet")
    if engine is None:
        engine = AnomalyEngine(settings.engine, settings.llm, cache=make_prompt_cache(settings))
    # New classes are prepared in the background; their frames wait in the stage (see commit_floor).
    stage = ScoringStage(engine, settings.scoring, settings.engine.shots_dir, settings.engine.k_shot,
                         defer_new_classes=True, references=ReferenceSync.from_settings(settings),
                         tiles=tiles_by_camera(settings.cameras))
    # The allowlist's and the configured cameras' classes (prompts, references) before readiness:
    # `linewatch run` starts capture on /readyz, so the first frames measure scoring, not preparation.
    stage.prepare_classes(dict.fromkeys([*(settings.scoring.classes or []),
                                         *(c.product_class for c in settings.cameras)]))
    if model_loaded is not None:
        model_loaded.set()
    log.info("score_worker_started", group=settings.scoring.group_id, method=engine.method)
    runtime = StreamRuntime(settings.kafka, score_runtime_config(settings, idle_exit_s), stage,
                            health=health, stop=stop,
                            failover=member_leases(settings, settings.scoring.group_id, "score"))
    try:
        rs = runtime.run()
    finally:
        stage.close()
    stats = ScoreStats(scored=rs.outputs, rejected=rs.rejected, stale=rs.skipped, batches=rs.batches,
                       reasons=dict(rs.reasons))
    log.info("score_worker_stopped", scored=stats.scored, rejected=stats.rejected, stale=stats.stale)
    return stats
