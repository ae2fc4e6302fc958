"""`linewatch replay` and `linewatch rescore`."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from tqdm import tqdm

from pipeline.cli import CommandError
from pipeline.config import Settings, load_settings
from pipeline.logging import configure_logging
from pipeline.replay.report import RunSummary, event_line
from schemas.events import DefectEvent


def _speed(text: str) -> float | None:
    if text == "max":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"speed must be a number (1, 4, 0.5) or 'max', got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("speed must be > 0")
    return value


def _say(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _print_event(event: DefectEvent) -> None:
    # tqdm owns the terminal's last line; tqdm.write keeps the bar intact below the event lines.
    tqdm.write(event_line(event), file=sys.stdout)


def _print_summary(summary: RunSummary, report: Path) -> None:
    _say(f"{summary.kind} {summary.session}: frames={summary.frames_published} scored={summary.frames_scored} "
         f"rejected={summary.frames_rejected} events={summary.events} span={summary.span_s:.1f}s "
         f"published_in={summary.publish_s:.1f}s wall={summary.wall_s:.1f}s")
    d = summary.deliveries
    if d is not None and any(d.values()):
        dead = ", ".join(f"`linewatch subscriptions dead-letters {sub}`" for sub in summary.dead_letter_subscriptions)
        _say(f"  deliveries: delivered={d.get('delivered', 0)} dead-lettered={d.get('dead_lettered', 0)} "
             f"coalesced={d.get('coalesced', 0)} pending={d.get('pending', 0)}" + (f"; see {dead}" if dead else ""))
    elif d is not None:
        _say("  deliveries: none (no subscription matched this replay's events, or none configured)")
    elif summary.kind == "replay":
        _say("  deliveries: none (a replay's events reach subscriptions only with --alerts)")
    for note in summary.notes:
        _say(f"  note: {note}")
    _say(f"report: {report} (scores.csv, events/*.jpg)")


def _camera_labels(settings: Settings, args: argparse.Namespace) -> tuple[str | None, str | None, str | None]:
    """--camera-id/--class/--line, completed from the configured camera of that id."""
    camera = next((c for c in settings.cameras if c.id == args.camera_id), None)
    product_class = args.product_class or (camera.product_class if camera else None)
    line = args.line or (camera.line if camera else None)
    return args.camera_id, line, product_class


def _quiet_logs(args: argparse.Namespace) -> None:
    # The command prints progress, events and a summary; logs only for warnings unless asked.
    if args.log_level is None:
        configure_logging("warning")


def cmd_replay(args: argparse.Namespace) -> int:
    from pipeline.cli.stream_cmds import stop_on_signals
    from pipeline.replay.inputs import Labels, open_input
    from pipeline.replay.runner import new_session, run_replay
    from pipeline.site import Site

    _quiet_logs(args)
    settings = load_settings(args.config)
    camera_id, line, product_class = _camera_labels(settings, args)
    source = open_input(args.path, Labels(camera_id, line, product_class), fps=args.fps, t_from=args.time_from,
                        t_to=args.time_to)
    session = new_session()
    report_dir = Path(args.report or Path("linewatch-reports") / session)
    stop = stop_on_signals()
    with contextlib.ExitStack() as stack:
        worker_check = None
        if settings.kafka.bootstrap_servers is None or settings.redis.url is None:
            # Nothing deployed to replay into: bring up a small site (broker, cache, scorer, alerter).
            site = Site(settings, config_file=args.config, run_dir=args.run_dir)
            site.warn_random_weights()
            env = site.start_infrastructure(stack)
            stack.callback(site.stop_children)
            # A deliver worker too when the events may reach subscriptions.
            names = ("score", "alert", "deliver") if args.alerts else ("score", "alert")
            for name in names:
                site.children[name] = site.spawn(name, env, [])
            _say(f"embedded workers: {', '.join(names)}; logs in {site.run_dir}")
            worker_check = site.dead_worker
        _say(f"replaying {args.path} as {session} at {'max' if args.speed is None else f'{args.speed:g}x'} speed"
             + (" (alerts reach subscriptions)" if args.alerts else ""))
        summary, report = run_replay(settings, source, str(args.path), report_dir, speed=args.speed,
                                     alerts=args.alerts, session=session, stop=stop, progress=not args.no_progress,
                                     worker_check=worker_check, on_event=_print_event)
    _print_summary(summary, report)
    return 0 if summary.complete else 1


def cmd_rescore(args: argparse.Namespace) -> int:
    from pipeline.cli.stream_cmds import stop_on_signals
    from pipeline.engine.engine import AnomalyEngine
    from pipeline.replay.rescore import parse_offsets, rescore
    from pipeline.replay.runner import new_session
    from workers.score import make_prompt_cache

    _quiet_logs(args)
    settings = load_settings(args.config)
    if not settings.kafka.bootstrap_servers or not settings.redis.url:
        raise CommandError("rescore reads the retained frames topic: configure LINEWATCH_KAFKA__BOOTSTRAP_SERVERS "
                           "and LINEWATCH_REDIS__URL")
    if args.method:
        settings.engine.method = args.method
    starts = parse_offsets(args.from_offset, "--from-offset")
    ends = parse_offsets(args.to_offset or [], "--to-offset")
    session = new_session("rescore")
    report_dir = Path(args.report or Path("linewatch-reports") / session)
    engine = AnomalyEngine(settings.engine, settings.llm, cache=make_prompt_cache(settings))
    summary, report = rescore(settings, engine, starts, ends, args.results_topic, report_dir, session,
                              stop=stop_on_signals(), progress=not args.no_progress)
    _print_summary(summary, report)
    return 0 if summary.complete else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="replay a recording, video file or image folder through the pipeline")
    p.add_argument("path", help="recording (from `linewatch record`), folder with index.jsonl, image folder or video")
    p.add_argument("--speed", type=_speed, default=1.0,
                   help="1 = original timing, 4 = four times faster, max = as fast as scoring allows")
    p.add_argument("--from", dest="time_from", metavar="T",
                   help="start: ISO time (2026-11-24T03:00:00Z), epoch seconds, or offset from the start (90s, 15m)")
    p.add_argument("--to", dest="time_to", metavar="T", help="end, same forms as --from")
    p.add_argument("--camera-id", help="camera to replay from a recording; names the camera of other inputs")
    p.add_argument("--class", dest="product_class", help="product class (overrides the recorded one)")
    p.add_argument("--line", help="line id for inputs that record none")
    p.add_argument("--fps", type=float, help="frame spacing for plain image folders (default: none)")
    p.add_argument("--alerts", action="store_true", help="let this replay's events reach live subscriptions")
    p.add_argument("--report", help="report folder (default: linewatch-reports/<session>)")
    p.add_argument("--run-dir", help="embedded mode: where worker logs go")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("rescore", help="score frames retained in the frames topic again, into a results topic")
    p.add_argument("--from-offset", action="append", required=True, metavar="[P:]OFFSET",
                   help="first offset per partition (repeatable), or one offset for all partitions")
    p.add_argument("--to-offset", action="append", metavar="[P:]OFFSET",
                   help="end offset (exclusive) per partition; default: the partition's end now")
    p.add_argument("--results-topic", default="rescore", help="results topic under the prefix (default: rescore)")
    p.add_argument("--method", choices=["winclip", "alfa"], help="override engine.method")
    p.add_argument("--report", help="report folder (default: linewatch-reports/<session>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_rescore)
