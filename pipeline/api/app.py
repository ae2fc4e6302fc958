"""The HTTP side of `linewatch api`: JSON routes under /api/v1, the live stream (SSE), the dashboard.

Every /api/v1 route needs the token, as ``Authorization: Bearer <token>`` or ``?token=<token>``
(EventSource cannot send headers). ``/``, ``/static/*``, ``/healthz``, ``/readyz`` and ``/metrics``
are open: the page holds no data until it has the token, and probes carry no credentials.
Routes stay thin: state lives in ``pipeline.api.store`` and ``pipeline.delivery.manage``; each
group of routes is its own router module (``routes_*.py``) over one :class:`~pipeline.api.context.Context`.
"""

from __future__ import annotations

import asyncio
import hmac
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from pipeline.api.context import Context, make_context
from pipeline.api.ingest import Ingest
from pipeline.api.routes_cameras import cameras_router
from pipeline.api.routes_events import events_router
from pipeline.api.routes_health import health_router, mount_static
from pipeline.api.routes_learning import learning_router
from pipeline.api.routes_live import live_router
from pipeline.api.routes_subscriptions import subscriptions_router
from pipeline.api.routes_thresholds import thresholds_router
from pipeline.api.store import LiveFeed
from pipeline.config import Settings
from pipeline.logging import get_logger

__all__ = ["API_PREFIX", "Context", "create_app", "serve"]

log = get_logger(__name__)

API_PREFIX = "/api/v1"


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None
    return request.query_params.get("token")


def create_app(settings: Settings, ingest: Ingest | None = None, heartbeat_s: float = 15.0) -> FastAPI:
    """The ASGI app; the live feed starts with the app's lifespan and Redis closes with it."""
    if not settings.api.token:
        raise ValueError("api.token is not set (LINEWATCH_API__TOKEN): the API refuses to run without a token")
    expected = settings.api.token.encode()
    ctx = make_context(settings, ingest)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(ctx.feed.start)
        try:
            yield
        finally:
            await asyncio.to_thread(ctx.feed.close)
            ctx.senders.close()
            ctx.client.close()

    def authorize(request: Request) -> None:
        supplied = _bearer(request)
        if supplied is None or not hmac.compare_digest(supplied.encode(), expected):
            raise HTTPException(401, "missing or invalid token", headers={"WWW-Authenticate": "Bearer"})

    app = FastAPI(title="linewatch", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # Without the offending input: it may be a secret, or a NaN that JSON cannot even carry.
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(RedisError)
    async def redis_unavailable(_request: Request, exc: RedisError) -> JSONResponse:
        log.warning("api_redis_error", error=repr(exc))
        return JSONResponse({"detail": "state store unavailable"}, status_code=503)

    app.include_router(health_router(ctx))  # open: dashboard page, probes, metrics
    api = APIRouter(prefix=API_PREFIX, dependencies=[Depends(authorize)])
    api.include_router(live_router(ctx, heartbeat_s))
    api.include_router(events_router(ctx))
    api.include_router(subscriptions_router(ctx))
    api.include_router(thresholds_router(ctx))
    api.include_router(cameras_router(settings, ctx.client))  # /cameras/registry
    api.include_router(learning_router(ctx))
    app.include_router(api)
    mount_static(app)
    return app


class _Server(uvicorn.Server):
    """uvicorn, ending open event streams first so a graceful shutdown does not wait on them."""

    def __init__(self, config: uvicorn.Config, feed: LiveFeed) -> None:
        super().__init__(config)
        self._feed = feed

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises SIGTERM after serving, which would kill us before the ingest loop
        # stops and leaves its consumer group; a signal here just means "shut down cleanly".
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets: Any = None) -> None:
        self._feed.end_streams()
        await super().shutdown(sockets)


def serve(settings: Settings, stop: threading.Event | None = None, heartbeat_s: float = 15.0,
          ingest: Ingest | None = None) -> None:
    """Run the ingest loop in a thread and the HTTP server in this one, until a signal or ``stop``.

    Raises the ingest loop's error if it died (the server is stopped then, so an orchestrator restarts us).
    """
    ingest = ingest or Ingest(settings)
    app = create_app(settings, ingest=ingest, heartbeat_s=heartbeat_s)
    # No access log: `?token=` (EventSource) would land in it.
    config = uvicorn.Config(app, host=settings.api.host, port=settings.api.port, access_log=False,
                            log_level="warning", timeout_graceful_shutdown=5, lifespan="on")
    server = _Server(config, app.state.ctx.feed)
    stop = stop or threading.Event()
    ingest_stop = threading.Event()
    failure: list[BaseException] = []

    def run_ingest() -> None:
        try:
            ingest.run(ingest_stop)
        except BaseException as exc:
            failure.append(exc)
            log.error("api_ingest_died", error=repr(exc))
            server.should_exit = True

    def watch() -> None:
        stop.wait()
        server.should_exit = True

    ingest_thread = threading.Thread(target=run_ingest, name="api-ingest", daemon=True)
    ingest_thread.start()
    threading.Thread(target=watch, name="api-stop", daemon=True).start()
    log.info("api_starting", host=settings.api.host, port=settings.api.port)
    try:
        server.run()
    finally:
        ingest_stop.set()
        stop.set()
        ingest_thread.join(30)
        log.info("api_stopped")
    if failure:
        raise failure[0]
