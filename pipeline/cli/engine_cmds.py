"""Engine commands: `score` (images, or the streaming worker without images), `eval`, `calibrate`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError

from pipeline.cli import CommandError
from pipeline.config import EngineSettings, Settings, load_settings

if TYPE_CHECKING:
    from pipeline.engine.engine import AnomalyEngine

# Flag name -> EngineSettings field; a flag overrides the configuration only when given.
ENGINE_FLAGS = {"method": "method", "backbone": "backbone", "pretrained": "pretrained", "precision": "precision",
                "device": "device", "shots": "shots_dir", "k_shot": "k_shot", "projections": "projections"}


def add_engine_options(p: argparse.ArgumentParser, references: bool = True) -> None:
    # No argparse `choices`: a bad value should be one error line like every other user error.
    p.add_argument("--method", default=None, help="winclip, alfa or aprilgan")
    p.add_argument("--backbone", default=None, help="open_clip model name (default ViT-B-16-plus-240)")
    p.add_argument("--pretrained", default=None, help="open_clip tag, checkpoint path, or 'random'")
    p.add_argument("--precision", default=None, help="fp32, bf16, fp16 or auto")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--projections", default=None, help="AprilGAN projections checkpoint (linewatch train aprilgan)")
    if references:
        p.add_argument("--shots", default=None, help="folder of normal reference images (<dir>/<class>/ or <dir>/)")
        p.add_argument("--k-shot", type=int, default=None, help="use the first K sorted references (0: all)")


def engine_settings(args: argparse.Namespace, settings: Settings) -> EngineSettings:
    """The configuration's engine section with the given flags on top, validated (one-line errors)."""
    overrides = {field: getattr(args, flag) for flag, field in ENGINE_FLAGS.items()
                 if getattr(args, flag, None) is not None}
    try:
        return EngineSettings.model_validate({**settings.engine.model_dump(), **overrides})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        flag = next((f for f, v in ENGINE_FLAGS.items() if v == field), field).replace("_", "-")
        raise CommandError(f"invalid --{flag} {err.get('input')!r}: {err['msg']}") from None


def build_engine(engine: EngineSettings, settings: Settings) -> AnomalyEngine:
    from pipeline.engine.engine import AnomalyEngine

    return AnomalyEngine(engine, settings.llm)


def check_images(paths: Sequence[Path]) -> None:
    """Fail before the model loads: every path must exist and look like an image (header check only)."""
    import cv2

    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"no such image: {p}")
        if not cv2.haveImageReader(str(p)):
            raise CommandError(f"{p}: not a readable image")


def score_paths(engine: AnomalyEngine, paths: Sequence[Path], product_class: str,
                batch_size: int) -> Iterator[tuple[Path, Any]]:
    """(path, FrameScore) per image, decoding one batch at a time so memory stays bounded."""
    from pipeline.imaging import read_image

    for i in range(0, len(paths), batch_size):
        chunk = paths[i : i + batch_size]
        yield from zip(chunk, engine.score([read_image(str(p)) for p in chunk], product_class), strict=True)


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


# -- score -----------------------------------------------------------------------------------

def _run_worker(args: argparse.Namespace) -> int:
    from pipeline.cli.stream_cmds import run_score_worker

    if args.out or args.product_class:
        raise CommandError("--class and --out apply to image scoring; without images `score` runs the "
                           "streaming worker, which takes classes from the frames")
    engine_settings(args, load_settings(args.config))  # bad flags fail here in one line, not in the worker
    # The worker reads its settings afresh; flags travel as LINEWATCH_ENGINE__* variables, which
    # outrank the config file just as flags should.
    for flag, field in ENGINE_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            os.environ[f"LINEWATCH_ENGINE__{field.upper()}"] = str(value)
    return run_score_worker(args)


def cmd_score(args: argparse.Namespace) -> int:
    if not args.images:
        return _run_worker(args)
    if not args.product_class or not args.out:
        raise CommandError("scoring images needs --class NAME and --out FILE.npz")
    settings = load_settings(args.config)
    engine_cfg = engine_settings(args, settings)
    paths = [Path(p) for p in args.images]
    check_images(paths)
    engine = build_engine(engine_cfg, settings)
    if engine_cfg.shots_dir is not None:
        engine.load_references(args.product_class, engine_cfg.shots_dir, engine_cfg.k_shot)
    results = [r for _, r in score_paths(engine, paths, args.product_class, args.batch_size)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    maps = {f"map_{i}": r.frame_map().astype(np.float32) for i, r in enumerate(results)}
    with out.open("wb") as fh:  # a file object: numpy would append ".npz" to a path without it
        np.savez_compressed(fh, scores=np.array([r.image_score for r in results], dtype=np.float32),
                            paths=np.array([str(p) for p in paths], dtype=str), **maps)
    width = max(len("image"), *(len(str(p)) for p in paths))
    sys.stdout.write(f"{'image':<{width}}  score\n")
    for p, r in zip(paths, results, strict=True):
        sys.stdout.write(f"{p!s:<{width}}  {r.image_score:.4f}\n")
    sys.stdout.write(f"wrote {out} ({engine.method}, {engine.precision.name}, {engine.fingerprint})\n")
    return 0


# -- eval ------------------------------------------------------------------------------------

def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.evaluation.mvtec import load_category
    from pipeline.evaluation.runner import evaluate
    from pipeline.imaging import read_image

    if args.k_shot < 0:
        raise CommandError(f"--k-shot must be >= 0, got {args.k_shot}")
    category = load_category(Path(args.dataset_root), args.category)
    shots = Path(args.shots) if args.shots else None
    if shots is None and len(category.train_good) < args.k_shot:
        raise CommandError(f"--k-shot {args.k_shot} needs that many images in {category.root / 'train' / 'good'} "
                           f"(found {len(category.train_good)})")
    settings = load_settings(args.config)
    # References come from --shots or the dataset's train/good, never from a configured shots folder:
    # an evaluation must say what it was given.
    engine_cfg = engine_settings(args, settings).model_copy(update={"shots_dir": shots, "k_shot": args.k_shot})
    refs = category.train_good[: args.k_shot] if args.k_shot and shots is None else []
    check_images([it.path for it in category.test] + refs)
    engine = build_engine(engine_cfg, settings)
    if shots is not None:  # as for `score`: --k-shot 0 with a folder takes all of it
        engine.load_references(args.category, shots, args.k_shot)
    elif refs:
        engine.set_references(args.category, [read_image(str(p)) for p in refs])
    metrics = evaluate(engine, category.test, args.category, Path(args.out), batch_size=args.batch_size)
    sys.stdout.write(f"{'metric':<20}value\n")
    for key in ("image_auroc", "f1_max", "pixel_auroc", "pixel_f1_max", "aupro", "n_images", "k_shot",
                "seconds_per_image"):
        value = metrics[key]
        sys.stdout.write(f"{key:<20}{value:.4f}\n" if isinstance(value, float) else f"{key:<20}{value}\n")
    if metrics.get("warning"):
        sys.stdout.write(f"WARNING: {metrics['warning']}\n")
    sys.stdout.write(f"wrote {Path(args.out) / 'metrics.json'} and {metrics['n_overlays']} overlays (a sample of "
                     f"{metrics['n_images']} images, normal and anomalous) in {Path(args.out) / 'overlays'}/\n")
    return 0


# -- calibrate -------------------------------------------------------------------------------

def cmd_calibrate(args: argparse.Namespace) -> int:
    from pipeline.cli.calibrate_cmds import cmd_calibrate as calibrate

    return calibrate(args)


def register(sub: argparse._SubParsersAction) -> None:
    from pipeline.cli.calibrate_cmds import add_calibrate_options

    p = sub.add_parser("score", help="score images to an .npz file; without images, run the scoring worker")
    p.add_argument("images", nargs="*", metavar="IMAGE")
    p.add_argument("--class", dest="product_class", default=None, help="product class, e.g. ball_screw")
    p.add_argument("--out", default=None, help="output .npz: scores (N,), paths (N,), map_0..map_{N-1} (H, W)")
    p.add_argument("--batch-size", type=_positive, default=8)
    add_engine_options(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("eval", help="evaluate on one category of an MVTec AD style dataset")
    p.add_argument("dataset_root", help="DATASET (holding <category>/) or the category folder itself")
    p.add_argument("--category", required=True)
    p.add_argument("--k-shot", type=int, default=0,
                   help="few-shot: first K sorted train/good images (or of --shots; 0 there: all); 0: zero-shot")
    p.add_argument("--shots", default=None, help="reference folder instead of train/good (<dir>/<category>/ or <dir>/)")
    p.add_argument("--batch-size", type=_positive, default=4)
    p.add_argument("--out", required=True, help="folder for metrics.json and overlays/")
    add_engine_options(p, references=False)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("calibrate", help="set a class (or camera) threshold from normal frames (stored in Redis)")
    p.add_argument("--class", dest="product_class", default=None)
    p.add_argument("--images", default=None, help="folder of known-good images")
    add_calibrate_options(p)
    p.add_argument("--quantile", type=float, default=0.99)
    p.add_argument("--margin", type=float, default=0.0)
    p.add_argument("--batch-size", type=_positive, default=8)
    add_engine_options(p)
    p.set_defaults(func=cmd_calibrate)
