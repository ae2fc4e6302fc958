"""Streaming commands: `run` (a whole small site), `capture`, `alert`, the scoring worker, `topics`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config import Settings, load_settings
from pipeline.logging import configure_logging, get_logger
from pipeline.runtime.signals import stop_on_signals

if TYPE_CHECKING:
    from pipeline.health import Health

log = get_logger(__name__)


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    if settings.kafka.bootstrap_servers is None:
        raise ValueError("no Kafka bootstrap servers configured (LINEWATCH_KAFKA__BOOTSTRAP_SERVERS); "
                         "`linewatch run` starts an embedded broker instead")
    return settings


def worker_health(settings: Settings) -> Health:
    """A Health serving /metrics, /healthz and /readyz on the metrics port (when one is set).

    Use as a context manager around the worker so the server and its probes close with it.
    """
    from pipeline.health import Health  # kafka/redis imports only for worker commands

    health = Health()
    if settings.metrics.port is not None:
        health.serve(settings.metrics.port)
    return health


def cmd_capture(args: argparse.Namespace) -> int:
    from workers.capture import run_capture, run_managed_capture

    settings = _settings(args)
    if settings.redis.url and not (args.camera or args.replay_session or args.stats_file):
        # Managed: the Redis camera registry, shared with other capture workers through leases. A
        # camera whose source is missing is that camera's error (reopened with backoff), not the worker's.
        with worker_health(settings) as health:
            run_managed_capture(settings, stop_on_signals(), health=health)
        return 0
    from pipeline.capture.sources import check_sources
    from workers.capture import select_cameras

    check_sources(select_cameras(settings, args.camera or None))
    with worker_health(settings) as health:
        stats = run_capture(settings, args.camera or None, stop_on_signals(), replay_session=args.replay_session,
                            health=health)
    if args.stats_file:
        Path(args.stats_file).write_text(json.dumps({k: vars(v) for k, v in stats.items()}))
    return 1 if stats and all(s.error for s in stats.values()) else 0


def run_score_worker(args: argparse.Namespace) -> int:
    from workers.score import run_score

    settings = _settings(args)
    if getattr(args, "method", None):
        settings.engine.method = args.method
    with worker_health(settings) as health:
        run_score(settings, stop_on_signals(), health=health)
    return 0


def cmd_alert(args: argparse.Namespace) -> int:
    from workers.alert import run_alert

    settings = _settings(args)
    with worker_health(settings) as health:
        run_alert(settings, stop_on_signals(), health=health)
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from pipeline.bus import TOPICS, create_topics

    settings = _settings(args)
    created = create_topics(settings.kafka, TOPICS)
    for name in created:
        sys.stdout.write(name + "\n")
    return 0


def _check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ValueError(f"api.port {port} on {host} is not free ({exc.strerror}): pass --api-port N, "
                             f"set api.port, or --no-api") from None


def check_site(settings: Settings) -> None:
    """What `run` can check before starting anything: cameras, their sources, the weights."""
    from pipeline.capture.sources import check_sources

    if not settings.cameras:
        raise ValueError("no cameras configured: add a `cameras:` list to the config file")
    check_sources(settings.cameras)
    engine = settings.engine
    if engine.pretrained != "random" and not Path(engine.pretrained).is_file():
        from pipeline.engine.weights import check_tag_available

        check_tag_available(engine.backbone, engine.pretrained,
                            str(engine.cache_dir) if engine.cache_dir else None)


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.site import Site, default_data_dir

    if args.log_level is None:
        # The site prints events and a summary; worker logs go to files in the run folder.
        configure_logging("warning")
    settings = load_settings(args.config)
    if args.api_port is not None:
        settings.api.port = args.api_port
    check_site(settings)
    if not args.no_api:
        _check_port_free(settings.api.host, settings.api.port)
    replay = f"replay-{uuid.uuid4().hex[:8]}" if args.replay else None
    site = Site(settings, config_file=args.config or os.environ.get("LINEWATCH_CONFIG"), replay_session=replay,
                run_dir=args.run_dir, data_dir=args.data_dir or default_data_dir(), api=not args.no_api)
    return site.run(exit_when_done=args.exit_when_done)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="every worker of a small site in one process tree (embedded broker/cache "
                                   "when none is configured)")
    p.add_argument("--replay", action="store_true",
                   help="tag frames as a replay session: no staleness limit, alert state kept apart")
    p.add_argument("--exit-when-done", action="store_true",
                   help="stop once finite sources are captured, scored and alerted, then print a summary")
    p.add_argument("--run-dir", default=None, help="where worker logs go (default: a temp folder)")
    p.add_argument("--data-dir", default=None,
                   help="where the embedded cache keeps subscriptions, thresholds and references across restarts "
                        "(default: $XDG_STATE_HOME/linewatch or ~/.local/state/linewatch)")
    p.add_argument("--api-port", type=int, default=None, help="dashboard/API port (default: api.port, 8080)")
    p.add_argument("--no-api", action="store_true", help="do not start the API and dashboard")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("capture", help="capture the registry's cameras, shared with other capture workers (with "
                                       "Redis; or fixed: --camera, --replay-session, no Redis)")
    p.add_argument("--camera", action="append", help="camera id (repeatable; default: all configured)")
    p.add_argument("--replay-session", default=None, help="tag frames with this replay session id")
    p.add_argument("--stats-file", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_capture)

    p = sub.add_parser("alert", help="run an alert worker")
    p.set_defaults(func=cmd_alert)

    p = sub.add_parser("topics", help="manage Kafka topics")
    topics = p.add_subparsers(dest="topics_command", required=True)
    t = topics.add_parser("create", help="create the linewatch topics with the configured partitions")
    t.set_defaults(func=cmd_topics)
