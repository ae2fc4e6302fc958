"""A real OpenAI-compatible chat-completions server on loopback, scripted per request.

Tests exercise `ChatClient` over real sockets (timeouts, disconnects and status codes behave as
they would against a remote endpoint) instead of mocking httpx. Each request pops the next
behaviour from a queue; when the queue is empty the server's `default` answers.

    with ChatServer(default=status(500)) as server:
        server.script(malformed(), ok(normal=[...], abnormal=[...]))
        ... LLMSettings(url=server.url, ...) ...
        assert len(server.requests) == 2
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

CHAT_PATH = "/v1/chat/completions"

DEFAULT_NORMAL = ("a smooth even surface", "uniform grey colour", "clean sharp edges")
DEFAULT_ABNORMAL = ("a deep scratch", "rust spots on the thread", "a dent in the metal")


@dataclass(frozen=True)
class Recorded:
    """One request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # decoded JSON, or the raw text when the body was not JSON


# A behaviour writes the answer (or deliberately does not) for one request.
Behaviour = Callable[["_Handler"], None]


def _send(handler: _Handler, code: int, payload: bytes, content_type: str = "application/json") -> None:
    handler.send_response(code)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


def answer(content: Any) -> Behaviour:
    """A well-formed completion whose message content is `content` (any JSON value, e.g. None)."""

    def run(handler: _Handler) -> None:
        body = {
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "model": "scripted",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
        }
        _send(handler, 200, json.dumps(body).encode())

    return run


def ok(normal: Iterable[Any] = DEFAULT_NORMAL, abnormal: Iterable[Any] = DEFAULT_ABNORMAL) -> Behaviour:
    """The answer ALFA asks for: content is a JSON object with both description lists."""
    return answer(json.dumps({"normal": list(normal), "abnormal": list(abnormal)}))


def fenced(normal: Iterable[Any] = DEFAULT_NORMAL, abnormal: Iterable[Any] = DEFAULT_ABNORMAL) -> Behaviour:
    """What chat models often do despite instructions: prose around a ```json fenced block."""
    obj = json.dumps({"normal": list(normal), "abnormal": list(abnormal)}, indent=2)
    return answer(f"Sure! Here are the descriptions:\n```json\n{obj}\n```\nLet me know if you need more.")


def malformed() -> Behaviour:
    """A 200 whose content is not JSON at all."""
    return answer("I'm sorry, I cannot help with visual inspection today.")


def wrong_shape(payload: Any = None) -> Behaviour:
    """Valid JSON in the content, but not the expected lists (default: both lists missing)."""
    return answer(json.dumps(payload if payload is not None else {"descriptions": ["a scratch", "a dent"]}))


def status(code: int, text: str = "scripted error") -> Behaviour:
    """An HTTP error with an OpenAI-style error body."""

    def run(handler: _Handler) -> None:
        _send(handler, code, json.dumps({"error": {"message": text, "code": code}}).encode())

    return run


def slow(seconds: float, then: Behaviour | None = None) -> Behaviour:
    """Wait before answering (`then`, default `ok()`), to run into the client's timeout."""
    after = then or ok()

    def run(handler: _Handler) -> None:
        # Waiting on the server's stop event instead of time.sleep lets `stop()` return at once.
        if handler.server.owner.stopping.wait(seconds):
            return
        with contextlib.suppress(OSError):  # the client gave up (timeout) and closed the socket: expected
            after(handler)

    return run


def disconnect() -> Behaviour:
    """Close the connection without sending a single byte of response."""

    def run(handler: _Handler) -> None:
        handler.close_connection = True
        with contextlib.suppress(OSError):
            handler.connection.shutdown(socket.SHUT_RDWR)
        handler.connection.close()

    return run


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # don't wait for handlers still sleeping in `slow`
    owner: ChatServer


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def _record(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.server.owner._record(Recorded(self.command, self.path, headers, body))

    def do_POST(self) -> None:
        self._record()
        if self.path != CHAT_PATH:
            status(404, f"no route {self.path}")(self)
            return
        self.server.owner._next()(self)

    def do_GET(self) -> None:
        self._record()
        status(405, "chat completions need POST")(self)


class ChatServer:
    """Scripted chat-completions endpoint on 127.0.0.1 (free port), served from a daemon thread."""

    def __init__(self, default: Behaviour | None = None) -> None:
        self.default: Behaviour = default or ok()
        self.stopping = threading.Event()
        self._queue: deque[Behaviour] = deque()
        self._requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- scripting -----------------------------------------------------------------------
    def script(self, *behaviours: Behaviour) -> ChatServer:
        """Queue behaviours for the next requests, in order."""
        with self._lock:
            self._queue.extend(behaviours)
        return self

    def _next(self) -> Behaviour:
        with self._lock:
            return self._queue.popleft() if self._queue else self.default

    def _record(self, request: Recorded) -> None:
        with self._lock:
            self._requests.append(request)

    @property
    def requests(self) -> list[Recorded]:
        with self._lock:
            return list(self._requests)

    # -- lifecycle -----------------------------------------------------------------------
    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("ChatServer is not running")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """Base URL as users configure it; the client appends /chat/completions."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> ChatServer:
        self.stopping.clear()
        httpd = _Server(("127.0.0.1", 0), _Handler)
        httpd.owner = self
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"chat-server-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket (later connections are refused)."""
        if self._httpd is None:
            return
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd, self._thread = None, None

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
