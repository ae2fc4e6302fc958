"""/api/v1/cameras (each camera's latest scored frame) and /api/v1/stream (events as they happen, SSE)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import StreamingResponse

from pipeline.api.context import CameraId, Context, image_response
from pipeline.cameras.overview import CameraAdmin


def live_router(ctx: Context, heartbeat_s: float) -> APIRouter:
    router = APIRouter()
    admin = CameraAdmin(ctx.settings, ctx.client, seed=False)  # read-only: registry, leases, health

    @router.get("/cameras")
    def cameras() -> list[dict[str, Any]]:
        """Latest scored frame per camera; live cameras of the registry also carry their capture state
        (live, reconnecting, dark, ended, unassigned) as the capture workers report it."""
        states = {row["id"]: row["state"] for row in admin.rows()}
        rows = ctx.cameras.all()
        for row in rows:
            if row.get("replay_session") is None and row.get("camera_id") in states:
                row["state"] = states[row["camera_id"]]
        return rows

    @router.get("/cameras/{camera_id}/latest.jpg")
    def camera_latest(camera_id: CameraId) -> Response:
        return image_response(ctx.cameras.jpeg(camera_id), "image/jpeg", f"frame for camera {camera_id!r}",
                              "no-store")

    @router.get("/stream")
    async def stream() -> StreamingResponse:
        # Listening starts before the response does, so nothing published after the headers is missed.
        listener = ctx.feed.listen()

        async def body() -> AsyncIterator[str]:
            try:
                yield "retry: 3000\n: connected\n\n"
                while True:
                    try:
                        item = await asyncio.wait_for(listener.queue.get(), heartbeat_s)
                    except TimeoutError:
                        yield ": heartbeat\n\n"  # keeps proxies from closing an idle stream
                        continue
                    if item is None:
                        return
                    yield f"event: defect\ndata: {item}\n\n"
            finally:
                ctx.feed.forget(listener)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return router
