"""Worker health over HTTP: ``/metrics``, ``/healthz`` (the worker loop is alive) and ``/readyz``.

A worker gets a :class:`Health`, calls ``beat()`` once per loop iteration and registers readiness
checks (broker, Redis, a ``model_loaded`` flag). The CLI serves it on ``settings.metrics.port``::

    with Health() as health:
        health.serve(settings.metrics.port)
        run_alert(settings, stop, health=health)

``/healthz`` answers 200 while the loop beats (and during start-up, for up to
``startup_timeout_s`` before the first beat), else 503. ``/readyz`` answers 200 when the loop is
beating and every check passes, else 503 with each failing check and its error. Check results
are cached for ``cache_s`` so probes hitting the endpoint often cost the broker nothing extra.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

from kafka import KafkaAdminClient
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from pipeline.config import KafkaSettings, RedisSettings, Settings
from pipeline.logging import get_logger
from pipeline.redis_store import connect

log = get_logger(__name__)

# A check passes by returning None (or anything but False); it fails by raising or returning False.
Check = Callable[[], object]

LOOP_CHECK = "loop"
_MAX_ERROR_CHARS = 300


@dataclass(slots=True)
class _Entry:
    fn: Check
    cache_s: float
    lock: threading.Lock
    error: str | None = None
    at: float | None = None  # monotonic time of the cached result; None = never evaluated


class Health:
    """Liveness heartbeat, named readiness checks, and the HTTP server exposing them."""

    def __init__(self, *, liveness_timeout_s: float = 60.0, startup_timeout_s: float = 600.0,
                 cache_s: float = 2.0) -> None:
        self.liveness_timeout_s = liveness_timeout_s
        # Model downloads and first broker contact may take minutes before the loop ever beats.
        self.startup_timeout_s = startup_timeout_s
        self.cache_s = cache_s
        self._created = time.monotonic()
        self._last_beat: float | None = None
        self._checks: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- liveness -----------------------------------------------------------------------------
    def beat(self) -> None:
        """Called by the worker loop on every iteration: proof that it is not stuck."""
        self._last_beat = time.monotonic()

    def liveness(self) -> tuple[bool, str]:
        """(alive, detail): alive while the loop beats, or while starting up before the first beat."""
        now = time.monotonic()
        if self._last_beat is None:
            waited = now - self._created
            if waited <= self.startup_timeout_s:
                return True, f"starting ({waited:.1f}s)"
            return False, f"worker loop has not started after {waited:.1f}s (limit {self.startup_timeout_s}s)"
        silent = now - self._last_beat
        if silent <= self.liveness_timeout_s:
            return True, f"last beat {silent:.1f}s ago"
        return False, f"no heartbeat for {silent:.1f}s (limit {self.liveness_timeout_s}s)"

    # -- readiness ----------------------------------------------------------------------------
    def add_check(self, name: str, fn: Check, *, cache_s: float | None = None) -> None:
        """Register (or replace) a readiness check; its result is reused for ``cache_s`` seconds."""
        if name == LOOP_CHECK:
            raise ValueError(f"check name {LOOP_CHECK!r} is reserved for the worker loop")
        entry = _Entry(fn=fn, cache_s=self.cache_s if cache_s is None else cache_s, lock=threading.Lock())
        with self._lock:
            old = self._checks.get(name)
            self._checks[name] = entry
        if old is not None:
            _close_check(old.fn)

    def add_flag(self, name: str, reason: str = "not set yet") -> threading.Event:
        """A check that passes once the returned event is set (e.g. ``model_loaded``)."""
        flag = threading.Event()

        def check() -> None:
            if not flag.is_set():
                raise RuntimeError(reason)

        self.add_check(name, check, cache_s=0.0)
        return flag

    def readiness(self) -> dict[str, str | None]:
        """Every check by name: None when it passes, else its error. Includes the ``loop`` check."""
        results: dict[str, str | None] = {LOOP_CHECK: self._loop_error()}
        with self._lock:
            entries = list(self._checks.items())
        for name, entry in entries:
            results[name] = self._evaluate(name, entry)
        return results

    def _loop_error(self) -> str | None:
        # Ready needs a loop that has actually started: a worker still loading is alive, not ready.
        alive, detail = self.liveness()
        if not alive:
            return detail
        return "worker loop has not started yet" if self._last_beat is None else None

    def _evaluate(self, name: str, entry: _Entry) -> str | None:
        # One evaluation at a time per check; concurrent probes reuse the fresh result.
        with entry.lock:
            now = time.monotonic()
            if entry.at is not None and now - entry.at < entry.cache_s:
                return entry.error
            try:
                ok = entry.fn()
                error = "check returned False" if ok is False else None
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]
            if error != entry.error or entry.at is None:
                (log.info if error is None else log.warning)("readiness_check", check=name, ok=error is None,
                                                            error=error)
            entry.error, entry.at = error, time.monotonic()
            return error

    # -- HTTP ---------------------------------------------------------------------------------
    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Start the HTTP server in a daemon thread; returns the bound port (``port=0`` picks one)."""
        if self._server is not None:
            raise RuntimeError("health server already running")
        server = _Server((host, port), _Handler)
        server.health = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="health-http", daemon=True)
        self._thread.start()
        log.info("health_server_started", host=host, port=self.port)
        return self.port

    @property
    def port(self) -> int | None:
        """The bound port while serving, else None."""
        return int(self._server.server_address[1]) if self._server is not None else None

    def close(self) -> None:
        """Stop the server (if any) and release the checks' connections."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        with self._lock:
            entries = list(self._checks.values())
        for entry in entries:
            _close_check(entry.fn)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _close_check(fn: Check) -> None:
    close = getattr(fn, "close", None)
    if callable(close):
        with contextlib.suppress(Exception):  # closing a probe must never mask the caller's error
            close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    health: Health

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("health_request_failed", client=str(client_address))


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        health = self.server.health
        if path == "/metrics":
            self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            alive, detail = health.liveness()
            self._json(200 if alive else 503, {"status": "ok" if alive else "stalled", "detail": detail})
        elif path == "/readyz":
            results = health.readiness()
            failing = {name: error for name, error in results.items() if error is not None}
            checks = {name: error or "ok" for name, error in results.items()}
            body = {"status": "not_ready", "failing": failing, "checks": checks} if failing else \
                {"status": "ready", "checks": checks}
            self._json(503 if failing else 200, body)
        else:
            self._json(404, {"error": f"not found: {path}", "paths": ["/metrics", "/healthz", "/readyz"]})

    def _json(self, status: int, body: dict[str, Any]) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Probes hit these paths every few seconds: keep them out of the default log level.
        log.debug("health_request", client=self.client_address[0], request=format % args)


# -- standard checks --------------------------------------------------------------------------
class _ProbeAdmin(KafkaAdminClient):
    """An admin client that releases its IO thread when bootstrap fails in the constructor.

    kafka-python 3.0 starts the IO thread before bootstrapping and leaves it running when the
    bootstrap raises, so retrying against an absent broker would leak a thread per probe.
    """

    def __init__(self, **configs: Any) -> None:
        try:
            super().__init__(**configs)
        except Exception:
            self._closed = False  # close() is a no-op until the constructor has finished
            with contextlib.suppress(Exception):
                self.close()
            raise


class BrokerCheck:
    """A metadata round trip on a dedicated admin client (the worker's own clients are not thread-safe).

    The client is created on first use and kept: it reconnects by itself once the broker is back.
    """

    def __init__(self, kafka: KafkaSettings, timeout_ms: int = 3000) -> None:
        self._kwargs = {**kafka.client_kwargs(), "request_timeout_ms": timeout_ms,
                        "bootstrap_timeout_ms": timeout_ms, "client_id": "linewatch-health"}
        self._admin: KafkaAdminClient | None = None
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            if self._admin is None:
                self._admin = _ProbeAdmin(**self._kwargs)
            self._admin.describe_cluster()

    def close(self) -> None:
        with self._lock:
            admin, self._admin = self._admin, None
        if admin is not None:
            admin.close()


class RedisCheck:
    """``PING`` on a dedicated client, so a broken worker connection cannot hide the server's state."""

    def __init__(self, settings: RedisSettings) -> None:
        self._client = connect(settings)

    def __call__(self) -> None:
        self._client.ping()

    def close(self) -> None:
        self._client.close()


def watch_dependencies(health: Health, settings: Settings, *, redis: bool = True) -> None:
    """Register the ``broker`` check, and the ``redis`` check when wanted and Redis is configured."""
    health.add_check("broker", BrokerCheck(settings.kafka))
    if redis and settings.redis.url:
        health.add_check("redis", RedisCheck(settings.redis))


def serve_metrics(port: int | None) -> Health | None:
    """Expose /metrics (plus /healthz and /readyz) on the port; None keeps metrics in-process only.

    For callers without a worker loop; workers create a `Health` themselves to beat and add checks.
    """
    if port is None:
        return None
    health = Health()
    health.serve(port)
    return health
