"""/api/v1/events: the event list (filtered, paged), one event, and its mask, thumbnail and overlay."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Response

from pipeline.api.context import Context, EventId, image_response
from pipeline.api.store import ALL_SESSIONS, EventQuery, render_overlay


def events_router(ctx: Context) -> APIRouter:
    router = APIRouter(prefix="/events")

    @router.get("")
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

    @router.get("/{event_id}")
    def event(event_id: EventId) -> dict[str, Any]:
        data = ctx.events.get(event_id)
        if data is None:
            raise HTTPException(404, f"no event {event_id!r}")
        return data

    @router.get("/{event_id}/mask.png")
    def event_mask(event_id: EventId) -> Response:
        return image_response(ctx.events.mask(event_id), "image/png", f"event {event_id!r}")

    @router.get("/{event_id}/thumbnail.jpg")
    def event_thumbnail(event_id: EventId) -> Response:
        return image_response(ctx.events.thumbnail(event_id), "image/jpeg", f"event {event_id!r}")

    @router.get("/{event_id}/overlay.jpg")
    def event_overlay_jpg(event_id: EventId) -> Response:
        ev = ctx.events.event(event_id)
        return image_response(render_overlay(ev) if ev is not None else None, "image/jpeg", f"event {event_id!r}")

    return router
