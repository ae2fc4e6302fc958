"""Hostile frame records from issue 9 ("What was found"), shared by the unit and the worker tests."""

from __future__ import annotations

import json
import struct
import time
from typing import Any

import numpy as np

from pipeline.imaging import encode_jpeg, encode_png
from schemas.frames import FRAME_HEADER_KEY

Headers = list[tuple[str, bytes]]


def header_fields(camera: str = "cam-1", seq: int = 0, width: int = 64, height: int = 48, **kw: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"camera_id": camera, "line_id": "line-1", "product_class": "ball_screw",
                              "seq": seq, "capture_ts": time.time(), "width": width, "height": height,
                              "schema_version": 1, "encoding": "jpeg"}
    fields.update(kw)
    return fields


def raw_header(**fields: Any) -> Headers:
    """A frame header as raw JSON, so values the model would refuse (NaN, 10**30) can be sent."""
    return [(FRAME_HEADER_KEY, json.dumps(header_fields(**fields)).encode())]


def small_image(width: int = 64, height: int = 48, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def jpeg_bomb(width: int, height: int, pad_bytes: int = 1_000_000) -> bytes:
    """A small JPEG whose frame header (SOF0) claims width x height, padded with comments to
    ``pad_bytes``: a decoder allocates the claimed size and fills what the scan lacks."""
    data = bytearray(encode_jpeg(small_image()))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    comment = b"\xff\xfe" + struct.pack(">H", 65_535) + bytes(65_533)
    pad = comment * max(0, pad_bytes // len(comment))
    return bytes(data[:2] + pad + data[2:])


def tall_png(width: int = 256, height: int = 65_000) -> bytes:
    """A valid, highly compressible frame far from square (its thumbnail must still be small)."""
    image = np.zeros((height, width, 3), np.uint8)
    image[::97, :, 1] = 200
    return encode_png(image[:, :, ::-1])  # encode_png takes BGR as OpenCV does
