"""Delivery under hostile or failing subscribers, with real loopback HTTP servers and real Redis.

DNS rebinding, non-public addresses, answers that never end or never stop, one slow subscriber
among fast ones, a subscriber down for long (circuit breaker), and the dead-letter cap.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from pipeline.config import DeliverSettings, RedisSettings, Settings
from pipeline.delivery import webhook_http
from pipeline.delivery.channels import DeliveryError, SenderFactory, WebhookSender
from pipeline.delivery.dispatch import Dispatcher
from pipeline.delivery.payload import build_notification
from pipeline.delivery.store import DeliveryLedger, ReplayAlerts
from pipeline.delivery.urls import IPAddress, Target, WebhookURLError, validate_webhook_url
from pipeline.embedded import free_port
from schemas.subscriptions import DeadDelivery, Subscription, WebhookChannel
from tests.test_deliver import SECRET, event, wait_until, webhook
from tests.tls_certs import self_signed
from tests.webhook_receiver import WebhookReceiver


# -- addresses ----------------------------------------------------------------------------------
@pytest.mark.parametrize("address", [
    "100.64.0.1",          # carrier-grade NAT
    "198.18.0.1",          # benchmarking
    "192.0.2.10",          # documentation
    "240.0.0.1",           # reserved
    "224.0.0.251",         # multicast
    "[2002:7f00:1::1]",    # 6to4 wrapping 127.0.0.1
    "[2002:a00:1::1]",     # 6to4 wrapping 10.0.0.1
    "[64:ff9b::7f00:1]",   # NAT64 of 127.0.0.1
    "[2001:db8::1]",       # documentation
    "[fd00::1]",           # unique local
    "[ff0e::1]",           # global-scope multicast
    "[::ffff:100.64.0.1]",  # v4-mapped CGNAT
])
def test_every_address_that_is_not_globally_routable_is_refused(address: str) -> None:
    with pytest.raises(WebhookURLError, match="non-public"):
        validate_webhook_url(f"http://{address}/hook")


@pytest.mark.parametrize("address", ["93.184.215.14", "[2606:4700::1]", "[2002:5db8:d70e::1]"])
def test_global_addresses_pass(address: str) -> None:
    assert validate_webhook_url(f"https://{address}/hook")


class ScriptedResolver:
    """Answers each lookup with the next list of addresses (the last one repeats): a rebinding DNS."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = [[ipaddress.ip_address(a) for a in answer] for answer in answers]
        self.calls: list[str] = []

    def __call__(self, host: str, port: int) -> list[IPAddress]:
        self.calls.append(host)
        return self.answers[min(len(self.calls), len(self.answers)) - 1]


def _notification() -> Any:
    return build_notification("s", event(), "none", None)


def test_rebinding_dns_cannot_reach_loopback() -> None:
    """The name first resolves to a public address (checked, accepted), then to 127.0.0.1: the request
    still goes to the checked address only, never to the loopback receiver."""
    with WebhookReceiver(SECRET) as rx:
        resolver = ScriptedResolver(["93.184.215.14"], ["127.0.0.1"])
        channel = WebhookChannel(url=f"http://hooks.example.test:{rx.port}/hook", secret=SECRET, timeout_s=1.0)
        sender = WebhookSender(channel, allow_private=False, resolver=resolver)
        with pytest.raises(DeliveryError) as failed:
            sender.send(_notification())
        assert "93.184.215.14" in str(failed.value) or "timeout" in str(failed.value)
        assert resolver.calls == ["hooks.example.test"]  # one lookup per attempt: the one checked
        # The next attempt looks up again, gets 127.0.0.1, and refuses it before connecting.
        with pytest.raises(DeliveryError, match="non-public") as refused:
            sender.send(_notification())
        assert refused.value.permanent
        assert rx.requests == []


def test_connection_goes_to_the_checked_address_with_the_host_header_kept() -> None:
    # Both answers are allowed here (private networks allowed): the receiver on 127.0.0.1 sees the
    # request, the decoy on 127.0.0.2 never does, and the Host header is the URL's name.
    with WebhookReceiver(SECRET) as rx, WebhookReceiver(SECRET, host="127.0.0.2") as decoy:
        port = rx.port
        resolver = ScriptedResolver(["127.0.0.1"], ["127.0.0.2"])
        channel = WebhookChannel(url=f"http://hooks.example.test:{port}/hook", secret=SECRET, timeout_s=2.0)
        WebhookSender(channel, allow_private=True, resolver=resolver).send(_notification())
        assert [r.host for r in rx.requests] == [f"hooks.example.test:{port}"]
        assert rx.requests[0].signature_ok and decoy.requests == []


# -- answers that never end -----------------------------------------------------------------------
class RawServer:
    """A loopback TCP server running ``serve(conn)`` per connection; records bytes it managed to send."""

    def __init__(self, serve: Any) -> None:
        self._serve = serve
        self.sent = 0
        self.finished = threading.Event()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        try:
            conn.recv(65536)
            self._serve(self, conn)
            self.finished.set()
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._sock.close()


def test_a_huge_error_body_is_not_read() -> None:
    total = 200 * 1024 * 1024

    def serve(server: RawServer, conn: socket.socket) -> None:
        conn.sendall(f"HTTP/1.1 500 Oops\r\nContent-Length: {total}\r\n\r\n".encode())
        chunk = b"x" * 65536
        while server.sent < total:
            conn.sendall(chunk)
            server.sent += len(chunk)

    server = RawServer(serve)
    try:
        channel = WebhookChannel(url=f"http://127.0.0.1:{server.port}/hook", secret=SECRET, timeout_s=30.0)
        with pytest.raises(DeliveryError, match="HTTP 500") as failed:
            WebhookSender(channel, allow_private=True, max_body=4096).send(_notification())
        assert not failed.value.permanent
        wait_until(lambda: server.sent > 0)
        time.sleep(0.5)
        assert not server.finished.is_set() and server.sent < total // 2  # the rest was never read
    finally:
        server.close()


def test_a_slow_drip_does_not_outlive_the_attempt_deadline() -> None:
    """Headers arrive one byte per 0.1 s (30 s in all): every read is quick, the whole is not."""
    answer = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 280 + b"\r\nContent-Length: 0\r\n\r\n"

    def serve(server: RawServer, conn: socket.socket) -> None:
        for byte in answer:
            conn.sendall(bytes([byte]))
            server.sent += 1
            time.sleep(0.1)

    server = RawServer(serve)
    try:
        channel = WebhookChannel(url=f"http://127.0.0.1:{server.port}/hook", secret=SECRET, timeout_s=1.0)
        with pytest.raises(DeliveryError, match=r"no complete answer within 1\.0 s"):
            WebhookSender(channel, allow_private=True).send(_notification())
        assert not server.finished.is_set()
    finally:
        server.close()


# -- lanes, limits and the circuit breaker ----------------------------------------------------------
@pytest.fixture
def dispatcher_for(redis_client: redis.Redis, redis_settings: RedisSettings) -> Iterator[Any]:
    made: list[tuple[Dispatcher, threading.Event]] = []

    def make(**deliver: Any) -> tuple[Dispatcher, DeliveryLedger]:
        settings = Settings(redis=redis_settings, deliver=DeliverSettings(allow_private_networks=True, **deliver))
        ledger = DeliveryLedger(redis_client, redis_settings.key_prefix)
        stop = threading.Event()
        d = Dispatcher(settings.deliver, ledger, ReplayAlerts(redis_client, redis_settings.key_prefix),
                       SenderFactory(settings, redis_client), stop)
        made.append((d, stop))
        return d, ledger

    yield make
    for d, stop in made:
        stop.set()
        d.close(timeout=5)


def _submit(d: Dispatcher, subs: list[Subscription], n: int, first_offset: int = 0) -> list[Any]:
    d.set_subscriptions({s.id: s for s in subs})
    events = [event("cam-1", (first_offset + i) * 10, 1000.0 + first_offset + i) for i in range(n)]
    for i, ev in enumerate(events):
        d.submit(("defects", 0), first_offset + i, ev)
    return events


def test_a_slow_subscriber_cannot_hold_the_others_or_the_commits(dispatcher_for: Any) -> None:
    d, ledger = dispatcher_for(max_in_flight_per_subscription=2, circuit_probe_s=0.3)
    gate = threading.Event()
    with WebhookReceiver(SECRET) as slow, WebhookReceiver(SECRET) as fast:
        slow.gate = gate
        events = _submit(d, [webhook("slow", slow.url, channel={"timeout_s": 30.0}), webhook("fast", fast.url)], 8)
        assert len(fast.wait_for(8)) == 8
        backlog = [x for x in ledger.dead("slow") if x.error.startswith("backlog_full")]
        # At most one being sent plus two queued: the rest were dead-lettered, not held.
        assert len(backlog) >= 5
        assert d.tracker.in_flight() <= 3
        gate.set()
        # Once the subscriber answers, the lane redrives what it owes by itself.
        assert sorted(slow.wait_for(8)) == sorted(e.event_id for e in events)
        wait_until(lambda: ledger.dead_count("slow") == 0)
        assert d.tracker.committable() == {("defects", 0): 8}


def test_circuit_opens_dead_letters_moves_commits_on_and_closes_when_the_subscriber_answers(
        dispatcher_for: Any) -> None:
    d, ledger = dispatcher_for(circuit_failures=3, circuit_probe_s=0.5)
    port = free_port()
    sub = webhook("down", f"http://127.0.0.1:{port}/hook",
                  channel={"max_attempts": 50, "backoff_initial_s": 0.01, "backoff_max_s": 0.02})
    events = _submit(d, [sub], 10)
    # The lane gives up on the first event after 3 failed attempts (not 50) and the rest go straight
    # to dead letters: every offset settles, so the partition's commit moves on.
    wait_until(lambda: d.tracker.committable() == {("defects", 0): 10})
    dead = ledger.dead("down")
    assert len(dead) == 10 and all(x.error.startswith("circuit_open") for x in dead)
    assert dead[0].attempts == 3 and all(x.attempts <= 1 for x in dead[1:])
    with WebhookReceiver(SECRET, port=port) as rx:
        # Nothing new arrives; the idle lane probes with the oldest owed dead letter, the circuit
        # closes, and the rest follow.
        assert sorted(rx.wait_for(10)) == sorted(e.event_id for e in events)
        wait_until(lambda: ledger.dead_count("down") == 0)
        assert rx.duplicates == 0
        later = _submit(d, [sub], 2, first_offset=10)
        assert set(rx.wait_for(12)) >= {e.event_id for e in later}
        assert not d._lanes["down"].breaker.is_open


def test_dead_letters_are_capped_per_subscription(redis_client: redis.Redis, redis_settings: RedisSettings) -> None:
    ledger = DeliveryLedger(redis_client, redis_settings.key_prefix, max_dead=3)
    for i in range(6):
        dead = DeadDelivery(subscription_id="s", delivery_id=f"d{i}", attempts=1, error="x", failed_at=1000.0 + i,
                            event=event("cam-1", i * 10).model_dump(mode="json"))
        ledger.record_sent("s", "cam-1", f"d{i}", None, dead)
    assert ledger.dead_count("s") == 3
    assert [x.delivery_id for x in ledger.dead("s")] == ["d3", "d4", "d5"]
    assert ledger.dead_count("other") == 0


def test_https_to_a_pinned_address_checks_the_certificate_against_the_url_host(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, "hooks.example.test")
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    def accept() -> None:
        while True:
            try:
                raw, _ = sock.accept()
            except OSError:
                return
            try:
                with server_tls.wrap_socket(raw, server_side=True) as conn:
                    # Read the whole request (headers, then the 2-byte body) before answering: closing
                    # with unread data would reset the connection under the client's read.
                    request = b""
                    while not (b"\r\n\r\n" in request and request.endswith(b"{}")):
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        request += chunk
                    conn.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
            except (OSError, ssl.SSLError):
                continue

    threading.Thread(target=accept, daemon=True).start()
    client_tls = ssl.create_default_context(cafile=str(cert))
    try:
        target = Target("https", "hooks.example.test", port, "/hook", ipaddress.ip_address("127.0.0.1"))
        assert webhook_http.post(target, b"{}", {}, 5.0, 1024, tls=client_tls).status == 204
        wrong = Target("https", "other.example.test", port, "/hook", ipaddress.ip_address("127.0.0.1"))
        with pytest.raises(ssl.SSLCertVerificationError):
            webhook_http.post(wrong, b"{}", {}, 5.0, 1024, tls=client_tls)
    finally:
        sock.close()
