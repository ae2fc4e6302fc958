"""The HTTP side of `linewatch api`: JSON routes under /api/v1, the live stream (SSE), the dashboard.

Every /api/v1 route needs the token, as ``Authorization: Bearer <token>`` or ``?token=<token>``
(EventSource cannot send headers). ``/``, ``/static/*``, ``/healthz``, ``/readyz`` and ``/metrics``
are open: the page holds no data until it has the token, and probes carry no credentials.
Routes stay thin: state lives in ``pipeline.api.store`` and ``pipeline.delivery.manage``.
"""

from __future__ import annotations

import asyncio
import hmac
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import redis
import uvicorn
from fastapi import APIRouter, Body, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel, Field, ValidationError
from redis.exceptions import RedisError

from pipeline.api.ingest import Ingest
from pipeline.api.routes_cameras import cameras_router
from pipeline.api.routes_learning import learning_router
from pipeline.api.store import (
    ALL_SESSIONS,
    EVENT_ID_PATTERN,
    CameraStore,
    EventQuery,
    EventStore,
    LiveFeed,
    render_overlay,
)
from pipeline.config import Settings
from pipeline.delivery.channels import SenderFactory
from pipeline.delivery.manage import (
    check_subscription,
    dead_letter_rows,
    redrive,
    send_test,
    subscription_rows,
    with_webhook_secret,
)
from pipeline.delivery.store import DeliveryLedger, SubscriptionStore
from pipeline.logging import get_logger
from pipeline.redis_store import ThresholdStore, connect
from schemas.frames import CAMERA_ID_PATTERN
from schemas.subscriptions import SUBSCRIPTION_ID_PATTERN, Subscription

log = get_logger(__name__)

API_PREFIX = "/api/v1"
STATIC_DIR = Path(__file__).parent / "static"
# The dashboard loads nothing from elsewhere; images arrive as blob: URLs fetched with the token.
DASHBOARD_CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
                 "connect-src 'self'; frame-ancestors 'none'")

EventId = Annotated[str, PathParam(pattern=EVENT_ID_PATTERN)]
CameraId = Annotated[str, PathParam(pattern=CAMERA_ID_PATTERN, max_length=128)]
SubId = Annotated[str, PathParam(pattern=SUBSCRIPTION_ID_PATTERN)]


class ThresholdUpdate(BaseModel):
    threshold: float = Field(allow_inf_nan=False)
    note: str | None = Field(default=None, max_length=500)


class RedriveRequest(BaseModel):
    delivery_ids: list[str] | None = None


@dataclass
class Context:
    settings: Settings
    client: redis.Redis
    events: EventStore
    cameras: CameraStore
    subs: SubscriptionStore
    ledger: DeliveryLedger
    thresholds: ThresholdStore
    feed: LiveFeed
    senders: SenderFactory
    ingest: Ingest | None


def make_context(settings: Settings, ingest: Ingest | None = None) -> Context:
    client = connect(settings.redis)
    prefix = settings.redis.key_prefix
    return Context(settings=settings, client=client, events=EventStore(client, prefix, settings.api.max_events),
                   cameras=CameraStore.bounded(client, prefix, settings.api), subs=SubscriptionStore(client, prefix),
                   ledger=DeliveryLedger(client, prefix, settings.deliver.ledger_ttl_s),
                   thresholds=ThresholdStore(client, prefix), feed=LiveFeed(client, prefix),
                   senders=SenderFactory(settings, client), ingest=ingest)


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None
    return request.query_params.get("token")


def _image(data: bytes | None, media_type: str, what: str, cache: str = "no-cache") -> Response:
    if data is None:
        raise HTTPException(404, f"no {what}")
    return Response(content=data, media_type=media_type, headers={"Cache-Control": cache})


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
    api = APIRouter(prefix=API_PREFIX, dependencies=[Depends(authorize)])

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

    # -- open routes -------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": DASHBOARD_CSP,
                                                                "Cache-Control": "no-cache"})

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
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

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    # -- cameras -----------------------------------------------------------------------------
    @api.get("/cameras")
    def cameras() -> list[dict[str, Any]]:
        return ctx.cameras.all()

    @api.get("/cameras/{camera_id}/latest.jpg")
    def camera_latest(camera_id: CameraId) -> Response:
        return _image(ctx.cameras.jpeg(camera_id), "image/jpeg", f"frame for camera {camera_id!r}", "no-store")

    # -- events ------------------------------------------------------------------------------
    @api.get("/events")
    def events(
        camera: str | None = None, line: str | None = None, product_class: str | None = None,
        status: Literal["open", "closed"] | None = None,
        session: Annotated[str | None, Query(description=f"replay session, or {ALL_SESSIONS!r} for all")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50, before: str | None = None,
    ) -> dict[str, Any]:
        query = EventQuery(camera=camera, line=line, product_class=product_class, status=status, session=session,
                           limit=limit, before=before)
        try:
            page = ctx.events.query(query)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return {"events": page.events, "next": page.next}

    @api.get("/events/{event_id}")
    def event(event_id: EventId) -> dict[str, Any]:
        data = ctx.events.get(event_id)
        if data is None:
            raise HTTPException(404, f"no event {event_id!r}")
        return data

    @api.get("/events/{event_id}/mask.png")
    def event_mask(event_id: EventId) -> Response:
        return _image(ctx.events.mask(event_id), "image/png", f"event {event_id!r}")

    @api.get("/events/{event_id}/thumbnail.jpg")
    def event_thumbnail(event_id: EventId) -> Response:
        return _image(ctx.events.thumbnail(event_id), "image/jpeg", f"event {event_id!r}")

    @api.get("/events/{event_id}/overlay.jpg")
    def event_overlay_jpg(event_id: EventId) -> Response:
        ev = ctx.events.event(event_id)
        return _image(render_overlay(ev) if ev is not None else None, "image/jpeg", f"event {event_id!r}")

    # -- live stream -------------------------------------------------------------------------
    @api.get("/stream")
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

    # -- subscriptions -----------------------------------------------------------------------
    def get_sub(sub_id: str) -> Subscription:
        try:
            return ctx.subs.get(sub_id)
        except KeyError:
            raise HTTPException(404, f"no subscription {sub_id!r}") from None

    @api.get("/subscriptions")
    def subscriptions() -> list[dict[str, Any]]:
        return subscription_rows(ctx.subs, ctx.ledger)

    @api.post("/subscriptions", status_code=201)
    def add_subscription(body: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
        sub, generated = parse_subscription(body)
        try:
            check_subscription(sub, settings)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        try:
            ctx.subs.add(sub)
        except ValueError as exc:  # the id exists
            raise HTTPException(409, str(exc)) from None
        log.info("subscription_added", subscription=sub.id, channel=sub.channel.type, via="api")
        # A generated secret is shown once, like the CLI does; it is never returned again.
        return {"subscription": sub.public(), "secret": generated}

    @api.delete("/subscriptions/{sub_id}", status_code=204)
    def remove_subscription(sub_id: SubId) -> Response:
        if not ctx.subs.remove(sub_id):
            raise HTTPException(404, f"no subscription {sub_id!r}")
        ctx.ledger.forget(sub_id)
        log.info("subscription_removed", subscription=sub_id, via="api")
        return Response(status_code=204)

    def sender_for(sub: Subscription) -> Any:
        try:
            return ctx.senders(sub)
        except ValueError as exc:  # its channel cannot be reached as configured (no Kafka)
            raise HTTPException(409, str(exc)) from None

    @api.post("/subscriptions/{sub_id}/test")
    def test_subscription(sub_id: SubId) -> dict[str, Any]:
        sub = get_sub(sub_id)
        sender = sender_for(sub)
        try:
            error = send_test(sub, sender, settings)
        finally:
            sender.close()
        return {"ok": error is None, "error": error}

    @api.get("/subscriptions/{sub_id}/dead-letters")
    def dead_letters(sub_id: SubId) -> list[dict[str, Any]]:
        get_sub(sub_id)
        return dead_letter_rows(ctx.ledger, sub_id)

    @api.post("/subscriptions/{sub_id}/redrive")
    def redrive_subscription(sub_id: SubId, body: Annotated[RedriveRequest | None, Body()] = None) -> dict[str, Any]:
        sub = get_sub(sub_id)
        sender = sender_for(sub)
        try:
            result = redrive(sub, ctx.ledger, sender, settings, body.delivery_ids if body else None)
        except ValueError as exc:  # unknown delivery ids
            raise HTTPException(404, str(exc)) from None
        finally:
            sender.close()
        return {"delivered": result.delivered, "failed": result.failed}

    # -- thresholds --------------------------------------------------------------------------
    @api.get("/thresholds")
    def thresholds() -> list[dict[str, Any]]:
        return [{"product_class": cls, "threshold": value, "meta": ctx.thresholds.meta(cls)}
                for cls, value in sorted(ctx.thresholds.all().items())]

    @api.put("/thresholds/{product_class}")
    def set_threshold(product_class: Annotated[str, PathParam(min_length=1, max_length=128)],
                      update: ThresholdUpdate) -> dict[str, Any]:
        meta = {"source": "api", **({"note": update.note} if update.note else {})}
        ctx.thresholds.set(product_class, update.threshold, meta)
        return {"product_class": product_class, "threshold": ctx.thresholds.get(product_class),
                "meta": ctx.thresholds.meta(product_class)}

    api.include_router(cameras_router(settings, ctx.client))  # /cameras/registry: pipeline/api/routes_cameras.py
    api.include_router(learning_router(ctx))
    app.include_router(api)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def parse_subscription(body: dict[str, Any]) -> tuple[Subscription, str | None]:
    """Validate a subscription body; a webhook without a secret gets a generated one (returned once)."""
    body, generated = with_webhook_secret(body)
    try:
        return Subscription.model_validate(body), generated
    except ValidationError as exc:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        raise HTTPException(422, errors) from None


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
