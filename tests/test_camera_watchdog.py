"""The camera watchdog: a camera no capture worker holds is still reported down, once.

Real broker and Redis (conftest fixtures); deliver workers (which run the watchdog) as threads,
capture workers as threads (fixed capture) or as `python -m pipeline.cli capture` processes
(managed capture, SIGKILLed). Small dark_after_s and lease times keep it quick.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from pipeline.cameras.health import HealthStore
from pipeline.cameras.leases import FixedClaims, LeaseManager
from pipeline.cameras.overview import CameraAdmin
from pipeline.cameras.watchdog import REASON
from pipeline.config import CameraConfig, KafkaSettings, RedisSettings
from pipeline.delivery.store import SubscriptionStore
from pipeline.imaging import encode_jpeg
from schemas.cameras import CAMERA_STATUS_TOPIC, CameraStatus
from schemas.subscriptions import Subscription
from tests.streaming_helpers import stop_processes
from tests.test_cameras import MjpegServer, Tail, _capture_process, camera, managed_settings, wait_until
from workers.capture import run_capture
from workers.deliver import run_deliver

# Quick: the lease lapses a second after its holder dies, a camera is dark after 2 s.
FAST = {"lease_s": 1.0, "registry_poll_s": 0.2, "dark_after_s": 2.0}


@pytest.fixture
def source(shared_data: Path, tmp_path: Path) -> Path:
    """A camera folder of four real ball screw images."""
    path = tmp_path / "cam"
    path.mkdir()
    for src in sorted((shared_data / "train" / "good").glob("*.jpg"))[:4]:
        shutil.copy(src, path / src.name)
    return path


@pytest.fixture
def status_tail(kafka_settings: KafkaSettings) -> Iterator[Tail]:
    tail = Tail(kafka_settings, CAMERA_STATUS_TOPIC)
    yield tail
    tail.close()


def statuses(tail: Tail, camera_id: str | None = None) -> list[CameraStatus]:
    out = [CameraStatus.model_validate_json(r.value) for r in tail.poll()]
    return [s for s in out if camera_id is None or s.camera_id == camera_id]


def test_a_camera_nobody_captures_is_reported_down_once_by_two_deliver_workers(
        kafka_settings: KafkaSettings, redis_settings: RedisSettings, redis_client: redis.Redis,
        status_tail: Tail, start_background: Callable[..., Any], tmp_path: Path) -> None:
    """No capture worker at all: the camera gets one camera_down (a subscriber receives it), whatever
    the number of deliver workers; a camera whose lease is held, or whose source ended, gets none."""
    cams = [camera("wd-free", tmp_path), camera("wd-leased", tmp_path), camera("wd-ended", tmp_path)]
    settings = managed_settings(kafka_settings, redis_settings, cams, **FAST)
    prefix = redis_settings.key_prefix
    # Held by a worker that is alive (its lease is valid for the whole test), and a file that ended.
    assert LeaseManager(redis_client, prefix, "worker-x", 120.0).acquire("wd-leased") is not None
    HealthStore(redis_client, prefix).put({"camera_id": "wd-ended", "state": "ended", "fps": 0.0,
                                          "last_frame_ts": time.time() - 600, "reconnects": 0, "worker": "gone",
                                          "lease_token": 1, "updated_at": time.time() - 600})
    stream = f"{prefix}:camera-notes"
    SubscriptionStore(redis_client, prefix).add(Subscription.model_validate(
        {"id": "line-4-watch", "filters": {"lines": ["line-4"]},
         "channel": {"type": "redis_stream", "stream": stream}}))
    started = time.time()
    start_background(run_deliver, settings)
    start_background(run_deliver, settings)

    down = status_tail.wait(lambda _: statuses(status_tail), 60, "a camera_down on the camera-status topic")
    wait_until(lambda: redis_client.xlen(stream) >= 1, 60, "the camera_down in the subscriber's stream")
    # Both watchdogs check every 0.2 s: long enough for a second message, were there one.
    time.sleep(3 * FAST["dark_after_s"])
    down = statuses(status_tail)
    assert [(s.status, s.camera_id) for s in down] == [("camera_down", "wd-free")], down
    assert down[0].reason == REASON and down[0].worker.startswith("watchdog-")
    assert down[0].last_frame_ts is None and down[0].ts - started >= FAST["dark_after_s"]
    notes = [json.loads(fields[b"notification"]) for _, fields in redis_client.xrange(stream)]
    assert [(n["status"], n["event"]["camera_id"], n["event"]["reason"]) for n in notes] == [
        ("camera_down", "wd-free", REASON)]
    assert HealthStore(redis_client, prefix).down("wd-free") is not None


def test_killed_capture_worker_camera_goes_down_then_up_when_capture_returns(
        kafka_settings: KafkaSettings, redis_settings: RedisSettings, redis_client: redis.Redis,
        source: Path, status_tail: Tail, start_background: Callable[..., Any], tmp_path: Path) -> None:
    """The only capture worker is SIGKILLed: once its lease lapses and the camera is dark_after_s
    silent, the watchdog sends camera_down; a new capture worker that sees frames sends camera_up."""
    cam = camera("wd-kill", source)
    cfg = tmp_path / "site.yaml"
    cfg.write_text(json.dumps({"capture": {"resize_width": 64, **FAST},
                               "cameras": [cam.model_dump(mode="json")]}))
    settings = managed_settings(kafka_settings, redis_settings, [cam], **FAST)
    leases = LeaseManager(redis_client, redis_settings.key_prefix, "-", 1.0)
    health = HealthStore(redis_client, redis_settings.key_prefix)
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_capture_process(cfg, kafka_settings, redis_settings, tmp_path / "a.log"))
        wait_until(lambda: (health.get("wd-kill") or {}).get("state") == "live", 60, "wd-kill live")
        # The watchdog starts once capture runs (a capture process takes seconds to start).
        start_background(run_deliver, settings)
        time.sleep(2 * FAST["dark_after_s"])
        assert statuses(status_tail) == []  # held and live: nothing to say
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(10)
        killed_at = time.time()
        down = status_tail.wait(lambda _: statuses(status_tail), 30, "camera_down after the kill")
        assert leases.holders(["wd-kill"])["wd-kill"] is None
        assert [s.status for s in down] == ["camera_down"] and down[0].reason == REASON
        assert down[0].ts - killed_at >= FAST["dark_after_s"] - 0.5  # its last frame came just before the kill
        assert down[0].last_frame_ts is not None and down[0].last_frame_ts <= killed_at

        procs.append(_capture_process(cfg, kafka_settings, redis_settings, tmp_path / "b.log"))
        both = status_tail.wait(lambda _: len(s := statuses(status_tail)) >= 2 and s, 60, "camera_up")
    finally:
        stop_processes(procs)
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in tmp_path.glob("*.log"))
    assert [s.status for s in both] == ["camera_down", "camera_up"], logs
    up = both[1]
    assert up.reason is None and not up.worker.startswith("watchdog-") and up.down_s >= FAST["dark_after_s"]


def test_fixed_capture_reports_its_camera_itself_and_the_watchdog_takes_over_when_it_stops(
        kafka_settings: KafkaSettings, redis_settings: RedisSettings, redis_client: redis.Redis,
        status_tail: Tail, start_background: Callable[..., Any]) -> None:
    """Fixed capture (`--camera`) holds no lease but claims its cameras: the watchdog leaves a camera
    it captures to it, even dark (the capture worker says so itself, later than the watchdog would
    here: its dark_after_s is larger); once it stops, the watchdog reports the camera."""
    jpeg = encode_jpeg(np.full((48, 64, 3), 90, np.uint8))
    server = MjpegServer(jpeg)
    cam = CameraConfig(id="wd-fixed", line="line-4", product_class="p", source=f"http://127.0.0.1:{server.port}/s",
                       fps=5)
    capture_settings = managed_settings(kafka_settings, redis_settings, [cam], **{**FAST, "dark_after_s": 4.0})
    settings = managed_settings(kafka_settings, redis_settings, [cam], **FAST)
    claims = FixedClaims(redis_client, redis_settings.key_prefix, 1.0)
    health = HealthStore(redis_client, redis_settings.key_prefix)
    restarted: MjpegServer | None = None
    try:
        capture = start_background(run_capture, capture_settings, ["wd-fixed"])
        wait_until(lambda: claims.claimed(["wd-fixed"])["wd-fixed"], 30, "wd-fixed claimed")
        wait_until(lambda: (health.get("wd-fixed") or {}).get("state") == "live", 30, "wd-fixed live")
        row = next(r for r in CameraAdmin(settings, redis_client).rows() if r["id"] == "wd-fixed")
        assert (row["state"], row["worker"]) == ("live", claims.claimed(["wd-fixed"])["wd-fixed"])  # not "unassigned"
        start_background(run_deliver, settings)
        time.sleep(2 * FAST["dark_after_s"])
        assert statuses(status_tail) == []  # captured (without a lease) and live: nothing to say

        server.stop()
        down = status_tail.wait(lambda _: statuses(status_tail), 30, "camera_down from the fixed capture")
        time.sleep(1.0)
        down = statuses(status_tail)
        assert [s.status for s in down] == ["camera_down"], down
        assert down[0].reason is None and down[0].worker == claims.claimed(["wd-fixed"])["wd-fixed"]
        restarted = MjpegServer(jpeg, port=server.port)
        both = status_tail.wait(lambda _: len(s := statuses(status_tail)) >= 2 and s, 30, "camera_up")
        assert [s.status for s in both] == ["camera_down", "camera_up"] and both[1].worker == down[0].worker

        capture.join()
        stopped_at = time.time()
        assert claims.claimed(["wd-fixed"])["wd-fixed"] is None  # released on the way out
        row = next(r for r in CameraAdmin(settings, redis_client).rows() if r["id"] == "wd-fixed")
        assert (row["state"], row["worker"]) == ("unassigned", None)
        third = status_tail.wait(lambda _: len(s := statuses(status_tail)) >= 3 and s, 30,
                                 "camera_down from the watchdog once fixed capture stopped")
    finally:
        for srv in (server, restarted):
            if srv is not None and not srv.stopping.is_set():
                srv.stop()
    assert [s.status for s in third] == ["camera_down", "camera_up", "camera_down"]
    assert third[2].reason == REASON and third[2].ts - stopped_at >= FAST["dark_after_s"] - 1.0
