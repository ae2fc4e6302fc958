"""structlog set-up: key-value events, JSON when stderr is not a terminal; credentials in URLs and
the configured secrets never reach a log line."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import structlog

# scheme://user:password@ or scheme://token@ (the userinfo of any URL in a text).
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/?#@\s]+)@")
# Values from the settings (SASL password, API token, ...) scrubbed wherever they appear.
_SECRETS: set[str] = set()
# Shorter values would blank ordinary words out of every line.
_MIN_SECRET_LEN = 6


def _mask_userinfo(m: re.Match[str]) -> str:
    user, sep, _password = m.group("userinfo").partition(":")
    # Without a colon the userinfo may be a token (https://TOKEN@host): hidden whole.
    return f"{m.group('scheme')}{user}:***@" if sep else f"{m.group('scheme')}***@"


def hide_secrets(*values: str | None) -> None:
    """Scrub these values from every later log line and from `redact`'s output."""
    _SECRETS.update(v for v in values if v and len(v) >= _MIN_SECRET_LEN)


def hide_url_password(url: str | None) -> None:
    """Scrub a URL's password wherever it appears, even where the URL pattern would miss it."""
    if url:
        with contextlib.suppress(ValueError):
            hide_secrets(urlsplit(url).password)


def redact_url(url: str) -> str:
    """One URL with its userinfo masked by parsing it (a password the text pattern would miss too)."""
    with contextlib.suppress(ValueError):
        parts = urlsplit(url)
        if parts.password is not None or parts.username is not None:
            user = parts.username or ""
            masked = f"{user}:***@" if parts.password is not None else "***@"
            host = parts.netloc.rpartition("@")[2]
            return urlunsplit(parts._replace(netloc=masked + host))
        return url
    return redact(url)


def redact(text: str) -> str:
    """The text with URL credentials as `user:***@` and every registered secret as `***`."""
    text = _URL_USERINFO.sub(_mask_userinfo, text)
    # Longest first: a secret that contains another is replaced whole.
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_scrub(v) for v in value)
    return value


def _redact_event(_logger: object, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    # After format_exc_info: an exception's text (a client error quoting its URL) is scrubbed too.
    for key, value in event.items():
        event[key] = _scrub(value)
    return event


class _StderrLogger:
    """Writes to whatever ``sys.stderr`` is at call time, not at configuration time.

    structlog's PrintLogger keeps the stream it was given; after a test harness or a daemoniser
    swaps and closes that stream, every log call would raise.
    """

    def msg(self, message: str) -> None:
        stream = sys.stderr
        stream.write(message + "\n")
        stream.flush()

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def _stderr_logger(*_args: object) -> _StderrLogger:
    return _StderrLogger()


def configure_logging(level: str = "info", json: bool | None = None) -> None:
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
