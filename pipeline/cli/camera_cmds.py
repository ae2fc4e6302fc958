"""`linewatch cameras add|update|remove|list|seed`: the camera registry while capture runs."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

from pipeline.cameras.overview import CameraAdmin, public_camera
from pipeline.cameras.registry import parse_camera
from pipeline.config import load_settings


@contextlib.contextmanager
def _admin(args: argparse.Namespace) -> Iterator[CameraAdmin]:
    from pipeline.redis_store import connect

    settings = load_settings(args.config)
    client = connect(settings.redis)
    try:
        yield CameraAdmin(settings, client)
    finally:
        client.close()


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    fields = {"line": args.line, "product_class": args.product_class, "source": args.source, "fps": args.fps,
              "loop": args.loop}
    return {k: v for k, v in fields.items() if v is not None}


def _out(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def cmd_add(args: argparse.Namespace) -> int:
    cam = parse_camera({"id": args.id, **_fields(args)})
    with _admin(args) as admin:
        admin.registry.add(cam)
    _out(public_camera(cam))
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    changes = _fields(args)
    if args.no_fps:
        changes["fps"] = None
    if not changes:
        raise ValueError("nothing to change: give --line, --class, --source, --fps/--no-fps or --loop/--no-loop")
    with _admin(args) as admin:
        cam = admin.registry.update(args.id, changes)
    _out(public_camera(cam))
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        if not admin.registry.remove(args.id):
            raise ValueError(f"no camera {args.id!r} in the registry")
    sys.stdout.write(f"removed {args.id}\n")
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    from pipeline.redis_store import connect

    settings = load_settings(args.config)
    client = connect(settings.redis)
    try:
        changed = CameraAdmin(settings, client, seed=False).registry.seed(list(settings.cameras),
                                                                          overwrite=args.overwrite)
    finally:
        client.close()
    sys.stdout.write(f"seeded: {', '.join(changed) or 'nothing new'}\n")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        rows = admin.rows()
    if args.json:
        _out(rows)
        return 0
    now = time.time()
    sys.stdout.write(f"{'id':<20} {'line':<10} {'class':<14} {'state':<12} {'fps':>6} {'last frame':>10} "
                     f"{'reconn':>6}  worker / source\n")
    for r in rows:
        age = f"{now - r['last_frame_ts']:.1f}s" if r["last_frame_ts"] else "-"
        fps = f"{r['fps_measured']:.1f}" if r["fps_measured"] is not None else "-"
        sys.stdout.write(f"{r['id']:<20} {r['line']:<10} {r['product_class']:<14} {r['state']:<12} {fps:>6} "
                         f"{age:>10} {r['reconnects']:>6}  {r['worker'] or '-'} / {r['source']}\n")
    return 0


def _camera_options(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--line", required=False, help="line id (default line-1)" if required else "line id")
    p.add_argument("--class", dest="product_class", required=required, help="product class scored against")
    p.add_argument("--source", required=required,
                   help="rtsp:// or http(s):// URL, device index, video file or image folder")
    p.add_argument("--fps", type=float, default=None, help="frame rate cap")
    p.add_argument("--loop", action=argparse.BooleanOptionalAction, default=None,
                   help="replay a file or folder source in a loop")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cameras", help="add, change, remove and list cameras while capture runs (Redis registry)")
    cams = p.add_subparsers(dest="cameras_command", required=True)
    a = cams.add_parser("add", help="add a camera; capture workers start it within seconds")
    a.add_argument("id")
    _camera_options(a, required=True)
    a.set_defaults(func=cmd_add)
    u = cams.add_parser("update", help="change a camera; its capture restarts with the new settings")
    u.add_argument("id")
    _camera_options(u, required=False)
    u.add_argument("--no-fps", action="store_true", help="remove the frame rate cap")
    u.set_defaults(func=cmd_update)
    r = cams.add_parser("remove", help="remove a camera; its capture stops (YAML seeding will not bring it back)")
    r.add_argument("id")
    r.set_defaults(func=cmd_remove)
    ls = cams.add_parser("list", help="cameras with state, frames/s, last frame, reconnects and capturing worker")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)
    s = cams.add_parser("seed", help="add the YAML cameras to the registry (--overwrite: also reset changed ones)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_seed)
