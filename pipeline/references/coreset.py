"""Greedy coreset subsampling (k-center, as PatchCore does) so a memory bank has a bounded size."""

from __future__ import annotations

import numpy as np

PROJECTION_DIM = 128  # distances on a random projection: same choice of centres, a fraction of the cost


def greedy_coreset(features: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Indices of ``size`` rows of ``features`` (N, D) that cover the rest (minimax distance).

    Rows are L2-normalised first (the memories are compared by cosine). Starts at row 0 so the
    result is deterministic; each step adds the row farthest from everything chosen so far.
    Returns all indices when N <= size.
    """
    n = features.shape[0]
    if size <= 0:
        raise ValueError(f"coreset size must be positive, got {size}")
    if n <= size:
        return np.arange(n)
    x = features.astype(np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if x.shape[1] > PROJECTION_DIM:
        rng = np.random.default_rng(seed)
        proj = rng.standard_normal((x.shape[1], PROJECTION_DIM)).astype(np.float32) / np.sqrt(PROJECTION_DIM)
        x = x @ proj
    x = np.ascontiguousarray(x)
    sq = np.einsum("ij,ij->i", x, x)
    chosen = np.empty(size, dtype=np.int64)
    chosen[0] = 0
    # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b: one matrix-vector product per step, no (N, D) temporaries.
    dist = sq + sq[0] - 2.0 * (x @ x[0])
    for i in range(1, size):
        nxt = int(np.argmax(dist))
        chosen[i] = nxt
        np.minimum(dist, sq + sq[nxt] - 2.0 * (x @ x[nxt]), out=dist)
    return np.sort(chosen)


def subsample_memory(arrays: dict[str, np.ndarray], max_rows: int) -> dict[str, np.ndarray]:
    """Each bank (patches, each window scale) cut to at most ``max_rows`` rows by its own coreset."""
    return {name: a if a.shape[0] <= max_rows else a[greedy_coreset(a, max_rows)] for name, a in arrays.items()}
