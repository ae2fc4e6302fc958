"""`linewatch record`: camera frames to disk as time segments."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from pipeline.cli import CommandError
from pipeline.cli.units import parse_duration, parse_size
from pipeline.config import CameraConfig, Settings, load_settings
from schemas.frames import CAMERA_ID_PATTERN


def _camera(settings: Settings, camera_id: str) -> CameraConfig:
    for camera in settings.cameras:
        if camera.id == camera_id:
            return camera
    known = ", ".join(c.id for c in settings.cameras) or "none"
    raise CommandError(f"camera {camera_id!r} is not configured (configured cameras: {known})")


def _out_dir(text: str) -> Path:
    out = Path(text).expanduser()
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {out} exists and is not a directory")
    return out


def cmd_record(args: argparse.Namespace) -> int:
    from pipeline.capture.sources import SourceError
    from pipeline.cli.stream_cmds import stop_on_signals
    from pipeline.recording import record_from_source, record_from_topic

    # Validate every argument before touching the config, the broker or the disk.
    max_bytes = parse_size(args.max_bytes) if args.max_bytes is not None else None
    max_age_s = parse_duration(args.max_age) if args.max_age is not None else None
    if max_age_s is not None and max_age_s <= 0:
        raise CommandError(f"--max-age must be > 0, got {args.max_age!r}")
    if args.segment_s <= 0:
        raise CommandError(f"--segment-s must be > 0, got {args.segment_s}")
    if args.max_frames is not None and args.max_frames < 1:
        raise CommandError(f"--max-frames must be >= 1, got {args.max_frames}")
    out = _out_dir(args.out)
    settings = load_settings(args.config)
    limits = {"segment_s": args.segment_s, "max_bytes": max_bytes, "max_age_s": max_age_s}
    if args.from_topic:
        # The id names a folder: no path separators or dot-dot from the command line.
        if not re.fullmatch(CAMERA_ID_PATTERN, args.camera):
            raise CommandError(f"bad camera id {args.camera!r}: use letters, digits, '_', '.', '-'")
        if settings.kafka.bootstrap_servers is None:
            raise CommandError("--from-topic needs Kafka bootstrap servers (LINEWATCH_KAFKA__BOOTSTRAP_SERVERS)")
        stats = record_from_topic(settings, args.camera, out, stop_on_signals(), args.max_frames, **limits)
    else:
        camera = _camera(settings, args.camera)
        try:
            stats = record_from_source(settings, camera, out, stop_on_signals(), args.max_frames, **limits)
        except SourceError as exc:
            raise CommandError(str(exc)) from None
    sys.stdout.write(
        f"recorded {stats.frames} frames of {args.camera} in {stats.segments} segments ({stats.bytes} bytes) "
        f"to {out}; skipped {stats.skipped}, duplicates {stats.duplicates}; "
        f"retention deleted {stats.deleted_segments} segments ({stats.deleted_bytes} bytes)\n"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("record", help="record a camera's frames to disk as time segments (JPEG + index.jsonl)")
    p.add_argument("--camera", required=True, help="camera id (a configured camera unless --from-topic)")
    p.add_argument("--out", required=True, help="recording root; frames go to OUT/<camera>/<segment>/")
    p.add_argument("--from-topic", action="store_true",
                   help="record the frames topic instead of the camera source (needs Kafka configured)")
    p.add_argument("--segment-s", type=float, default=60.0, help="seconds of capture time per segment (default 60)")
    p.add_argument("--max-bytes", default=None, help="size limit of the camera's recording, e.g. 500M, 2G")
    p.add_argument("--max-age", default=None, help="delete segments older than this, e.g. 3600, 90m, 24h, 7d")
    p.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    p.set_defaults(func=cmd_record)
