"""One HTTP POST to a checked address, under one deadline, reading at most a few KiB of the answer.

General clients resolve the host themselves (a second lookup a rebinding DNS server can answer
with 127.0.0.1), time out per read (a server dripping one byte a second never times out) and read
error bodies whole. Here the connection goes to ``Target.address`` while the Host header and the
TLS server name (SNI and certificate check) stay the URL's host; a watchdog shuts the socket down
when the attempt's deadline passes, whatever phase it is in; and the body is cut at ``max_body``.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import time
from dataclasses import dataclass

from pipeline.delivery.urls import Target


class DeadlineExceededError(TimeoutError):
    pass


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes  # at most max_body bytes


def _connect(address: str, port: int, timeout: float, expired: threading.Event) -> socket.socket:
    sock = socket.create_connection((address, port), timeout)
    if expired.is_set():  # the watchdog fired while connecting, before it could see the socket
        sock.close()
        raise DeadlineExceededError("deadline exceeded while connecting")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, target: Target, timeout: float, expired: threading.Event) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self._address = str(target.address)
        self._expired = expired

    def connect(self) -> None:
        self.sock = _connect(self._address, self.port, self.timeout, self._expired)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, target: Target, timeout: float, expired: threading.Event, context: ssl.SSLContext) -> None:
        super().__init__(target.host, target.port, timeout=timeout, context=context)
        self._address = str(target.address)
        self._expired = expired
        self._tls = context

    def connect(self) -> None:
        # Set before the handshake so the watchdog can cut a handshake that drips too.
        self.sock = raw = _connect(self._address, self.port, self.timeout, self._expired)
        # server_hostname: SNI and the certificate are checked against the URL's host, not the IP.
        self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)


_DEFAULT_TLS: ssl.SSLContext | None = None


def _default_tls() -> ssl.SSLContext:
    global _DEFAULT_TLS
    if _DEFAULT_TLS is None:
        _DEFAULT_TLS = ssl.create_default_context()
    return _DEFAULT_TLS


def post(target: Target, body: bytes, headers: dict[str, str], deadline_s: float, max_body: int,
         tls: ssl.SSLContext | None = None) -> Response:
    """POST ``body``; raises DeadlineExceededError past ``deadline_s`` and OSError/HTTPException otherwise."""
    expired = threading.Event()
    if target.scheme == "https":
        conn: http.client.HTTPConnection = _PinnedHTTPSConnection(target, deadline_s, expired,
                                                                  tls or _default_tls())
    else:
        conn = _PinnedHTTPConnection(target, deadline_s, expired)

    def expire() -> None:
        expired.set()
        sock = conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    started = time.monotonic()
    watchdog = threading.Timer(deadline_s, expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        conn.request("POST", target.path, body=body, headers={**headers, "Connection": "close"})
        answer = conn.getresponse()
        data = answer.read(max_body)
        if expired.is_set():
            raise DeadlineExceededError(f"deadline of {deadline_s} s exceeded")
        return Response(answer.status, {k.lower(): v for k, v in answer.getheaders()}, data)
    except (OSError, http.client.HTTPException) as exc:
        if expired.is_set() or time.monotonic() - started >= deadline_s:
            raise DeadlineExceededError(f"deadline of {deadline_s} s exceeded") from exc
        raise
    finally:
        watchdog.cancel()
        conn.close()
