"""Per-frame scores and dead letters."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from schemas.binary import Binary
from schemas.frames import FrameRef


class ScoreMessage(BaseModel):
    """One scored frame; keyed by camera id on the scores topic so a camera stays in order.

    The map is quantised to uint8 PNG at ``map_size``; ``map_min``/``map_max`` restore its scale.
    """

    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    frame: FrameRef
    image_score: float
    anomaly_map_png: Binary
    map_min: float
    map_max: float
    # A small JPEG of the frame so alerting can draw thumbnails without refetching frames.
    thumbnail_jpeg: Binary
    model_fingerprint: str
    method: str
    latency_ms: float = Field(ge=0, description="capture (replays: publication) to score, milliseconds")
    scored_ts: float


class DeadLetter(BaseModel):
    """Why a record was diverted; the original value rides along unchanged as the record value."""

    model_config = ConfigDict(extra="forbid")

    reason: str
    stage: str
    source_topic: str
    source_partition: int
    source_offset: int
    key: str | None = None
    ts: float
    # The record value rides along cut to the producer's limit when larger; these say what it was.
    original_size: int | None = None
    sha256: str | None = None
    truncated: bool = False
