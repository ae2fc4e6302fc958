"""The cameras as users see them (CLI, API, dashboard): configuration, who captures them, health."""

from __future__ import annotations

import re
from typing import Any

import redis

from pipeline.cameras.health import HealthStore, camera_state_of
from pipeline.cameras.leases import FixedClaims, LeaseManager
from pipeline.cameras.registry import CameraRegistry
from pipeline.config import CameraConfig, Settings


def masked_source(source: str) -> str:
    """Never show credentials embedded in a camera URL (rtsp://user:pass@host/...)."""
    return re.sub(r"//[^/@]*@", "//***@", source)


def public_camera(cam: CameraConfig) -> dict[str, Any]:
    return {**cam.model_dump(mode="json"), "source": masked_source(cam.source)}


class CameraAdmin:
    """Registry, leases and health over one Redis client, seeded from the YAML on creation."""

    def __init__(self, settings: Settings, client: redis.Redis, seed: bool = True) -> None:
        prefix = settings.redis.key_prefix
        self.settings = settings
        self.registry = CameraRegistry(client, prefix)
        self.health = HealthStore(client, prefix)
        # Read-only use (holders): the owner name is never written.
        self._leases = LeaseManager(client, prefix, "-", settings.capture.lease_s)
        # Fixed capture (`--camera`, `linewatch run`) holds no lease; it claims its cameras instead.
        self._claims = FixedClaims(client, prefix, settings.capture.lease_s)
        if seed:
            self.registry.seed(list(settings.cameras))

    def rows(self) -> list[dict[str, Any]]:
        cams = self.registry.all()
        meta = self.registry.meta()
        health = self.health.all()
        holders = self._leases.holders(list(cams))
        claims = self._claims.claimed(list(cams))
        rows = []
        for cid, cam in cams.items():
            record = health.get(cid)
            holder = holders.get(cid)
            worker = holder[0] if holder else claims.get(cid)
            rows.append({
                **public_camera(cam),
                "origin": meta.get(cid, {}).get("origin"),
                "state": camera_state_of(record, worker is not None),
                "fps_measured": record.get("fps") if record and worker else None,
                "last_frame_ts": record.get("last_frame_ts") if record else None,
                "reconnects": record.get("reconnects", 0) if record else 0,
                "worker": worker,
                "lease_token": holder[1] if holder else None,
                "down": self.health.down(cid) is not None,
            })
        return rows
