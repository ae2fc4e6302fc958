"""Greedy coreset (references.max_patches) cost: `python -m bench.coreset [--rows 22500] [--dim 640] [--size 4096]`.

Random features of the shape `references collect` produces (ViT-B-16-plus-240: 225 patches of
640 dims per frame; 100 frames = 22,500 rows), subsampled to the configured bank size.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pipeline.references.coreset import greedy_coreset


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=22_500)
    p.add_argument("--dim", type=int, default=640)
    p.add_argument("--size", type=int, nargs="+", default=[1024, 4096])
    args = p.parse_args()
    x = np.random.default_rng(0).standard_normal((args.rows, args.dim)).astype(np.float32)
    for size in args.size:
        start = time.perf_counter()
        greedy_coreset(x, size)
        print(f"rows {args.rows} dim {args.dim} -> {size}: {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
