"""/api/v1/thresholds: the per-class alert thresholds, read and set (``pipeline.redis_store.ThresholdStore``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from fastapi import Path as PathParam
from pydantic import BaseModel, Field

from pipeline.api.context import Context


class ThresholdUpdate(BaseModel):
    threshold: float = Field(allow_inf_nan=False)
    note: str | None = Field(default=None, max_length=500)


def thresholds_router(ctx: Context) -> APIRouter:
    router = APIRouter(prefix="/thresholds")

    @router.get("")
    def thresholds() -> list[dict[str, Any]]:
        return [{"product_class": cls, "threshold": value, "meta": ctx.thresholds.meta(cls)}
                for cls, value in sorted(ctx.thresholds.all().items())]

    @router.put("/{product_class}")
    def set_threshold(product_class: Annotated[str, PathParam(min_length=1, max_length=128)],
                      update: ThresholdUpdate) -> dict[str, Any]:
        meta = {"source": "api", **({"note": update.note} if update.note else {})}
        ctx.thresholds.set(product_class, update.threshold, meta)
        return {"product_class": product_class, "threshold": ctx.thresholds.get(product_class),
                "meta": ctx.thresholds.meta(product_class)}

    return router
