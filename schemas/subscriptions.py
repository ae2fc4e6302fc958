"""Alert subscriptions: who wants which defect events, through which channel; and what they receive."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SUBSCRIPTION_ID_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"
EventStatus = Literal["open", "closed"]


class SubscriptionFilter(BaseModel):
    """Every non-empty criterion must hold; empty lists match anything."""

    model_config = ConfigDict(extra="forbid")

    lines: list[str] = []
    # Camera ids or shell-style globs ("press-*").
    cameras: list[str] = []
    product_classes: list[str] = []
    min_peak_score: float | None = None
    # Total pixels of the event's defect regions.
    min_area: int | None = Field(default=None, ge=0)
    # Which transitions produce a message; most subscribers only want new defects.
    statuses: list[EventStatus] = Field(default_factory=lambda: ["open"], min_length=1)


class WebhookChannel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["webhook"] = "webhook"
    url: str
    secret: str = Field(min_length=16, description="HMAC-SHA256 key for X-Linewatch-Signature")
    # How the mask and thumbnail travel: inline base64, links to the API, or left out.
    media: Literal["base64", "url", "none"] = "base64"
    timeout_s: float = Field(default=5.0, gt=0)
    max_attempts: int = Field(default=5, ge=1, le=50)
    backoff_initial_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=30.0, ge=0)


class KafkaChannel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["kafka"] = "kafka"
    topic: str = Field(pattern=r"^[A-Za-z0-9._\-]{1,249}$")
    media: Literal["base64", "url", "none"] = "base64"


class RedisStreamChannel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["redis_stream"] = "redis_stream"
    stream: str = Field(min_length=1, max_length=256)
    # Approximate cap on entries so an unread stream cannot fill Redis.
    maxlen: int | None = Field(default=10_000, ge=1)
    media: Literal["base64", "url", "none"] = "none"


Channel = Annotated[WebhookChannel | KafkaChannel | RedisStreamChannel, Field(discriminator="type")]


class Subscription(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=SUBSCRIPTION_ID_PATTERN)
    filters: SubscriptionFilter = SubscriptionFilter()
    channel: Channel
    # At most one message per camera per interval (event time); the rest are counted as coalesced.
    rate_limit_s: float | None = Field(default=None, gt=0)
    created_at: float = Field(default_factory=time.time)

    def public(self) -> dict[str, Any]:
        """The subscription as shown to users: the webhook secret is masked."""
        data = self.model_dump(mode="json")
        if data["channel"]["type"] == "webhook":
            data["channel"]["secret"] = "****"
        return data


class Notification(BaseModel):
    """What a subscriber receives (webhook body, Kafka value, Redis stream field)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    subscription_id: str
    delivery_id: str = Field(description="event id, plus ':closed' for a closing message")
    # camera_down / camera_up: a camera's health (pipeline.delivery.camera_status); ``event`` then
    # holds the schemas.cameras.CameraStatus fields.
    status: EventStatus | Literal["camera_down", "camera_up"]
    # Messages suppressed by the rate limit for this camera since the previous message.
    coalesced: int = Field(default=0, ge=0)
    test: bool = False
    event: dict[str, Any]
    sent_at: float = Field(default_factory=time.time)


class DeadDelivery(BaseModel):
    """A delivery that exhausted its attempts; kept until redriven or discarded."""

    model_config = ConfigDict(extra="forbid")

    subscription_id: str
    delivery_id: str
    attempts: int
    error: str
    failed_at: float
    # The defect event as JSON (binaries base64), so a redrive needs nothing else.
    event: dict[str, Any]
    coalesced: int = 0
