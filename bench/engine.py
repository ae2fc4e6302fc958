"""Engine throughput: each method at batch sizes 1 and 8 beside the bare encode_image forward.

    python bench/engine.py [--backbone ViT-B-16-plus-240] [--pretrained random] [--iters 2]
                           [--methods winclip winclip-1shot alfa aprilgan aprilgan-1shot]

Prints frames/s, ms/frame, peak memory, the cost relative to one bare forward, and for the fast
(lower-precision) mode its deviation from exact fp32 (max image-score difference, Spearman
correlation of the maps). Random weights time the same matrix work as real ones.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

# bench/pipeline.py would shadow the package: put the repository root, not bench/, first on the path.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from pipeline.config import EngineSettings
from pipeline.engine.engine import AnomalyEngine
from pipeline.engine.weights import load_backbone
from pipeline.imaging import read_image

DATA = Path(os.environ.get("LINEWATCH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared/data/ball_screw"))


class PeakRSS:
    """Samples resident memory in a thread (torch's CPU allocations are invisible to tracemalloc)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.005)

    def __enter__(self) -> PeakRSS:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def mib(self) -> float:
        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
        return self.peak / 2**20


def timed(fn, iters: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def paired_ratio(bb, engine: AnomalyEngine, frames: list, pairs: int) -> tuple[float, float, float]:
    """Median, min and max over ``pairs`` of (engine.score time / bare forward time), run alternately.

    The bare forward gets the same frames preprocessed outside the timing, so the ratio includes
    the method's preprocessing and frame-size maps, as the main table does. Alternating pairs see
    the same machine load, which a shared VM's drift otherwise turns into noise of 2x.
    """
    x = engine._prepare(frames)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    ratios = []
    for _ in range(pairs):
        with torch.inference_mode():
            sync()
            start = time.perf_counter()
            bb.model.encode_image(x)
            sync()
            bare = time.perf_counter() - start
        start = time.perf_counter()
        engine.score(frames, "ball_screw")  # returns numpy maps: already synchronised
        ratios.append((time.perf_counter() - start) / bare)
    return float(np.median(ratios)), min(ratios), max(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="ViT-B-16-plus-240")
    parser.add_argument("--pretrained", default="random")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--device", default="auto")
    # "-1shot" adds one reference frame; aprilgan runs with stand-in projections (same cost as trained ones).
    parser.add_argument("--methods", nargs="+",
                        default=["winclip", "winclip-1shot", "alfa", "aprilgan", "aprilgan-1shot"])
    parser.add_argument("--tensor-level", action="store_true",
                        help="also time 240x240 tensors in and maps out, as bench/anomalib_reference.py does")
    parser.add_argument("--interleave", type=int, default=0, metavar="N",
                        help="also time N alternating (bare forward, engine.score) pairs per method at the largest "
                             "batch and report the median ratio: robust on a shared, noisy machine")
    parser.add_argument("--anomalib-fps", type=float, default=None,
                        help="anomalib WinClipModel fp32 frames/s on this machine (bench/anomalib_reference.py)")
    args = parser.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    bb, fp = load_backbone(args.backbone, args.pretrained, device)
    paths = sorted((DATA / "test" / "pitting").glob("*.jpg"))[:4] + sorted((DATA / "test" / "good").glob("*.jpg"))[:4]
    frames = [read_image(str(p)) for p in paths]
    refs = [read_image(str(p)) for p in sorted((DATA / "train" / "good").glob("*.jpg"))[:1]]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"device {device}{' ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}")
    print(f"backbone {args.backbone} ({args.pretrained}), input {bb.image_size}, frames {frames[0].shape}")
    print()
    header = f"{'mode':<28}{'batch':>6}{'frames/s':>10}{'ms/frame':>10}{'x bare':>8}{'peak MiB':>10}"
    print(header)
    print("-" * len(header))

    bare: dict[int, float] = {}
    for bs in args.batch_sizes:
        x = torch.randn(bs, 3, *bb.image_size, device=device)
        with PeakRSS() as mem, torch.inference_mode():
            sec = timed(lambda x=x: bb.model.encode_image(x), args.iters)
        bare[bs] = sec / bs
        print(f"{'bare encode_image fp32':<28}{bs:>6}{bs / sec:>10.2f}{1000 * sec / bs:>10.1f}{1.0:>8.2f}"
              f"{mem.mib():>10.0f}")

    results: dict[tuple[str, str, int], list] = {}
    interleaved: dict[tuple[str, str], tuple[float, float, float]] = {}
    for method in args.methods:
        base = method.split("-")[0]
        precisions = ["fp32", "auto"] if base == "winclip" else ["auto"]
        for precision in precisions:
            settings = EngineSettings(method=base, backbone=args.backbone, pretrained=args.pretrained,
                                      precision=precision, device=str(device))
            engine = AnomalyEngine(settings, backbone=bb, fingerprint=fp)
            if method.endswith("1shot"):
                engine.set_references("ball_screw", refs)
            engine.prepare("ball_screw")
            for bs in args.batch_sizes:
                batch = frames[:bs] if bs <= len(frames) else (frames * (bs // len(frames) + 1))[:bs]
                with PeakRSS() as mem:
                    sec = timed(lambda b=batch, e=engine: e.score(b, "ball_screw"), args.iters)
                results[(method, engine.precision.name, bs)] = engine.score(batch, "ball_screw")
                if args.interleave and bs == max(args.batch_sizes):
                    interleaved[(method, engine.precision.name)] = paired_ratio(bb, engine, batch, args.interleave)
                label = f"{method} {engine.precision.name}"
                print(f"{label:<28}{bs:>6}{bs / sec:>10.2f}{1000 * sec / bs:>10.1f}{sec / bs / bare[bs]:>8.2f}"
                      f"{mem.mib():>10.0f}")
                if args.tensor_level:
                    # Same input and output as bench/anomalib_reference.py: a 240x240 tensor in, 240x240 map out.
                    x = torch.randn(bs, 3, *bb.image_size, device=device)
                    sec = timed(lambda x=x, e=engine: e.score_tensor(x, "ball_screw"), args.iters)
                    label = f"  (tensor in/out) {engine.precision.name}"
                    print(f"{label:<28}{bs:>6}{bs / sec:>10.2f}{1000 * sec / bs:>10.1f}{sec / bs / bare[bs]:>8.2f}")
    print()
    for method in [m for m in args.methods if m.startswith("winclip")]:
        bs = max(args.batch_sizes)
        exact = results.get((method, "fp32", bs))
        fast = next((v for (m, p, b), v in results.items() if m == method and b == bs and p != "fp32"), None)
        if exact is None or fast is None:
            continue
        score_diff = max(abs(a.image_score - b.image_score) for a, b in zip(exact, fast, strict=True))
        rho = np.mean([spearmanr(a.anomaly_map.ravel(), b.anomaly_map.ravel())[0]
                       for a, b in zip(exact, fast, strict=True)])
        print(f"{method}: fast mode vs fp32 exact: max |image score diff| = {score_diff:.2e}, "
              f"map Spearman = {rho:.4f}")
    for (method, precision), (ratio, lo, hi) in interleaved.items():
        print(f"{method} {precision}: interleaved with bare forwards (batch {max(args.batch_sizes)}, "
              f"{args.interleave} pairs): median {ratio:.2f}x bare (pairs {lo:.2f}-{hi:.2f})")
    if args.anomalib_fps:
        print(f"anomalib WinClipModel fp32 reference: {args.anomalib_fps:.3f} frames/s")


if __name__ == "__main__":
    main()
