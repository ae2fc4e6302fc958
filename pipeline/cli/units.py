"""Parsing of human-friendly command-line quantities: durations (90s, 15m, 24h, 7d) and sizes (500M, 2G)."""

from __future__ import annotations

import re

_DURATION = {"": 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a number with an optional unit (ms, s, m, h, d)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", text.lower())
    if not match:
        raise ValueError(f"bad duration {text!r}: use a number with an optional unit, e.g. 30s, 15m, 24h, 7d")
    return float(match.group(1)) * _DURATION[match.group(2) or ""]


def parse_size(text: str) -> int:
    """Bytes in ``text``: a number with an optional binary unit (K, M, G, T; an optional trailing B)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not match:
        raise ValueError(f"bad size {text!r}: use a number with an optional unit, e.g. 500M, 2G")
    return int(float(match.group(1)) * _SIZE[match.group(2)])
