"""Capture worker: one thread per camera, all offering frames to one shared DroppingPublisher.

Two modes: `run_capture` captures a fixed list of configured cameras until their sources end
(`--camera`, replays, `linewatch run`; with Redis it claims and reports them, `FixedReport`);
`run_managed_capture` captures the cameras of the Redis registry, shared with other workers through
leases, and follows registry changes while running.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

import redis
from kafka.errors import KafkaError

from pipeline.bus import create_topics
from pipeline.cameras.health import CameraHealth, DarkWatch, HealthStore, forget_metrics
from pipeline.cameras.leases import FixedClaims, Lease, LeaseManager, WorkerDirectory
from pipeline.cameras.registry import CameraRegistry
from pipeline.cameras.status import StatusPublisher
from pipeline.capture.publisher import DroppingPublisher
from pipeline.capture.sources import LiveSource
from pipeline.capture.stage import CaptureStage, CaptureStats
from pipeline.config import CameraConfig, Settings
from pipeline.health import Health, watch_dependencies
from pipeline.logging import get_logger
from pipeline.metrics import CAMERA_LEASES, FRAMES_DROPPED
from pipeline.redis_store import connect
from schemas.cameras import CAMERA_STATUS_TOPIC, CameraStatus

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


class FixedReport:
    """Fixed capture with Redis: it claims its cameras and reports their health and transitions.

    The claims (`FixedClaims`) tell the deliver workers' camera watchdog that these cameras are
    captured, so it leaves them alone while this worker lives and reports them once it is gone; the
    health records and `DarkWatch` then do for them what a lease holder does for its cameras. Best
    effort: with Redis or the broker away, capture goes on and only these reports wait.
    """

    RETRY_S = 5.0

    def __init__(self, settings: Settings, healths: dict[str, CameraHealth]) -> None:
        prefix = settings.redis.key_prefix
        cap = settings.capture
        self.worker = worker_name()
        self.healths = healths
        self.dark_after_s = cap.dark_after_s
        self.client = connect(settings.redis)
        self.claims = FixedClaims(self.client, prefix, cap.lease_s)
        self.store = HealthStore(self.client, prefix)
        self.publisher = StatusPublisher(settings)
        self.dark = DarkWatch(self.store, self.publisher, cap.dark_after_s, self.worker)
        # Claims lapse after lease_s: renewed several times per period, as leases are.
        self.interval_s = min(cap.registry_poll_s, cap.lease_s / 4)
        self._next = 0.0
        self._log = log.bind(worker="capture", owner=self.worker)

    def report(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + self.interval_s
        try:
            self.claims.claim(self.worker, list(self.healths))
            for health in self.healths.values():
                state = health.state(self.dark_after_s)
                self.store.put(health.record(self.dark_after_s, self.worker, 0))
                self.dark.check(health, state)
        except (redis.RedisError, KafkaError, OSError) as exc:
            self._next = now + max(self.interval_s, self.RETRY_S)
            self._log.warning("camera_health_report_failed", error=repr(exc))

    def close(self, stopped: bool) -> None:
        """A stop releases the claims at once (the watchdog takes over); sources that ended are
        reported ``ended`` first, which the watchdog leaves alone."""
        try:
            if not stopped:
                self.report(force=True)
            self.claims.release(self.worker, list(self.healths))
        except (redis.RedisError, OSError) as exc:
            self._log.warning("camera_claims_release_failed", error=repr(exc))
        finally:
            self.publisher.close()
            self.client.close()


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
    no Redis) and a beat per join round of the supervising loop. With Redis configured (and no replay
    session) the cameras are also claimed and reported (`FixedReport`).
    """
    cameras = select_cameras(settings, camera_ids)
    wlog = log.bind(worker="capture", replay_session=replay_session)
    if health is not None:
        watch_dependencies(health, settings, redis=False)
    reporting = bool(settings.redis.url) and replay_session is None
    try:
        create_topics(settings.kafka, names=("frames", CAMERA_STATUS_TOPIC) if reporting else ("frames",))
    except KafkaError as exc:
        # The publisher retries the broker in the background; capture must not wait for it.
        wlog.warning("topic_check_failed", error=repr(exc))

    publisher = DroppingPublisher(settings.kafka, "frames", settings.capture.max_buffered_frames)
    if health is not None:
        # Not ready while sends keep failing (the producer is being rebuilt); liveness is untouched.
        health.add_check("publisher", publisher.check, cache_s=0.0)
    stats: dict[str, CaptureStats] = {c.id: CaptureStats(camera_id=c.id) for c in cameras}
    healths = {c.id: CameraHealth(c) for c in cameras}
    # With Redis: claims, health records and camera_down/up too. Not for a replay session, whose
    # frames are not the cameras' present (the live capture of the same ids reports them).
    report = FixedReport(settings, healths) if reporting else None

    def run_one(camera: CameraConfig) -> None:
        clog = wlog.bind(camera=camera.id)
        try:
            stage = CaptureStage(camera, settings.capture, publisher, replay_session=replay_session,
                                 on_frame=healths[camera.id].on_frame)
            healths[camera.id].source_reconnects = lambda: int(getattr(stage.source, "reconnects", 0))
            stats[camera.id] = stage.run(stop, max_frames=max_frames)
            healths[camera.id].ended = True
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
                for h in healths.values():
                    h.export(settings.capture.dark_after_s)
                if report is not None and not stop.is_set():
                    report.report()
                t.join(0.5)
    except BaseException:
        # Interrupted (Ctrl-C) or failing here: tell the camera threads to wind down too.
        stop.set()
        raise
    finally:
        if report is not None:
            report.close(stopped=stop.is_set())
        publisher.close(timeout=flush_timeout_s)
        published, dropped = publisher.published, publisher.dropped
        for cid, s in stats.items():
            s.published = published.get(cid, 0)
            s.dropped = dropped.get(cid, 0)
        wlog.info("capture_workers_finished",
                  **{cid: {"captured": s.captured, "published": s.published, "dropped": s.dropped,
                           "error": s.error} for cid, s in stats.items()})
    return stats


# -- managed capture: cameras from the Redis registry, shared between workers by leases ----------
class LeaseGuard:
    """Passes frames on only while the camera's lease is valid and its runner has not been stopped.

    Check and offer happen under one lock that ``close`` also takes, so once ``close`` returns no
    frame of this runner reaches the publisher: the lease can then be released safely.
    """

    def __init__(self, publisher: DroppingPublisher, lease: Lease) -> None:
        self._publisher = publisher
        self._lease = lease
        self._lock = threading.Lock()
        self._open = True

    def offer(self, camera_id: str, value: bytes, headers: list[tuple[str, bytes]]) -> bool:
        with self._lock:
            if self._open and self._lease.valid():
                return self._publisher.offer(camera_id, value, headers)
        FRAMES_DROPPED.labels(camera=camera_id, reason="lease").inc()
        return False

    def close(self) -> None:
        with self._lock:
            self._open = False


class CameraRunner:
    """One leased camera on this worker: a thread that captures it, reopening the source on failure
    with backoff, until stopped; a finite source that ends is left ended until the camera changes."""

    def __init__(self, camera: CameraConfig, lease: Lease, settings: Settings, publisher: DroppingPublisher,
                 health: CameraHealth) -> None:
        self.camera = camera
        self.lease = lease
        self.health = health
        self._settings = settings
        self._guard = LeaseGuard(publisher, lease)
        self._stop = threading.Event()
        self._log = log.bind(worker="capture", camera=camera.id, lease_token=lease.token)
        self.thread = threading.Thread(target=self._run, name=f"capture-{camera.id}", daemon=True)

    def start(self) -> CameraRunner:
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop publishing at once; the thread ends at its next frame or wait."""
        self._stop.set()
        self._guard.close()

    def _run(self) -> None:
        capture = self._settings.capture
        delay = capture.reconnect_initial_s
        while not self._stop.is_set():
            frames_before = self.health.last_frame_ts
            try:
                stage = CaptureStage(self.camera, capture, self._guard, on_frame=self.health.on_frame)
                self.health.source_reconnects = lambda s=stage: int(getattr(s.source, "reconnects", 0))
                stage.run(self._stop)
                if self._stop.is_set():
                    return
                if not self.camera.loop and not isinstance(stage.source, LiveSource):
                    self.health.ended = True
                    self._log.info("camera_source_ended")
                    return
                error = "source ended"
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            if self.health.last_frame_ts != frames_before:
                delay = capture.reconnect_initial_s  # it delivered: the next outage starts backoff afresh
            self._log.warning("camera_source_failed", error=error, retry_in_s=round(delay, 2))
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, capture.reconnect_max_s)
            self.health.restarted()


def worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class ManagedCapture:
    """The supervisor of one capture worker: registry, leases, camera threads and their health.

    Each round (``capture.registry_poll_s``) it renews its leases (a camera whose lease is lost is
    stopped at once), applies registry changes to the cameras it holds (restart on change, stop on
    removal), takes free cameras up to its fair share (cameras / live workers) and hands back any
    beyond it, then exports health and publishes dark/return transitions.
    """

    def __init__(self, settings: Settings, client: redis.Redis, publisher: DroppingPublisher,
                 publish_status: Callable[[CameraStatus], None], worker: str | None = None) -> None:
        prefix = settings.redis.key_prefix
        cap = settings.capture
        self.settings = settings
        self.worker = worker or worker_name()
        self.registry = CameraRegistry(client, prefix)
        self.leases = LeaseManager(client, prefix, self.worker, cap.lease_s)
        self.directory = WorkerDirectory(client, prefix, cap.lease_s)
        self.health_store = HealthStore(client, prefix)
        self.dark = DarkWatch(self.health_store, publish_status, cap.dark_after_s, self.worker)
        self.publisher = publisher
        self.runners: dict[str, CameraRunner] = {}
        self.cameras: dict[str, CameraConfig] = {}
        self._version = -1
        self._log = log.bind(worker="capture", owner=self.worker)

    def round(self) -> None:
        self.directory.beat(self.worker)
        version = self.registry.version()
        if version != self._version:
            self._version, self.cameras = self.registry.snapshot()
            if not self.cameras:
                self._log.info("camera_registry_empty", waiting_for="cameras (linewatch cameras add)")
        self._renew()
        self._apply_changes()
        self._balance()
        self._report()
        CAMERA_LEASES.set(len(self.runners))

    def _renew(self) -> None:
        for cid, runner in list(self.runners.items()):
            if not self.leases.renew(runner.lease):
                self._log.warning("camera_lease_lost", camera=cid, lease_token=runner.lease.token)
                self._drop(cid, release=False)

    def _apply_changes(self) -> None:
        for cid, runner in list(self.runners.items()):
            cam = self.cameras.get(cid)
            if cam is None:
                self._log.info("camera_removed", camera=cid)
                self._drop(cid)
                self.health_store.forget(cid)
            elif cam != runner.camera:
                self._log.info("camera_changed", camera=cid)
                # No join: stop() already ends its publishing, and a slow source must not hold up renewals.
                runner.stop()
                self._start(cam, runner.lease, runner.health.last_frame_ts)

    def _balance(self) -> None:
        alive = max(1, len(self.directory.alive()))
        fair = -(-len(self.cameras) // alive)
        free = [cid for cid in self.cameras if cid not in self.runners]
        # Workers try free cameras in different orders, so several starting together spread out.
        free.sort(key=lambda cid: hash((cid, self.worker)))
        for cid in free:
            if len(self.runners) >= fair:
                break
            lease = self.leases.acquire(cid)
            if lease is not None:
                previous = self.health_store.get(cid)
                self._log.info("camera_acquired", camera=cid, lease_token=lease.token)
                self._start(self.cameras[cid], lease, previous.get("last_frame_ts") if previous else None)
        # More than a fair share (a worker joined): hand the newest back; another worker takes them.
        for cid in list(self.runners)[fair:]:
            self._log.info("camera_handed_back", camera=cid, fair_share=fair, workers=alive)
            self._drop(cid)

    def _start(self, cam: CameraConfig, lease: Lease, last_frame_ts: float | None) -> None:
        health = CameraHealth(cam, last_frame_ts=last_frame_ts)
        self.runners[cam.id] = CameraRunner(cam, lease, self.settings, self.publisher, health).start()

    def _drop(self, cid: str, release: bool = True) -> None:
        runner = self.runners.pop(cid)
        runner.stop()  # no frame of it is offered after this returns
        if release:
            self.leases.release(runner.lease)
        forget_metrics(cid)

    def _report(self) -> None:
        dark_after = self.settings.capture.dark_after_s
        for cid, runner in self.runners.items():
            state = runner.health.export(dark_after)
            try:
                self.health_store.put(runner.health.record(dark_after, self.worker, runner.lease.token))
                self.dark.check(runner.health, state)
            except (redis.RedisError, KafkaError) as exc:
                self._log.warning("camera_health_report_failed", camera=cid, error=repr(exc))

    def close(self) -> None:
        for cid in list(self.runners):
            self._drop(cid)
        self.directory.leave(self.worker)


def run_managed_capture(settings: Settings, stop: threading.Event, *, health: Health | None = None,
                        worker: str | None = None, flush_timeout_s: float = 10.0) -> None:
    """Capture the registry's cameras this worker holds leases for, until ``stop`` is set.

    Seeds the registry from ``settings.cameras`` (see `pipeline.cameras.registry`), then runs
    `ManagedCapture` rounds. Redis trouble during a round is logged and retried next round; the
    leases then lapse on their own (the camera threads stop publishing when theirs does).
    """
    if health is not None:
        watch_dependencies(health, settings)
    client = connect(settings.redis)
    try:
        create_topics(settings.kafka, names=("frames", CAMERA_STATUS_TOPIC))
    except KafkaError as exc:
        log.warning("topic_check_failed", error=repr(exc))
    publisher = DroppingPublisher(settings.kafka, "frames", settings.capture.max_buffered_frames)
    status_publisher = StatusPublisher(settings)
    supervisor = ManagedCapture(settings, client, publisher, status_publisher, worker)
    wlog = log.bind(worker="capture", owner=supervisor.worker)
    # Renewals happen once per round: several per lease period, whatever the poll setting says.
    interval = min(settings.capture.registry_poll_s, settings.capture.lease_s / 4)
    seeded: list[str] | None = None
    try:
        while not stop.is_set():
            try:
                if seeded is None:
                    seeded = supervisor.registry.seed(list(settings.cameras))
                    wlog.info("managed_capture_started", seeded=seeded, lease_s=settings.capture.lease_s,
                              dark_after_s=settings.capture.dark_after_s)
                supervisor.round()
            except redis.RedisError as exc:
                wlog.warning("capture_round_failed", waiting_for="redis", error=repr(exc))
            if health is not None:
                health.beat()
            stop.wait(interval)
    finally:
        try:
            supervisor.close()
        except redis.RedisError as exc:
            wlog.warning("capture_release_failed", error=repr(exc))
        publisher.close(timeout=flush_timeout_s)
        status_publisher.close()
        client.close()
        wlog.info("managed_capture_stopped")
