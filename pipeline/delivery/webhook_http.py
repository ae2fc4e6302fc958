"""One HTTP POST to a checked address, under one deadline, reading at most a few KiB of the answer.

General clients resolve the host themselves (a second lookup a rebinding DNS server can answer
with 127.0.0.1), time out per read (a server dripping one byte a second never times out) and read
error bodies whole. Here the connection goes to ``Target.address`` while the Host header and the
TLS server name (SNI and certificate check) stay the URL's host; a watchdog shuts the socket down
when the attempt's deadline passes, whatever phase it is in; and the body is cut at ``max_body``.

Through an HTTP proxy (`pipeline.delivery.proxy`), an https URL goes through a CONNECT tunnel
(TLS to the URL's host inside it, certificate checked against that host as ever) and an http URL
is sent to the proxy in absolute form; the proxy resolves the host.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import time
from dataclasses import dataclass

from pipeline.delivery.proxy import Proxy
from pipeline.delivery.urls import Target

# A proxy's answer to CONNECT is a status line and a few headers; more is not an answer.
MAX_CONNECT_ANSWER = 16 * 1024


class DeadlineExceededError(TimeoutError):
    pass


class ProxyError(OSError):
    """The proxy did not open the tunnel; ``status`` is its answer's status code, if it gave one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


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


def _pinned_address(target: Target) -> str:
    if target.address is None:
        raise ValueError(f"no checked address for {target.host!r} (only a proxy may connect without one)")
    return str(target.address)


def _authority(host: str, port: int) -> str:
    """host:port as a request target, IPv6 in brackets and names in their ASCII (IDNA) form."""
    if ":" in host:
        return f"[{host}]:{port}"
    try:
        host.encode("ascii")
    except UnicodeEncodeError:
        host = host.encode("idna").decode("ascii")
    return f"{host}:{port}"


def _tunnel(sock: socket.socket, target: Target, proxy: Proxy) -> None:
    """CONNECT through the proxy to the target's host and port; returns once the tunnel is open."""
    authority = _authority(target.host, target.port)
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if proxy.authorization:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
    answer = b""
    while b"\r\n\r\n" not in answer:
        if len(answer) > MAX_CONNECT_ANSWER:
            raise ProxyError(f"proxy {proxy} answered CONNECT with more than {MAX_CONNECT_ANSWER} bytes of headers")
        chunk = sock.recv(4096)
        if not chunk:
            raise ProxyError(f"proxy {proxy} closed the connection during CONNECT to {authority}")
        answer += chunk
    head, _, rest = answer.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    fields = status_line.split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
        raise ProxyError(f"proxy {proxy} gave no HTTP answer to CONNECT: {status_line[:100]!r}")
    status = int(fields[1])
    if not 200 <= status < 300:
        raise ProxyError(f"proxy {proxy} refused CONNECT to {authority}: {status_line[:200]}", status)
    if rest:
        # The client speaks first in TLS: anything already here did not come from the target.
        raise ProxyError(f"proxy {proxy} sent data ahead of the tunnel to {authority}")


class _PinnedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, target: Target, timeout: float, expired: threading.Event) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self._address = _pinned_address(target)
        self._expired = expired

    def connect(self) -> None:
        self.sock = _connect(self._address, self.port, self.timeout, self._expired)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, target: Target, timeout: float, expired: threading.Event, context: ssl.SSLContext) -> None:
        super().__init__(target.host, target.port, timeout=timeout, context=context)
        self._address = _pinned_address(target)
        self._expired = expired
        self._tls = context

    def connect(self) -> None:
        # Set before the handshake so the watchdog can cut a handshake that drips too.
        self.sock = raw = _connect(self._address, self.port, self.timeout, self._expired)
        # server_hostname: SNI and the certificate are checked against the URL's host, not the IP.
        self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)


class _ProxiedHTTPConnection(http.client.HTTPConnection):
    """http:// through a proxy: the connection goes to the proxy, the request names the URL whole."""

    def __init__(self, proxy: Proxy, timeout: float, expired: threading.Event) -> None:
        super().__init__(proxy.host, proxy.port, timeout=timeout)
        self._expired = expired

    def connect(self) -> None:
        self.sock = _connect(self.host, self.port, self.timeout, self._expired)


class _TunnelledHTTPSConnection(http.client.HTTPSConnection):
    """https:// through a proxy: CONNECT, then TLS to the URL's host inside the tunnel."""

    def __init__(self, target: Target, proxy: Proxy, timeout: float, expired: threading.Event,
                 context: ssl.SSLContext) -> None:
        super().__init__(target.host, target.port, timeout=timeout, context=context)
        self._target = target
        self._proxy = proxy
        self._expired = expired
        self._tls = context

    def connect(self) -> None:
        # Set before CONNECT so the watchdog can cut a proxy that drips its answer.
        self.sock = raw = _connect(self._proxy.host, self._proxy.port, self.timeout, self._expired)
        _tunnel(raw, self._target, self._proxy)
        self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)


_DEFAULT_TLS: ssl.SSLContext | None = None


def _default_tls() -> ssl.SSLContext:
    global _DEFAULT_TLS
    if _DEFAULT_TLS is None:
        _DEFAULT_TLS = ssl.create_default_context()
    return _DEFAULT_TLS


def post(target: Target, body: bytes, headers: dict[str, str], deadline_s: float, max_body: int,
         tls: ssl.SSLContext | None = None, proxy: Proxy | None = None) -> Response:
    """POST ``body`` (through ``proxy`` when given); raises DeadlineExceededError past ``deadline_s``,
    ProxyError when the proxy does not open a tunnel, and OSError/HTTPException otherwise."""
    expired = threading.Event()
    path = target.path
    headers = {**headers, "Connection": "close"}
    conn: http.client.HTTPConnection
    if proxy is not None and target.scheme == "https":
        conn = _TunnelledHTTPSConnection(target, proxy, deadline_s, expired, tls or _default_tls())
    elif proxy is not None:
        conn = _ProxiedHTTPConnection(proxy, deadline_s, expired)
        # Absolute form: http.client takes the Host header from it.
        authority = _authority(target.host, target.port)
        path = f"http://{authority.removesuffix(':80')}{target.path}"
        if proxy.authorization:
            headers["Proxy-Authorization"] = proxy.authorization
    elif target.scheme == "https":
        conn = _PinnedHTTPSConnection(target, deadline_s, expired, tls or _default_tls())
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
        conn.request("POST", path, body=body, headers=headers)
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
