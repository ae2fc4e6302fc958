"""Alert subscriptions: who wants which defect events, through which channel; and what they receive."""

from __future__ import annotations

import string
import time
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

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


class RetriedChannel(BaseModel):
    """What every channel that attempts a delivery itself (webhook, MQTT, OPC UA) shares: one
    attempt's deadline and the retries with exponential backoff (``delivery.attempts.RetryPolicy``)."""

    model_config = ConfigDict(extra="forbid")

    # Deadline of one whole attempt (connect, send, answer; for MQTT the PUBACK), not of each read.
    timeout_s: float = Field(default=5.0, gt=0)
    max_attempts: int = Field(default=5, ge=1, le=50)
    backoff_initial_s: float = Field(default=0.5, ge=0)
    backoff_max_s: float = Field(default=30.0, ge=0)


class WebhookChannel(RetriedChannel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["webhook"] = "webhook"
    url: str
    secret: str = Field(min_length=16, description="HMAC-SHA256 key for X-Linewatch-Signature")
    # How the mask and thumbnail travel: inline base64, links to the API, or left out.
    media: Literal["base64", "url", "none"] = "base64"


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


def _credentials_out_of_url(data: Any, field: str) -> Any:
    """Move ``user:password@`` out of a URL into ``username``/``password``, so they are never shown or logged."""
    if not isinstance(data, dict) or not isinstance(data.get(field), str):
        return data
    parts = urlsplit(data[field])
    if parts.username is None and parts.password is None:
        return data
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    try:
        if parts.port is not None:
            netloc += f":{parts.port}"
    except ValueError:
        return data  # a bad port: the field's own check says so
    out = {**data, field: urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))}
    out.setdefault("username", unquote(parts.username or "") or None)
    if parts.password is not None:
        out.setdefault("password", unquote(parts.password))
    return out


MQTT_TOPIC_FIELDS = frozenset({"line", "camera", "product_class", "status"})
# The retained state is per camera: its topic cannot depend on one event's class or status.
MQTT_STATE_FIELDS = frozenset({"line", "camera"})


def _template_fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def _check_topic(template: str, allowed: frozenset[str], what: str) -> str:
    try:
        fields = _template_fields(template)
    except ValueError as exc:
        raise ValueError(f"{what} {template!r} is not a valid template: {exc}") from None
    unknown = fields - allowed
    if unknown:
        raise ValueError(f"{what} {template!r} uses {sorted(unknown)}; allowed: {sorted(allowed)}")
    if not template or "#" in template or "+" in template or template.startswith("/"):
        raise ValueError(f"{what} {template!r} must be a topic name without wildcards or a leading '/'")
    return template


class MqttChannel(RetriedChannel):
    """Publish to an MQTT broker: one message per transition, plus a retained state per camera.

    ``url`` is ``mqtt://host:1883/<topic template>`` (``mqtts://`` for TLS, port 8883 by default);
    credentials given in the URL move to ``username``/``password`` so they are never shown.
    """

    model_config = ConfigDict(extra="forbid")

    type: Literal["mqtt"] = "mqtt"
    url: str
    username: str | None = None
    password: str | None = None
    # Default: linewatch-<subscription>-<random>, so two workers never take each other's session.
    client_id: str | None = Field(default=None, min_length=1, max_length=128)
    qos: Literal[0, 1, 2] = 1
    # Retained per-camera state ("ok"/"defect" with the open event id); default: <topic>/state
    # without the {status}/{product_class} levels.
    state_topic: str | None = None
    retain_state: bool = True
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    tls_insecure: bool = False
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    media: Literal["base64", "url", "none"] = "none"

    @model_validator(mode="before")
    @classmethod
    def _credentials_out_of_url(cls, data: Any) -> Any:
        return _credentials_out_of_url(data, "url")

    @model_validator(mode="after")
    def _check(self) -> MqttChannel:
        parts = urlsplit(self.url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"MQTT URL must be mqtt:// or mqtts://, got {self.url!r}")
        if not parts.hostname:
            raise ValueError(f"MQTT URL has no host: {self.url!r}")
        try:
            _ = parts.port
        except ValueError:
            raise ValueError(f"MQTT URL has a bad port: {self.url!r}") from None
        _check_topic(self.topic, MQTT_TOPIC_FIELDS, "MQTT topic")
        _check_topic(self.state_template, MQTT_STATE_FIELDS, "MQTT state topic")
        return self

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or (8883 if self.tls else 1883)

    @property
    def topic(self) -> str:
        """The event topic template: the URL's path without its leading '/'."""
        return unquote(urlsplit(self.url).path.lstrip("/"))

    @property
    def state_template(self) -> str:
        if self.state_topic:
            return self.state_topic
        levels = [lv for lv in self.topic.split("/") if not (_template_fields(lv) - MQTT_STATE_FIELDS)]
        return "/".join([*levels, "state"])


class OpcUaNodes(BaseModel):
    """Node ids (``ns=2;s=Line3.Press1.Reject``) written for one camera or line; any may be left out."""

    model_config = ConfigDict(extra="forbid")

    reject: str | None = None  # Boolean
    event_id: str | None = None  # String
    peak_score: str | None = None  # Float or Double
    count: str | None = None  # an integer type: events opened so far


class OpcUaChannel(RetriedChannel):
    """Write nodes on an OPC UA server per transition: reject signal, event id, peak score, count."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["opcua"] = "opcua"
    endpoint: str = Field(pattern=r"^opc\.tcp://")
    security: Literal["None", "Basic256Sha256_Sign", "Basic256Sha256_SignAndEncrypt"] = "None"
    # Client certificate (DER or PEM) and its private key (PEM), needed with Sign/SignAndEncrypt;
    # the server's certificate pins it (otherwise the one the endpoint presents is used).
    certificate: str | None = None
    private_key: str | None = None
    server_certificate: str | None = None
    username: str | None = None
    password: str | None = None
    # latch: reject true from open to close; pulse: true for pulse_ms after open, then false.
    reject_mode: Literal["latch", "pulse"] = "latch"
    pulse_ms: int = Field(default=500, ge=10, le=60_000)
    # Nodes per camera id; a camera not listed uses its line's nodes.
    cameras: dict[str, OpcUaNodes] = {}
    lines: dict[str, OpcUaNodes] = {}
    media: Literal["base64", "url", "none"] = "none"

    @model_validator(mode="before")
    @classmethod
    def _credentials_out_of_endpoint(cls, data: Any) -> Any:
        return _credentials_out_of_url(data, "endpoint")

    @model_validator(mode="after")
    def _check(self) -> OpcUaChannel:
        if not self.cameras and not self.lines:
            raise ValueError("OPC UA channel maps no nodes: give `cameras` or `lines`")
        if self.security != "None" and not (self.certificate and self.private_key):
            raise ValueError(f"OPC UA security {self.security} needs `certificate` and `private_key`")
        return self

    def nodes_for(self, camera_id: str, line_id: str) -> OpcUaNodes | None:
        return self.cameras.get(camera_id) or self.lines.get(line_id)


Channel = Annotated[WebhookChannel | KafkaChannel | RedisStreamChannel | MqttChannel | OpcUaChannel,
                    Field(discriminator="type")]
# Channels that carry the present state of a camera: closing messages matter as much as openings.
STATEFUL_CHANNELS = frozenset({"mqtt", "opcua"})


class Subscription(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=SUBSCRIPTION_ID_PATTERN)
    filters: SubscriptionFilter = SubscriptionFilter()
    channel: Channel
    # At most one message per camera per interval (event time); the rest are counted as coalesced.
    rate_limit_s: float | None = Field(default=None, gt=0)
    created_at: float = Field(default_factory=time.time)

    @model_validator(mode="before")
    @classmethod
    def _stateful_channels_get_closings(cls, data: Any) -> Any:
        """MQTT and OPC UA carry a camera's present state, so by default they get closings too."""
        if not isinstance(data, dict):
            return data
        channel = data.get("channel")
        ctype = channel.get("type") if isinstance(channel, dict) else getattr(channel, "type", None)
        filters = data.get("filters")
        if ctype in STATEFUL_CHANNELS and (filters is None or (isinstance(filters, dict)
                                                               and "statuses" not in filters)):
            return {**data, "filters": {**(filters or {}), "statuses": ["open", "closed"]}}
        return data

    def public(self) -> dict[str, Any]:
        """The subscription as shown to users: secrets and passwords are masked."""
        data = self.model_dump(mode="json")
        if data["channel"]["type"] == "webhook":
            data["channel"]["secret"] = "****"
        if data["channel"].get("password"):
            data["channel"]["password"] = "****"
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
