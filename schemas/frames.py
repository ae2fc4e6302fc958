"""Frame metadata travelling in Kafka record headers beside the JPEG value."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
# One header carries the whole JSON-encoded FrameHeader; the value stays raw JPEG bytes.
FRAME_HEADER_KEY = "linewatch-frame"

CAMERA_ID_PATTERN = r"^[A-Za-z0-9_.\-]+$"


class FrameRef(BaseModel):
    """What downstream stages need to point back at a frame."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    camera_id: str = Field(pattern=CAMERA_ID_PATTERN, max_length=128)
    line_id: str = Field(max_length=128)
    product_class: str = Field(min_length=1, max_length=128)
    seq: int = Field(ge=0)
    capture_ts: float = Field(description="capture time, seconds since the epoch")
    width: int = Field(gt=0)
    height: int = Field(gt=0)
    replay_session: str | None = None


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
