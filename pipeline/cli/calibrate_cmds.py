"""`linewatch calibrate`: a class or camera threshold from normal frames (a folder, a recording, or live).

It scores with what the scorers use (the class's current reference set in Redis, else
engine.shots_dir), prints the spread of scores it saw, and says which threshold it replaces.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pipeline.cli import CommandError
from pipeline.config import load_settings


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def cmd_calibrate(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError

    from pipeline.alerting.calibrate import score_spread, spread_line, threshold_from_scores
    from pipeline.camera_tuning import CameraTuningStore
    from pipeline.cli.engine_cmds import build_engine, check_images, engine_settings
    from pipeline.engine.engine import list_images
    from pipeline.imaging import decode_image, read_image
    from pipeline.redis_store import ThresholdStore, connect
    from pipeline.references.collect import frames_from_recording, frames_from_topic
    from pipeline.references.memory import install
    from pipeline.references.store import ReferenceStore

    settings = load_settings(args.config)
    engine_cfg = engine_settings(args, settings)
    sources = [s for s in (args.images, args.recording, args.frames) if s is not None]
    if len(sources) != 1:
        raise CommandError("give one source of normal frames: --images DIR, --recording PATH or "
                           "--camera ID --frames N (live)")
    camera_cfg = next((c for c in settings.cameras if c.id == args.camera), None) if args.camera else None
    product_class = args.product_class or (camera_cfg.product_class if camera_cfg else None)
    if product_class is None:
        raise CommandError("say --class NAME (or --camera of a configured camera)")
    if args.frames is not None and args.camera is None:
        raise CommandError("--frames reads live frames of one camera: give --camera ID")
    if settings.redis.url is None:
        raise CommandError("calibrate needs a Redis URL (LINEWATCH_REDIS__URL)")
    paths: list[Path] = []
    if args.images is not None:
        folder = Path(args.images)
        if not folder.is_dir():
            raise CommandError(f"not a folder: {folder}")
        paths = list_images(folder)
        if not paths:
            raise CommandError(f"no images in {folder}")
        check_images(paths)
        where = str(folder)
    client = connect(settings.redis)
    try:
        client.ping()  # an unreachable Redis should fail before minutes of scoring, not after
    except RedisError as exc:
        raise CommandError(f"cannot reach Redis at {settings.redis.url}: {exc}") from None
    if args.recording is not None:
        blobs = frames_from_recording(Path(args.recording), args.camera, args.max_frames)
        where = f"recording {args.recording}"
    elif args.frames is not None:
        if settings.kafka.bootstrap_servers is None:
            raise CommandError("live frames come from the frames topic: set kafka.bootstrap_servers")
        blobs = frames_from_topic(settings.kafka, args.camera, args.frames, timeout_s=args.timeout,
                                  say=lambda s: sys.stderr.write(s + "\n"))
        where = f"{args.frames} live frames of {args.camera}"
    engine = build_engine(engine_cfg, settings)
    refs = ReferenceStore(client, settings.redis.key_prefix)
    current = refs.current(product_class)
    if current is not None:
        install(engine, refs, current, settings.references.max_patches)
        reference = current.tag
    elif engine_cfg.shots_dir is not None:
        engine.load_references(product_class, engine_cfg.shots_dir, engine_cfg.k_shot)
        reference = str(engine_cfg.shots_dir)
    else:
        reference = "none (zero-shot)"
    scores: list[float] = []
    batch = args.batch_size
    if paths:
        for i in range(0, len(paths), batch):
            scores += [r.image_score for r in engine.score([read_image(str(p)) for p in paths[i:i + batch]],
                                                           product_class)]
    else:
        for i in range(0, len(blobs), batch):
            scores += [r.image_score for r in engine.score([decode_image(b) for b in blobs[i:i + batch]],
                                                           product_class)]
    threshold = threshold_from_scores(scores, args.quantile, args.margin)
    spread = score_spread(scores)
    meta: dict[str, Any] = {"quantile": args.quantile, "margin": args.margin, "n_images": len(scores),
                            "images": where, "method": engine.method, "backbone": engine_cfg.backbone,
                            "pretrained": engine_cfg.pretrained, "precision": engine.precision.name,
                            "k_shot": engine.k_shot(product_class), "fingerprint": engine.fingerprint,
                            "references": reference, "spread": spread}
    classes = ThresholdStore(client, settings.redis.key_prefix)
    try:
        if args.camera is not None:
            tuning = CameraTuningStore(client, settings.redis.key_prefix)
            old = tuning.get(args.camera).threshold
            old_text = (f"camera {args.camera}'s threshold {old:.6f}" if old is not None else
                        f"camera {args.camera}'s configured threshold {camera_cfg.threshold:.6f}"
                        if camera_cfg is not None and camera_cfg.threshold is not None else
                        _class_text(classes, product_class, settings.alert.default_threshold) + " for this camera")
            tuning.update(args.camera, threshold=threshold, by="calibrate")
            target = f"camera {args.camera} ({product_class})"
        else:
            old_text = _class_text(classes, product_class, settings.alert.default_threshold)
            classes.set(product_class, threshold, meta)
            target = product_class
    except RedisError as exc:
        raise CommandError(f"could not store the threshold in Redis: {exc}") from None
    finally:
        client.close()
    _out(spread_line(spread))
    _out(f"{target}: threshold {threshold:.6f} from {len(scores)} normal images "
         f"(quantile {args.quantile}, margin {args.margin}; references {reference})")
    _out(f"replaces {old_text}")
    if ":random-" in engine.fingerprint:
        _out("calibrated on RANDOM WEIGHTS: the threshold means nothing")
    return 0


def _class_text(classes: Any, product_class: str, default: float) -> str:
    old = classes.get(product_class)
    if old is None:
        return f"the default threshold {default:.6f} (alert.default_threshold)"
    meta = classes.meta(product_class) or {}
    how = f"{meta.get('n_images', '?')} images from {meta.get('images', meta.get('source', '?'))}"
    return f"{product_class}'s threshold {old:.6f} ({how})"


def add_calibrate_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--camera", default=None, help="calibrate this camera's own threshold (and read its frames)")
    p.add_argument("--recording", default=None, help="normal frames from a recording (with --camera: its frames)")
    p.add_argument("--frames", type=int, default=None, help="N live frames of --camera from the frames topic")
    p.add_argument("--max-frames", type=int, default=None, help="thin a recording to at most this many frames")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for live frames")
