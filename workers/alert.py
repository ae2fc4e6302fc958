"""Alert worker: wiring of the alert stage onto the stream runtime (scores -> defects).

Per batch (the runtime's order): decode scores (bad records to the DLQ) -> ``AlertStage.handle``
and ``on_tick`` -> produce events and wait for acks -> persist camera states -> commit offsets.
Anything failing before the commit replays the batch onto the last persisted states, where
already-seen seqs are dropped. Redis or the broker down: the worker waits and retries, never exits.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

from pipeline.alerting.stage import AlertStage
from pipeline.alerting.state_store import CameraStateStore
from pipeline.camera_tuning import CameraTuningStore
from pipeline.config import Settings
from pipeline.health import Health, watch_dependencies
from pipeline.logging import get_logger
from pipeline.redis_store import ThresholdStore, connect
from pipeline.runtime.failover import member_leases
from pipeline.runtime.loop import RuntimeConfig, StreamRuntime

log = get_logger(__name__)


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
    if health is not None:
        watch_dependencies(health, settings)
    client = connect(settings.redis)
    stage = AlertStage(settings.alert, ThresholdStore(client, settings.redis.key_prefix),
                       CameraStateStore(client, settings.redis.key_prefix, settings.alert.state_ttl_s),
                       cameras=settings.cameras, tuning=CameraTuningStore(client, settings.redis.key_prefix))
    config = RuntimeConfig(name="alert", group_id=settings.alert.group_id, topics=("scores",),
                           output_topics=("defects",), max_batch=max_records, poll_timeout_ms=poll_timeout_ms,
                           idle_exit_s=idle_exit_s)
    try:
        rs = StreamRuntime(settings.kafka, config, stage, health=health, stop=stop,
                           failover=member_leases(settings, settings.alert.group_id, "alert")).run()
    finally:
        client.close()
    stats = AlertStats(records=rs.records, scores=stage.counts.scores, invalid=rs.rejected,
                       events_opened=stage.counts.events_opened, events_closed=stage.counts.events_closed,
                       batches=rs.batches)
    log.info("alert_worker_stopped", **asdict(stats))
    return stats
