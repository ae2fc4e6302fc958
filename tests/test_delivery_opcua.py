"""The OPC UA channel against a real asyncua server started by the test."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from pipeline.cli import main
from pipeline.config import DeliverSettings, RedisSettings, Settings
from pipeline.delivery.channels import SenderFactory
from pipeline.delivery.dispatch import Dispatcher
from pipeline.delivery.store import DeliveryLedger, ReplayAlerts, SubscriptionStore
from pipeline.embedded import free_port
from schemas.subscriptions import Subscription
from tests.opcua_peer import OpcUaServer, nodes
from tests.test_deliver import event, wait_until


def opcua_sub(sub_id: str, endpoint: str, **channel: Any) -> Subscription:
    return Subscription.model_validate({"id": sub_id, "channel": {
        "type": "opcua", "endpoint": endpoint, "timeout_s": 3.0, "max_attempts": 3, "backoff_initial_s": 0.05,
        "backoff_max_s": 0.3, "cameras": {"press-1": nodes("Press1")}, "lines": {"line-4": nodes("Line4")},
        **channel}})


@pytest.fixture
def dispatcher_for(redis_client: redis.Redis, redis_settings: RedisSettings) -> Iterator[Any]:
    made: list[tuple[Dispatcher, threading.Event]] = []

    def make(**deliver: Any) -> tuple[Dispatcher, DeliveryLedger]:
        settings = Settings(redis=redis_settings, deliver=DeliverSettings(**deliver))
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


class Feed:
    """Submits events to the dispatcher at increasing offsets and waits until each is settled."""

    def __init__(self, d: Dispatcher) -> None:
        self.d = d
        self.offset = 0

    def __call__(self, *events: Any) -> None:
        for ev in events:
            self.d.submit(("defects", 0), self.offset, ev)
            self.offset += 1
        wait_until(lambda: self.d.tracker.committable() == {("defects", 0): self.offset})


def test_nodes_follow_events_open_and_close(dispatcher_for: Any) -> None:
    with OpcUaServer() as plc:
        d, ledger = dispatcher_for()
        d.set_subscriptions({"plc": opcua_sub("plc", plc.endpoint)})
        feed = Feed(d)
        first = event("press-1", 0, 1000.0, score=0.93)
        feed(first)
        values = plc.values("Press1")
        assert values["Reject"] is True and values["EventId"] == first.event_id and values["Count"] == 1
        assert values["PeakScore"] == pytest.approx(0.93, abs=1e-6)
        feed(event("press-1", 0, 1000.0, status="closed", score=0.97))
        values = plc.values("Press1")
        assert values["Reject"] is False and values["Count"] == 1
        assert values["PeakScore"] == pytest.approx(0.97, abs=1e-6)
        second = event("press-1", 50, 1100.0)
        feed(second)
        assert plc.values("Press1")["Count"] == 2 and plc.read("Press1.Reject") is True
        # A camera without its own nodes uses its line's; one without either is skipped, not failed.
        feed(event("lathe-7", 0, 1000.0, line="line-4"), event("other", 0, 1000.0, line="line-9"))
        assert plc.values("Line4")["Count"] == 1 and plc.read("Line4.Reject") is True
        assert plc.values("Press1")["EventId"] == second.event_id
        assert ledger.dead_count("plc") == 0
        assert plc.changes("Press1.Reject") == [False, True, False, True]


def test_pulse_mode_sets_the_signal_back_after_its_width(dispatcher_for: Any) -> None:
    with OpcUaServer() as plc:
        d, _ = dispatcher_for()
        d.set_subscriptions({"plc": opcua_sub("plc", plc.endpoint, reject_mode="pulse", pulse_ms=200)})
        feed = Feed(d)
        feed(event("press-1", 0, 1000.0))
        wait_until(lambda: plc.changes("Press1.Reject") == [False, True, False])
        assert plc.read("Press1.Count") == 1
        feed(event("press-1", 0, 1000.0, status="closed"))
        assert plc.changes("Press1.Reject") == [False, True, False]  # closing does not touch a pulse


def test_server_down_retries_dead_letters_then_redrive_delivers(dispatcher_for: Any, redis_settings: RedisSettings,
                                                                redis_client: redis.Redis,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    d, ledger = dispatcher_for(circuit_failures=1000)
    sub = opcua_sub("plc", f"opc.tcp://127.0.0.1:{port}/linewatch/", max_attempts=2, timeout_s=1.0)
    SubscriptionStore(redis_client, redis_settings.key_prefix).add(sub)
    d.set_subscriptions({"plc": sub})
    opened = event("press-1", 0, 1000.0)
    Feed(d)(opened)
    (dead,) = ledger.dead("plc")
    assert dead.attempts == 2 and "OPC UA server" in dead.error

    monkeypatch.setenv("LINEWATCH_REDIS__URL", redis_settings.url or "")
    monkeypatch.setenv("LINEWATCH_REDIS__KEY_PREFIX", redis_settings.key_prefix)
    with OpcUaServer(port=port) as plc:
        assert main(["subscriptions", "redrive", "plc"]) == 0
        assert "1 delivered, 0 still failing" in capsys.readouterr().out
        assert plc.read("Press1.Reject") is True and plc.read("Press1.EventId") == opened.event_id
        assert plc.read("Press1.Count") == 1
    assert ledger.dead_count("plc") == 0


@pytest.mark.parametrize("security", ["Basic256Sha256_SignAndEncrypt", "Basic256Sha256_Sign"])
def test_secured_with_certificates_and_a_password(security: str, dispatcher_for: Any, tmp_path: Path,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    password = "opc-Secret-77"
    with OpcUaServer(tmp_path, secure=True, users={"linewatch": password}) as plc:
        d, ledger = dispatcher_for(circuit_failures=1000)
        secure = {"security": security, "certificate": str(plc.client_cert),
                  "private_key": str(plc.client_key), "server_certificate": str(plc.server_cert),
                  "username": "linewatch", "password": password}
        wrong = opcua_sub("wrong", plc.endpoint, **{**secure, "password": "not-it"}, max_attempts=1)
        plain = opcua_sub("plain", plc.endpoint, max_attempts=1)
        d.set_subscriptions({"ok": opcua_sub("ok", plc.endpoint, **secure), "wrong": wrong, "plain": plain})
        ev = event("press-1", 0, 1000.0)
        Feed(d)(ev)
        assert plc.read("Press1.Reject") is True and plc.read("Press1.Count") == 1
        assert ledger.outcome("ok", ev.event_id) == "delivered"
        assert ledger.outcome("wrong", ev.event_id) == "dead" and ledger.outcome("plain", ev.event_id) == "dead"
    logs = capfd.readouterr()
    assert password not in logs.out + logs.err


def test_cli_add_opcua_with_node_flags(redis_settings: RedisSettings, redis_client: redis.Redis,
                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LINEWATCH_REDIS__URL", redis_settings.url or "")
    monkeypatch.setenv("LINEWATCH_REDIS__KEY_PREFIX", redis_settings.key_prefix)
    monkeypatch.setenv("LINEWATCH_SUBSCRIPTION_PASSWORD", "from-the-env-1")
    assert main(["subscriptions", "add", "plc", "--opcua", "opc.tcp://plc.plant:4840",
                 "--node", 'press-1.reject=ns=3;s="DB"."Press1"."Reject"', "--node", "press-1.count=ns=3;i=42",
                 "--line-node", "line-4.reject=ns=3;s=L4", "--pulse-ms", "250", "--username", "lw"]) == 0
    sub = SubscriptionStore(redis_client, redis_settings.key_prefix).get("plc")
    ch = sub.channel
    assert ch.type == "opcua" and ch.reject_mode == "pulse" and ch.pulse_ms == 250
    press = ch.cameras["press-1"]
    assert press.reject == 'ns=3;s="DB"."Press1"."Reject"' and press.count == "ns=3;i=42"
    assert ch.lines["line-4"].reject == "ns=3;s=L4" and (ch.username, ch.password) == ("lw", "from-the-env-1")
    assert sub.filters.statuses == ["open", "closed"]
    assert main(["subscriptions", "add", "bad", "--opcua", "opc.tcp://h:4840", "--node", "press-1.colour=x"]) == 2
    assert "NAME.FIELD=NODEID" in capsys.readouterr().err
    assert main(["subscriptions", "add", "bad", "--opcua", "opc.tcp://h:4840", "--node", "p.reject=x",
                 "--security", "Basic256Sha256_Sign"]) == 2
    assert "needs `certificate` and `private_key`" in capsys.readouterr().err
