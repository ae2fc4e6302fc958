"""Worker health endpoints (pipeline/health.py) over real HTTP on loopback, against the real broker and Redis."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from pipeline.config import AlertSettings, DeliverSettings, KafkaSettings, RedisSettings, Settings
from pipeline.embedded import EmbeddedBroker, free_port
from pipeline.health import BrokerCheck, Health, serve_metrics, watch_dependencies
from pipeline.metrics import FRAMES_CAPTURED
from tests.streaming_helpers import Background, site_settings
from workers.alert import run_alert
from workers.deliver import run_deliver
from workers.score import run_score


# -- helpers ------------------------------------------------------------------------------------
def get(health: Health, path: str) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a GET on the health server; error statuses are answers too."""
    url = f"http://127.0.0.1:{health.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=15) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def get_json(health: Health, path: str) -> tuple[int, dict[str, Any]]:
    status, headers, body = get(health, path)
    assert headers["Content-Type"] == "application/json"
    return status, json.loads(body)


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def make_health() -> Iterator[Callable[..., Health]]:
    """Health objects serving on a free loopback port, all closed after the test."""
    made: list[Health] = []

    def make(**kwargs: Any) -> Health:
        health = Health(**kwargs)
        made.append(health)
        health.serve(0, host="127.0.0.1")
        return health

    yield make
    for health in made:
        health.close()


# -- liveness and routing -----------------------------------------------------------------------
def test_healthz_follows_the_heartbeat(make_health: Callable[..., Health]) -> None:
    health = make_health(liveness_timeout_s=0.3)
    assert health.port and health.port > 0

    status, body = get_json(health, "/healthz")
    assert (status, body["status"]) == (200, "ok")  # starting up: alive before the first beat
    assert "starting" in body["detail"]

    health.beat()
    assert get_json(health, "/healthz")[0] == 200
    time.sleep(0.5)
    status, body = get_json(health, "/healthz")
    assert (status, body["status"]) == (503, "stalled")
    assert "no heartbeat" in body["detail"]

    health.beat()
    status, body = get_json(health, "/healthz")
    assert (status, body["status"]) == (200, "ok")
    assert "last beat" in body["detail"]


def test_healthz_fails_when_the_loop_never_starts(make_health: Callable[..., Health]) -> None:
    health = make_health(startup_timeout_s=0.0)
    time.sleep(0.05)
    status, body = get_json(health, "/healthz")
    assert status == 503
    assert "has not started" in body["detail"]


def test_unknown_paths_are_404(make_health: Callable[..., Health]) -> None:
    health = make_health()
    for path in ("/", "/health", "/metrics/extra", "/readyz/x"):
        status, body = get_json(health, path)
        assert status == 404, path
        assert path in body["error"]
    assert get(health, "/healthz?verbose=1")[0] == 200  # query strings do not change the route


def test_metrics_exposes_linewatch_metrics(make_health: Callable[..., Health]) -> None:
    health = make_health()
    FRAMES_CAPTURED.labels(camera="health-test-cam").inc()
    status, headers, body = get(health, "/metrics")
    assert status == 200
    assert headers["Content-Type"] == CONTENT_TYPE_LATEST  # the Prometheus text format, not JSON
    assert headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    assert 'linewatch_frames_captured_total{camera="health-test-cam"} 1.0' in text
    for name in ("linewatch_frames_published_total", "linewatch_scoring_seconds", "linewatch_consumer_lag",
                 "linewatch_deliveries_total", "linewatch_dlq_total"):
        assert f"# TYPE {name.removesuffix('_total')}" in text, name


def test_serve_metrics_wrapper_serves_all_endpoints() -> None:
    assert serve_metrics(None) is None
    health = serve_metrics(0)
    assert health is not None
    try:
        assert get(health, "/metrics")[0] == 200
        assert get(health, "/healthz")[0] == 200
    finally:
        health.close()
    assert health.port is None


# -- readiness ----------------------------------------------------------------------------------
def test_readyz_checks_pass_fail_and_are_cached(make_health: Callable[..., Health]) -> None:
    health = make_health(cache_s=30.0)
    calls: list[str] = []

    def counted() -> None:
        calls.append("x")

    def broken() -> None:
        raise ConnectionError("boom at the far end")

    health.add_check("counted", counted)
    health.add_check("falsy", lambda: False)
    health.add_check("broken", broken)
    model_loaded = health.add_flag("model_loaded", "model not loaded yet")
    health.beat()

    status, body = get_json(health, "/readyz")
    assert status == 503
    assert body["status"] == "not_ready"
    assert body["failing"] == {"falsy": "check returned False", "broken": "ConnectionError: boom at the far end",
                               "model_loaded": "RuntimeError: model not loaded yet"}
    assert body["checks"]["counted"] == "ok" and body["checks"]["loop"] == "ok"

    model_loaded.set()  # flags are not cached: the next probe sees them at once
    health.add_check("falsy", lambda: None)
    health.add_check("broken", lambda: True)
    status, body = get_json(health, "/readyz")
    assert (status, body["status"]) == (200, "ready"), body
    assert calls == ["x"]  # the second probe reused the cached result


def test_readyz_requires_a_started_loop(make_health: Callable[..., Health]) -> None:
    health = make_health(liveness_timeout_s=0.3)
    status, body = get_json(health, "/readyz")
    assert status == 503
    assert "has not started" in body["failing"]["loop"]
    health.beat()
    assert get_json(health, "/readyz")[0] == 200
    time.sleep(0.5)
    status, body = get_json(health, "/readyz")
    assert status == 503
    assert "no heartbeat" in body["failing"]["loop"]


def test_readyz_ready_with_real_broker_and_redis(make_health: Callable[..., Health], kafka_settings: KafkaSettings,
                                                 redis_settings: RedisSettings) -> None:
    health = make_health()
    watch_dependencies(health, Settings(kafka=kafka_settings, redis=redis_settings))
    health.beat()
    status, body = get_json(health, "/readyz")
    assert status == 200, body
    assert body == {"status": "ready", "checks": {"loop": "ok", "broker": "ok", "redis": "ok"}}


def test_readyz_names_redis_when_unreachable(make_health: Callable[..., Health],
                                             kafka_settings: KafkaSettings) -> None:
    health = make_health()
    closed = RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=1.0)
    watch_dependencies(health, Settings(kafka=kafka_settings, redis=closed))
    health.beat()
    status, body = get_json(health, "/readyz")
    assert status == 503
    assert set(body["failing"]) == {"redis"}
    assert "Error" in body["failing"]["redis"]
    assert body["checks"]["broker"] == "ok"


def test_readyz_names_the_broker_when_unreachable(make_health: Callable[..., Health],
                                                  redis_settings: RedisSettings) -> None:
    health = make_health()
    closed = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}")
    watch_dependencies(health, Settings(kafka=closed, redis=redis_settings))
    health.beat()
    started = time.monotonic()
    status, body = get_json(health, "/readyz")
    assert time.monotonic() - started < 10  # bounded by the probe's timeout, not the client defaults
    assert status == 503
    assert set(body["failing"]) == {"broker"}
    assert "KafkaTimeoutError" in body["failing"]["broker"]
    assert body["checks"]["redis"] == "ok"


def test_broker_check_follows_an_outage() -> None:
    """The probe's client survives the broker going away and coming back on the same port."""
    port = free_port()
    check = BrokerCheck(KafkaSettings(bootstrap_servers=f"127.0.0.1:{port}"), timeout_ms=1000)
    broker = EmbeddedBroker(port=port).start()
    try:
        check()
        broker.stop(timeout_s=0.5)  # tansu needs no graceful shutdown here
        with pytest.raises(Exception):  # noqa: B017 (whatever kafka-python raises for a dead node)
            check()
        broker = EmbeddedBroker(port=port).start()
        wait_for(lambda: _passes(check), 10, "broker check to recover")
    finally:
        check.close()
        broker.stop(timeout_s=0.5)


def test_broker_check_does_not_leak_threads_while_the_broker_is_absent() -> None:
    check = BrokerCheck(KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}"), timeout_ms=300)
    before = threading.active_count()
    for _ in range(3):
        with pytest.raises(Exception):  # noqa: B017
            check()
    check.close()
    wait_for(lambda: threading.active_count() <= before, 5, "probe IO threads to end")


def _passes(check: Callable[[], object]) -> bool:
    try:
        check()
    except Exception:
        return False
    return True


# -- real workers -------------------------------------------------------------------------------
def test_alert_worker_becomes_ready(make_health: Callable[..., Health], kafka_settings: KafkaSettings,
                                   redis_settings: RedisSettings) -> None:
    health = make_health(cache_s=0.0)
    settings = Settings(kafka=kafka_settings, redis=redis_settings,
                        alert=AlertSettings(group_id=f"{kafka_settings.topic_prefix}-alert"))
    assert get_json(health, "/readyz")[0] == 503  # no worker loop yet
    with Background(run_alert, settings, poll_timeout_ms=100, health=health) as worker:
        wait_for(lambda: get_json(health, "/readyz")[0] == 200 or worker.error is not None, 20,
                 "the alert worker to become ready")
        assert worker.error is None
        status, body = get_json(health, "/readyz")
        assert status == 200
        # The runtime's own check says whether it is waiting for its broker or Redis.
        assert body["checks"] == {"loop": "ok", "broker": "ok", "redis": "ok", "alert_stream": "ok"}
        assert get_json(health, "/healthz")[0] == 200


def test_score_worker_reports_model_loaded(make_health: Callable[..., Health], kafka_settings: KafkaSettings,
                                           redis_settings: RedisSettings) -> None:
    health = make_health(cache_s=0.0)
    settings = site_settings(kafka_settings, redis_settings, group_id=f"{kafka_settings.topic_prefix}-score")
    with Background(run_score, settings, health=health) as worker:
        wait_for(lambda: get_json(health, "/readyz")[0] == 200 or worker.error is not None, 60,
                 "the score worker to become ready")
        assert worker.error is None
        assert get_json(health, "/readyz")[1]["checks"] == {"loop": "ok", "broker": "ok", "redis": "ok",
                                                            "model_loaded": "ok", "score_stream": "ok"}


def test_deliver_worker_becomes_ready(make_health: Callable[..., Health], kafka_settings: KafkaSettings,
                                      redis_settings: RedisSettings) -> None:
    health = make_health(cache_s=0.0)
    settings = Settings(kafka=kafka_settings, redis=redis_settings,
                        deliver=DeliverSettings(group_id=f"{kafka_settings.topic_prefix}-deliver"))
    with Background(run_deliver, settings, poll_timeout_ms=100, health=health) as worker:
        wait_for(lambda: get_json(health, "/readyz")[0] == 200 or worker.error is not None, 20,
                 "the deliver worker to become ready")
        assert worker.error is None
        assert get_json(health, "/readyz")[1]["checks"] == {"loop": "ok", "broker": "ok", "redis": "ok",
                                                            "deliver_stream": "ok"}
