"""The camera watchdog: `camera_down` for a camera no capture worker holds.

A capture worker reports the cameras it holds (`pipeline.cameras.health.DarkWatch`). When every
capture worker is dead, or none takes a camera, nobody would: the line is blind and nobody is told.
The watchdog runs in every deliver worker (`workers.deliver`) and, every ``capture.registry_poll_s``,
looks at each camera of the registry. A camera is *held* while a capture worker holds its lease or
a fixed capture worker claims it (`pipeline.cameras.leases.FixedClaims`). One that is not held gets
a ``camera_down`` (``reason``: no capture worker holds it) once

- its last frame (the health record in Redis) is ``capture.dark_after_s`` old, or, when it never
  had one, this watchdog has watched it that long, and
- this watchdog has seen it unheld for ``capture.lease_s`` (a capture worker starting with the site
  takes its cameras within its first rounds; no alarm for the moment in between),

unless its source ended (a file or folder that reached its end is not a blind line).

Once only, whatever the number of deliver workers: the down marker a holder would set is set here
by one Lua script that also checks, atomically, that no lease or claim appeared meanwhile; only the
watchdog that set it publishes. The capture worker that takes the camera next finds the marker and
sends the ``camera_up`` once frames flow (as after any dark period).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from kafka.errors import KafkaError

from pipeline.cameras.health import HealthStore
from pipeline.cameras.leases import FixedClaims, LeaseManager
from pipeline.cameras.registry import CameraRegistry
from pipeline.config import CameraConfig, Settings
from pipeline.logging import get_logger
from pipeline.metrics import CAMERA_STATUS_SENT, WATCHDOG_CHECKS, WATCHDOG_DOWN, WATCHDOG_UNHELD
from schemas.cameras import CameraStatus

log = get_logger(__name__)

REASON = "no capture worker holds the camera"

# KEYS[1] down marker, KEYS[2] lease, KEYS[3] fixed claim; ARGV[1] the camera_down JSON.
# 1 when this call marked the camera down; 0 when it is held again or already marked.
_MARK_UNHELD = """
if redis.call('EXISTS', KEYS[2], KEYS[3]) > 0 then
  return 0
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX') then
  return 1
end
return 0
"""


def watchdog_name() -> str:
    return f"watchdog-{socket.gethostname()}-{os.getpid()}"


class CameraWatchdog:
    """Checks the registry's cameras for ones nobody holds; ``run`` repeats ``check`` until stopped."""

    def __init__(self, settings: Settings, client: redis.Redis, publish: Callable[[CameraStatus], None],
                 name: str | None = None) -> None:
        prefix = settings.redis.key_prefix
        cap = settings.capture
        self.settings = settings
        self.name = name or watchdog_name()
        self.publish = publish
        self.dark_after_s = cap.dark_after_s
        self.grace_s = cap.lease_s
        self.interval_s = cap.registry_poll_s
        self.registry = CameraRegistry(client, prefix)
        self.health = HealthStore(client, prefix)
        # Read-only use (holders): the owner name is never written.
        self.leases = LeaseManager(client, prefix, "-", cap.lease_s)
        self.claims = FixedClaims(client, prefix, cap.lease_s)
        self.started_ts = time.time()
        # Wall time this watchdog first saw each camera unheld (dropped when it is held again).
        self.unheld_since: dict[str, float] = {}
        self._mark = client.register_script(_MARK_UNHELD)
        self._seeded = False
        self._log = log.bind(worker="deliver", watchdog=self.name)

    def check(self) -> list[CameraStatus]:
        """One look at every camera; returns the camera_down messages this call published."""
        if not self._seeded:
            # Like every worker: the YAML cameras are watched even before any capture worker ran.
            self.registry.seed(list(self.settings.cameras))
            self._seeded = True
        cams = self.registry.all()
        ids = list(cams)
        holders = self.leases.holders(ids)
        claims = self.claims.claimed(ids)
        records = self.health.all()
        now = time.time()
        unheld = [cid for cid in ids if holders.get(cid) is None and claims.get(cid) is None]
        self.unheld_since = {cid: self.unheld_since.get(cid, now) for cid in unheld}
        WATCHDOG_UNHELD.set(len(unheld))
        sent: list[CameraStatus] = []
        for cid in unheld:
            status = self._due(cams[cid], records.get(cid), now)
            if status is not None and self._report(status):
                sent.append(status)
        return sent

    def _due(self, cam: CameraConfig, record: dict[str, Any] | None, now: float) -> CameraStatus | None:
        """The camera_down this unheld camera is due, or None while it is not (yet)."""
        if record is not None and record.get("state") == "ended":
            return None
        if now - self.unheld_since[cam.id] < self.grace_s:
            return None
        record = record or {}
        last = record.get("last_frame_ts")
        since = float(last) if last is not None else self.started_ts
        if now - since < self.dark_after_s:
            return None
        return CameraStatus(status="camera_down", camera_id=cam.id, line_id=cam.line,
                            product_class=cam.product_class, since_ts=since, last_frame_ts=last,
                            dark_after_s=self.dark_after_s, reconnects=int(record.get("reconnects", 0)),
                            worker=self.name, reason=REASON)

    def _report(self, status: CameraStatus) -> bool:
        cid = status.camera_id
        # The marker leaves ``reason`` out: capture workers of the version before it still read it.
        marked = self._mark(keys=[self.health.down_key(cid), self.leases.key(cid), self.claims.key(cid)],
                            args=[status.model_dump_json(exclude={"reason"})])
        if marked != 1:
            return False  # already down (told by its last holder or another watchdog), or held again
        try:
            self.publish(status)
        except Exception:
            # Not published: drop the marker so the next check (here or elsewhere) tries again.
            self.health.clear_down(cid)
            raise
        CAMERA_STATUS_SENT.labels(status="camera_down").inc()
        WATCHDOG_DOWN.inc()
        self._log.warning("camera_down", camera=cid, reason=REASON, last_frame_ts=status.last_frame_ts,
                          silent_s=round(time.time() - status.since_ts, 1))
        return True

    def run(self, stop: threading.Event) -> None:
        """Check every ``interval_s`` until ``stop``; Redis or broker trouble waits for the next check."""
        self._log.info("camera_watchdog_started", dark_after_s=self.dark_after_s, grace_s=self.grace_s)
        while not stop.wait(self.interval_s):
            try:
                self.check()
                WATCHDOG_CHECKS.labels(outcome="ok").inc()
            except (redis.RedisError, KafkaError, OSError) as exc:
                WATCHDOG_CHECKS.labels(outcome="failed").inc()
                self._log.warning("camera_watchdog_check_failed", error=repr(exc))
            except Exception:
                # A bug must not end the thread silently: the next check may still report the others.
                WATCHDOG_CHECKS.labels(outcome="failed").inc()
                self._log.exception("camera_watchdog_check_failed")
