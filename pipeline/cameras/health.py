"""Camera health: frames/s, last frame, reconnects and state (live, reconnecting, dark) per camera.

The capture worker holding a camera's lease tracks it (`CameraHealth`), writes it to Redis for the
API (`HealthStore`) and turns the crossing of ``capture.dark_after_s`` into `CameraStatus`
messages (`DarkWatch`). A Redis marker per dark camera makes the transitions survive a change of
worker: the next holder neither repeats a ``camera_down`` nor forgets the ``camera_up``. A camera
no worker holds is reported by the deliver workers' watchdog (`pipeline.cameras.watchdog`) through
the same marker, and the worker that takes it next sends the ``camera_up``.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import redis

from pipeline.config import CameraConfig
from pipeline.logging import get_logger
from pipeline.metrics import CAMERA_FPS, CAMERA_LAST_FRAME, CAMERA_RECONNECTS, CAMERA_STATE, CAMERA_STATUS_SENT
from schemas.cameras import CameraState, CameraStatus

log = get_logger(__name__)

FPS_WINDOW_S = 10.0
STATES: tuple[str, ...] = ("live", "reconnecting", "dark", "ended")


def stall_after_s(camera: CameraConfig, dark_after_s: float) -> float:
    """No frame for this long means the camera is not live (it is reconnecting or worse)."""
    interval = 1.0 / camera.fps if camera.fps else 0.0
    return min(dark_after_s, max(2.0, 3 * interval))


class CameraHealth:
    """One camera on one worker. ``on_frame`` runs on the capture thread, the rest on the supervisor."""

    def __init__(self, camera: CameraConfig, last_frame_ts: float | None = None) -> None:
        self.camera = camera
        self.started_ts = time.time()
        self.last_frame_ts = last_frame_ts
        self.ended = False
        self._frames: deque[float] = deque()
        self._lock = threading.Lock()
        self._restarts = 0
        self._reconnects_counted = 0
        # Reconnects the current source counted itself (a LiveSource reconnecting in place).
        self.source_reconnects: Callable[[], int] = lambda: 0
        self._past_source_reconnects = 0

    def on_frame(self, capture_ts: float) -> None:
        now = time.monotonic()
        with self._lock:
            self.last_frame_ts = time.time()
            self._frames.append(now)

    def restarted(self) -> None:
        """The capture thread opens its source again (after an error or the source ending)."""
        with self._lock:
            self._restarts += 1
            self._past_source_reconnects += self.source_reconnects()
            self.source_reconnects = lambda: 0

    def reconnects(self) -> int:
        return self._restarts + self._past_source_reconnects + self.source_reconnects()

    def fps(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._frames and now - self._frames[0] > FPS_WINDOW_S:
                self._frames.popleft()
            if not self._frames:
                return 0.0
            # Frames in the window over the window (or over the time since the first frame, if shorter).
            span = max(1.0, min(FPS_WINDOW_S, now - self._frames[0]))
            return len(self._frames) / span

    def silent_s(self) -> float:
        """Seconds since the last frame (or since capture started on this worker, if none came)."""
        return time.time() - (self.last_frame_ts or self.started_ts)

    def state(self, dark_after_s: float) -> str:
        if self.ended:
            return "ended"
        silent = self.silent_s()
        if silent >= dark_after_s:
            return "dark"
        if self.last_frame_ts is not None and silent < stall_after_s(self.camera, dark_after_s):
            return "live"
        return "reconnecting"

    def record(self, dark_after_s: float, worker: str, token: int) -> dict[str, Any]:
        state = self.state(dark_after_s)
        return {"camera_id": self.camera.id, "state": state, "fps": round(self.fps(), 3),
                "last_frame_ts": self.last_frame_ts, "reconnects": self.reconnects(), "worker": worker,
                "lease_token": token, "updated_at": time.time()}

    def export(self, dark_after_s: float) -> str:
        """Update this camera's Prometheus series; returns the state."""
        cid = self.camera.id
        state = self.state(dark_after_s)
        CAMERA_FPS.labels(camera=cid).set(self.fps())
        if self.last_frame_ts is not None:
            CAMERA_LAST_FRAME.labels(camera=cid).set(self.last_frame_ts)
        total = self.reconnects()
        if total > self._reconnects_counted:
            CAMERA_RECONNECTS.labels(camera=cid).inc(total - self._reconnects_counted)
            self._reconnects_counted = total
        for s in STATES:
            CAMERA_STATE.labels(camera=cid, state=s).set(1.0 if s == state else 0.0)
        return state


def forget_metrics(camera_id: str) -> None:
    """Drop a camera's series when it leaves this worker, so labels stay bounded by the registry."""
    for metric in (CAMERA_FPS, CAMERA_LAST_FRAME, CAMERA_RECONNECTS):
        with contextlib.suppress(KeyError):
            metric.remove(camera_id)
    for s in STATES:
        with contextlib.suppress(KeyError):
            CAMERA_STATE.remove(camera_id, s)


class HealthStore:
    """Each camera's latest health record (for the API) and its dark marker."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._key = f"{prefix}:camera-health"

    def down_key(self, camera_id: str) -> str:
        return f"{self._prefix}:camera-down:{camera_id}"

    def put(self, record: dict[str, Any]) -> None:
        self._client.hset(self._key, record["camera_id"], json.dumps(record))

    def all(self) -> dict[str, dict[str, Any]]:
        return {k.decode(): json.loads(v) for k, v in self._client.hgetall(self._key).items()}

    def get(self, camera_id: str) -> dict[str, Any] | None:
        raw = self._client.hget(self._key, camera_id)
        return json.loads(raw) if raw is not None else None

    def forget(self, camera_id: str) -> None:
        self._client.hdel(self._key, camera_id)
        self._client.delete(self.down_key(camera_id))

    def mark_down(self, status: CameraStatus) -> bool:
        """Set the marker; False when the camera is already marked down (by this or an earlier holder)."""
        return bool(self._client.set(self.down_key(status.camera_id), status.to_json(), nx=True))

    def down(self, camera_id: str) -> CameraStatus | None:
        raw = self._client.get(self.down_key(camera_id))
        return CameraStatus.model_validate_json(raw) if raw is not None else None

    def clear_down(self, camera_id: str) -> CameraStatus | None:
        """Remove the marker; returns it when this call removed it (so one worker sends camera_up)."""
        pipe = self._client.pipeline(transaction=True)
        pipe.get(self.down_key(camera_id))
        pipe.delete(self.down_key(camera_id))
        raw, deleted = pipe.execute()
        return CameraStatus.model_validate_json(raw) if raw is not None and deleted else None

    def restore_down(self, status: CameraStatus) -> None:
        self._client.set(self.down_key(status.camera_id), status.to_json())


Publish = Callable[[CameraStatus], None]


class DarkWatch:
    """Turns health into camera_down / camera_up messages, each transition once across workers."""

    def __init__(self, store: HealthStore, publish: Publish, dark_after_s: float, worker: str) -> None:
        self.store = store
        self.publish = publish
        self.dark_after_s = dark_after_s
        self.worker = worker

    def check(self, health: CameraHealth, state: str) -> CameraStatus | None:
        """Publish the transition the state implies, if any; returns what was published."""
        cam = health.camera
        if state == "dark":
            status = CameraStatus(status="camera_down", camera_id=cam.id, line_id=cam.line,
                                  product_class=cam.product_class,
                                  since_ts=health.last_frame_ts or health.started_ts,
                                  last_frame_ts=health.last_frame_ts, dark_after_s=self.dark_after_s,
                                  reconnects=health.reconnects(), worker=self.worker)
            if not self.store.mark_down(status):
                return None
            try:
                self.publish(status)
            except Exception:
                # Not published: drop the marker so the next check tries again.
                self.store.clear_down(cam.id)
                raise
            CAMERA_STATUS_SENT.labels(status="camera_down").inc()
            log.warning("camera_down", camera=cam.id, silent_s=round(health.silent_s(), 1))
            return status
        if state == "live":
            down = self.store.clear_down(cam.id)
            if down is None:
                return None
            now = time.time()
            status = CameraStatus(status="camera_up", camera_id=cam.id, line_id=cam.line,
                                  product_class=cam.product_class, since_ts=health.last_frame_ts or now,
                                  last_frame_ts=health.last_frame_ts, down_s=round(now - down.since_ts, 3),
                                  dark_after_s=self.dark_after_s, reconnects=health.reconnects(),
                                  worker=self.worker)
            try:
                self.publish(status)
            except Exception:
                self.store.restore_down(down)
                raise
            CAMERA_STATUS_SENT.labels(status="camera_up").inc()
            log.info("camera_up", camera=cam.id, down_s=status.down_s)
            return status
        return None


def camera_state_of(record: dict[str, Any] | None, held: bool) -> CameraState | str:
    """The state the API shows: the holder's record, or ``unassigned`` when no worker holds the camera
    (by a lease, or by a fixed capture worker's claim)."""
    if record is None or not held:
        return "unassigned"
    return str(record.get("state", "unassigned"))
