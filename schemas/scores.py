"""Per-frame scores and dead letters."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from schemas.binary import Binary
from schemas.frames import FrameRef


class FrameSource(BaseModel):
    """Where the scored frame lies in Kafka, so a later step (a false alarm teaching) can fetch it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    topic: str
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)


class Provenance(BaseModel):
    """What produced a score, so a change in behaviour can be traced to a change in the model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str | None = None
    model_fingerprint: str | None = None
    prompt_version: str | None = None
    # "<class>:v<N>" of the reference set in Redis, "dir" for engine.shots_dir, None for zero-shot.
    reference_version: str | None = None


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
    # Added by the learning loop (issue 13); absent in older messages.
    source: FrameSource | None = None
    prompt_version: str | None = None
    reference_version: str | None = None


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
