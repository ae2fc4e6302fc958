"""A real webhook receiver on loopback that checks what a subscriber must check.

It verifies ``X-Linewatch-Signature`` with the subscription secret, deduplicates by
``Idempotency-Key`` like a careful receiver would, and answers from a script of status codes
(then ``default``). ``gate`` (when set) holds every request until the test releases it.

    with WebhookReceiver(secret) as rx:
        rx.script(500, 500)          # two failures, then the default 200
        ... subscription url=rx.url ...
        assert rx.accepted_keys == [event_id]
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from pipeline.delivery.signing import SIGNATURE_HEADER, SignatureError, verify


@dataclass(frozen=True)
class Received:
    key: str | None
    body: dict[str, Any]
    status: int
    signature_ok: bool
    signature_error: str | None
    host: str | None = None  # the Host header as received
    at: float = 0.0  # arrival time (wall clock)


class WebhookReceiver:
    def __init__(self, secret: str, port: int = 0, default: int = 200, host: str = "127.0.0.1") -> None:
        self.secret = secret
        self.default = default
        self.delay_s = 0.0  # seconds each request is held before its answer (a slow subscriber)
        self.gate: threading.Event | None = None
        self.requests: list[Received] = []
        self.accepted: dict[str, dict[str, Any]] = {}  # Idempotency-Key -> body, first acceptance only
        self.duplicates = 0
        self._script: deque[int] = deque()
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if receiver.gate is not None:
                    receiver.gate.wait(30)
                receiver._handle(self, body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self._server.server_address[0]}:{self._server.server_address[1]}/hook"

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def accepted_keys(self) -> list[str]:
        with self._lock:
            return list(self.accepted)

    def script(self, *statuses: int) -> None:
        with self._lock:
            self._script.extend(statuses)

    def _handle(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        if self.delay_s:
            time.sleep(self.delay_s)
        error = None
        try:
            verify(self.secret, handler.headers.get(SIGNATURE_HEADER), body)
        except SignatureError as exc:
            error = str(exc)
        key = handler.headers.get("Idempotency-Key")
        with self._lock:
            status = 401 if error else (self._script.popleft() if self._script else self.default)
            payload = json.loads(body) if body else {}
            self.requests.append(Received(key, payload, status, error is None, error, handler.headers.get("Host"),
                                          time.time()))
            if 200 <= status < 300 and key is not None:
                if key in self.accepted:
                    self.duplicates += 1
                else:
                    self.accepted[key] = payload
            self._arrived.notify_all()
        handler.send_response(status)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def wait_for(self, accepted: int, timeout: float = 30.0) -> list[str]:
        """Block until ``accepted`` distinct deliveries arrived; returns their keys in order."""
        with self._lock:
            self._arrived.wait_for(lambda: len(self.accepted) >= accepted, timeout)
            return list(self.accepted)

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.gate is not None:
            self.gate.set()
        self._server.shutdown()
        self._server.server_close()
