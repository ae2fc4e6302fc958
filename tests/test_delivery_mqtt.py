"""The MQTT channel against real brokers: the shared Mosquitto on 127.0.0.1:1883 (a unique topic prefix
per test) and, for restarts and credentials, a Mosquitto process of the test's own."""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from pipeline.cli import main
from pipeline.config import DeliverSettings, RedisSettings, Settings
from pipeline.delivery.channels import SenderFactory
from pipeline.delivery.dispatch import Dispatcher
from pipeline.delivery.mqtt import MqttSender
from pipeline.delivery.payload import build_notification
from pipeline.delivery.store import CameraStates, DeliveryLedger, ReplayAlerts, SubscriptionStore
from pipeline.embedded import free_port
from schemas.subscriptions import MqttChannel, Subscription
from tests.mqtt_peers import SHARED_BROKER, Mosquitto, MqttCollector
from tests.streaming_helpers import Background
from tests.test_deliver import event, publish, wait_until
from tests.tls_certs import self_signed
from workers.deliver import run_deliver


def mqtt_sub(sub_id: str, url: str, **channel: Any) -> Subscription:
    return Subscription.model_validate({"id": sub_id, "channel": {
        "type": "mqtt", "url": url, "timeout_s": 2.0, "max_attempts": 3, "backoff_initial_s": 0.05,
        "backoff_max_s": 0.3, **channel}})


@pytest.fixture
def prefix() -> str:
    return f"lwtest-{uuid.uuid4().hex[:10]}"


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


def _state(messages: list[Any], topic: str) -> dict[str, Any]:
    return [m for m in messages if m.topic == topic][-1].payload


# -- through the deliver worker --------------------------------------------------------------------
def test_each_transition_arrives_once_and_the_retained_state_is_the_present(
        kafka_settings: Any, redis_settings: RedisSettings, redis_client: redis.Redis, prefix: str) -> None:
    settings = Settings(kafka=kafka_settings, redis=redis_settings,
                        deliver=DeliverSettings(reload_s=0.2, group_id=f"{kafka_settings.topic_prefix}-deliver"))
    host, port = SHARED_BROKER
    SubscriptionStore(redis_client, redis_settings.key_prefix).add(
        mqtt_sub("plc", f"mqtt://{host}:{port}/{prefix}/{{line}}/{{camera}}/{{status}}"))
    a_open, b_open = event("cam-a", 0, 1000.0), event("cam-b", 0, 1001.0, cls="bolt")
    a_closed = event("cam-a", 0, 1000.0, status="closed")
    with MqttCollector(host, port, f"{prefix}/#") as rx:
        publish(settings.kafka, [a_open, b_open, a_closed])
        with Background(run_deliver, settings):
            rx.wait_for(lambda msgs: len([m for m in msgs if "delivery_id" in m.payload]) >= 3
                        and len([m for m in msgs if "state" in m.payload]) >= 3)
            threading.Event().wait(1.0)  # nothing more may arrive
        events = rx.events()
        assert Counter(m.payload["delivery_id"] for m in events) == Counter(
            {a_open.event_id: 1, b_open.event_id: 1, f"{a_closed.event_id}:closed": 1})
        topics = {m.payload["delivery_id"]: m.topic for m in events}
        assert topics[a_open.event_id] == f"{prefix}/line-1/cam-a/open"
        assert topics[f"{a_closed.event_id}:closed"] == f"{prefix}/line-1/cam-a/closed"
        assert not any(m.retain for m in events)
        assert _state(rx.messages, f"{prefix}/line-1/cam-a/state")["state"] == "ok"
        assert _state(rx.messages, f"{prefix}/line-1/cam-b/state") | {"updated_at": 0} == {
            "state": "defect", "event_id": b_open.event_id, "last_event_id": b_open.event_id, "camera_id": "cam-b",
            "line_id": "line-1", "at": 1001.0, "updated_at": 0}
    # A gateway connecting now (a PLC after a power cycle) gets the present at once, retained.
    with MqttCollector(host, port, f"{prefix}/+/+/state") as late:
        got = late.wait_for(lambda msgs: len(msgs) >= 2)
        assert all(m.retain for m in got)
        assert {m.payload["camera_id"]: (m.payload["state"], m.payload["event_id"]) for m in got} == {
            "cam-a": ("ok", None), "cam-b": ("defect", b_open.event_id)}
    # Retained messages outlive the test on the shared broker: clear them.
    _clear_retained(host, port, [f"{prefix}/line-1/cam-a/state", f"{prefix}/line-1/cam-b/state"])


def _clear_retained(host: str, port: int, topics: list[str]) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2)
    client.connect(host, port)
    client.loop_start()
    for topic in topics:
        client.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


def test_filters_and_rate_limit_apply(dispatcher_for: Any, prefix: str) -> None:
    d, ledger = dispatcher_for()
    host, port = SHARED_BROKER
    sub = Subscription.model_validate({
        "id": "line3", "rate_limit_s": 60, "filters": {"lines": ["line-3"], "statuses": ["open", "closed"]},
        "channel": {"type": "mqtt", "url": f"mqtt://{host}:{port}/{prefix}/{{camera}}", "timeout_s": 2.0}})
    d.set_subscriptions({"line3": sub})
    first, held = event("p-1", 0, 1000.0, line="line-3"), event("p-1", 10, 1030.0, line="line-3")
    other_line = event("p-9", 0, 1000.0, line="line-4")
    # The closing comes within the rate limit's interval too, and must go out all the same.
    first_closed = event("p-1", 0, 1000.0, line="line-3", status="closed")
    with MqttCollector(host, port, f"{prefix}/#") as rx:
        for i, ev in enumerate([first, other_line, held, first_closed]):
            d.submit(("defects", 0), i, ev)
        rx.wait_for(lambda msgs: len(msgs) >= 4)
        wait_until(lambda: ledger.outcome("line3", held.event_id) == "coalesced")
        assert [m.payload["delivery_id"] for m in rx.events()] == [first.event_id, f"{first.event_id}:closed"]
        assert [m.payload["state"] for m in rx.messages if m.topic == f"{prefix}/p-1/state"] == ["defect", "ok"]
    _clear_retained(host, port, [f"{prefix}/p-1/state"])


def test_a_late_old_transition_does_not_rewind_the_retained_state(redis_client: redis.Redis,
                                                                  redis_settings: RedisSettings, prefix: str) -> None:
    """A redriven dead letter (an old opening) arrives after the event closed: the message goes out,
    the retained state stays "ok"."""
    host, port = SHARED_BROKER
    channel = mqtt_sub("late", f"mqtt://{host}:{port}/{prefix}/{{camera}}/{{status}}").channel
    assert isinstance(channel, MqttChannel)
    sender = MqttSender(channel, "late", CameraStates(redis_client, redis_settings.key_prefix))
    opened, closed = event("p-1", 0, 1000.0), event("p-1", 0, 1000.0, status="closed")
    try:
        with MqttCollector(host, port, f"{prefix}/#") as rx:
            sender.send(build_notification("late", closed, "none", None))
            sender.send(build_notification("late", opened, "none", None))
            got = rx.wait_for(lambda msgs: len(msgs) >= 4)
            topics = [m.topic for m in got if "delivery_id" in m.payload]
            assert topics == [f"{prefix}/p-1/closed", f"{prefix}/p-1/open"]
            assert [m.payload["state"] for m in got if "state" in m.payload] == ["ok", "ok"]
    finally:
        sender.close()
        _clear_retained(host, port, [f"{prefix}/p-1/state"])


# -- restarts, credentials, dead letters and redrive -------------------------------------------------
def test_a_broker_restart_mid_stream_loses_no_delivery(dispatcher_for: Any, tmp_path: Path, prefix: str,
                                                       capfd: pytest.CaptureFixture[str]) -> None:
    password = "pl4nt-Secret-9"
    with Mosquitto(tmp_path / "broker", users={"linewatch": password, "plc": "plc-pw"}) as broker:
        d, ledger = dispatcher_for(circuit_failures=1000)
        sub = mqtt_sub("plc", f"mqtt://linewatch:{password}@127.0.0.1:{broker.port}/{prefix}/{{camera}}",
                       max_attempts=50, timeout_s=1.0, client_id="linewatch-restart-test")
        assert password not in sub.channel.url
        events = [event(f"cam-{i % 3}", i * 10, 1000.0 + i) for i in range(30)]
        with MqttCollector("127.0.0.1", broker.port, f"{prefix}/#", client_id="plc-gateway", clean=False,
                           username="plc", password="plc-pw") as rx:
            d.set_subscriptions({"plc": sub})
            for i, ev in enumerate(events[:10]):
                d.submit(("defects", 0), i, ev)
            rx.wait_for(lambda msgs: len(rx.events()) >= 5)
            broker.stop()
            for i, ev in enumerate(events[10:20], start=10):  # while the broker is down
                d.submit(("defects", 0), i, ev)
            threading.Event().wait(1.5)
            broker.start()
            for i, ev in enumerate(events[20:], start=20):
                d.submit(("defects", 0), i, ev)
            wait_until(lambda: d.tracker.committable() == {("defects", 0): 30}, timeout=60)
            rx.wait_for(lambda msgs: {e.event_id for e in events} <= {m.payload["delivery_id"] for m in rx.events()},
                        timeout=60)
        assert all(ledger.outcome("plc", e.event_id) == "delivered" for e in events)
        assert ledger.dead_count("plc") == 0
    logs = capfd.readouterr()
    assert password not in logs.out + logs.err


def test_mqtts_trusts_the_configured_ca_only(dispatcher_for: Any, tmp_path: Path, prefix: str) -> None:
    cert, key = self_signed(tmp_path / "tls", "localhost", ip="127.0.0.1")
    with Mosquitto(tmp_path / "broker", tls=(cert, key)) as broker, \
            MqttCollector("127.0.0.1", broker.port, f"{prefix}/#", tls_ca=cert) as rx:
        d, ledger = dispatcher_for(circuit_failures=1000)
        url = f"mqtts://127.0.0.1:{broker.port}/{prefix}/{{camera}}"
        d.set_subscriptions({"tls": mqtt_sub("tls", url, ca_file=str(cert)),
                             "untrusted": mqtt_sub("untrusted", url, max_attempts=1, timeout_s=1.0)})
        ev = event("cam-1", 0, 1000.0)
        d.submit(("defects", 0), 0, ev)
        assert [m.payload["delivery_id"] for m in rx.wait_for(lambda msgs: len(rx.events()) >= 1)
                if "delivery_id" in m.payload] == [ev.event_id]
        wait_until(lambda: ledger.outcome("untrusted", ev.event_id) == "dead")
        assert ledger.outcome("tls", ev.event_id) == "delivered"


def test_broker_down_dead_letters_then_redrive_delivers(dispatcher_for: Any, tmp_path: Path, prefix: str,
                                                        redis_settings: RedisSettings, redis_client: redis.Redis,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    d, ledger = dispatcher_for(circuit_failures=1000)
    sub = mqtt_sub("down", f"mqtt://127.0.0.1:{port}/{prefix}/{{camera}}", max_attempts=2, timeout_s=0.5)
    SubscriptionStore(redis_client, redis_settings.key_prefix).add(sub)
    events = [event("cam-1", 0, 1000.0), event("cam-1", 0, 1000.0, status="closed")]
    d.set_subscriptions({"down": sub})
    for i, ev in enumerate(events):
        d.submit(("defects", 0), i, ev)
    wait_until(lambda: ledger.dead_count("down") == 2)
    assert d.tracker.committable() == {("defects", 0): 2}
    assert all("not connected to MQTT broker" in x.error for x in ledger.dead("down"))

    monkeypatch.setenv("LINEWATCH_REDIS__URL", redis_settings.url or "")
    monkeypatch.setenv("LINEWATCH_REDIS__KEY_PREFIX", redis_settings.key_prefix)
    with Mosquitto(tmp_path / "broker", port=port), MqttCollector("127.0.0.1", port, f"{prefix}/#") as rx:
        assert main(["subscriptions", "redrive", "down"]) == 0
        got = rx.wait_for(lambda msgs: len(msgs) >= 4)  # two events, two states
        assert [m.payload["delivery_id"] for m in rx.events()] == [events[0].event_id, f"{events[0].event_id}:closed"]
        assert _state(got, f"{prefix}/cam-1/state")["state"] == "ok"
    assert "2 delivered, 0 still failing" in capsys.readouterr().out
    assert ledger.dead_count("down") == 0


def test_cli_add_mqtt_keeps_the_password_out_of_the_url_and_the_listing(
        redis_settings: RedisSettings, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LINEWATCH_REDIS__URL", redis_settings.url or "")
    monkeypatch.setenv("LINEWATCH_REDIS__KEY_PREFIX", redis_settings.key_prefix)
    assert main(["subscriptions", "add", "plc", "--mqtt",
                 "mqtts://gw:S3cr%40t@broker.plant:8883/linewatch/{line}/{camera}", "--client-id", "lw-1",
                 "--line", "line-3"]) == 0
    assert "S3cr" not in capsys.readouterr().out
    sub = SubscriptionStore(redis_client, redis_settings.key_prefix).get("plc")
    ch = sub.channel
    assert ch.type == "mqtt" and ch.url == "mqtts://broker.plant:8883/linewatch/{line}/{camera}"
    assert (ch.username, ch.password, ch.client_id, ch.qos, ch.port, ch.tls) == ("gw", "S3cr@t", "lw-1", 1, 8883, True)
    assert sub.filters.statuses == ["open", "closed"]
    assert main(["subscriptions", "list", "--json"]) == 0
    out = capsys.readouterr().out
    assert "S3cr" not in out and json.loads(out)[0]["channel"]["password"] == "****"
    assert main(["subscriptions", "add", "bad", "--mqtt", "mqtt://h/a/{shift}"]) == 2
    assert "allowed" in capsys.readouterr().err
