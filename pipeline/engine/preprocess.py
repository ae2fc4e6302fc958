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


Frame = np.ndarray | torch.Tensor  # numpy (H, W[, C]) uint8 on the host, or torch (3, H, W) uint8 on any device


def _as_chw(frame: Frame) -> torch.Tensor:
    if isinstance(frame, torch.Tensor):
        if frame.dtype != torch.uint8 or frame.ndim != 3 or frame.shape[0] != 3:
            raise ValueError(f"unsupported frame tensor {tuple(frame.shape)} {frame.dtype}; expected (3, H, W) uint8")
        return frame
    return torch.from_numpy(np.ascontiguousarray(to_rgb(frame))).permute(2, 0, 1)


def resize_frame(frame: Frame, size: tuple[int, int]) -> torch.Tensor:
    """Squash-resize (bicubic, antialiased, like the reference) -> (3, h, w) uint8 on the frame's device.

    The whole frame is kept (no centre crop): a defect at the border must stay visible.
    """
    return TF.resize(_as_chw(frame), list(size), interpolation=InterpolationMode.BICUBIC, antialias=True)


def normalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, h, w) uint8 -> normalised fp32 on the same device."""
    # In place on the fresh float copy: the same arithmetic without a second batch-size buffer.
    return TF.normalize(batch.float().div_(255.0), list(mean), list(std), inplace=True)


def preprocess(frames: Sequence[Frame], size: tuple[int, int], mean: Sequence[float],
               std: Sequence[float], device: torch.device | None = None) -> torch.Tensor:
    """Frames -> normalised (B, 3, h, w) fp32 model input on ``device`` (default: the host).

    Frames already on the device (GPU-decoded) are resized there. Host frames bound for CUDA are
    resized on the host and travel as uint8 (a quarter of the bytes of fp32) in one pinned buffer
    with a non-blocking copy, then are normalised on the device.
    """
    resized = [resize_frame(f, size) for f in frames]
    target = device or torch.device("cpu")
    away = [i for i, r in enumerate(resized) if r.device != target]
    if away:
        staged = torch.stack([resized[i] for i in away])
        if target.type == "cuda" and staged.device.type == "cpu":
            staged = staged.pin_memory().to(target, non_blocking=True)
        else:
            staged = staged.to(target)
        for j, i in enumerate(away):
            resized[i] = staged[j]
    return normalize(torch.stack(resized), mean, std)
