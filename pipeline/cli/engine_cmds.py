"""Engine commands: `score` (images, or the streaming worker without images), `eval`, `calibrate`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from pipeline.cli import CommandError
from pipeline.config import EngineSettings, Settings, load_settings


def add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=["winclip", "alfa"], default=None)
    p.add_argument("--backbone", default=None, help="open_clip model name (default ViT-B-16-plus-240)")
    p.add_argument("--pretrained", default=None, help="open_clip tag, checkpoint path, or 'random'")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16", "auto"], default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or auto")


def engine_settings(args: argparse.Namespace, settings: Settings) -> EngineSettings:
    """The config file's engine section with the flags that were given on top."""
    overrides = {k: getattr(args, k) for k in ("method", "backbone", "pretrained", "precision", "device")
                 if getattr(args, k, None) is not None}
    return settings.engine.model_copy(update=overrides)


def build_engine(args: argparse.Namespace, settings: Settings) -> object:
    from pipeline.engine.engine import AnomalyEngine

    return AnomalyEngine(engine_settings(args, settings), settings.llm)


def cmd_score(args: argparse.Namespace) -> int:
    if not args.images:
        from pipeline.cli.stream_cmds import run_score_worker

        return run_score_worker(args)
    if not args.product_class or not args.out:
        raise CommandError("scoring images needs --class NAME and --out FILE.npz")
    from pipeline.imaging import read_image

    paths = [Path(p) for p in args.images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CommandError(f"no such image: {', '.join(missing)}")
    images = [read_image(str(p)) for p in paths]  # an unreadable file fails before the model loads
    settings = load_settings(args.config)
    engine = build_engine(args, settings)
    if args.shots:
        engine.load_references(args.product_class, Path(args.shots), args.k_shot)
    results = []
    for i in range(0, len(images), args.batch_size):
        results.extend(engine.score(images[i : i + args.batch_size], args.product_class))
    arrays = {f"map_{i}": r.anomaly_map for i, r in enumerate(results)}
    np.savez_compressed(args.out, scores=np.array([r.image_score for r in results], dtype=np.float32),
                        paths=np.array([str(p) for p in paths]), **arrays)
    width = max(len(str(p)) for p in paths)
    sys.stdout.write(f"{'image':<{width}}  score\n")
    for p, r in zip(paths, results, strict=True):
        sys.stdout.write(f"{p!s:<{width}}  {r.image_score:.4f}\n")
    sys.stdout.write(f"wrote {args.out} ({engine.method}, {engine.precision.name}, {engine.fingerprint})\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.evaluation.mvtec import load_category
    from pipeline.evaluation.runner import evaluate

    category = load_category(Path(args.dataset_root), args.category)
    settings = load_settings(args.config)
    engine = build_engine(args, settings)
    if args.k_shot:
        refs = Path(args.shots) if args.shots else None
        if refs is not None:
            engine.load_references(args.category, refs, args.k_shot)
        else:
            if len(category.train_good) < args.k_shot:
                raise CommandError(f"--k-shot {args.k_shot} needs that many images in {category.root}/train/good")
            from pipeline.imaging import read_image

            engine.set_references(args.category, [read_image(str(p)) for p in category.train_good[: args.k_shot]])
    metrics = evaluate(engine, category.test, args.category, Path(args.out), batch_size=args.batch_size)
    sys.stdout.write(f"{'metric':<20}value\n")
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "pixel_f1_max", "n_images", "seconds_per_image"):
        value = metrics[key]
        sys.stdout.write(f"{key:<20}{value:.4f}\n" if isinstance(value, float) else f"{key:<20}{value}\n")
    sys.stdout.write(f"wrote {Path(args.out) / 'metrics.json'} and overlays\n")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from pipeline.alerting.calibrate import threshold_from_scores
    from pipeline.engine.engine import list_images
    from pipeline.imaging import read_image
    from pipeline.redis_store import ThresholdStore, connect

    settings = load_settings(args.config)
    if settings.redis.url is None:
        raise CommandError("calibrate needs a Redis URL (LINEWATCH_REDIS__URL)")
    folder = Path(args.images)
    if not folder.is_dir():
        raise CommandError(f"not a folder: {folder}")
    paths = list_images(folder)
    if not paths:
        raise CommandError(f"no images in {folder}")
    images = [read_image(str(p)) for p in paths]
    engine = build_engine(args, settings)
    scores = [r.image_score for i in range(0, len(images), 8)
              for r in engine.score(images[i : i + 8], args.product_class)]
    threshold = threshold_from_scores(scores, args.quantile, args.margin)
    store = ThresholdStore(connect(settings.redis), settings.redis.key_prefix)
    store.set(args.product_class, threshold, {"quantile": args.quantile, "margin": args.margin, "n_images": len(paths),
                                              "method": engine.method, "fingerprint": engine.fingerprint})
    sys.stdout.write(f"{args.product_class}: threshold {threshold:.6f} from {len(paths)} normal images "
                     f"(quantile {args.quantile}, margin {args.margin})\n")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score images to an .npz file; without images, run the scoring worker")
    p.add_argument("images", nargs="*", metavar="IMAGE")
    p.add_argument("--class", dest="product_class", default=None, help="product class, e.g. ball_screw")
    p.add_argument("--shots", default=None, help="folder of normal reference images (few-shot)")
    p.add_argument("--k-shot", type=int, default=0, help="use the first K references (0: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default=None, help="output .npz")
    add_engine_options(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("eval", help="evaluate on an MVTec AD style dataset")
    p.add_argument("dataset_root")
    p.add_argument("--category", required=True)
    p.add_argument("--k-shot", type=int, default=0)
    p.add_argument("--shots", default=None, help="reference folder (default: the category's train/good)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", required=True)
    add_engine_options(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("calibrate", help="set a class threshold from normal images (stored in Redis)")
    p.add_argument("--class", dest="product_class", required=True)
    p.add_argument("--images", required=True)
    p.add_argument("--quantile", type=float, default=0.99)
    p.add_argument("--margin", type=float, default=0.0)
    add_engine_options(p)
    p.set_defaults(func=cmd_calibrate)
