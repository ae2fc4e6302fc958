"""Small pure tensor functions shared by WinCLIP and ALFA.

Shapes use B (batch), P (patches), W (windows), K (reference items), D (embedding dim).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch.nn import functional as F


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``a`` with every row of ``b``.

    a: (..., N, D), b: (M, D) -> (..., N, M).
    """
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(-2, -1)


def two_class_score(embeddings: torch.Tensor, normal: torch.Tensor, anomalous: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """Softmax probability of the anomalous prototype (WinCLIP Eq. 1).

    embeddings: (..., D); normal, anomalous: (D,) or broadcastable (..., D) -> (...).
    """
    emb = F.normalize(embeddings, dim=-1)
    sim_n = (emb * F.normalize(normal, dim=-1)).sum(-1)
    sim_a = (emb * F.normalize(anomalous, dim=-1)).sum(-1)
    return torch.stack((sim_n, sim_a), dim=-1).div(temperature).softmax(dim=-1)[..., 1]


def window_masks(grid: tuple[int, int], kernel: int, stride: int = 1) -> torch.Tensor:
    """Patch indices (row-major) of every k x k window sliding over the grid.

    Returns (k*k, W) int64; column w lists the patches of window w.
    """
    height, width = grid
    if kernel > height or kernel > width:
        raise ValueError(f"window size {kernel} exceeds the patch grid {grid}")
    index = torch.arange(height * width, dtype=torch.float32).reshape(1, 1, height, width)
    return F.unfold(index, kernel_size=kernel, stride=stride)[0].long()


def coverage_matrix(masks: torch.Tensor, n_patches: int) -> torch.Tensor:
    """(k*k, W) window masks -> (W, P) float matrix, 1 where window w covers patch p."""
    n_windows = masks.shape[1]
    cover = torch.zeros(n_windows, n_patches)
    cover.scatter_(1, masks.T, 1.0)
    return cover


def harmonic_aggregation(window_scores: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """Harmonic mean of the scores of the windows covering each patch.

    window_scores: (B, W), coverage: (W, P) -> (B, P); uncovered patches get 0.
    """
    count = coverage.sum(0)
    inv_sum = window_scores.reciprocal() @ coverage
    return (count / inv_sum).nan_to_num(nan=0.0, posinf=0.0)


def harmonic_fusion(maps: list[torch.Tensor]) -> torch.Tensor:
    """Element-wise harmonic mean of same-shaped maps."""
    return len(maps) / torch.stack(maps).reciprocal().sum(0)


def nearest_reference_distance(queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """WinCLIP+ visual association: min over the memory of (1 - cos) / 2.

    queries: (B, N, D), memory: (M, D) -> (B, N) in [0, 1].
    """
    return (1.0 - cosine_matrix(queries, memory)).amin(dim=-1) / 2.0


def upsample_maps(grid_maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, H, W), bilinear with align_corners=False (as the reference)."""
    return F.interpolate(grid_maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def gaussian_kernel(sigma: float, radius: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float | tuple[float, float]) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, H, W) maps; sigma in pixels, or (sigma_y, sigma_x); 0 disables.

    Reflect padding, the kernel cut at 4 sigma (at most one pixel less than the map's side).
    """
    sigma_y, sigma_x = (sigma, sigma) if isinstance(sigma, int | float) else sigma
    out = maps.unsqueeze(1)
    if sigma_x > 0 and maps.shape[-1] > 1:
        r = min(max(1, round(4 * sigma_x)), maps.shape[-1] - 1)
        k = gaussian_kernel(sigma_x, r, maps.dtype, maps.device)
        out = F.conv2d(F.pad(out, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    if sigma_y > 0 and maps.shape[-2] > 1:
        r = min(max(1, round(4 * sigma_y)), maps.shape[-2] - 1)
        k = gaussian_kernel(sigma_y, r, maps.dtype, maps.device)
        out = F.conv2d(F.pad(out, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return out.squeeze(1)


@lru_cache(maxsize=128)
def resample_matrix(n_out: int, n_in: int, sigma: float, device: torch.device) -> torch.Tensor:
    """(n_out, n_in) fp32: linear resampling (align_corners=False, as `upsample_maps`) followed by
    `gaussian_blur` along the same axis, as one matrix (both are linear; built in fp64)."""
    eye = torch.eye(n_in, dtype=torch.float64)
    m = F.interpolate(eye[:, None, :], size=n_out, mode="linear", align_corners=False)[:, 0, :].T
    if sigma > 0:
        m = gaussian_blur(m[None], (sigma, 0.0))[0]
    return m.to(device=device, dtype=torch.float32)


def upsample_smooth(grid_maps: torch.Tensor, size: tuple[int, int], sigma: tuple[float, float] = (0.0, 0.0),
                    ) -> torch.Tensor:
    """(B, h, w) -> (B, H, W): `upsample_maps` then `gaussian_blur(sigma)`, as two small matmuls.

    The same numbers (to fp32 rounding) for a fraction of the work: a blur at 240 px with a 57-tap
    kernel costs ~6 MFLOP per map by convolution and ~0.4 MFLOP folded into the resampling.
    """
    (h, w), (sy, sx) = grid_maps.shape[-2:], sigma
    ay = resample_matrix(size[0], h, float(sy), grid_maps.device)
    ax = resample_matrix(size[1], w, float(sx), grid_maps.device)
    return ay @ grid_maps.float() @ ax.T
