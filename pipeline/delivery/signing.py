"""Webhook signatures: ``X-Linewatch-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256>``.

The MAC covers ``"<t>.<body>"`` so a captured request cannot be replayed later with a new
timestamp; receivers check the MAC and that ``t`` is recent.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Linewatch-Signature"


class SignatureError(ValueError):
    """The signature header is absent, malformed, stale or wrong."""


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The header value for ``body``."""
    ts = int(time.time()) if timestamp is None else timestamp
    return f"t={ts},v1={_mac(secret, ts, body)}"


def verify(secret: str, header: str | None, body: bytes, tolerance_s: float = 300.0,
           now: float | None = None) -> int:
    """Check a header against the body; returns its timestamp or raises SignatureError."""
    if not header:
        raise SignatureError(f"missing {SIGNATURE_HEADER}")
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        ts = int(parts["t"])
        given = parts["v1"]
    except (ValueError, KeyError) as exc:
        raise SignatureError(f"malformed {SIGNATURE_HEADER}: {header!r}") from exc
    if not hmac.compare_digest(given, _mac(secret, ts, body)):
        raise SignatureError("signature does not match the body")
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_s:
        raise SignatureError(f"signature timestamp {ts} is outside the {tolerance_s:.0f} s tolerance")
    return ts
