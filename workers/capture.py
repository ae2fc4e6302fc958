"""Capture worker: one thread per camera, all offering frames to one shared DroppingPublisher."""

from __future__ import annotations

import threading

from kafka.errors import KafkaError

from pipeline.bus import DroppingPublisher, create_topics
from pipeline.capture.stage import CaptureStage, CaptureStats
from pipeline.config import CameraConfig, Settings
from pipeline.health import Health, watch_dependencies
from pipeline.logging import get_logger

log = get_logger(__name__)


def select_cameras(settings: Settings, camera_ids: list[str] | None) -> list[CameraConfig]:
    """The configured cameras, filtered by id; an unknown id is an error, not silently ignored."""
    if not settings.cameras:
        raise ValueError("no cameras configured (settings.cameras is empty)")
    if not camera_ids:
        return list(settings.cameras)
    known = {c.id: c for c in settings.cameras}
    unknown = [cid for cid in camera_ids if cid not in known]
    if unknown:
        raise ValueError(f"unknown camera id(s) {unknown}; configured: {sorted(known)}")
    return [known[cid] for cid in dict.fromkeys(camera_ids)]


def run_capture(
    settings: Settings,
    camera_ids: list[str] | None,
    stop: threading.Event,
    replay_session: str | None = None,
    *,
    max_frames: int | None = None,
    flush_timeout_s: float = 10.0,
    health: Health | None = None,
) -> dict[str, CaptureStats]:
    """Capture the selected cameras until every source ends or ``stop`` is set.

    A camera whose thread raises is logged and reported with ``error`` set; the others keep going.
    The publisher is drained (up to ``flush_timeout_s``) before returning, so the published/dropped
    counts in the returned stats are final. ``health`` gets the broker readiness check (capture needs
    no Redis) and a beat per join round of the supervising loop.
    """
    cameras = select_cameras(settings, camera_ids)
    wlog = log.bind(worker="capture", replay_session=replay_session)
    if health is not None:
        watch_dependencies(health, settings, redis=False)
    try:
        create_topics(settings.kafka, names=("frames",))
    except KafkaError as exc:
        # The publisher retries the broker in the background; capture must not wait for it.
        wlog.warning("topic_check_failed", error=repr(exc))

    publisher = DroppingPublisher(settings.kafka, "frames", settings.capture.max_buffered_frames)
    if health is not None:
        # Not ready while sends keep failing (the producer is being rebuilt); liveness is untouched.
        health.add_check("publisher", publisher.check, cache_s=0.0)
    stats: dict[str, CaptureStats] = {c.id: CaptureStats(camera_id=c.id) for c in cameras}

    def run_one(camera: CameraConfig) -> None:
        clog = wlog.bind(camera=camera.id)
        try:
            stage = CaptureStage(camera, settings.capture, publisher, replay_session=replay_session)
            stats[camera.id] = stage.run(stop, max_frames=max_frames)
        except Exception as exc:
            # One broken camera must never take the others down.
            clog.exception("camera_failed", source=camera.source)
            stats[camera.id].error = f"{type(exc).__name__}: {exc}"

    threads = [
        threading.Thread(target=run_one, args=(c,), name=f"capture-{c.id}", daemon=True) for c in cameras
    ]
    wlog.info("capture_workers_starting", cameras=[c.id for c in cameras])
    try:
        for t in threads:
            t.start()
        for t in threads:
            # Timed joins keep the calling thread responsive to signals (Ctrl-C sets stop upstream).
            while t.is_alive():
                if health is not None:
                    health.beat()
                t.join(0.5)
    except BaseException:
        # Interrupted (Ctrl-C) or failing here: tell the camera threads to wind down too.
        stop.set()
        raise
    finally:
        publisher.close(timeout=flush_timeout_s)
        published, dropped = publisher.published, publisher.dropped
        for cid, s in stats.items():
            s.published = published.get(cid, 0)
            s.dropped = dropped.get(cid, 0)
        wlog.info("capture_workers_finished",
                  **{cid: {"captured": s.captured, "published": s.published, "dropped": s.dropped,
                           "error": s.error} for cid, s in stats.items()})
    return stats
