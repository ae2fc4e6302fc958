"""Prometheus metrics for every worker; one registry per process, served by `pipeline.health.Health`."""

from __future__ import annotations

import threading
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

OTHER_LABEL = "other"


class LabelValues:
    """Keeps one label's values bounded: configured values always, then the first ``cap`` other
    values seen, then everything else as ``other`` (camera ids and class names come from messages)."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._configured: set[str] = set()
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def configure(self, values: Iterable[str]) -> None:
        with self._lock:
            self._configured.update(values)

    def __call__(self, value: str) -> str:
        if value in self._configured or value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self._cap:
                self._seen.add(value)
                return value
        return OTHER_LABEL


CAMERA_LABEL = LabelValues(cap=256)
CLASS_LABEL = LabelValues(cap=64)

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
RUNTIME_RECORDS = Counter("linewatch_stream_records_total", "Records by outcome in the stream runtime",
                          ["worker", "outcome"])
RUNTIME_BATCH_SECONDS = Histogram(
    "linewatch_stream_batch_seconds", "Stream runtime time per micro-batch (decode wait, stage, produce, acks)",
    ["worker"], buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
GROUP_MEMBERS_REMOVED = Counter("linewatch_group_members_removed_total", "Dead consumer-group members "
                              "removed by this worker (no Redis beat for a lease)", ["worker"])
RUNTIME_DEGRADED = Gauge("linewatch_stream_degraded", "1 while a worker waits for its broker or Redis", ["worker"])
DELIVERIES = Counter("linewatch_deliveries_total", "Subscription deliveries", ["channel", "outcome"])
# Camera health, exported by the capture worker holding the camera (series dropped when it lets go).
CAMERA_FPS = Gauge("linewatch_camera_fps", "Frames per second read from the camera (last 10 s)", ["camera"])
CAMERA_LAST_FRAME = Gauge("linewatch_camera_last_frame_timestamp_seconds", "Unix time of the camera's last frame",
                          ["camera"])
CAMERA_RECONNECTS = Counter("linewatch_camera_reconnects_total", "Camera source reopened after an error or end",
                            ["camera"])
CAMERA_STATE = Gauge("linewatch_camera_state", "1 for the camera's state (live, reconnecting, dark, ended)",
                     ["camera", "state"])
CAMERA_LEASES = Gauge("linewatch_camera_leases", "Cameras this capture worker holds")
CAMERA_STATUS_SENT = Counter("linewatch_camera_status_total", "camera_down / camera_up messages published",
                             ["status"])
# The camera watchdog of the deliver workers (`pipeline.cameras.watchdog`).
WATCHDOG_UNHELD = Gauge("linewatch_camera_watchdog_unheld", "Registry cameras no capture worker held at the "
                        "watchdog's last check (no lease, no fixed capture)")
WATCHDOG_DOWN = Counter("linewatch_camera_watchdog_down_total", "camera_down messages the watchdog published for "
                        "cameras no capture worker holds")
WATCHDOG_CHECKS = Counter("linewatch_camera_watchdog_checks_total", "Camera watchdog checks by outcome",
                          ["outcome"])

