"""API routes for learning from the line (issue 13): labels, the event view's images, per-camera
tuning (threshold, ignore regions), score timelines, shift statistics and reference sets.

Included in the token-protected /api/v1 router by ``pipeline.api.app``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Response
from fastapi import Path as PathParam
from kafka.errors import KafkaError
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from pipeline import imaging, overlay
from pipeline.api.store import EVENT_ID_PATTERN, EventQuery
from pipeline.camera_tuning import CameraTuningStore, Polygon, effective
from pipeline.labels import LabelPublisher, UnknownEventError, label_event
from pipeline.references.frames import FrameNotFoundError, peak_frame
from pipeline.references.store import ReferenceStore, describe
from schemas.frames import CAMERA_ID_PATTERN
from schemas.labels import LabelValue

if TYPE_CHECKING:
    from pipeline.api.context import Context

EventId = Annotated[str, PathParam(pattern=EVENT_ID_PATTERN)]
CameraId = Annotated[str, PathParam(pattern=CAMERA_ID_PATTERN, max_length=128)]
SHIFT_S = 8 * 3600.0
FRAME_CACHE = 16


class LabelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: LabelValue
    note: str | None = Field(default=None, max_length=1000)
    by: str | None = Field(default=None, max_length=128)
    # False: keep the label without teaching the reference set.
    teach: bool = True


class TuningRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Send null to drop an override (back to the configuration / the class threshold).
    threshold: float | None = Field(default=None, allow_inf_nan=False)
    ignore_regions: list[Polygon] | None = None
    by: str | None = Field(default=None, max_length=128)


def learning_router(ctx: Context) -> APIRouter:
    router = APIRouter()
    settings = ctx.settings
    prefix = settings.redis.key_prefix
    tuning = CameraTuningStore(ctx.client, prefix)
    refs = ReferenceStore(ctx.client, prefix)
    publisher = LabelPublisher(settings)
    cameras_cfg = {c.id: c for c in settings.cameras}

    def load_event(event_id: str) -> Any:
        ev = ctx.events.event(event_id)
        if ev is None:
            raise HTTPException(404, f"no event {event_id!r}")
        return ev

    def random_weights(ev: Any) -> bool:
        return overlay.is_random(ev.provenance.model_fingerprint if ev.provenance else None)

    # -- labels ----------------------------------------------------------------------------
    @router.post("/events/{event_id}/label")
    async def set_label(event_id: EventId, body: LabelRequest) -> dict[str, Any]:
        try:
            result = await run_in_threadpool(label_event, settings, ctx.client, event_id, body.label, note=body.note,
                                             by=body.by, teach_references=body.teach, publisher=publisher)
        except UnknownEventError:
            raise HTTPException(404, f"no event {event_id!r}") from None
        return {"label": result.label.model_dump(mode="json"), "published": result.published,
                "publish_error": result.publish_error}

    # -- the event view's images ---------------------------------------------------------------
    frames: OrderedDict[str, Any] = OrderedDict()  # the last few peak frames: switching views refetches nothing

    frames_lock = threading.Lock()

    def full_frame(ev: Any) -> Any:
        with frames_lock:
            if ev.event_id in frames:
                frames.move_to_end(ev.event_id)
                return frames[ev.event_id]
        try:
            frame = imaging.decode_image(peak_frame(settings.kafka, ev))
        except (FrameNotFoundError, KafkaError, ValueError, OSError):
            return None  # no longer retained: the thumbnail stands in
        with frames_lock:
            frames[ev.event_id] = frame
            while len(frames) > FRAME_CACHE:
                frames.popitem(last=False)
        return frame

    def view(event_id: str, kind: str) -> bytes:
        ev = load_event(event_id)
        frame = full_frame(ev)
        if frame is None:
            frame = imaging.decode_image(ev.thumbnail_jpeg)
        rnd = random_weights(ev)
        if kind == "raw":
            out = overlay.stamp_random(frame) if rnd else frame
        elif kind == "heat":
            if ev.peak_map_png is None:
                raise HTTPException(404, f"event {event_id!r} carries no anomaly map")
            amap = imaging.dequantize_map(ev.peak_map_png, ev.peak_map_min or 0.0, ev.peak_map_max or 0.0)
            out = overlay.heat_view(frame, amap, 0.0, 1.0, random_weights=rnd)
        else:
            out = overlay.outline_view(frame, imaging.decode_png(ev.mask_png), ev.regions, (ev.width, ev.height),
                                       random_weights=rnd)
        return imaging.encode_jpeg(out, quality=90)

    @router.get("/events/{event_id}/view/{kind}.jpg")
    async def event_view(event_id: EventId, kind: Annotated[str, PathParam(pattern="^(raw|heat|mask)$")]) -> Response:
        data = await run_in_threadpool(view, event_id, kind)
        return Response(content=data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=60"})

    # -- per-camera tuning ---------------------------------------------------------------------
    def tuning_of(camera_id: str) -> dict[str, Any]:
        live = tuning.get(camera_id)
        threshold, regions = effective(cameras_cfg.get(camera_id), live)
        record = ctx.cameras.get(camera_id) or {}
        cls = record.get("product_class") or (cameras_cfg[camera_id].product_class if camera_id in cameras_cfg
                                              else None)
        class_threshold = ctx.thresholds.get(cls) if cls else None
        fallback = class_threshold if class_threshold is not None else settings.alert.default_threshold
        return {"camera_id": camera_id, "product_class": cls, "threshold_override": threshold,
                "class_threshold": class_threshold, "default_threshold": settings.alert.default_threshold,
                "effective_threshold": threshold if threshold is not None else fallback,
                "ignore_regions": regions, "updated_ts": live.updated_ts if live.by or live.threshold is not None
                or live.ignore_regions is not None else None, "by": live.by}

    @router.get("/cameras/{camera_id}/tuning")
    def get_tuning(camera_id: CameraId) -> dict[str, Any]:
        return tuning_of(camera_id)

    @router.put("/cameras/{camera_id}/tuning")
    def put_tuning(camera_id: CameraId, body: TuningRequest) -> dict[str, Any]:
        changes = body.model_dump(exclude_unset=True)
        try:
            tuning.update(camera_id, **changes)
        except ValueError as exc:
            raise HTTPException(422, str(exc).splitlines()[0]) from None
        return tuning_of(camera_id)

    @router.get("/cameras/{camera_id}/timeline")
    def timeline(camera_id: CameraId, seconds: Annotated[float, Query(gt=0, le=86400)] = 300) -> dict[str, Any]:
        points = ctx.cameras.timeline(camera_id)
        if points:
            newest = max(p["ts"] for p in points)
            points = [p for p in points if p["ts"] >= newest - seconds]
        return {"camera_id": camera_id, "points": points, "threshold": tuning_of(camera_id)["effective_threshold"]}

    # -- shift statistics ------------------------------------------------------------------------
    @router.get("/stats")
    def stats(since: float | None = None, session: str | None = None) -> dict[str, Any]:
        """Events and labels per camera since ``since`` (default: the last 8 hours), live events only
        unless ``session`` says otherwise."""
        start = since if since is not None else time.time() - SHIFT_S
        per: dict[str, dict[str, Any]] = {}
        before: str | None = None
        done = False
        while not done:
            page = ctx.events.query(EventQuery(session=session, limit=500, before=before))
            for ev in page.events:
                if ev["first_ts"] < start:  # newest first: everything further is older still
                    done = True
                    break
                row = per.setdefault(ev["camera_id"], {"camera_id": ev["camera_id"], "events": 0, "confirmed": 0,
                                                       "false_alarm": 0, "unlabelled": 0})
                row["events"] += 1
                label = (ev.get("label") or {}).get("label")
                row[label if label else "unlabelled"] += 1
            done = done or page.next is None
            before = page.next
        for row in per.values():
            labelled = row["confirmed"] + row["false_alarm"]
            row["false_alarm_rate"] = row["false_alarm"] / labelled if labelled else None
        return {"since": start, "session": session, "cameras": sorted(per.values(), key=lambda r: r["camera_id"])}

    # -- reference sets --------------------------------------------------------------------------
    @router.get("/references")
    def references() -> list[dict[str, Any]]:
        current = refs.current_versions()
        return [{"product_class": cls, "current": current.get(cls),
                 "versions": [describe(r, r.version == current.get(cls)) for r in refs.versions(cls)]}
                for cls in refs.classes()]

    @router.get("/overlay-style")
    def overlay_style() -> dict[str, Any]:
        return {"legend": overlay.legend_stops(), "outline": "rgb({},{},{})".format(*overlay.OUTLINE_RGB),
                "random_banner": overlay.RANDOM_BANNER}
    return router
