"""The notification a subscriber receives, with media inline, linked or left out."""

from __future__ import annotations

import time
from typing import Any, Literal

from pipeline.delivery.filters import delivery_id
from schemas.events import DefectEvent
from schemas.subscriptions import Notification

Media = Literal["base64", "url", "none"]
MEDIA_FIELDS = ("mask_png", "thumbnail_jpeg", "peak_map_png")


def event_media(event: dict[str, Any], media: Media, base_url: str | None) -> dict[str, Any]:
    """``event`` (JSON form, binaries base64) with its images shaped for the channel."""
    if media == "base64":
        return event
    out = {k: v for k, v in event.items() if k not in MEDIA_FIELDS}
    if media == "url":
        if not base_url:
            raise ValueError("media 'url' needs deliver.public_base_url (where `linewatch api` is reachable)")
        root = f"{base_url.rstrip('/')}/api/v1/events/{event['event_id']}"
        out["mask_url"] = f"{root}/mask.png"
        out["thumbnail_url"] = f"{root}/thumbnail.jpg"
    return out


def build_notification(sub_id: str, event: DefectEvent | dict[str, Any], media: Media, base_url: str | None,
                       coalesced: int = 0, test: bool = False) -> Notification:
    data = event.model_dump(mode="json") if isinstance(event, DefectEvent) else event
    parsed = event if isinstance(event, DefectEvent) else DefectEvent.model_validate(event)
    return Notification(subscription_id=sub_id, delivery_id=delivery_id(parsed), status=parsed.status,
                        coalesced=coalesced, test=test, event=event_media(data, media, base_url),
                        sent_at=time.time())
