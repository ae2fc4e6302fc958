"""Cameras at run time: registry, leases, managed capture, failover, health and camera_down/up.

Real broker and Redis (conftest fixtures), real capture of image-folder sources, capture workers as
threads or as `python -m pipeline.cli capture` subprocesses.
"""

from __future__ import annotations

import contextlib
import http.server
import itertools
import json
import os
import shutil
import signal
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import uvicorn
from kafka import KafkaConsumer

from pipeline.api.app import create_app
from pipeline.bus import create_topics, topic_name, topic_partitions
from pipeline.cameras.health import HealthStore
from pipeline.cameras.leases import LeaseManager
from pipeline.cameras.overview import CameraAdmin
from pipeline.cameras.registry import CameraExistsError, CameraNotFoundError, CameraRegistry
from pipeline.capture.publisher import DroppingPublisher
from pipeline.cli import main
from pipeline.config import (
    ApiSettings,
    CameraConfig,
    CaptureSettings,
    DeliverSettings,
    KafkaSettings,
    RedisSettings,
    Settings,
)
from pipeline.embedded import free_port
from pipeline.imaging import encode_jpeg
from pipeline.metrics import CAMERA_STATE
from schemas.cameras import CAMERA_STATUS_TOPIC, CameraStatus
from schemas.frames import FrameHeader
from schemas.subscriptions import Subscription
from tests.conftest import REPO_ROOT
from tests.streaming_helpers import stop_processes
from workers.capture import LeaseGuard, run_managed_capture
from workers.deliver import run_deliver


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout} s")
        time.sleep(0.1)


@pytest.fixture
def folder(shared_data: Path, tmp_path: Path) -> Callable[[str], Path]:
    """A camera folder of four real ball screw images."""
    def make(name: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        for src in sorted((shared_data / "train" / "good").glob("*.jpg"))[:4]:
            shutil.copy(src, path / src.name)
        return path
    return make


def camera(cid: str, source: Path, cls: str = "ball_screw", fps: float = 5.0) -> CameraConfig:
    return CameraConfig(id=cid, line="line-4", product_class=cls, source=str(source), fps=fps, loop=True)


def managed_settings(kafka: KafkaSettings, redis_settings: RedisSettings, cameras: list[CameraConfig],
                     **capture: Any) -> Settings:
    return Settings(kafka=kafka, redis=redis_settings, cameras=cameras,
                    capture=CaptureSettings(**{"resize_width": 64, "lease_s": 3.0, "registry_poll_s": 0.2,
                                               "reconnect_initial_s": 0.2, "reconnect_max_s": 0.5, **capture}),
                    deliver=DeliverSettings(group_id=f"{kafka.topic_prefix}-deliver"))


class Tail:
    """Every record of a topic from the beginning, read as it arrives (no consumer group)."""

    def __init__(self, kafka: KafkaSettings, name: str) -> None:
        create_topics(kafka, names=(name,))
        self._consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, enable_auto_commit=False)
        topic = topic_name(kafka, name)
        tps = topic_partitions(self._consumer, topic, 10.0)
        assert tps, f"topic {topic} has no partitions"
        self._consumer.assign(tps)
        self._consumer.seek_to_beginning(*tps)
        self.records: list[Any] = []

    def poll(self) -> list[Any]:
        for recs in self._consumer.poll(timeout_ms=200).values():
            self.records.extend(recs)
        return self.records

    def wait(self, predicate: Callable[[list[Any]], Any], timeout: float, what: str) -> Any:
        return wait_until(lambda: predicate(self.poll()), timeout, what)

    def close(self) -> None:
        self._consumer.close()


@pytest.fixture
def frames_tail(kafka_settings: KafkaSettings) -> Iterator[Tail]:
    tail = Tail(kafka_settings, "frames")
    yield tail
    tail.close()


def headers(records: list[Any], camera_id: str | None = None) -> list[FrameHeader]:
    out = [FrameHeader.from_headers(r.headers) for r in records]
    return [h for h in out if camera_id is None or h.camera_id == camera_id]


# -- registry and leases (Redis only) -------------------------------------------------------------
def test_seed_never_undoes_runtime_edits(redis_client: redis.Redis, redis_settings: RedisSettings,
                                         tmp_path: Path) -> None:
    reg = CameraRegistry(redis_client, redis_settings.key_prefix)
    yaml_cams = [camera("a", tmp_path), camera("b", tmp_path)]
    assert reg.seed(yaml_cams) == ["a", "b"]
    assert reg.seed(yaml_cams) == []  # already there
    v = reg.version()
    reg.update("a", {"fps": 2.0})
    assert reg.remove("b") and not reg.remove("b")
    assert reg.version() > v
    assert reg.seed(yaml_cams) == []  # neither the edit nor the removal is undone
    assert reg.get("a").fps == 2.0 and list(reg.all()) == ["a"]
    assert reg.meta()["a"]["origin"] == "runtime"
    with pytest.raises(CameraExistsError):
        reg.add(camera("a", tmp_path))
    with pytest.raises(CameraNotFoundError):
        reg.update("b", {"fps": 1.0})
    with pytest.raises(ValueError, match="fps"):
        reg.update("a", {"fps": -1})
    with pytest.raises(ValueError, match="id cannot change"):
        reg.update("a", {"id": "z"})
    # Adding a removed camera again at run time clears its tombstone; --overwrite re-applies the YAML.
    assert reg.seed(yaml_cams, overwrite=True) == ["a", "b"]
    assert reg.get("a").fps == 5.0 and list(reg.all()) == ["a", "b"]


def test_leases_exclude_fence_and_expire(redis_client: redis.Redis, redis_settings: RedisSettings) -> None:
    prefix = redis_settings.key_prefix
    one = LeaseManager(redis_client, prefix, "w1", lease_s=1.0)
    two = LeaseManager(redis_client, prefix, "w2", lease_s=1.0)
    first = one.acquire("cam")
    assert first is not None and first.valid()
    assert two.acquire("cam") is None
    assert one.renew(first)
    assert one.holders(["cam", "other"]) == {"cam": ("w1", first.token), "other": None}
    time.sleep(1.2)  # w1 stops renewing: the lease lapses
    assert not first.valid()
    second = two.acquire("cam")
    assert second is not None and second.token > first.token
    # The old holder can neither extend nor delete the new holder's lease.
    assert not one.renew(first) and not one.release(first)
    assert two.holders(["cam"]) == {"cam": ("w2", second.token)}
    assert two.release(second) and one.acquire("cam") is not None


def test_no_frame_passes_without_a_valid_lease(kafka_settings: KafkaSettings, redis_client: redis.Redis,
                                               redis_settings: RedisSettings) -> None:
    create_topics(kafka_settings, names=("frames",))
    leases = LeaseManager(redis_client, redis_settings.key_prefix, "w", lease_s=1.0)
    lease = leases.acquire("g")
    assert lease is not None
    publisher = DroppingPublisher(kafka_settings, "frames", 8)
    try:
        guard = LeaseGuard(publisher, lease)
        assert guard.offer("g", b"frame-1", [])
        time.sleep(0.85)  # not renewed: the holder gives the lease up before Redis expires it
        assert not lease.valid() and not guard.offer("g", b"frame-2", [])
        fresh = leases.acquire("h")
        assert fresh is not None
        stopped = LeaseGuard(publisher, fresh)
        stopped.close()  # a stopped runner: nothing passes even with a valid lease
        assert fresh.valid() and not stopped.offer("h", b"frame-3", [])
        assert publisher.flush(15)
    finally:
        publisher.close()
    assert publisher.published == {"g": 1}


# -- managed capture in process ---------------------------------------------------------------------
def test_cameras_added_changed_and_removed_while_capture_runs(
        kafka_settings: KafkaSettings, redis_settings: RedisSettings, redis_client: redis.Redis,
        folder: Callable[[str], Path], frames_tail: Tail, start_background: Callable[..., Any]) -> None:
    settings = managed_settings(kafka_settings, redis_settings, [camera("yaml-1", folder("y1"))])
    start_background(run_managed_capture, settings, worker="solo")
    frames_tail.wait(lambda r: headers(r, "yaml-1"), 60, "frames of the seeded YAML camera")

    reg = CameraRegistry(redis_client, redis_settings.key_prefix)
    reg.add(camera("cam-b", folder("b"), cls="bolt"))
    frames_tail.wait(lambda r: headers(r, "cam-b"), 30, "frames of a camera added at run time")
    assert {h.product_class for h in headers(frames_tail.records, "cam-b")} == {"bolt"}

    reg.update("cam-b", {"product_class": "nut"})
    frames_tail.wait(lambda r: any(h.product_class == "nut" for h in headers(r, "cam-b")), 30,
                     "frames with the changed product class")

    reg.remove("yaml-1")
    removed_at = time.time()
    # cam-b keeps going for a while after the removal; yaml-1 stops within a few rounds.
    frames_tail.wait(lambda r: sum(h.capture_ts > removed_at + 3 for h in headers(r, "cam-b")) >= 5, 30,
                     "cam-b frames well after the removal")
    late = [h for h in headers(frames_tail.records, "yaml-1") if h.capture_ts > removed_at + 1.0]
    assert late == [], f"{len(late)} frames of the removed camera"
    assert CameraRegistry(redis_client, redis_settings.key_prefix).seed(settings.cameras) == []

    rows = {r["id"]: r for r in CameraAdmin(settings, redis_client).rows()}
    assert list(rows) == ["cam-b"]
    assert rows["cam-b"]["state"] == "live" and rows["cam-b"]["worker"] == "solo"
    assert rows["cam-b"]["fps_measured"] > 0 and rows["cam-b"]["product_class"] == "nut"


# -- failover between capture processes ---------------------------------------------------------------
def _capture_process(cfg: Path, kafka: KafkaSettings, redis_settings: RedisSettings, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEWATCH_")}
    env.update({
        "LINEWATCH_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers or "",
        "LINEWATCH_KAFKA__TOPIC_PREFIX": kafka.topic_prefix,
        "LINEWATCH_REDIS__URL": redis_settings.url or "",
        "LINEWATCH_REDIS__KEY_PREFIX": redis_settings.key_prefix,
    })
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "--config", str(cfg), "capture"],
                                cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _runs(found: list[FrameHeader]) -> list[list[FrameHeader]]:
    """Split one camera's frames into capture runs: each run counts on from its own start sequence
    (the epoch in ms when it started), so runs are far apart in sequence numbers."""
    runs: list[list[FrameHeader]] = []
    for h in sorted(found, key=lambda h: h.seq):
        if runs and h.seq - runs[-1][-1].seq < 100:
            runs[-1].append(h)
        else:
            runs.append([h])
    return runs


def test_killed_capture_worker_cameras_move_and_are_never_captured_twice(
        kafka_settings: KafkaSettings, redis_settings: RedisSettings, redis_client: redis.Redis,
        folder: Callable[[str], Path], frames_tail: Tail, tmp_path: Path) -> None:
    cams = [camera("fo-1", folder("f1")), camera("fo-2", folder("f2"))]
    cfg = tmp_path / "site.yaml"
    cfg.write_text(json.dumps({"capture": {"resize_width": 64, "lease_s": 3.0, "registry_poll_s": 0.3},
                               "cameras": [c.model_dump(mode="json") for c in cams]}))
    leases = LeaseManager(redis_client, redis_settings.key_prefix, "-", 3.0)
    procs = [_capture_process(cfg, kafka_settings, redis_settings, tmp_path / "a.log")]
    try:
        wait_until(lambda: all(leases.holders(["fo-1", "fo-2"]).values()), 60, "worker a holds both cameras")
        procs.append(_capture_process(cfg, kafka_settings, redis_settings, tmp_path / "b.log"))
        # Two workers: a fair share is one camera each, so a hands one over to b.
        owners = wait_until(lambda: (h := leases.holders(["fo-1", "fo-2"])) and all(h.values())
                            and len({o[0] for o in h.values() if o}) == 2 and h, 60, "one camera per worker")
        frames_tail.wait(lambda r: len(headers(r, "fo-1")) >= 5 and len(headers(r, "fo-2")) >= 5, 60,
                         "frames of both cameras")
        victim_owner, victim_token = owners["fo-1"]
        victim = next(p for p in procs if f"-{p.pid}-" in victim_owner)
        survivor = next(p for p in procs if p is not victim)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        killed_at = time.time()
        moved = wait_until(lambda: (h := leases.holders(["fo-1"])["fo-1"]) and h[0] != victim_owner and h,
                           60, "fo-1 taken over by the surviving worker")
        took_s = time.time() - killed_at
        assert f"-{survivor.pid}-" in moved[0] and moved[1] > victim_token
        frames_tail.wait(lambda r: any(h.capture_ts > killed_at + took_s for h in headers(r, "fo-1")), 30,
                         "fo-1 frames from the surviving worker")
        assert survivor.poll() is None
    finally:
        stop_processes(procs)
    logs = "".join(f"\n--- {p.name}\n{p.read_text()[-2000:]}" for p in tmp_path.glob("*.log"))
    for cid in ("fo-1", "fo-2"):
        runs = _runs(headers(frames_tail.poll(), cid))
        assert runs, cid + logs
        for run in runs:
            # One capture thread per run: its frames are in capture order.
            assert [h.capture_ts for h in run] == sorted(h.capture_ts for h in run), cid + logs
        spans = sorted((run[0].capture_ts, run[-1].capture_ts) for run in runs)
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start > end, f"{cid}: two captures overlapped in time: {spans}{logs}"
    # fo-1 was captured by the killed worker and then by the survivor: at least two runs.
    assert len(_runs(headers(frames_tail.records, "fo-1"))) >= 2, logs


# -- camera health: down and up, to subscriptions ---------------------------------------------------------
def test_camera_that_stops_raises_camera_down_then_camera_up(
        kafka_settings: KafkaSettings, redis_settings: RedisSettings, redis_client: redis.Redis,
        folder: Callable[[str], Path], frames_tail: Tail, start_background: Callable[..., Any],
        tmp_path: Path) -> None:
    source = folder("dark")
    images = tmp_path / "saved"
    shutil.copytree(source, images)
    settings = managed_settings(kafka_settings, redis_settings, [camera("dk-1", source)], dark_after_s=2.0)
    prefix = redis_settings.key_prefix
    from pipeline.delivery.store import SubscriptionStore
    stream = f"{prefix}:camera-notes"
    subs = SubscriptionStore(redis_client, prefix)
    subs.add(Subscription.model_validate({"id": "line-4-watch", "filters": {"lines": ["line-4"]},
                                          "channel": {"type": "redis_stream", "stream": stream}}))
    subs.add(Subscription.model_validate({"id": "other-line", "filters": {"lines": ["line-9"]},
                                          "channel": {"type": "redis_stream", "stream": stream + "-other"}}))
    status_tail = Tail(kafka_settings, CAMERA_STATUS_TOPIC)
    try:
        start_background(run_deliver, settings)
        start_background(run_managed_capture, settings, worker="health")
        frames_tail.wait(lambda r: headers(r, "dk-1"), 60, "frames of dk-1")
        health = HealthStore(redis_client, prefix)
        wait_until(lambda: (health.get("dk-1") or {}).get("state") == "live", 30, "dk-1 live")

        for f in source.iterdir():
            f.unlink()  # the camera stops delivering
        wait_until(lambda: redis_client.xlen(stream) >= 1, 60, "camera_down in the subscription's stream")
        row = next(r for r in CameraAdmin(settings, redis_client).rows() if r["id"] == "dk-1")
        assert row["state"] == "dark" and row["down"] and row["reconnects"] >= 1
        assert CAMERA_STATE.labels(camera="dk-1", state="dark")._value.get() == 1.0

        for f in images.iterdir():
            shutil.copy(f, source / f.name)  # and comes back
        wait_until(lambda: redis_client.xlen(stream) >= 2, 60, "camera_up in the subscription's stream")
        wait_until(lambda: (health.get("dk-1") or {}).get("state") == "live", 30, "dk-1 live again")
    finally:
        statuses = [CameraStatus.model_validate_json(r.value) for r in status_tail.poll()]
        status_tail.close()
    entries = redis_client.xrange(stream)
    notes = [json.loads(fields[b"notification"]) for _, fields in entries]
    assert [n["status"] for n in notes] == ["camera_down", "camera_up"]
    down, up = notes[0]["event"], notes[1]["event"]
    assert down["camera_id"] == up["camera_id"] == "dk-1" and down["line_id"] == "line-4"
    assert up["down_s"] >= 2.0 and down["dark_after_s"] == 2.0
    assert [s.status for s in statuses][:2] == ["camera_down", "camera_up"]
    assert redis_client.xlen(stream + "-other") == 0  # another line's subscription hears nothing


# -- the same operations through the CLI and the API --------------------------------------------------------
def test_cameras_cli(redis_settings: RedisSettings, redis_client: redis.Redis, tmp_path: Path,
                     capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "site.yaml"
    cfg.write_text(json.dumps({"redis": redis_settings.model_dump(mode="json"),
                               "cameras": [camera("yaml-cam", tmp_path).model_dump(mode="json")]}))
    base = ["--config", str(cfg), "cameras"]
    assert main([*base, "add", "press-2", "--line", "line-2", "--class", "bolt",
                 "--source", "rtsp://op:secret@10.0.0.7/s", "--fps", "5"]) == 0
    assert "secret" not in capsys.readouterr().out
    assert main([*base, "add", "press-2", "--class", "bolt", "--source", "x"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*base, "update", "press-2", "--no-fps", "--class", "nut"]) == 0
    assert main([*base, "update", "nope", "--fps", "2"]) == 2
    assert "no camera 'nope'" in capsys.readouterr().err
    assert main([*base, "update", "press-2", "--fps", "-3"]) == 2
    assert "invalid camera fps" in capsys.readouterr().err
    capsys.readouterr()
    assert main([*base, "list", "--json"]) == 0
    rows = {r["id"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"press-2", "yaml-cam"}  # the YAML camera was seeded
    assert rows["press-2"]["fps"] is None and rows["press-2"]["product_class"] == "nut"
    assert rows["press-2"]["source"] == "rtsp://***@10.0.0.7/s" and rows["press-2"]["state"] == "unassigned"
    assert rows["yaml-cam"]["origin"] == "yaml" and rows["press-2"]["origin"] == "runtime"
    assert main([*base, "remove", "yaml-cam"]) == 0 and main([*base, "remove", "yaml-cam"]) == 2
    capsys.readouterr()
    assert main([*base, "list"]) == 0
    table = capsys.readouterr().out
    assert "press-2" in table and "yaml-cam" not in table  # removed stays removed despite the YAML


def test_cameras_api(redis_settings: RedisSettings, tmp_path: Path) -> None:
    token = "cam-api-token-0123456789"
    settings = Settings(redis=redis_settings, cameras=[camera("yaml-cam", tmp_path)],
                        api=ApiSettings(host="127.0.0.1", port=free_port(), token=token))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.api.port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.api.port}/api/v1/cameras/registry"
    try:
        with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=10) as http:
            wait_until(lambda: server.started, 30, "API server up")
            assert httpx.get(url).status_code == 401
            assert [r["id"] for r in http.get(url).json()] == ["yaml-cam"]
            body = {"id": "gate-1", "line": "line-5", "product_class": "bolt", "source": "http://u:pw@cam/mjpg"}
            created = http.post(url, json=body)
            assert created.status_code == 201 and created.json()["source"] == "http://***@cam/mjpg"
            assert http.post(url, json=body).status_code == 409
            bad = http.post(url, json={**body, "id": "gate-2", "fps": 0})
            assert bad.status_code == 422 and "fps" in bad.json()["detail"]
            bad = http.post(url, json={**body, "id": "gate-2", "source": "ftp://cam/x"})
            assert bad.status_code == 422 and "unsupported URL scheme ftp://" in bad.json()["detail"]
            changed = http.patch(f"{url}/gate-1", json={"fps": 12.5})
            assert changed.status_code == 200 and changed.json()["fps"] == 12.5
            assert http.patch(f"{url}/nope", json={"fps": 1}).status_code == 404
            row = http.get(f"{url}/gate-1").json()
            assert row["state"] == "unassigned" and row["line"] == "line-5" and row["worker"] is None
            assert http.delete(f"{url}/gate-1").status_code == 204
            assert http.delete(f"{url}/gate-1").status_code == 404
            assert http.get(f"{url}/gate-1").status_code == 404
    finally:
        server.should_exit = True
        thread.join(15)


def test_dashboard_camera_rows_carry_the_capture_state(redis_settings: RedisSettings, tmp_path: Path) -> None:
    """/api/v1/cameras (the dashboard's tiles): a registry camera shows what its capture worker reports
    (dark here), one nobody holds is unassigned, and a replay stays a replay."""
    from pipeline.api.store import CameraStore
    from tests.test_api import make_score

    token = "cam-state-token-0123456789"
    settings = Settings(redis=redis_settings, cameras=[camera("held-cam", tmp_path), camera("free-cam", tmp_path)],
                        api=ApiSettings(host="127.0.0.1", port=free_port(), token=token))
    client = redis.Redis.from_url(redis_settings.url)
    prefix = redis_settings.key_prefix
    CameraAdmin(settings, client)  # seeds the registry from the YAML
    lease = LeaseManager(client, prefix, "worker-a", 30.0).acquire("held-cam")
    assert lease is not None
    HealthStore(client, prefix).put({"camera_id": "held-cam", "state": "dark", "fps": 0.0, "last_frame_ts": None,
                                     "reconnects": 3, "worker": "worker-a", "lease_token": lease.token,
                                     "updated_at": time.time()})
    store = CameraStore(client, prefix)
    jpeg = encode_jpeg(np.full((30, 40, 3), 128, np.uint8))
    for cam, session in (("held-cam", None), ("free-cam", None), ("other-cam", "replay-1")):
        assert store.put(make_score(cam, session=session), jpeg)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=settings.api.port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 30, "API server up")
        rows = httpx.get(f"http://127.0.0.1:{settings.api.port}/api/v1/cameras",
                         headers={"Authorization": f"Bearer {token}"}, timeout=10).json()
        states = {r["camera_id"]: r.get("state") for r in rows}
        assert states == {"held-cam": "dark", "free-cam": "unassigned", "other-cam": None}
    finally:
        server.should_exit = True
        thread.join(15)
        client.close()


class MjpegServer:
    """A multipart/x-mixed-replace JPEG stream on loopback, stopped and restarted on the same port."""

    def __init__(self, jpeg: bytes, port: int = 0) -> None:
        self.stopping = threading.Event()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    while not owner.stopping.is_set():
                        self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                                         % len(jpeg) + jpeg + b"\r\n")
                        time.sleep(0.05)

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(2)


def test_mjpeg_camera_that_stops_goes_dark_and_comes_back(
        kafka_settings: KafkaSettings, redis_settings: RedisSettings, redis_client: redis.Redis,
        start_background: Callable[..., Any]) -> None:
    jpeg = encode_jpeg(np.full((48, 64, 3), 90, np.uint8))
    server = MjpegServer(jpeg)
    cam = CameraConfig(id="mj-1", line="line-4", product_class="p", source=f"http://127.0.0.1:{server.port}/s",
                       fps=5)
    settings = managed_settings(kafka_settings, redis_settings, [cam], dark_after_s=2.5)
    status_tail = Tail(kafka_settings, CAMERA_STATUS_TOPIC)
    health = HealthStore(redis_client, redis_settings.key_prefix)
    restarted: MjpegServer | None = None
    try:
        start_background(run_managed_capture, settings, worker="mj")
        wait_until(lambda: (health.get("mj-1") or {}).get("state") == "live", 60, "mj-1 live")
        server.stop()
        # Silent for a few seconds: reconnecting first, then dark.
        wait_until(lambda: (health.get("mj-1") or {}).get("state") == "reconnecting", 30, "mj-1 reconnecting")
        down = status_tail.wait(lambda r: [CameraStatus.model_validate_json(x.value) for x in r], 60, "camera_down")
        assert [s.status for s in down] == ["camera_down"] and down[0].camera_id == "mj-1"
        assert (health.get("mj-1") or {}).get("state") == "dark"
        restarted = MjpegServer(jpeg, port=server.port)
        statuses = status_tail.wait(lambda r: len(r) >= 2 and [CameraStatus.model_validate_json(x.value)
                                                                for x in r], 60, "camera_up")
        assert [s.status for s in statuses] == ["camera_down", "camera_up"]
        assert statuses[1].down_s is not None and statuses[1].down_s >= 2.5
        wait_until(lambda: (health.get("mj-1") or {}).get("reconnects", 0) >= 1, 30, "the reconnect counted")
    finally:
        status_tail.close()
        if restarted is not None:
            restarted.stop()
