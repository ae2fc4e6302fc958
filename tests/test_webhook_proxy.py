"""Webhooks through an HTTP proxy: CONNECT tunnels for https, absolute form for http, NO_PROXY.

A real proxy runs on loopback (`TinyProxy`, threads and sockets): it resolves names itself through
its own table, so `hooks.example.test` (which this process cannot resolve) reaches a loopback
receiver only through it, and it records every request it was asked to carry.
"""

from __future__ import annotations

import base64
import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from pipeline.config import DeliverSettings, Settings
from pipeline.delivery.channels import DeliveryError, SenderFactory, WebhookSender
from pipeline.delivery.manage import check_subscription
from pipeline.delivery.payload import build_notification
from pipeline.delivery.proxy import WebhookProxies, bypasses
from pipeline.delivery.urls import WebhookURLError
from schemas.subscriptions import Subscription, WebhookChannel
from tests.test_deliver import SECRET, event
from tests.tls_certs import self_signed
from tests.webhook_receiver import WebhookReceiver

HOST = "hooks.example.test"  # .test never resolves: only the proxy knows where it is
PROXY_AUTH = "Basic " + base64.b64encode(b"plant:s3cret").decode()


@dataclass(frozen=True)
class Carried:
    method: str
    target: str
    authorization: str | None


class TinyProxy:
    """A threaded HTTP proxy on loopback: CONNECT tunnels and absolute-form forwarding.

    Names resolve through ``hosts``; with ``auth`` set, a request without that Proxy-Authorization
    gets 407. ``carried`` lists every request it was asked for, authorized or not.
    """

    def __init__(self, hosts: dict[str, str], auth: str | None = None) -> None:
        self.hosts = hosts
        self.auth = auth
        self.carried: list[Carried] = []
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, credentials: str = "") -> str:
        return f"http://{credentials}127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.ExitStack() as stack:
            stack.enter_context(conn)
            conn.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            head, _, early = head.partition(b"\r\n\r\n")
            request_line, *lines = head.decode("latin-1").split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
            with self._lock:
                self.carried.append(Carried(method, target, headers.get("proxy-authorization")))
            if self.auth is not None and headers.get("proxy-authorization") != self.auth:
                conn.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                             b"Proxy-Authenticate: Basic realm=\"plant\"\r\nContent-Length: 0\r\n\r\n")
                return
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
                upstream = stack.enter_context(socket.create_connection((self.hosts.get(host, host), int(port)), 5))
                conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                upstream.sendall(early)
            else:
                url = urlsplit(target)
                assert url.scheme == "http" and url.hostname, f"not an absolute-form request: {request_line}"
                upstream = stack.enter_context(socket.create_connection(
                    (self.hosts.get(url.hostname, url.hostname), url.port or 80), 5))
                kept = [ln for ln in lines if not ln.lower().startswith(("proxy-authorization:", "proxy-connection:"))]
                origin = (url.path or "/") + (f"?{url.query}" if url.query else "")
                upstream.sendall("\r\n".join([f"{method} {origin} HTTP/1.1", *kept]).encode("latin-1")
                                 + b"\r\n\r\n" + early)
            self._pipe(conn, upstream)

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        def copy(src: socket.socket, dst: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while chunk := src.recv(65536):
                    dst.sendall(chunk)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        back = threading.Thread(target=copy, args=(b, a), daemon=True)
        back.start()
        copy(a, b)
        back.join(10)

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def proxy() -> Iterator[TinyProxy]:
    p = TinyProxy({HOST: "127.0.0.1"}, auth=PROXY_AUTH)
    yield p
    p.close()


@pytest.fixture
def clean_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _notification() -> Any:
    return build_notification("s", event(), "none", None)


def _tls_receiver(tmp_path: Path) -> tuple[WebhookReceiver, ssl.SSLContext]:
    """A WebhookReceiver speaking TLS with a certificate for HOST, and a client context trusting it."""
    cert, key = self_signed(tmp_path, HOST)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    rx = WebhookReceiver(SECRET)
    rx._server.socket = server_tls.wrap_socket(rx._server.socket, server_side=True)
    return rx, ssl.create_default_context(cafile=str(cert))


def test_https_webhook_goes_through_a_connect_tunnel_set_by_https_proxy(
        proxy: TinyProxy, clean_proxy_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """HTTPS_PROXY with credentials: CONNECT to the URL's host (never resolved here), TLS checked
    against that host inside the tunnel; without the credentials the proxy's 407 is final."""
    clean_proxy_env.setenv("HTTPS_PROXY", proxy.url("plant:s3cret@"))
    rx, client_tls = _tls_receiver(tmp_path)
    with rx:
        channel = WebhookChannel(url=f"https://{HOST}:{rx.port}/hook", secret=SECRET, timeout_s=5.0)
        WebhookSender(channel, allow_private=False, proxies=WebhookProxies(), tls=client_tls).send(_notification())
        assert rx.wait_for(1, 10) == [_notification().delivery_id]
        assert rx.requests[0].signature_ok and rx.requests[0].host == f"{HOST}:{rx.port}"
        assert proxy.carried == [Carried("CONNECT", f"{HOST}:{rx.port}", PROXY_AUTH)]

        clean_proxy_env.setenv("HTTPS_PROXY", proxy.url())
        with pytest.raises(DeliveryError) as refused:
            WebhookSender(channel, allow_private=False, proxies=WebhookProxies(), tls=client_tls).send(_notification())
        assert refused.value.permanent and "407" in str(refused.value) and "s3cret" not in str(refused.value)
        assert len(rx.requests) == 1


def test_http_webhook_goes_to_the_proxy_in_absolute_form_and_no_proxy_bypasses_it(
        proxy: TinyProxy, clean_proxy_env: pytest.MonkeyPatch) -> None:
    clean_proxy_env.setenv("http_proxy", proxy.url("plant:s3cret@"))
    clean_proxy_env.setenv("NO_PROXY", "localhost, 127.0.0.0/8")
    with WebhookReceiver(SECRET) as rx:
        via_proxy = WebhookChannel(url=f"http://{HOST}:{rx.port}/hook?line=3", secret=SECRET, timeout_s=5.0)
        WebhookSender(via_proxy, allow_private=False, proxies=WebhookProxies()).send(_notification())
        assert proxy.carried == [Carried("POST", f"http://{HOST}:{rx.port}/hook?line=3", PROXY_AUTH)]
        assert rx.requests[-1].signature_ok and rx.requests[-1].host == f"{HOST}:{rx.port}"

        # NO_PROXY covers the loopback receiver: reached directly (an internal receiver, so allowed).
        direct = WebhookChannel(url=f"http://127.0.0.1:{rx.port}/hook", secret=SECRET, timeout_s=5.0)
        WebhookSender(direct, allow_private=True, proxies=WebhookProxies()).send(_notification())
        assert len(rx.requests) == 2 and rx.requests[-1].host == f"127.0.0.1:{rx.port}"
        assert len(proxy.carried) == 1

        # A domain in NO_PROXY: direct, so the name must resolve here, and .test does not.
        clean_proxy_env.setenv("NO_PROXY", ".example.test")
        with pytest.raises(DeliveryError) as unresolved:
            WebhookSender(via_proxy, allow_private=False, proxies=WebhookProxies()).send(_notification())
        assert unresolved.value.permanent and "cannot resolve" in str(unresolved.value)
        assert len(proxy.carried) == 1 and len(rx.requests) == 2


def test_through_a_proxy_the_url_itself_is_still_checked(proxy: TinyProxy, clean_proxy_env: pytest.MonkeyPatch,
                                                         redis_client: redis.Redis) -> None:
    """The proxy resolves names, so a name is the proxy's policy; a private address or a loopback
    name written in the URL is refused here, before the proxy hears of it."""
    settings = Settings(deliver=DeliverSettings(webhook_proxy=proxy.url("plant:s3cret@")))
    make = SenderFactory(settings, redis_client)
    for url in ("http://127.0.0.1:8080/hook", "https://10.1.2.3/hook", "http://localhost/hook",
                "https://[::ffff:192.168.0.1]/hook"):
        sub = Subscription(id="s", channel=WebhookChannel(url=url, secret=SECRET, timeout_s=2.0))
        with pytest.raises(DeliveryError) as refused:
            make(sub).send(_notification())
        assert refused.value.permanent, url
        with pytest.raises(WebhookURLError):
            check_subscription(sub, settings)
    assert proxy.carried == []
    # A name only the proxy can resolve is accepted when the subscription is added (direct: refused).
    named = Subscription(id="n", channel=WebhookChannel(url=f"https://{HOST}/hook", secret=SECRET))
    check_subscription(named, settings)
    with pytest.raises(WebhookURLError, match="cannot resolve"):
        check_subscription(named, Settings(deliver=DeliverSettings(webhook_proxy="direct")))


def test_configured_proxy_and_no_proxy_override_the_environment(
        proxy: TinyProxy, clean_proxy_env: pytest.MonkeyPatch, redis_client: redis.Redis) -> None:
    clean_proxy_env.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    clean_proxy_env.setenv("NO_PROXY", "*")
    other = TinyProxy({HOST: "127.0.0.1"})
    try:
        with WebhookReceiver(SECRET) as rx:
            settings = Settings(deliver=DeliverSettings(webhook_proxy=other.url(),
                                                        webhook_no_proxy=["internal.example.test"]))
            sub = Subscription(id="s", channel=WebhookChannel(url=f"http://{HOST}:{rx.port}/hook", secret=SECRET,
                                                              timeout_s=5.0))
            SenderFactory(settings, redis_client)(sub).send(_notification())
            assert [c.target for c in other.carried] == [f"http://{HOST}:{rx.port}/hook"]
            assert rx.wait_for(1, 10)
    finally:
        other.close()
    assert proxy.carried == []
    with pytest.raises(ValueError, match="only http:// proxies"):
        DeliverSettings(webhook_proxy="socks5://127.0.0.1:1080")


def test_no_proxy_entries() -> None:
    entries = [".corp.example", "plant.example:8443", "10.0.0.0/8", "[::1]:8080", "192.168.1.7"]
    assert bypasses("corp.example", 443, entries) and bypasses("a.b.corp.example", 80, entries)
    assert not bypasses("notcorp.example", 443, entries)
    assert bypasses("plant.example", 8443, entries) and not bypasses("plant.example", 443, entries)
    assert bypasses("10.20.30.40", 443, entries) and not bypasses("11.0.0.1", 443, entries)
    assert bypasses("::1", 8080, entries) and not bypasses("::1", 443, entries)
    assert bypasses("192.168.1.7", 80, entries) and not bypasses("192.168.1.8", 80, entries)
    assert bypasses("anything.example", 443, ["*"]) and not bypasses("anything.example", 443, [])
