"""The open routes: the dashboard page and its static files, /healthz, /readyz and /metrics.

They need no token: the page holds no data until it has one, and probes carry no credentials.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Response
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from redis.exceptions import RedisError

from pipeline.api.context import Context

STATIC_DIR = Path(__file__).parent / "static"
# The dashboard loads nothing from elsewhere; images arrive as blob: URLs fetched with the token.
DASHBOARD_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
                 "connect-src 'self'; frame-ancestors 'none'")


def health_router(ctx: Context) -> APIRouter:
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": DASHBOARD_CSP,
                                                                "Cache-Control": "no-cache"})

    @router.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz")
    def readyz() -> JSONResponse:
        problems: dict[str, str] = {}
        try:
            ctx.client.ping()
        except RedisError as exc:
            problems["redis"] = repr(exc)
        if ctx.ingest is not None and not (ctx.ingest.ready.is_set() and ctx.ingest.alive()):
            problems["ingest"] = "starting" if not ctx.ingest.ready.is_set() else "loop stalled"
        return JSONResponse({"status": "ok" if not problems else "unavailable", "problems": problems},
                            status_code=503 if problems else 200)

    @router.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return router


def mount_static(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
