"""Binary fields: raw bytes in Python, base64 text in JSON."""

from __future__ import annotations

import base64
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer


def _from_json(value: Any) -> Any:
    # JSON carries base64 text; Python callers pass the raw bytes themselves.
    if isinstance(value, str):
        return base64.b64decode(value.encode("ascii"), validate=True)
    return value


Binary = Annotated[
    bytes,
    BeforeValidator(_from_json),
    PlainSerializer(lambda b: base64.b64encode(b).decode("ascii"), return_type=str, when_used="json"),
]
