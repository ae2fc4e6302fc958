"""Prometheus metrics for every worker; one registry per process, served by `pipeline.health.Health`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from pipeline.health import Health

FRAMES_CAPTURED = Counter("linewatch_frames_captured_total", "Frames read from a source", ["camera"])
FRAMES_DROPPED = Counter(
    "linewatch_frames_dropped_total", "Frames dropped before publishing", ["camera", "reason"]
)
FRAMES_PUBLISHED = Counter("linewatch_frames_published_total", "Frames acknowledged by the broker", ["camera"])
FRAMES_SCORED = Counter("linewatch_frames_scored_total", "Frames scored", ["product_class", "method"])
FRAMES_STALE = Counter("linewatch_frames_stale_total", "Frames skipped as older than the staleness limit",
                       ["camera"])
BATCH_SIZE = Histogram("linewatch_batch_size", "Frames per scoring forward", buckets=(1, 2, 4, 8, 16, 32, 64))
SCORING_SECONDS = Histogram(
    "linewatch_scoring_seconds", "Engine time per batch",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
END_TO_END_SECONDS = Histogram(
    "linewatch_capture_to_score_seconds", "Capture time to score publication",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
CONSUMER_LAG = Gauge("linewatch_consumer_lag", "Records behind the partition end", ["group", "topic", "partition"])
PROMPT_CACHE = Counter("linewatch_prompt_cache_total", "Prompt cache lookups", ["tier", "outcome"])
EVENTS_OPENED = Counter("linewatch_events_opened_total", "Defect events opened", ["camera", "product_class"])
EVENT_LABELS = Counter("linewatch_event_labels_total", "Operator labels on defect events (false-alarm rate: "
                       "false_alarm / events opened)", ["camera", "product_class", "label"])
DLQ_RECORDS = Counter("linewatch_dlq_total", "Records sent to the dead-letter topic", ["stage", "reason"])
DELIVERIES = Counter("linewatch_deliveries_total", "Subscription deliveries", ["channel", "outcome"])


def serve_metrics(port: int | None) -> Health | None:
    """Expose /metrics (plus /healthz and /readyz) on the port; None keeps metrics in-process only.

    Kept for callers without a worker loop; workers create a `Health` themselves to beat and add checks.
    """
    if port is None:
        return None
    from pipeline.health import Health  # health imports modules that import this one

    health = Health()
    health.serve(port)
    return health
