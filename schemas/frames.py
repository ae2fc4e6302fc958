"""Frame metadata travelling in Kafka record headers beside the JPEG value.

Every field that later becomes part of a path, a Redis key, a metric label or a comparison is
bounded here, so a hostile header is refused before any work is done with it.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

SCHEMA_VERSION = 1
# One header carries the whole JSON-encoded FrameHeader; the value stays raw JPEG bytes.
FRAME_HEADER_KEY = "linewatch-frame"

# Ids become folder names, Redis key parts and URL segments: no separators, no leading dot (so
# never "." or ".."), bounded length.
CAMERA_ID_PATTERN = r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}$"
LINE_ID_PATTERN = r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}$"
# Class names become prompt text, cache keys and reference folder names (``shots_dir/<class>``):
# letters, digits, "_", "-" and inner spaces ("metal nut"); never a dot or a separator.
PRODUCT_CLASS_PATTERN = r"^[A-Za-z0-9](?:[A-Za-z0-9_\- ]{0,62}[A-Za-z0-9_\-])?$"
REPLAY_SESSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$"
# Sequence numbers fit a signed 64-bit integer (Redis, JSON consumers in other languages).
MAX_SEQ = 2**63 - 1
# Capture times outside [2000-01-01, 2200-01-01) are clock garbage, not frames.
MIN_CAPTURE_TS = 946_684_800.0
MAX_CAPTURE_TS = 7_258_118_400.0
MAX_FRAME_SIDE = 65_535  # JPEG's own limit; PNG's is larger but nothing real exceeds it


class FrameRef(BaseModel):
    """What downstream stages need to point back at a frame."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    camera_id: str = Field(pattern=CAMERA_ID_PATTERN)
    line_id: str = Field(pattern=LINE_ID_PATTERN)
    product_class: str = Field(pattern=PRODUCT_CLASS_PATTERN)
    seq: int = Field(ge=0, le=MAX_SEQ)
    capture_ts: float = Field(description="capture time, seconds since the epoch")
    width: int = Field(gt=0, le=MAX_FRAME_SIDE)
    height: int = Field(gt=0, le=MAX_FRAME_SIDE)
    replay_session: str | None = Field(default=None, pattern=REPLAY_SESSION_PATTERN)

    @field_validator("capture_ts")
    @classmethod
    def _plausible_time(cls, value: float) -> float:
        if not math.isfinite(value) or not MIN_CAPTURE_TS <= value < MAX_CAPTURE_TS:
            raise ValueError(f"capture_ts {value!r} is not a plausible epoch time "
                             f"(finite, {MIN_CAPTURE_TS:.0f} <= ts < {MAX_CAPTURE_TS:.0f})")
        return value


class FrameHeader(FrameRef):
    schema_version: Literal[1] = SCHEMA_VERSION
    encoding: Literal["jpeg", "png"] = "jpeg"

    def to_header(self) -> list[tuple[str, bytes]]:
        return [(FRAME_HEADER_KEY, self.model_dump_json().encode())]

    @classmethod
    def from_headers(cls, headers: list[tuple[str, bytes]] | None) -> FrameHeader:
        """Parse record headers; raises ValueError with a reason when absent or invalid."""
        for key, value in headers or []:
            if key == FRAME_HEADER_KEY:
                return cls.model_validate_json(value)
        raise ValueError(f"missing record header {FRAME_HEADER_KEY!r}")

    def ref(self) -> FrameRef:
        return FrameRef(**self.model_dump(include=set(FrameRef.model_fields)))
