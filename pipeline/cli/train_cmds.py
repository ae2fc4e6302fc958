"""Training commands: `train aprilgan` fits AprilGAN's projections on MVTec-layout labelled folders."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.cli import CommandError
from pipeline.cli.engine_cmds import _positive, engine_settings
from pipeline.config import load_settings


def _positive_float(value: str) -> float:
    x = float(value)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return x


def cmd_train_aprilgan(args: argparse.Namespace) -> int:
    from pipeline.engine.aprilgan_train import TrainConfig, collect_items, save_projections, train_projections
    from pipeline.engine.engine import resolve_device
    from pipeline.engine.weights import load_backbone

    settings = load_settings(args.config)
    engine_cfg = engine_settings(args, settings)
    out = Path(args.out)
    if out.is_dir():
        raise CommandError(f"--out {out} is a folder; give a file name, e.g. {out / 'aprilgan.pt'}")
    items = collect_items(Path(args.data))
    classes = sorted({it.product_class for it in items})
    defects = sum(1 for it in items if it.mask is not None)
    if defects == 0:
        raise CommandError(f"{args.data}: no defect images with masks (only good images): nothing to learn")
    backbone, _ = load_backbone(engine_cfg.backbone, engine_cfg.pretrained, resolve_device(engine_cfg.device),
                                str(engine_cfg.cache_dir) if engine_cfg.cache_dir else None)
    sys.stderr.write(f"training AprilGAN projections for {engine_cfg.backbone} on {len(items)} images "
                     f"({defects} with defects) of {len(classes)} classes: {', '.join(classes)}\n")
    config = TrainConfig(epochs=args.epochs, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                         seed=args.seed, progress=not args.no_progress)
    result = train_projections(backbone, items, config)
    save_projections(result.projections, out, pretrained=engine_cfg.pretrained)
    losses = result.losses
    sys.stdout.write(f"wrote {out}: {len(result.projections.stages)} stages {list(result.projections.stages)}, "
                     f"{len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}\n")
    sys.stdout.write(f"use it with engine.projections: {out} (or --projections {out}) and --method aprilgan\n")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a method's learned parts (AprilGAN projections)")
    methods = p.add_subparsers(dest="train_method", required=True, metavar="METHOD")
    a = methods.add_parser("aprilgan", help="fit AprilGAN's per-stage projections (focal + dice, backbone frozen)")
    a.add_argument("--data", required=True,
                   help="MVTec-layout folder: DIR/test/<defect>/ + DIR/ground_truth/, or DIR/<class>/... for several")
    a.add_argument("--out", required=True, help="checkpoint file for engine.projections")
    a.add_argument("--epochs", type=_positive, default=3, help="passes over the data (default 3)")
    a.add_argument("--steps", type=_positive, default=None, help="optimiser steps instead of --epochs")
    a.add_argument("--lr", type=_positive_float, default=1e-3)
    a.add_argument("--batch-size", type=_positive, default=8)
    a.add_argument("--seed", type=int, default=111)
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    a.add_argument("--backbone", default=None, help="open_clip model name (default: engine.backbone)")
    a.add_argument("--pretrained", default=None, help="open_clip tag, checkpoint path, or 'random'")
    a.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or auto")
    a.set_defaults(func=cmd_train_aprilgan)
