"""/api/v1/cameras/registry: the camera registry (add, change, remove) with each camera's health.

Mounted on the token-protected /api/v1 router. The registry is seeded from the YAML on first use
(`pipeline.cameras.registry` has the seeding rule).
"""

from __future__ import annotations

import threading
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Body, HTTPException, Response
from fastapi import Path as PathParam

from pipeline.cameras.overview import CameraAdmin, public_camera
from pipeline.cameras.registry import CameraExistsError, CameraNotFoundError, parse_camera
from pipeline.config import Settings
from schemas.frames import CAMERA_ID_PATTERN

CameraId = Annotated[str, PathParam(pattern=CAMERA_ID_PATTERN, max_length=128)]


def cameras_router(settings: Settings, client: redis.Redis) -> APIRouter:
    router = APIRouter(prefix="/cameras/registry")
    admin = CameraAdmin(settings, client, seed=False)
    seeded = threading.Event()

    def ready() -> CameraAdmin:
        # Seeding waits for the first request: the API starts even while Redis is still coming up.
        if not seeded.is_set():
            admin.registry.seed(list(settings.cameras))
            seeded.set()
        return admin

    def row(camera_id: str) -> dict[str, Any]:
        for r in ready().rows():
            if r["id"] == camera_id:
                return r
        raise HTTPException(404, f"no camera {camera_id!r} in the registry")

    @router.get("")
    def list_cameras() -> list[dict[str, Any]]:
        """Every camera: configuration (credentials in URLs masked), capturing worker, health."""
        return ready().rows()

    @router.get("/{camera_id}")
    def get_camera(camera_id: CameraId) -> dict[str, Any]:
        return row(camera_id)

    @router.post("", status_code=201)
    def add_camera(body: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
        try:
            cam = parse_camera(body)
            ready().registry.add(cam)
        except CameraExistsError as exc:
            raise HTTPException(409, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return public_camera(cam)

    @router.patch("/{camera_id}")
    def update_camera(camera_id: CameraId, body: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
        try:
            cam = ready().registry.update(camera_id, body)
        except CameraNotFoundError as exc:
            raise HTTPException(404, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return public_camera(cam)

    @router.delete("/{camera_id}", status_code=204)
    def remove_camera(camera_id: CameraId) -> Response:
        if not ready().registry.remove(camera_id):
            raise HTTPException(404, f"no camera {camera_id!r} in the registry")
        return Response(status_code=204)

    return router
