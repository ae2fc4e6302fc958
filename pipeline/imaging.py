"""Image encode/decode helpers shared by capture, scoring and alerting."""

from __future__ import annotations

import cv2
import numpy as np


class FrameDecodeError(ValueError):
    """A frame's bytes are not a decodable image."""


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """RGB (H, W, 3) or gray (H, W) uint8 -> JPEG bytes."""
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def decode_image(data: bytes) -> np.ndarray:
    """JPEG/PNG bytes -> RGB uint8 (H, W, 3); gray sources are expanded to 3 channels."""
    if not data:
        raise FrameDecodeError("empty frame")
    arr = np.frombuffer(data, dtype=np.uint8)
    bgr = cv2.imdecode(arr, cv2.IMREAD_COLOR)
    if bgr is None:
        raise FrameDecodeError("undecodable image bytes")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# Scales libjpeg can decode to directly (in the DCT domain): 1/1, 1/2, 1/4, 1/8.
DECODE_SCALES = (1, 2, 4, 8)
_REDUCED_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                  8: cv2.IMREAD_REDUCED_COLOR_8}


def decode_scale(width: int, height: int, need_width: int, need_height: int) -> int:
    """The largest reduction (1, 2, 4 or 8) that still leaves at least need_width x need_height pixels."""
    best = 1
    for s in DECODE_SCALES:
        if -(-width // s) >= need_width and -(-height // s) >= need_height:
            best = s
    return best


def scaled_size(width: int, height: int, scale: int) -> tuple[int, int]:
    """(width, height) of a JPEG decoded at 1/scale (libjpeg rounds up)."""
    return -(-width // scale), -(-height // scale)


def decode_image_scaled(data: bytes, scale: int) -> np.ndarray:
    """JPEG/PNG bytes -> RGB uint8 at 1/scale of the stored size (scale 1, 2, 4 or 8).

    A JPEG is reduced while it is decoded (DCT scaling, ceil of the size: far cheaper than decoding
    at full size and resizing); other formats are decoded whole and reduced by area (floor). OpenCV
    releases the GIL meanwhile, so a thread pool decodes in parallel.
    """
    if scale not in _REDUCED_FLAGS:
        raise ValueError(f"decode scale {scale} not in {DECODE_SCALES}")
    if not data:
        raise FrameDecodeError("empty frame")
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), _REDUCED_FLAGS[scale])
    if bgr is None:
        raise FrameDecodeError("undecodable image bytes")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def read_image(path: str) -> np.ndarray:
    """Read an image file as RGB uint8; raises FrameDecodeError naming the file."""
    try:
        with open(path, "rb") as fh:
            return decode_image(fh.read())
    except FrameDecodeError as exc:
        raise FrameDecodeError(f"{path}: {exc}") from None


def encode_png(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def decode_png(data: bytes) -> np.ndarray:
    arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise FrameDecodeError("undecodable PNG")
    return arr


def quantize_map(anomaly_map: np.ndarray, size: int) -> tuple[bytes, float, float]:
    """Float map (H, W) -> (uint8 PNG at size x size, min, max) so it fits a small message."""
    small = cv2.resize(anomaly_map.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    lo, hi = float(small.min()), float(small.max())
    scale = (hi - lo) or 1.0
    q = np.clip(np.rint((small - lo) / scale * 255.0), 0, 255).astype(np.uint8)
    return encode_png(q), lo, hi


def dequantize_map(png: bytes, lo: float, hi: float, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Inverse of quantize_map; optionally resized (bilinear) to (height, width)."""
    q = decode_png(png).astype(np.float32)
    m = lo + q / 255.0 * ((hi - lo) or 0.0)
    if shape is not None and m.shape != shape:
        m = cv2.resize(m, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return m


def heat_overlay(image: np.ndarray, anomaly_map: np.ndarray, vmin: float = 0.0, vmax: float = 1.0,
                 alpha: float = 0.45) -> np.ndarray:
    """Blend a JET heat map over an RGB image; map is resized to the image."""
    h, w = image.shape[:2]
    m = cv2.resize(anomaly_map.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    norm = np.clip((m - vmin) / ((vmax - vmin) or 1.0), 0, 1)
    heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(image, 1 - alpha, heat, alpha, 0)
