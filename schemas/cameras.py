"""Camera health messages: a camera going dark (``camera_down``) or delivering again (``camera_up``)."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.frames import CAMERA_ID_PATTERN

# The one place the topic is named: `<kafka.topic_prefix>.camera-status`.
CAMERA_STATUS_TOPIC = "camera-status"

CameraState = Literal["live", "reconnecting", "dark"]
CameraStatusKind = Literal["camera_down", "camera_up"]


class CameraStatus(BaseModel):
    """Published by the capture worker holding the camera when it crosses the dark limit or delivers
    again, or by the camera watchdog (`pipeline.cameras.watchdog`) when no capture worker holds it."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    status: CameraStatusKind
    camera_id: str = Field(pattern=CAMERA_ID_PATTERN, max_length=128)
    line_id: str
    product_class: str
    # camera_down: when the last frame came (or capture started, if none came); camera_up: the first new frame.
    since_ts: float
    last_frame_ts: float | None = None
    # How long the camera was dark (camera_up only).
    down_s: float | None = None
    dark_after_s: float
    reconnects: int = 0
    worker: str = ""
    # Why the camera is down, when it is not simply silent at its capture worker (the watchdog's
    # "no capture worker holds the camera"); None otherwise, and then left out of the JSON.
    reason: str | None = None
    ts: float = Field(default_factory=time.time)

    def to_json(self) -> str:
        """The message as sent and as kept in the down marker: without ``reason`` when it is None, so
        workers of the version before the field still read what this one writes."""
        return self.model_dump_json(exclude={"reason"} if self.reason is None else None)

    @property
    def status_id(self) -> str:
        """Idempotency key: the same transition published twice is delivered once."""
        return f"{self.camera_id}:{self.status}:{int(self.since_ts * 1000)}"
