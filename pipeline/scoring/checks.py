"""Checks on a frame record before any work is done with it, and the reject reason codes.

A rejected record goes to the DLQ with the reason ``"<code>: <detail>"``; codes are stable (they
label the DLQ metric and are what operators filter on), details are for people.
"""

from __future__ import annotations

import re

from pydantic import ValidationError

from pipeline.imaging import FrameDecodeError, ImageInfo, read_image_info
from schemas.frames import FrameHeader

# -- reason codes ----------------------------------------------------------------------------------
EMPTY = "empty"  # the record has no value
OVERSIZED = "oversized"  # too many bytes, or too many pixels (declared or in the encoded header)
BAD_HEADER = "bad_header"  # frame header missing or invalid (ids, class, session, seq, capture_ts)
UNKNOWN_CLASS = "unknown_class"  # product class not in ``scoring.classes``
FUTURE_CAPTURE_TS = "future_capture_ts"  # a live frame stamped ahead of the scorer's clock
UNKNOWN_FORMAT = "unknown_format"  # magic bytes are neither JPEG nor PNG
ENCODING_MISMATCH = "encoding_mismatch"  # magic bytes disagree with the declared encoding
BAD_IMAGE_HEADER = "bad_image_header"  # JPEG SOF / PNG IHDR missing, truncated or contradictory
DIMENSION_MISMATCH = "dimension_mismatch"  # the encoded size is not the declared size
UNDECODABLE = "undecodable"  # the decoder failed
SCORING_FAILED = "scoring_failed"  # the engine failed on this frame alone
CLASS_PREPARATION_FAILED = "class_preparation_failed"  # text embeddings/references of the class failed

REASON_CODES = (EMPTY, OVERSIZED, BAD_HEADER, UNKNOWN_CLASS, FUTURE_CAPTURE_TS, UNKNOWN_FORMAT,
                ENCODING_MISMATCH, BAD_IMAGE_HEADER, DIMENSION_MISMATCH, UNDECODABLE, SCORING_FAILED,
                CLASS_PREPARATION_FAILED)


class FrameCheckError(ValueError):
    """A record refused before work; ``reason`` is ``"<code>: <detail>"``."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.reason = f"{code}: {detail}"


def reason_code(reason: str) -> str:
    return reason.split(":", 1)[0].strip()


def parse_header(headers: list[tuple[str, bytes]] | None) -> FrameHeader:
    try:
        return FrameHeader.from_headers(headers)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "header"
        raise FrameCheckError(BAD_HEADER, f"{field}: {err['msg']}"[:300]) from None
    except ValueError as exc:
        raise FrameCheckError(BAD_HEADER, first_line(exc)) from None


def check_encoded(value: bytes, header: FrameHeader, max_pixels: int) -> ImageInfo:
    """Magic bytes, real dimensions and pixel limit from the encoded header, before decoding."""
    try:
        info = read_image_info(value)
    except FrameDecodeError as exc:
        code = UNKNOWN_FORMAT if str(exc).startswith("unknown image format") else BAD_IMAGE_HEADER
        raise FrameCheckError(code, first_line(exc)) from None
    if info.encoding != header.encoding:
        raise FrameCheckError(ENCODING_MISMATCH, f"declared {header.encoding}, bytes are {info.encoding}")
    if info.pixels > max_pixels:
        raise FrameCheckError(OVERSIZED, f"encoded {info.width}x{info.height} pixels > {max_pixels}")
    if (info.width, info.height) != (header.width, header.height):
        raise FrameCheckError(DIMENSION_MISMATCH, f"header {header.width}x{header.height}, "
                                                f"encoded {info.width}x{info.height}")
    return info


def first_line(exc: BaseException) -> str:
    text = re.sub(r"\s+", " ", str(exc).strip().splitlines()[0]) if str(exc).strip() else type(exc).__name__
    return text[:300]
