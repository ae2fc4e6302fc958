"""`linewatch events label|list|export` and `linewatch references collect|list|show|remove|export`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.cli import CommandError
from pipeline.config import Settings, load_settings

if TYPE_CHECKING:
    import redis


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


@contextmanager
def _redis(settings: Settings) -> Iterator[redis.Redis]:
    from redis.exceptions import RedisError

    from pipeline.redis_store import connect

    if settings.redis.url is None:
        raise CommandError("this command needs Redis (redis.url / LINEWATCH_REDIS__URL)")
    client = connect(settings.redis)
    try:
        client.ping()
    except RedisError as exc:
        client.close()
        raise CommandError(f"cannot reach Redis at {settings.redis.url}: {exc}") from None
    try:
        yield client
    finally:
        client.close()


# -- events ---------------------------------------------------------------------------------------
def cmd_events_label(args: argparse.Namespace) -> int:
    from pipeline.labels import UnknownEventError, label_event

    if args.false_alarm == args.confirmed:
        raise CommandError("say --false-alarm or --confirmed")
    settings = load_settings(args.config)
    value = "false_alarm" if args.false_alarm else "confirmed"
    with _redis(settings) as client:
        try:
            result = label_event(settings, client, args.event_id, value, note=args.note, by=args.by,
                                 recording=Path(args.recording) if args.recording else None,
                                 teach_references=not args.no_teach)
        except UnknownEventError as exc:
            raise CommandError(str(exc.args[0])) from None
    label = result.label
    _out(f"{label.event_id}: {label.label}" + (f" by {label.by}" if label.by else ""))
    if label.reference_version:
        _out(f"peak frame joined the normal references of {label.product_class}: now {label.reference_version}")
    if label.teach_error:
        _out(f"not taught: {label.teach_error}")
    if not result.published:
        _out(f"label kept, but not published on the labels topic: {result.publish_error}")
    return 0 if not label.teach_error else 1


def _events(settings: Settings, client: redis.Redis, label: str | None, camera: str | None,
            product_class: str | None, session: str | None) -> list[dict[str, Any]]:
    from pipeline.api.store import EventQuery, EventStore

    store = EventStore(client, settings.redis.key_prefix, settings.api.max_events)
    out: list[dict[str, Any]] = []
    before = None
    while True:
        page = store.query(EventQuery(camera=camera, product_class=product_class, label=label, session=session,
                                      limit=500, before=before))
        out.extend(page.events)
        if page.next is None:
            return out
        before = page.next


def cmd_events_list(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    with _redis(settings) as client:
        rows = _events(settings, client, args.label, args.camera, args.product_class, args.session)
    _out(f"{'event':<26}{'camera':<18}{'class':<14}{'status':<8}{'peak':>7}{'thr':>7}  label")
    for ev in rows[: args.limit]:
        label = (ev.get("label") or {}).get("label") or "-"
        _out(f"{ev['event_id']:<26}{ev['camera_id']:<18}{ev['product_class']:<14}{ev['status']:<8}"
             f"{ev['peak_score']:>7.3f}{ev['threshold']:>7.3f}  {label}")
    return 0


def cmd_events_export(args: argparse.Namespace) -> int:
    """MVTec layout per product class: labelled events as test images, ground truth from their masks."""
    import cv2

    from pipeline import imaging
    from pipeline.api.store import EventStore
    from pipeline.references.frames import FrameNotFoundError, peak_frame
    from pipeline.references.store import ReferenceStore

    settings = load_settings(args.config)
    out = Path(args.out)
    recording = Path(args.recording) if args.recording else None
    written: dict[str, dict[str, int]] = {}
    degraded: list[str] = []
    with _redis(settings) as client:
        store = EventStore(client, settings.redis.key_prefix, settings.api.max_events)
        labels = [args.label] + (["false_alarm"] if args.label == "confirmed" and not args.no_good else [])
        for label in labels:
            for summary in _events(settings, client, label, args.camera, args.product_class, args.session):
                ev = store.event(summary["event_id"])
                if ev is None:
                    continue
                try:
                    frame = imaging.decode_image(peak_frame(settings.kafka, ev, recording))
                except (FrameNotFoundError, OSError, ValueError) as exc:
                    # The thumbnail, scaled to the event's size, keeps mask and image aligned.
                    degraded.append(f"{ev.event_id}: {exc}")
                    frame = cv2.resize(imaging.decode_image(ev.thumbnail_jpeg), (ev.width, ev.height))
                base = out / ev.product_class
                defect = "good" if label == "false_alarm" else "defect"
                (base / "test" / defect).mkdir(parents=True, exist_ok=True)
                (base / "test" / defect / f"{ev.event_id}.png").write_bytes(imaging.encode_png(frame))
                if defect != "good":
                    (base / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
                    mask = imaging.decode_png(ev.mask_png)
                    if mask.shape[:2] != frame.shape[:2]:
                        mask = cv2.resize(mask, (frame.shape[1], frame.shape[0]), interpolation=cv2.INTER_NEAREST)
                    (base / "ground_truth" / defect / f"{ev.event_id}_mask.png").write_bytes(imaging.encode_png(mask))
                counts = written.setdefault(ev.product_class, {})
                counts[defect] = counts.get(defect, 0) + 1
        refs = ReferenceStore(client, settings.redis.key_prefix)
        for cls in written:
            ref = refs.current(cls)
            if ref is None:
                continue
            good = out / cls / "train" / "good"
            good.mkdir(parents=True, exist_ok=True)
            for i, data in enumerate(refs.images(ref)):
                (good / f"{ref.version:04d}_{i:05d}.png").write_bytes(imaging.encode_png(imaging.decode_image(data)))
            written[cls]["train_good"] = len(ref.images)
    if not written:
        raise CommandError(f"no events labelled {args.label!r} to export")
    for cls, counts in sorted(written.items()):
        _out(f"{out / cls}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for line in degraded:
        _out(f"thumbnail used (frame not found): {line}")
    _out(f"evaluate with: linewatch eval {out} --category CLASS --out DIR")
    return 0


# -- references -----------------------------------------------------------------------------------
def cmd_references_collect(args: argparse.Namespace) -> int:
    from pipeline.cli.engine_cmds import build_engine, engine_settings
    from pipeline.references.collect import collect, frames_from_recording, frames_from_topic
    from pipeline.references.store import ReferenceStore

    if (args.camera is None) == (args.recording is None):
        raise CommandError("say where frames come from: --camera ID --frames N, or --recording PATH")
    settings = load_settings(args.config)
    max_patches = args.max_patches or settings.references.max_patches
    engine_cfg = engine_settings(args, settings)
    with _redis(settings) as client:
        if args.camera is not None:
            if not args.frames:
                raise CommandError("--camera needs --frames N")
            if settings.kafka.bootstrap_servers is None:
                raise CommandError("--camera reads the frames topic: set kafka.bootstrap_servers")
            images = frames_from_topic(settings.kafka, args.camera, args.frames, retained=args.retained,
                                       timeout_s=args.timeout, say=lambda s: sys.stderr.write(s + "\n"))
            source = f"collect:camera:{args.camera}"
        else:
            images = frames_from_recording(Path(args.recording), args.recording_camera, args.frames)
            source = f"collect:recording:{args.recording}"
        engine = build_engine(engine_cfg, settings)
        ref, before, after = collect(engine, ReferenceStore(client, settings.redis.key_prefix), args.product_class,
                                     images, max_patches, source, note=args.note, by=args.by)
    _out(f"{ref.tag}: {len(images)} frames, memory rows " + ", ".join(
        f"{k} {before[k]} -> {after[k]}" for k in sorted(after)) + f" (coreset, max {max_patches}); now current")
    if ":random-" in engine.fingerprint:
        _out("built with RANDOM WEIGHTS: the memory means nothing")
    return 0


def cmd_references_list(args: argparse.Namespace) -> int:
    from pipeline.references.store import ReferenceStore

    settings = load_settings(args.config)
    with _redis(settings) as client:
        refs = ReferenceStore(client, settings.redis.key_prefix)
        current = refs.current_versions()
        classes = [args.product_class] if args.product_class else refs.classes()
        _out(f"{'set':<28}{'images':>7}  {'current':<8}{'source':<40}created")
        for cls in classes:
            for r in refs.versions(cls):
                mark = "yes" if current.get(cls) == r.version else ""
                _out(f"{r.tag:<28}{len(r.images):>7}  {mark:<8}{r.source[:39]:<40}{r.created_ts:.0f}")
    return 0


def _get_ref(refs: Any, cls: str, version: int | None) -> Any:
    ref = refs.get(cls, version) if version else refs.current(cls)
    if ref is None:
        raise CommandError(f"no reference set {cls}" + (f":v{version}" if version else " (no current version)"))
    return ref


def cmd_references_show(args: argparse.Namespace) -> int:
    from pipeline.references.store import ReferenceStore, describe

    settings = load_settings(args.config)
    with _redis(settings) as client:
        refs = ReferenceStore(client, settings.redis.key_prefix)
        ref = _get_ref(refs, args.product_class, args.version)
        _out(json.dumps(describe(ref, refs.current_versions().get(ref.product_class) == ref.version), indent=2))
    return 0


def cmd_references_remove(args: argparse.Namespace) -> int:
    from pipeline.references.store import ReferenceStore

    settings = load_settings(args.config)
    with _redis(settings) as client:
        refs = ReferenceStore(client, settings.redis.key_prefix)
        try:
            now = refs.remove(args.product_class, args.version)
        except KeyError as exc:
            raise CommandError(str(exc.args[0])) from None
    _out(f"removed {args.product_class}:v{args.version}; current: "
         + (now.tag if now else "none (engine.shots_dir or zero-shot)"))
    return 0


def cmd_references_export(args: argparse.Namespace) -> int:
    """Images as files in OUT/<class>/ (usable as engine.shots_dir) plus the manifest."""
    from pipeline import imaging
    from pipeline.references.store import ReferenceStore, describe

    settings = load_settings(args.config)
    with _redis(settings) as client:
        refs = ReferenceStore(client, settings.redis.key_prefix)
        ref = _get_ref(refs, args.product_class, args.version)
        folder = Path(args.out) / ref.product_class
        folder.mkdir(parents=True, exist_ok=True)
        for image_id, data in zip(ref.images, refs.images(ref), strict=True):
            suffix = ".png" if data[:4] == b"\x89PNG" else ".jpg"
            imaging.decode_image(data)  # refuse to export something unreadable
            (folder / f"{image_id}{suffix}").write_bytes(data)
        (folder / "manifest.json").write_text(json.dumps(describe(ref), indent=2))
    _out(f"wrote {len(ref.images)} images of {ref.tag} to {folder}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from pipeline.cli.engine_cmds import add_engine_options

    events = sub.add_parser("events", help="label, list and export defect events")
    esub = events.add_subparsers(dest="events_command", required=True, metavar="ACTION")
    p = esub.add_parser("label", help="label an event; a false alarm teaches its class's normal references")
    p.add_argument("event_id")
    p.add_argument("--false-alarm", action="store_true")
    p.add_argument("--confirmed", action="store_true")
    p.add_argument("--note", default=None)
    p.add_argument("--by", default=None, help="who says so")
    p.add_argument("--recording", default=None, help="find the peak frame in this recording (frames topic otherwise)")
    p.add_argument("--no-teach", action="store_true", help="keep the label, leave the reference set alone")
    p.set_defaults(func=cmd_events_label)
    p = esub.add_parser("list", help="events with their labels, newest first")
    p.add_argument("--label", default=None, help="confirmed, false_alarm or none")
    p.add_argument("--camera", default=None)
    p.add_argument("--class", dest="product_class", default=None)
    p.add_argument("--session", default=None, help="replay session, or * for all (default: live only)")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_events_list)
    p = esub.add_parser("export", help="labelled events as an MVTec-layout folder for `linewatch eval`")
    p.add_argument("--label", default="confirmed", help="confirmed (default) or false_alarm")
    p.add_argument("--out", required=True)
    p.add_argument("--camera", default=None)
    p.add_argument("--class", dest="product_class", default=None)
    p.add_argument("--session", default="*", help="replay session, or * for all (default)")
    p.add_argument("--recording", default=None, help="find peak frames in this recording")
    p.add_argument("--no-good", action="store_true", help="leave false alarms out of test/good")
    p.set_defaults(func=cmd_events_export)

    refs = sub.add_parser("references", help="versioned normal reference sets in Redis")
    rsub = refs.add_subparsers(dest="references_command", required=True, metavar="ACTION")
    p = rsub.add_parser("collect", help="build a class's reference set from live or recorded frames")
    p.add_argument("--class", dest="product_class", required=True)
    p.add_argument("--camera", default=None, help="read frames of this camera from the frames topic")
    p.add_argument("--frames", type=int, default=None, help="how many frames (--camera: required)")
    p.add_argument("--retained", action="store_true", help="the last N retained frames instead of the next N")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for --camera frames")
    p.add_argument("--recording", default=None, help="a recording (root, camera folder or segment)")
    p.add_argument("--recording-camera", default=None, help="one camera of a multi-camera recording")
    p.add_argument("--max-patches", type=int, default=None, help="memory rows per bank (references.max_patches)")
    p.add_argument("--note", default=None)
    p.add_argument("--by", default=None)
    add_engine_options(p, references=False)
    p.set_defaults(func=cmd_references_collect)
    p = rsub.add_parser("list", help="versions of every class (or one)")
    p.add_argument("--class", dest="product_class", default=None)
    p.set_defaults(func=cmd_references_list)
    for name, func, helptext in (("show", cmd_references_show, "one version's manifest (default: current)"),
                                 ("export", cmd_references_export, "a version's images to OUT/<class>/")):
        p = rsub.add_parser(name, help=helptext)
        p.add_argument("product_class", metavar="CLASS")
        p.add_argument("--version", type=int, default=None)
        if name == "export":
            p.add_argument("--out", required=True)
        p.set_defaults(func=func)
    p = rsub.add_parser("remove", help="delete a version (the newest remaining becomes current)")
    p.add_argument("product_class", metavar="CLASS")
    p.add_argument("--version", type=int, required=True)
    p.set_defaults(func=cmd_references_remove)
