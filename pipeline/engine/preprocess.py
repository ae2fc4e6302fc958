"""Camera frames -> normalised model input."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF


def to_rgb(frame: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 -> (H, W, 3) uint8."""
    if frame.ndim == 2:
        frame = frame[:, :, None]
    if frame.ndim != 3 or frame.shape[2] not in (1, 3, 4):
        raise ValueError(f"unsupported frame shape {frame.shape}; expected HxW, HxWx1, HxWx3 or HxWx4")
    if frame.dtype != np.uint8:
        raise ValueError(f"unsupported frame dtype {frame.dtype}; expected uint8")
    if frame.shape[2] == 1:
        frame = np.repeat(frame, 3, axis=2)
    return frame[:, :, :3]


def preprocess(frames: Sequence[np.ndarray], size: tuple[int, int], mean: Sequence[float],
               std: Sequence[float]) -> torch.Tensor:
    """Squash-resize (bicubic, antialiased, like the reference) and normalise -> (B, 3, h, w) fp32.

    The whole frame is kept (no centre crop): a defect at the border must stay visible.
    """
    out = []
    for frame in frames:
        t = torch.from_numpy(np.ascontiguousarray(to_rgb(frame))).permute(2, 0, 1)
        t = TF.resize(t, list(size), interpolation=InterpolationMode.BICUBIC, antialias=True)
        out.append(t)
    batch = torch.stack(out).float().div_(255.0)
    return TF.normalize(batch, list(mean), list(std))
