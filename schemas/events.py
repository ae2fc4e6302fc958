"""Defect events produced by the alert stage."""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.binary import Binary
from schemas.scores import FrameSource, Provenance


class Region(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    x: int = Field(ge=0)
    y: int = Field(ge=0)
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    area: int = Field(gt=0, description="pixels of the connected region")


class DefectEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    event_id: str
    status: Literal["open", "closed"]
    camera_id: str
    line_id: str
    product_class: str
    first_seq: int
    last_seq: int
    first_ts: float
    last_ts: float
    peak_seq: int
    peak_score: float
    threshold: float
    n_frames: int = Field(ge=1)
    width: int
    height: int
    regions: list[Region]
    mask_png: Binary
    thumbnail_jpeg: Binary
    replay_session: str | None = None
    # Where the peak frame lies in the frames topic (while retained) and what scored it.
    peak_source: FrameSource | None = None
    provenance: Provenance | None = None
    # The peak frame's anomaly map (uint8 PNG at scoring.map_size; min/max restore the scale),
    # for heat views at any resolution.
    peak_map_png: Binary | None = None
    peak_map_min: float | None = None
    peak_map_max: float | None = None

    @staticmethod
    def make_id(camera_id: str, first_seq: int, replay_session: str | None = None) -> str:
        """Deterministic id: a redelivered score can never open a second event."""
        raw = f"{camera_id}:{replay_session or 'live'}:{first_seq}".encode()
        return hashlib.sha256(raw).hexdigest()[:24]
