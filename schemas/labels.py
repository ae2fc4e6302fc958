"""Operator labels on defect events: the feedback that teaches the few-shot memory."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

LabelValue = Literal["confirmed", "false_alarm"]


class Label(BaseModel):
    """One verdict on one event; a newer label on the same event replaces the older one."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    event_id: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,128}$")
    label: LabelValue
    note: str | None = Field(default=None, max_length=1000)
    by: str | None = Field(default=None, max_length=128, description="who said it (operator name or id)")
    labelled_ts: float = Field(default_factory=time.time)
    camera_id: str | None = None
    product_class: str | None = None
    # Set when a false alarm's peak frame joined the class's reference set ("<class>:v<N>").
    reference_version: str | None = None
    teach_error: str | None = None
