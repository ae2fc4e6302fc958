"""Image encode/decode helpers shared by capture, scoring and alerting."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import cv2
import numpy as np

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
# Start-of-frame markers carrying the image size: SOF0-3, 5-7, 9-11, 13-15 (not DHT C4, JPG C8, DAC CC).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# Markers without a length field: TEM, RST0-7, SOI.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8), 0xD8})
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9


class FrameDecodeError(ValueError):
    """A frame's bytes are not a decodable image."""


class ImageHeaderError(FrameDecodeError):
    """The encoded header (magic bytes, JPEG SOF, PNG IHDR) is missing, truncated or unknown."""


@dataclass(frozen=True)
class ImageInfo:
    """What the encoded header says, read without decoding a single pixel."""

    encoding: str  # "jpeg" | "png"
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def sniff_encoding(data: bytes) -> str | None:
    """"jpeg" or "png" from the magic bytes, else None (GIF, BMP, TIFF, WebP, garbage)."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    return None


def read_image_info(data: bytes) -> ImageInfo:
    """Encoding and real dimensions from the encoded header (PNG IHDR, JPEG SOF); no decoding.

    This is what the decoder will allocate for, so limits are checked on it before decoding: a
    frame's own metadata cannot be trusted to describe its bytes.
    """
    encoding = sniff_encoding(data)
    if encoding == "png":
        width, height = _png_size(data)
    elif encoding == "jpeg":
        width, height = _jpeg_size(data)
    else:
        raise ImageHeaderError(f"unknown image format (magic bytes {data[:8].hex()})")
    return ImageInfo(encoding, width, height)


def _png_size(data: bytes) -> tuple[int, int]:
    # The IHDR chunk must come first: 4-byte length 13, b"IHDR", width, height (big-endian).
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ImageHeaderError("PNG without an IHDR chunk")
    width, height = struct.unpack(">II", data[16:24])
    if width == 0 or height == 0:
        raise ImageHeaderError(f"PNG IHDR gives {width}x{height}")
    return width, height


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """Walk the marker segments up to the first scan; every SOF met must give the same size."""
    size: tuple[int, int] | None = None
    pos, n = 2, len(data)
    while pos < n:
        if data[pos] != 0xFF:
            raise ImageHeaderError(f"JPEG marker expected at byte {pos}")
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            break
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (_JPEG_SOS, _JPEG_EOI):
            break
        if pos + 2 > n:
            break
        (length,) = struct.unpack(">H", data[pos:pos + 2])
        if length < 2 or pos + length > n:
            raise ImageHeaderError(f"JPEG segment 0x{marker:02X} overruns the data")
        if marker in _JPEG_SOF:
            if length < 7:
                raise ImageHeaderError("JPEG SOF segment too short")
            height, width = struct.unpack(">HH", data[pos + 3:pos + 7])
            if width == 0 or height == 0:
                # Height 0 defers to a DNL marker after the scan: the size is unknown before decoding.
                raise ImageHeaderError(f"JPEG SOF gives {width}x{height}")
            if size is not None and size != (width, height):
                raise ImageHeaderError(f"JPEG has two frame headers: {size[0]}x{size[1]} and {width}x{height}")
            size = (width, height)
        pos += length
    if size is None:
        raise ImageHeaderError("JPEG without a frame header (SOF) before its first scan")
    return size


def fit_within(width: int, height: int, box: int) -> tuple[int, int]:
    """The size of (width, height) scaled down, aspect kept, to fit a box x box square."""
    if width <= box and height <= box:
        return width, height
    scale = box / max(width, height)
    return max(1, min(box, round(width * scale))), max(1, min(box, round(height * scale)))


def thumbnail_jpeg(image: np.ndarray, box: int = 256, quality: int = 80) -> bytes:
    """A JPEG of the image shrunk to fit box x box, so its size is bounded whatever the frame's shape."""
    h, w = image.shape[:2]
    tw, th = fit_within(w, h, box)
    if (tw, th) != (w, h):
        image = cv2.resize(image, (tw, th), interpolation=cv2.INTER_AREA)
    return encode_jpeg(image, quality=quality)


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
