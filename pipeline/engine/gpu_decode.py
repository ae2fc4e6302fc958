"""JPEG decoding on an NVIDIA GPU (nvjpeg through torchvision), for the CUDA scoring path only.

A micro-batch of JPEG bytes is decoded in one batched call straight into device memory; the frames
are then resized and normalised there (pipeline.engine.preprocess), and the thumbnail is cut from
the same decoded frame on the device, so only the thumbnail's few kilobytes come back to the host.
The CPU path never comes here: `available(device)` is False for any non-CUDA device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

JPEG_MAGIC = b"\xff\xd8"


def available(device: torch.device) -> bool:
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:  # pragma: no cover - torchvision built without image support
        return False
    return True


def is_jpeg(data: bytes) -> bool:
    return data[:2] == JPEG_MAGIC


def decode_jpegs(datas: Sequence[bytes], device: torch.device) -> list[torch.Tensor]:
    """JPEG bytes -> [(3, H, W) uint8 on ``device``], one batched nvjpeg call.

    Raises RuntimeError if any frame does not decode (the caller retries frame by frame to find it).
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    if not available(device):
        raise RuntimeError(f"GPU JPEG decoding needs a CUDA device, not {device}")
    # Pinned host tensors: nvjpeg copies them to the device without a staging copy.
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8).pin_memory() for d in datas]
    out = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    return list(out) if isinstance(out, list | tuple) else [out]


def thumbnail_on_device(frame: torch.Tensor, width: int) -> np.ndarray:
    """(3, H, W) uint8 device frame -> (h, width, 3) uint8 host array (aspect kept; never enlarged)."""
    _, h, w = frame.shape
    if w > width:
        frame = TF.resize(frame, [max(1, round(h * width / w)), width],
                          interpolation=InterpolationMode.BILINEAR, antialias=True)
    return frame.permute(1, 2, 0).contiguous().cpu().numpy()
