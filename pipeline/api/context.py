"""What every API router works with: the settings, one Redis client and the stores over it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import redis
from fastapi import HTTPException, Response
from fastapi import Path as PathParam

from pipeline.api.ingest import Ingest
from pipeline.api.store import EVENT_ID_PATTERN, CameraStore, EventStore, LiveFeed
from pipeline.config import Settings
from pipeline.delivery.channels import SenderFactory
from pipeline.delivery.store import DeliveryLedger, SubscriptionStore
from pipeline.redis_store import ThresholdStore, connect
from schemas.frames import CAMERA_ID_PATTERN

EventId = Annotated[str, PathParam(pattern=EVENT_ID_PATTERN)]
CameraId = Annotated[str, PathParam(pattern=CAMERA_ID_PATTERN, max_length=128)]


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


def image_response(data: bytes | None, media_type: str, what: str, cache: str = "no-cache") -> Response:
    """The image, or 404 saying what has none."""
    if data is None:
        raise HTTPException(404, f"no {what}")
    return Response(content=data, media_type=media_type, headers={"Cache-Control": cache})
