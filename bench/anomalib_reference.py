"""anomalib's WinClipModel zero-shot fp32 throughput on this CPU, for bench/README.md.

Run with the reference venv (tests/reference/build_venv.sh), from the repository root:
    /tmp/linewatch-refvenv/bin/python bench/anomalib_reference.py [--batch-sizes 1 8] [--iters 3]

Same model as the parity fixtures (synthetic weights, fp32, eval); one warm-up forward per batch size, then
--iters timed forwards; torch's default thread count.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "reference"))
from make_fixtures import build_model, load_synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    model = build_model(load_synthetic())
    model.setup("ball screw")  # zero-shot: text prototypes only, k_shot == 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(f"{'anomalib WinClipModel fp32':<28}{'batch':>6}{'frames/s':>10}{'ms/frame':>10}")
    for bs in args.batch_sizes:
        x = torch.randn(bs, 3, 240, 240, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            model(x)
            start = time.perf_counter()
            for _ in range(args.iters):
                model(x)
        sec = (time.perf_counter() - start) / args.iters
        print(f"{'':<28}{bs:>6}{bs / sec:>10.3f}{1000 * sec / bs:>10.1f}")
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1) + 1:  # the benchmark alone keeps every core busy
        print(f"warning: 1-min load average {load:.1f} on {os.cpu_count()} cores: other work inflated these times")


if __name__ == "__main__":
    main()
