"""Workers on the stream runtime under faults, as processes on the real broker and Redis.

SIGKILL mid-stream keeps at-least-once (alert, deliver, recorder; the scorer's is in
test_pipeline_integration.py); a killed alert worker's open event is closed by its replacement
without another score; a Redis restart does not end the alert worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from kafka import KafkaConsumer, TopicPartition

from pipeline.bus import create_topics, topic_name
from pipeline.config import AlertSettings, KafkaSettings, RedisSettings, Settings
from pipeline.delivery.store import SubscriptionStore
from pipeline.embedded import EmbeddedRedis, free_port
from pipeline.health import Health
from schemas.events import DefectEvent
from tests.streaming_helpers import publish_frames
from tests.test_alert_worker import make_score, produce, stream
from tests.test_deliver import SECRET, event, webhook
from tests.test_deliver import publish as publish_events
from tests.webhook_receiver import WebhookReceiver
from workers.alert import run_alert


def env_for(kafka: KafkaSettings, redis_settings: RedisSettings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEWATCH_")}
    env.update({
        "LINEWATCH_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers or "",
        "LINEWATCH_KAFKA__TOPIC_PREFIX": kafka.topic_prefix,
        "LINEWATCH_KAFKA__PARTITIONS": str(kafka.partitions),
        "LINEWATCH_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "LINEWATCH_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
        "LINEWATCH_REDIS__URL": redis_settings.url or "",
        "LINEWATCH_REDIS__KEY_PREFIX": redis_settings.key_prefix,
        **extra,
    })
    return env


class Procs:
    """Worker subprocesses with their logs; every one still running is killed at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def start(self, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = self.tmp / f"worker-{len(self.procs)}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], env=env, stdout=fh,
                                    stderr=subprocess.STDOUT)
        self.procs.append((proc, log))
        return proc

    def kill(self, proc: subprocess.Popen) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert proc.returncode == -signal.SIGKILL, self.tail(proc)

    def tail(self, proc: subprocess.Popen) -> str:
        log = next(log for p, log in self.procs if p is proc)
        return log.read_text(errors="replace")[-3000:]

    def close(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


@pytest.fixture
def procs(tmp_path: Path) -> Any:
    p = Procs(tmp_path)
    yield p
    p.close()


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def defects(kafka: KafkaSettings) -> list[DefectEvent]:
    consumer = KafkaConsumer(**kafka.client_kwargs(), group_id=None, enable_auto_commit=False)
    try:
        topic = kafka.topic("defects")
        tps = [TopicPartition(topic, p) for p in range(kafka.partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        out: list[DefectEvent] = []
        deadline = time.monotonic() + 20
        while any(consumer.position(tp) < ends[tp] for tp in tps) and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=200).values():
                out.extend(DefectEvent.model_validate_json(r.value) for r in recs)
        return out
    finally:
        consumer.close(autocommit=False)


# -- alert ----------------------------------------------------------------------------------------------
def test_killed_alert_worker_open_event_is_closed_by_the_replacement(
        kafka_settings: KafkaSettings, redis_settings: RedisSettings, procs: Procs) -> None:
    create_topics(kafka_settings)
    env = env_for(kafka_settings, redis_settings, LINEWATCH_ALERT__QUIET_S="1.0", LINEWATCH_ALERT__SILENCE_S="3.0",
                  LINEWATCH_ALERT__GROUP_ID=f"{kafka_settings.topic_prefix}-alert")
    # Four cameras open an event each and then fall silent for good: no score will ever close them.
    cams = [f"cam-{i}" for i in range(4)]
    produce(kafka_settings, [s for c in cams for s in stream(c, [0.1, 0.9, 0.9])])
    first = procs.start(["alert"], env)
    wait_until(lambda: len({e.camera_id for e in defects(kafka_settings) if e.status == "open"}) == 4 or
               first.poll() is not None, "four open events")
    # Past the persist and commit of that batch: the states are in Redis with their partition index.
    client = redis.Redis.from_url(redis_settings.url or "")
    try:
        wait_until(lambda: len(list(client.scan_iter(f"{redis_settings.key_prefix}:alert:partition:*"))) > 0,
                   "the partition index")
    finally:
        client.close()
    procs.kill(first)
    assert not [e for e in defects(kafka_settings) if e.status == "closed"]

    # More scores arrive for other cameras while no worker runs (at least once: they are handled later).
    produce(kafka_settings, stream("cam-late", [0.9, 0.9]))
    second = procs.start(["alert"], env)
    events = wait_until(lambda: (evs := defects(kafka_settings)) and
                        {e.camera_id for e in evs if e.status == "closed"} >= set(cams)
                        and any(e.camera_id == "cam-late" for e in evs) and evs, "the replacement closing them",
                        timeout=150)
    for cam in cams:
        per = [(e.status, e.event_id) for e in events if e.camera_id == cam]
        assert ("closed", DefectEvent.make_id(cam, 1)) in per and ("open", DefectEvent.make_id(cam, 1)) in per
    second.send_signal(signal.SIGTERM)
    assert second.wait(30) == 0, procs.tail(second)


def test_alert_worker_survives_a_redis_restart(kafka_settings: KafkaSettings, tmp_path: Path,
                                               start_background: Callable[..., Any]) -> None:
    port = free_port()
    own = EmbeddedRedis(port=port).start()
    settings = Settings(kafka=kafka_settings,
                        redis=RedisSettings(url=own.url, key_prefix="restart", socket_timeout_s=1.0),
                        alert=AlertSettings(k=2, n=3, quiet_s=1.0, silence_s=60.0,
                                            group_id=f"{kafka_settings.topic_prefix}-alert"))
    create_topics(kafka_settings)
    health = Health()
    worker = start_background(run_alert, settings, health=health, poll_timeout_ms=100)
    try:
        produce(kafka_settings, stream("cam-1", [0.9, 0.9]))
        wait_until(lambda: any(e.camera_id == "cam-1" for e in defects(kafka_settings)), "cam-1's event")
        own.stop()  # Redis goes away
        produce(kafka_settings, stream("cam-2", [0.9, 0.9]))
        wait_until(lambda: health.readiness().get("alert_stream") is not None, "readiness to turn false")
        time.sleep(2.0)
        assert worker.thread.is_alive(), worker.error
        assert health.liveness()[0]
        own = EmbeddedRedis(port=port).start()  # back, empty, on the same port
        wait_until(lambda: any(e.camera_id == "cam-2" for e in defects(kafka_settings)), "cam-2 after the restart")
        wait_until(lambda: health.readiness().get("alert_stream") is None, "readiness to recover")
        assert worker.thread.is_alive(), worker.error
    finally:
        worker.stop.set()
        worker.thread.join(30)
        own.stop()
    assert worker.error is None


# -- recorder -------------------------------------------------------------------------------------------
def recorded_seqs(root: Path, camera: str) -> list[int]:
    seqs: list[int] = []
    for index in (root / camera).glob("*/index.jsonl"):
        for line in index.read_text().splitlines():
            if line.strip():
                seqs.append(int(json.loads(line)["seq"]))
    return seqs


def test_sigkilled_recorder_loses_no_frame(kafka_settings: KafkaSettings, redis_settings: RedisSettings,
                                           procs: Procs, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    n = 400  # one record per batch (--max-frames) and a commit each: enough to be killed mid-stream
    frames = [("cam-r", s, rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for s in range(n)]
    publish_frames(kafka_settings, frames)
    out = tmp_path / "rec"
    env = env_for(kafka_settings, redis_settings)
    args = ["record", "--camera", "cam-r", "--out", str(out), "--from-topic"]
    first = procs.start([*args, "--max-frames", "1000"], env)  # one record per batch: many commits
    wait_until(lambda: len(recorded_seqs(out, "cam-r")) >= 5 or first.poll() is not None, "some frames recorded")
    procs.kill(first)
    before = set(recorded_seqs(out, "cam-r"))
    assert 5 <= len(before) < n, f"not killed mid-stream: {len(before)}\n{procs.tail(first)}"
    second = procs.start(args, env)
    wait_until(lambda: set(recorded_seqs(out, "cam-r")) == set(range(n)), "every frame recorded")
    second.send_signal(signal.SIGTERM)
    assert second.wait(30) == 0, procs.tail(second)


# -- deliver --------------------------------------------------------------------------------------------
def test_sigkilled_deliver_worker_loses_no_delivery(kafka_settings: KafkaSettings, redis_settings: RedisSettings,
                                                    redis_client: redis.Redis, procs: Procs) -> None:
    events = [event(f"cam-{i % 2}", first_seq=i * 10) for i in range(20)]
    with WebhookReceiver(SECRET) as rx:
        rx.script(*([503, 200] * 40))  # every delivery needs a retry: the kill lands mid-stream
        SubscriptionStore(redis_client, redis_settings.key_prefix).add(
            webhook("qa", rx.url, channel={"backoff_initial_s": 0.2, "backoff_max_s": 0.3}))
        publish_events(kafka_settings, events)
        env = env_for(kafka_settings, redis_settings, LINEWATCH_DELIVER__ALLOW_PRIVATE_NETWORKS="true",
                      LINEWATCH_DELIVER__GROUP_ID=f"{kafka_settings.topic_prefix}-deliver")
        first = procs.start(["deliver"], env)
        wait_until(lambda: len(rx.accepted_keys) >= 4 or first.poll() is not None, "some deliveries")
        procs.kill(first)
        before = len(rx.accepted_keys)
        assert 4 <= before < 20, f"not killed mid-stream: {before}\n{procs.tail(first)}"
        second = procs.start(["deliver"], env)
        wait_until(lambda: set(rx.accepted_keys) >= {e.event_id for e in events}, "every event delivered")
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0, procs.tail(second)


def test_scores_for_the_alert_worker_are_topic_partition_indexed(kafka_settings: KafkaSettings,
                                                                 redis_settings: RedisSettings,
                                                                 redis_client: redis.Redis,
                                                                 start_background: Callable[..., Any]) -> None:
    settings = Settings(kafka=kafka_settings, redis=redis_settings,
                        alert=AlertSettings(group_id=f"{kafka_settings.topic_prefix}-alert"))
    create_topics(kafka_settings)
    produce(kafka_settings, [make_score("cam-i", 0, 0.1)])
    start_background(run_alert, settings, idle_exit_s=2.0, poll_timeout_ms=100).wait(60)
    keys = [k.decode() for k in redis_client.scan_iter(f"{redis_settings.key_prefix}:alert:partition:*")]
    assert len(keys) == 1 and keys[0].startswith(f"{redis_settings.key_prefix}:alert:partition:"
                                                 f"{topic_name(kafka_settings, 'scores')}:")
    assert redis_client.smembers(keys[0]) == {b"cam-i:live"}




# -- capture publisher ----------------------------------------------------------------------------------
def test_publisher_rebuilds_a_producer_that_stays_broken_after_a_broker_restart(tmp_path: Path) -> None:
    from pipeline.capture.publisher import DroppingPublisher
    from pipeline.embedded import EmbeddedBroker

    port = free_port()
    broker = EmbeddedBroker(port=port).start()
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap_servers, topic_prefix="restart", partitions=1,
                          request_timeout_ms=3000)
    publisher: DroppingPublisher | None = None
    try:
        create_topics(kafka, names=("frames",))
        publisher = DroppingPublisher(kafka, "frames", max_buffered=8, max_in_flight=4, connect_retry_s=0.2,
                                      request_timeout_ms=3000, delivery_timeout_ms=4000)
        publisher.offer("cam", b"before", [])
        assert publisher.flush(30) and publisher.published == {"cam": 1}
        broker.stop()  # the broker goes away and comes back empty on the same port
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            publisher.offer("cam", b"during", [])
            time.sleep(0.1)
        broker = EmbeddedBroker(port=port).start()
        create_topics(kafka, names=("frames",))

        def published_again() -> bool:
            assert publisher is not None
            publisher.offer("cam", b"after", [])
            time.sleep(0.2)
            return publisher.published.get("cam", 0) > 1

        wait_until(published_again, "a frame published after the broker came back", timeout=120)
        assert publisher.broken is None
    finally:
        if publisher is not None:
            publisher.close(timeout=5)
        broker.stop()


# -- API ingest -----------------------------------------------------------------------------------------
def test_sigkilled_api_ingest_loses_no_event(kafka_settings: KafkaSettings, redis_settings: RedisSettings,
                                             redis_client: redis.Redis, procs: Procs) -> None:
    from pipeline.api.store import EventStore

    events = [event(f"cam-{i % 4}", first_seq=i * 10, ts=1000.0 + i) for i in range(600)]
    publish_events(kafka_settings, events)
    store = EventStore(redis_client, redis_settings.key_prefix)
    env = env_for(kafka_settings, redis_settings, LINEWATCH_API__TOKEN="t" * 32, LINEWATCH_API__PORT=str(free_port()),
                  LINEWATCH_API__GROUP_ID=f"{kafka_settings.topic_prefix}-api")
    first = procs.start(["api"], env)
    wait_until(lambda: store.count() >= 20 or first.poll() is not None, "some events stored", timeout=150)
    procs.kill(first)
    before = store.count()
    assert 20 <= before < len(events), f"not killed mid-stream: {before}\n{procs.tail(first)}"
    env["LINEWATCH_API__PORT"] = str(free_port())
    second = procs.start(["api"], env)
    wait_until(lambda: all(store.get(e.event_id) for e in events), "every event stored", timeout=150)
    second.send_signal(signal.SIGTERM)
    second.wait(30)
