"""Subscriptions and the deliver worker against a real broker, real Redis and real HTTP receivers."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import numpy as np
import pytest
import redis

from pipeline.bus import create_topics, make_producer, topic_name
from pipeline.cli import main
from pipeline.config import DeliverSettings, KafkaSettings, RedisSettings, Settings
from pipeline.delivery.attempts import RetryPolicy
from pipeline.delivery.filters import matches
from pipeline.delivery.signing import SignatureError, sign, verify
from pipeline.delivery.store import DeliveryLedger, ReplayAlerts, SubscriptionStore
from pipeline.delivery.urls import WebhookURLError, validate_webhook_url
from pipeline.embedded import free_port
from pipeline.imaging import encode_jpeg, encode_png
from schemas.events import DefectEvent, Region
from schemas.subscriptions import Subscription, SubscriptionFilter
from tests.streaming_helpers import Background, read_topic
from tests.webhook_receiver import WebhookReceiver
from workers.deliver import run_deliver

SECRET = "s3cret-s3cret-s3cret"
_MASK = encode_png(np.zeros((8, 8), np.uint8))
_THUMB = encode_jpeg(np.zeros((8, 8, 3), np.uint8))


def event(camera: str = "cam-1", first_seq: int = 0, ts: float = 1000.0, status: str = "open", score: float = 0.9,
          area: int = 100, line: str = "line-1", cls: str = "ball_screw", session: str | None = None) -> DefectEvent:
    return DefectEvent(
        event_id=DefectEvent.make_id(camera, first_seq, session), status=status, camera_id=camera, line_id=line,
        product_class=cls, first_seq=first_seq, last_seq=first_seq + 3, first_ts=ts, last_ts=ts + 1.0,
        peak_seq=first_seq + 1, peak_score=score, threshold=0.5, n_frames=4, width=8, height=8,
        regions=[Region(x=0, y=0, width=4, height=4, area=area)], mask_png=_MASK, thumbnail_jpeg=_THUMB,
        replay_session=session,
    )


def publish(kafka: KafkaSettings, events: list[DefectEvent]) -> None:
    create_topics(kafka, names=("defects", "dlq"))
    producer = make_producer(kafka)
    for ev in events:
        producer.send(topic_name(kafka, "defects"), key=ev.camera_id.encode(), value=ev.model_dump_json().encode())
    producer.flush()
    producer.close()


def webhook(sub_id: str, url: str, **kw: Any) -> Subscription:
    channel = {"type": "webhook", "url": url, "secret": SECRET, "timeout_s": 2.0, "max_attempts": 3,
               "backoff_initial_s": 0.05, "backoff_max_s": 0.2, **kw.pop("channel", {})}
    return Subscription.model_validate({"id": sub_id, "channel": channel, **kw})


@pytest.fixture
def settings(kafka_settings: KafkaSettings, redis_settings: RedisSettings) -> Settings:
    return Settings(kafka=kafka_settings, redis=redis_settings,
                    deliver=DeliverSettings(allow_private_networks=True, reload_s=0.2,
                                            group_id=f"{kafka_settings.topic_prefix}-deliver"))


@pytest.fixture
def store(redis_client: redis.Redis, redis_settings: RedisSettings) -> SubscriptionStore:
    return SubscriptionStore(redis_client, redis_settings.key_prefix)


@pytest.fixture
def ledger(redis_client: redis.Redis, redis_settings: RedisSettings) -> DeliveryLedger:
    return DeliveryLedger(redis_client, redis_settings.key_prefix)


def wait_until(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


# -- pure parts ---------------------------------------------------------------------------------
def test_filters_are_exact() -> None:
    f = SubscriptionFilter(lines=["line-3"], cameras=["press-*"], product_classes=["bolt"], min_peak_score=0.7,
                           min_area=50)
    ok = event(camera="press-2", line="line-3", cls="bolt", score=0.7, area=50)
    assert matches(f, ok)
    assert not matches(f, event(camera="lathe-2", line="line-3", cls="bolt", score=0.8, area=60))
    assert not matches(f, event(camera="press-2", line="line-4", cls="bolt", score=0.8, area=60))
    assert not matches(f, event(camera="press-2", line="line-3", cls="nut", score=0.8, area=60))
    assert not matches(f, event(camera="press-2", line="line-3", cls="bolt", score=0.69, area=60))
    assert not matches(f, event(camera="press-2", line="line-3", cls="bolt", score=0.8, area=49))
    assert not matches(f, event(camera="press-2", line="line-3", cls="bolt", score=0.8, area=60, status="closed"))
    assert matches(SubscriptionFilter(statuses=["closed"]), event(status="closed"))
    assert matches(SubscriptionFilter(), event())


def test_signature_roundtrip_and_tampering() -> None:
    body = b'{"a": 1}'
    header = sign(SECRET, body)
    assert verify(SECRET, header, body) > 0
    with pytest.raises(SignatureError, match="does not match"):
        verify(SECRET, header, b'{"a": 2}')
    with pytest.raises(SignatureError, match="does not match"):
        verify("another-secret-1234", header, body)
    with pytest.raises(SignatureError, match="tolerance"):
        verify(SECRET, sign(SECRET, body, timestamp=int(time.time()) - 3600), body)
    with pytest.raises(SignatureError, match="missing"):
        verify(SECRET, None, body)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/x", "http://localhost/x", "http://10.1.2.3/x",
                                 "http://192.168.0.10/x", "http://169.254.169.254/latest", "http://[::1]/x",
                                 "http://0.0.0.0/x", "http://[::ffff:127.0.0.1]/x"])
def test_internal_webhook_urls_are_refused_unless_allowed(url: str) -> None:
    with pytest.raises(WebhookURLError, match="allow_private_networks"):
        validate_webhook_url(url)
    assert validate_webhook_url(url, allow_private=True) == url


@pytest.mark.parametrize("url", ["ftp://example.com/x", "http:///x", "http://user:pw@example.com/x", "hook"])
def test_malformed_webhook_urls_are_refused(url: str) -> None:
    with pytest.raises(WebhookURLError):
        validate_webhook_url(url, allow_private=True)


def test_public_addresses_pass() -> None:
    assert validate_webhook_url("https://93.184.215.14/hook", check_dns=False)


def test_backoff_grows_with_jitter_and_honours_retry_after() -> None:
    policy = RetryPolicy(max_attempts=5, initial_s=1.0, max_s=8.0)
    for failed, base in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (6, 8.0)]:
        delays = [policy.delay(failed) for _ in range(200)]
        assert base / 2 <= min(delays) and max(delays) <= base
        assert max(delays) - min(delays) > base / 10  # jittered, not constant
    assert policy.delay(1, retry_after_s=5.0) == 5.0
    assert policy.delay(1, retry_after_s=100.0) == 8.0


# -- the worker ---------------------------------------------------------------------------------
def test_signed_idempotent_delivery(settings: Settings, store: SubscriptionStore) -> None:
    events = [event("cam-1", 0, 1000.0), event("cam-2", 0, 1001.0)]
    with WebhookReceiver(SECRET) as rx:
        store.add(webhook("qa", rx.url))
        publish(settings.kafka, events)
        with Background(run_deliver, settings):
            keys = rx.wait_for(2)
        assert sorted(keys) == sorted(e.event_id for e in events)
        assert all(r.signature_ok for r in rx.requests), [r.signature_error for r in rx.requests]
        assert len(rx.requests) == 2
        body = rx.accepted[events[0].event_id]
        assert body["subscription_id"] == "qa" and body["status"] == "open" and body["coalesced"] == 0
        assert DefectEvent.model_validate(body["event"]) == events[0]  # mask and thumbnail inline


def test_two_server_errors_then_success_is_one_delivery(settings: Settings, store: SubscriptionStore,
                                                        ledger: DeliveryLedger) -> None:
    ev = event()
    with WebhookReceiver(SECRET) as rx:
        rx.script(500, 500)
        store.add(webhook("flaky", rx.url))
        publish(settings.kafka, [ev])
        with Background(run_deliver, settings):
            rx.wait_for(1)
            wait_until(lambda: ledger.outcome("flaky", ev.event_id) == "delivered")
        assert [r.status for r in rx.requests] == [500, 500, 200]
        assert {r.key for r in rx.requests} == {ev.event_id}
        assert rx.accepted_keys == [ev.event_id] and rx.duplicates == 0
        assert ledger.dead("flaky") == []


def test_down_receiver_dead_letters_then_redrive_delivers(settings: Settings, store: SubscriptionStore,
                                                          ledger: DeliveryLedger, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    events = [event("cam-1", 0, 1000.0), event("cam-1", 10, 1100.0)]
    store.add(webhook("down", url))
    publish(settings.kafka, events)
    # The circuit breaker has its own test (test_delivery_hardening.py); here every attempt is made.
    settings = settings.model_copy(update={"deliver": settings.deliver.model_copy(update={"circuit_failures": 100})})
    with Background(run_deliver, settings):
        wait_until(lambda: len(ledger.dead("down")) == 2)
    dead = ledger.dead("down")
    assert [d.delivery_id for d in dead] == [e.event_id for e in events]
    assert all(d.attempts == 3 and "Connect" in d.error for d in dead)

    monkeypatch.setenv("LINEWATCH_REDIS__URL", settings.redis.url or "")
    monkeypatch.setenv("LINEWATCH_REDIS__KEY_PREFIX", settings.redis.key_prefix)
    monkeypatch.setenv("LINEWATCH_DELIVER__ALLOW_PRIVATE_NETWORKS", "true")
    assert main(["subscriptions", "dead-letters", "down"]) == 0
    assert events[1].event_id in capsys.readouterr().out
    with WebhookReceiver(SECRET, port=port) as rx:
        assert main(["subscriptions", "redrive", "down"]) == 0
        assert sorted(rx.accepted_keys) == sorted(e.event_id for e in events)
        assert all(r.signature_ok for r in rx.requests)
    assert "2 delivered, 0 still failing" in capsys.readouterr().out
    assert ledger.dead("down") == []
    assert ledger.outcome("down", events[0].event_id) == "delivered"


def test_filters_and_rate_limit_through_the_worker(settings: Settings, store: SubscriptionStore,
                                                   ledger: DeliveryLedger) -> None:
    events = [
        event("press-1", 0, 1000.0, line="line-3"),
        event("press-1", 10, 1030.0, line="line-3"),   # within 60 s of the first: coalesced
        event("press-1", 20, 1059.0, line="line-3"),   # still within 60 s of the last *sent*: coalesced
        event("press-1", 30, 1060.0, line="line-3"),   # 60 s after the last sent: sent with coalesced=2
        event("press-2", 0, 1010.0, line="line-3"),    # another camera has its own interval
        event("lathe-1", 0, 1000.0, line="line-4", score=0.6),
        event("press-1", 0, 1000.0, line="line-3", status="closed"),  # closings not subscribed
    ]
    with WebhookReceiver(SECRET) as limited, WebhookReceiver(SECRET) as strong:
        store.add(webhook("line3", limited.url, filters={"lines": ["line-3"], "cameras": ["press-*"]},
                          rate_limit_s=60))
        store.add(webhook("strong", strong.url, filters={"min_peak_score": 0.8}))
        publish(settings.kafka, events)
        with Background(run_deliver, settings):
            limited.wait_for(3)
            strong.wait_for(5)
            time.sleep(1.0)  # nothing else may arrive
        assert sorted(limited.accepted_keys) == sorted([events[0].event_id, events[3].event_id, events[4].event_id])
        assert limited.accepted[events[3].event_id]["coalesced"] == 2
        assert limited.accepted[events[0].event_id]["coalesced"] == 0
        assert sorted(strong.accepted_keys) == sorted(e.event_id for e in events[:5])
        assert ledger.outcome("line3", events[1].event_id) == "coalesced"
        assert ledger.pending_coalesced("line3") == {}


def test_slow_subscriber_does_not_hold_up_others(settings: Settings, store: SubscriptionStore) -> None:
    events = [event("cam-1", i * 10, 1000.0 + i) for i in range(4)]
    gate = threading.Event()
    with WebhookReceiver(SECRET) as slow, WebhookReceiver(SECRET) as fast:
        slow.gate = gate  # the slow receiver answers nothing until released
        store.add(webhook("slow", slow.url, channel={"timeout_s": 20.0}))
        store.add(webhook("fast", fast.url))
        publish(settings.kafka, events)
        with Background(run_deliver, settings):
            assert len(fast.wait_for(4, timeout=30)) == 4
            assert slow.accepted_keys == []
            gate.set()
            assert len(slow.wait_for(4, timeout=30)) == 4


def test_restart_neither_loses_nor_resends(settings: Settings, store: SubscriptionStore,
                                           ledger: DeliveryLedger) -> None:
    events = [event("cam-1", i * 10, 1000.0 + i) for i in range(3)]
    gate = threading.Event()
    with WebhookReceiver(SECRET) as slow, WebhookReceiver(SECRET) as fast:
        slow.gate = gate
        store.add(webhook("slow", slow.url, channel={"timeout_s": 1.0, "max_attempts": 50}))
        store.add(webhook("fast", fast.url))
        publish(settings.kafka, events)
        with Background(run_deliver, settings):
            fast.wait_for(3)
        # The slow lane settled nothing, so no offset was committed: the next worker reads all three
        # again, skips what "fast" acknowledged and delivers what "slow" still owes.
        assert fast.accepted_keys and ledger.outcome("slow", events[0].event_id) is None
        gate.set()
        with Background(run_deliver, settings):
            slow.wait_for(3)
            wait_until(lambda: all(ledger.outcome("slow", e.event_id) == "delivered" for e in events))
        fast_requests = [r for r in fast.requests if r.status == 200]
        assert len(fast_requests) == 3 and fast.duplicates == 0
        assert sorted(slow.accepted_keys) == sorted(e.event_id for e in events)


def test_kafka_and_redis_stream_channels(settings: Settings, store: SubscriptionStore,
                                         redis_client: redis.Redis) -> None:
    ev = event()
    out_topic = topic_name(settings.kafka, "mes-out")
    stream = f"{settings.redis.key_prefix}:mes-stream"
    store.add(Subscription.model_validate({"id": "to-kafka", "channel": {"type": "kafka", "topic": out_topic}}))
    store.add(Subscription.model_validate({"id": "to-redis", "channel": {"type": "redis_stream", "stream": stream}}))
    publish(settings.kafka, [ev])
    with Background(run_deliver, settings):
        wait_until(lambda: redis_client.xlen(stream) == 1)
        records = read_topic(settings.kafka, "mes-out", 1)
    (rec,) = records
    assert rec.key == b"cam-1" and dict(rec.headers)["Idempotency-Key"] == ev.event_id.encode()
    assert DefectEvent.model_validate(json.loads(rec.value)["event"]) == ev
    ((_, fields),) = redis_client.xrange(stream)
    assert fields[b"delivery_id"] == ev.event_id.encode()
    notification = json.loads(fields[b"notification"])
    assert "mask_png" not in notification["event"] and notification["event"]["peak_score"] == ev.peak_score


def test_replay_events_reach_subscriptions_only_when_opted_in(settings: Settings, store: SubscriptionStore,
                                                             redis_client: redis.Redis) -> None:
    live = event("cam-1", 0)
    quiet_replay = event("cam-1", 0, session="replay-quiet")
    alerting_replay = event("cam-1", 0, session="replay-alerts")
    ReplayAlerts(redis_client, settings.redis.key_prefix).enable("replay-alerts")
    with WebhookReceiver(SECRET) as rx:
        store.add(webhook("live", rx.url))
        publish(settings.kafka, [quiet_replay, live, alerting_replay])
        with Background(run_deliver, settings):
            rx.wait_for(2)
            time.sleep(1.0)
        assert sorted(rx.accepted_keys) == sorted([live.event_id, alerting_replay.event_id])


def test_invalid_event_goes_to_dlq_and_others_continue(settings: Settings, store: SubscriptionStore) -> None:
    ev = event()
    with WebhookReceiver(SECRET) as rx:
        store.add(webhook("qa", rx.url))
        create_topics(settings.kafka, names=("defects", "dlq"))
        producer = make_producer(settings.kafka)
        producer.send(topic_name(settings.kafka, "defects"), key=b"cam-1", value=b"{not json")
        producer.flush()
        producer.close()
        publish(settings.kafka, [ev])
        with Background(run_deliver, settings):
            rx.wait_for(1)
        dlq = read_topic(settings.kafka, "dlq", 1)
    assert rx.accepted_keys == [ev.event_id]
    assert dlq[0].value == b"{not json"


# -- the CLI ------------------------------------------------------------------------------------
@pytest.fixture
def cli_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINEWATCH_REDIS__URL", settings.redis.url or "")
    monkeypatch.setenv("LINEWATCH_REDIS__KEY_PREFIX", settings.redis.key_prefix)
    monkeypatch.setenv("LINEWATCH_KAFKA__BOOTSTRAP_SERVERS", settings.kafka.bootstrap_servers or "")


def test_cli_add_list_test_remove(cli_env: None, store: SubscriptionStore, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    with WebhookReceiver(SECRET) as rx:
        # Loopback receivers are refused by default (SSRF guard) ...
        assert main(["subscriptions", "add", "shift-lead", "--webhook", rx.url, "--secret", SECRET]) == 2
        assert "allow_private_networks" in capsys.readouterr().err
        monkeypatch.setenv("LINEWATCH_DELIVER__ALLOW_PRIVATE_NETWORKS", "true")
        assert main(["subscriptions", "add", "shift-lead", "--webhook", rx.url, "--secret", SECRET,
                     "--line", "line-3", "--camera", "press-*", "--min-score", "0.8", "--rate-limit", "5m"]) == 0
        sub = store.get("shift-lead")
        assert sub.rate_limit_s == 300 and sub.filters.cameras == ["press-*"] and sub.filters.lines == ["line-3"]
        assert main(["subscriptions", "add", "shift-lead", "--redis-stream", "x"]) == 2
        assert "already exists" in capsys.readouterr().err
        assert main(["subscriptions", "list", "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert [s["id"] for s in listed] == ["shift-lead"] and listed[0]["channel"]["secret"] == "****"
        assert main(["subscriptions", "test", "shift-lead"]) == 0
        assert rx.accepted and next(iter(rx.accepted.values()))["test"] is True
        assert rx.requests[0].signature_ok
        rx.script(503)
        rx.default = 503
        assert main(["subscriptions", "test", "shift-lead"]) == 1
        assert "HTTP 503" in capsys.readouterr().out
    assert main(["subscriptions", "remove", "shift-lead"]) == 0
    assert main(["subscriptions", "remove", "shift-lead"]) == 2
    assert main(["subscriptions", "add", "x", "--webhook", "http://a/b", "--kafka-topic", "t"]) == 2
    assert "exactly one channel" in capsys.readouterr().err


def test_cli_generates_a_secret_when_none_given(cli_env: None, store: SubscriptionStore,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("LINEWATCH_DELIVER__ALLOW_PRIVATE_NETWORKS", "true")
    assert main(["subscriptions", "add", "gen", "--webhook", "http://127.0.0.1:9/hook"]) == 0
    out = capsys.readouterr().out
    secret = out.strip().rsplit(" ", 1)[-1]
    assert store.get("gen").channel.secret == secret and len(secret) >= 32  # type: ignore[union-attr]


def test_cli_add_from_file(cli_env: None, store: SubscriptionStore, tmp_path: Any,
                           capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "mes.yaml"
    spec.write_text("filters: {product_classes: [bolt], min_area: 200, statuses: [open, closed]}\n"
                    "channel: {type: kafka, topic: mes.defects}\nrate_limit_s: 30\n")
    assert main(["subscriptions", "add", "mes", "--from-file", str(spec)]) == 0
    sub = store.get("mes")
    assert sub.channel.type == "kafka" and sub.filters.statuses == ["open", "closed"] and sub.rate_limit_s == 30
    spec.write_text("channel: {type: carrier-pigeon}\n")
    assert main(["subscriptions", "add", "bad", "--from-file", str(spec)]) == 2
    assert "invalid subscription" in capsys.readouterr().err
