"""The `linewatch` command line: one parser, subcommands registered by small modules."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline.logging import configure_logging, redact


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 2, no traceback."""


# Exceptions that mean bad input or environment rather than a bug: reported in one line.
USER_ERRORS: tuple[type[BaseException], ...] = (CommandError, FileNotFoundError, NotADirectoryError,
                                                PermissionError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    from pipeline.cli import (
        api_cmds,
        camera_cmds,
        delivery_cmds,
        engine_cmds,
        learning_cmds,
        record_cmds,
        replay_cmds,
        stream_cmds,
        train_cmds,
    )

    parser = argparse.ArgumentParser(prog="linewatch", description=__doc__)
    parser.add_argument("--config", help="YAML configuration file (also LINEWATCH_CONFIG)")
    parser.add_argument("--log-level", default=None, help="debug, info, warning, error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    stream_cmds.register(sub)
    engine_cmds.register(sub)
    record_cmds.register(sub)
    replay_cmds.register(sub)
    delivery_cmds.register(sub)
    api_cmds.register(sub)
    camera_cmds.register(sub)
    learning_cmds.register(sub)
    train_cmds.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level or "info")
    from pipeline.errors import LLMError, WeightsError
    from pipeline.imaging import FrameDecodeError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (*USER_ERRORS, WeightsError, LLMError, FrameDecodeError) as exc:
        # An error may quote a URL or setting (cannot reach Redis at ...): never its credentials.
        sys.stderr.write(f"linewatch {args.command}: error: {redact(str(exc))}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
