"""`linewatch api`: the JSON API, live event stream and dashboard (with its Kafka ingest loop)."""

from __future__ import annotations

import argparse
import sys

from pipeline.cli import CommandError
from pipeline.config import Settings, load_settings


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    if args.host is not None:
        settings.api.host = args.host
    if args.port is not None:
        settings.api.port = args.port
    if not settings.api.token:
        raise CommandError("api.token is not set (LINEWATCH_API__TOKEN or api.token in the config file): "
                           "the API refuses to start without a token")
    if not settings.redis.url:
        raise CommandError("no Redis configured (LINEWATCH_REDIS__URL): events and subscriptions are stored there")
    if not settings.kafka.bootstrap_servers:
        raise CommandError("no Kafka bootstrap servers configured (LINEWATCH_KAFKA__BOOTSTRAP_SERVERS)")
    return settings


def cmd_api(args: argparse.Namespace) -> int:
    from pipeline.api.app import serve  # web framework imports only for this command

    settings = _settings(args)
    api = settings.api
    host = "127.0.0.1" if api.host in ("0.0.0.0", "::", "") else api.host
    # The link carries the token only for a person at a terminal: redirected output is a log file.
    token = api.token if sys.stdout.isatty() else "<api.token>"
    sys.stdout.write(f"dashboard: http://{host}:{api.port}/?token={token}  "
                     f"(listening on {api.host}:{api.port}; api.host 0.0.0.0 serves other machines)\n")
    sys.stdout.flush()
    # uvicorn handles SIGINT/SIGTERM itself (graceful shutdown); the ingest loop stops after it.
    serve(settings)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("api", help="serve the JSON API, live event stream and dashboard (needs api.token)")
    p.add_argument("--host", help="listen address (default: api.host)")
    p.add_argument("--port", type=int, help="listen port (default: api.port)")
    p.set_defaults(func=cmd_api)
