"""The camera registry: the cameras capture works on, in Redis, editable while capture runs.

Seeding rule: the YAML ``cameras:`` list seeds the registry. A YAML camera is added only when its
id is neither in the registry nor removed at run time (a tombstone remembers removals), so a
restart with the same YAML never undoes `linewatch cameras update|remove`. Once a camera is in the
registry, the registry is the truth: edit it with `linewatch cameras update` (or the API), or
re-apply the YAML on purpose with `linewatch cameras seed --overwrite`.

Every change bumps a version counter, which capture workers poll to pick changes up.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

import redis
from pydantic import ValidationError

from pipeline.capture.sources import LIVE_SCHEMES
from pipeline.config import CameraConfig

Origin = Literal["yaml", "runtime"]


class CameraNotFoundError(ValueError):
    def __init__(self, camera_id: str) -> None:
        super().__init__(f"no camera {camera_id!r} in the registry")


class CameraExistsError(ValueError):
    pass


def parse_camera(data: dict[str, Any]) -> CameraConfig:
    """A CameraConfig from user input; a bad field is a one-line ValueError naming it.

    Only what can be judged anywhere is checked here: whether a file, folder or device exists is
    known only on the capture workers' hosts (a missing one shows as a reconnecting/dark camera).
    """
    try:
        cam = CameraConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "camera"
        raise ValueError(f"invalid camera {where}: {first.get('msg', 'invalid')}") from None
    source = cam.source.strip()
    if not source:
        raise ValueError("invalid camera source: empty")
    if "://" in source and not source.lower().startswith(LIVE_SCHEMES):
        raise ValueError(f"invalid camera source: unsupported URL scheme {source.split('://')[0]}:// "
                         f"(supported: {', '.join(LIVE_SCHEMES)})")
    return cam


class CameraRegistry:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._client = client
        self._key = f"{prefix}:cameras"
        self._meta_key = f"{prefix}:cameras:meta"
        self._removed_key = f"{prefix}:cameras:removed"
        self._version_key = f"{prefix}:cameras:version"

    # -- reading --------------------------------------------------------------------------------
    def version(self) -> int:
        raw = self._client.get(self._version_key)
        return int(raw) if raw is not None else 0

    def all(self) -> dict[str, CameraConfig]:
        cams = {k.decode(): CameraConfig.model_validate_json(v) for k, v in self._client.hgetall(self._key).items()}
        return dict(sorted(cams.items()))

    def snapshot(self) -> tuple[int, dict[str, CameraConfig]]:
        """Version and cameras read together, so a worker never pairs a version with older cameras."""
        pipe = self._client.pipeline(transaction=True)
        pipe.get(self._version_key)
        pipe.hgetall(self._key)
        raw_version, raw = pipe.execute()
        cams = {k.decode(): CameraConfig.model_validate_json(v) for k, v in raw.items()}
        return int(raw_version or 0), dict(sorted(cams.items()))

    def get(self, camera_id: str) -> CameraConfig:
        raw = self._client.hget(self._key, camera_id)
        if raw is None:
            raise CameraNotFoundError(camera_id)
        return CameraConfig.model_validate_json(raw)

    def meta(self) -> dict[str, dict[str, Any]]:
        return {k.decode(): json.loads(v) for k, v in self._client.hgetall(self._meta_key).items()}

    # -- changing -------------------------------------------------------------------------------
    def _meta(self, origin: Origin) -> str:
        return json.dumps({"origin": origin, "updated_at": time.time()})

    def seed(self, cameras: list[CameraConfig], overwrite: bool = False) -> list[str]:
        """Add YAML cameras by the seeding rule (module doc); returns the ids added or overwritten."""
        changed: list[str] = []
        for cam in cameras:
            if overwrite:
                pipe = self._client.pipeline(transaction=True)
                pipe.hset(self._key, cam.id, cam.model_dump_json())
                pipe.hset(self._meta_key, cam.id, self._meta("yaml"))
                pipe.srem(self._removed_key, cam.id)
                pipe.incr(self._version_key)
                pipe.execute()
                changed.append(cam.id)
            elif not self._client.sismember(self._removed_key, cam.id) and self._client.hsetnx(
                    self._key, cam.id, cam.model_dump_json()):
                # HSETNX: concurrent seeders (every worker seeds at start) add each camera once.
                pipe = self._client.pipeline(transaction=True)
                pipe.hset(self._meta_key, cam.id, self._meta("yaml"))
                pipe.incr(self._version_key)
                pipe.execute()
                changed.append(cam.id)
        return changed

    def add(self, cam: CameraConfig) -> None:
        if not self._client.hsetnx(self._key, cam.id, cam.model_dump_json()):
            raise CameraExistsError(f"camera {cam.id!r} already exists (use update)")
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(self._meta_key, cam.id, self._meta("runtime"))
        pipe.srem(self._removed_key, cam.id)
        pipe.incr(self._version_key)
        pipe.execute()

    def update(self, camera_id: str, changes: dict[str, Any]) -> CameraConfig:
        """Apply field changes (validated as a whole camera); the id cannot change."""
        if "id" in changes and changes["id"] != camera_id:
            raise ValueError("a camera's id cannot change (remove it and add a new one)")
        with self._client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(self._key)
                    raw = pipe.hget(self._key, camera_id)
                    if raw is None:
                        raise CameraNotFoundError(camera_id)
                    current = CameraConfig.model_validate_json(raw)
                    updated = parse_camera({**current.model_dump(), **changes, "id": camera_id})
                    pipe.multi()
                    pipe.hset(self._key, camera_id, updated.model_dump_json())
                    pipe.hset(self._meta_key, camera_id, self._meta("runtime"))
                    pipe.incr(self._version_key)
                    pipe.execute()
                    return updated
                except redis.WatchError:
                    continue  # changed meanwhile: apply the changes to the newer copy

    def remove(self, camera_id: str) -> bool:
        pipe = self._client.pipeline(transaction=True)
        pipe.hdel(self._key, camera_id)
        pipe.hdel(self._meta_key, camera_id)
        pipe.sadd(self._removed_key, camera_id)
        pipe.incr(self._version_key)
        removed, *_ = pipe.execute()
        return bool(removed)
