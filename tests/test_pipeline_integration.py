"""End to end across processes and stages on the real broker and Redis (see conftest.py).

A SIGKILLed scorer loses no frame, alerts are debounced through the broker, and `linewatch run`
brings a whole site up on its embedded broker and cache.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import redis
from kafka import KafkaConsumer

from pipeline.bus import create_topics, make_producer, topic_name, topic_partitions
from pipeline.config import (
    AlertSettings,
    EngineSettings,
    KafkaSettings,
    RedisSettings,
    ScoringSettings,
    Settings,
    load_settings,
)
from pipeline.engine.engine import AnomalyEngine
from pipeline.imaging import decode_image, decode_png, encode_jpeg, read_image
from pipeline.redis_store import ThresholdStore
from schemas import DefectEvent, FrameHeader, ScoreMessage
from tests.engine_helpers import SMALL, backbone
from workers.alert import run_alert
from workers.score import run_score

CLASS = "ball_screw"


# -- helpers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(shared_data: Path) -> list[np.ndarray]:
    """Four normal and four pitted ball screws, 320 x 130 (RGB)."""
    paths = sorted((shared_data / "test" / "good").glob("*.jpg"))[:4] + sorted(
        (shared_data / "test" / "pitting").glob("*.jpg"))[:4]
    return [cv2.resize(read_image(str(p)), (320, 130), interpolation=cv2.INTER_AREA) for p in paths]


def make_engine() -> AnomalyEngine:
    bb, fp = backbone(SMALL)
    return AnomalyEngine(EngineSettings(backbone=SMALL, pretrained="random", precision="fp32"),
                         backbone=bb, fingerprint=fp)


def publish(kafka: KafkaSettings, frames: list[tuple[str, int, np.ndarray, float]]) -> None:
    """(camera, seq, rgb, capture_ts) -> frames topic as the capture worker writes them; acked."""
    create_topics(kafka)
    producer = make_producer(kafka)
    try:
        futures = []
        for camera, seq, image, ts in frames:
            h = FrameHeader(camera_id=camera, line_id="line-1", product_class=CLASS, seq=seq, capture_ts=ts,
                            width=image.shape[1], height=image.shape[0])
            futures.append(producer.send(topic_name(kafka, "frames"), key=camera.encode(),
                                         value=encode_jpeg(image), headers=h.to_header()))
        producer.flush(timeout=30)
        for f in futures:
            f.get(timeout=30)
    finally:
        producer.close()


class TopicReader:
    """Follows every partition of a topic from the start (no group), accumulating records."""

    def __init__(self, kafka: KafkaSettings, name: str) -> None:
        self.consumer = KafkaConsumer(**kafka.client_kwargs(), group_id=None, enable_auto_commit=False)
        topic = topic_name(kafka, name)
        tps = topic_partitions(self.consumer, topic, 20.0)
        assert tps, f"topic {topic} not found"
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        self.records: list = []

    def poll(self, timeout_ms: int = 200) -> list:
        for recs in self.consumer.poll(timeout_ms=timeout_ms).values():
            self.records.extend(recs)
        return self.records

    def until(self, done: Any, timeout_s: float, settle_s: float = 0.0) -> list:
        """Poll until ``done(records)``, then keep polling ``settle_s`` more (late arrivals)."""
        deadline = time.monotonic() + timeout_s
        while not done(self.poll()) and time.monotonic() < deadline:
            pass
        end = time.monotonic() + settle_s
        while time.monotonic() < end:
            self.poll()
        return self.records

    def close(self) -> None:
        self.consumer.close(autocommit=False)


def score_keys(records: list) -> list[tuple[str, int]]:
    return [(m.frame.camera_id, m.frame.seq) for m in (ScoreMessage.model_validate_json(r.value) for r in records)]


def run_in_thread(fn: Any, *args: Any, timeout_s: float = 90.0, **kwargs: Any) -> Any:
    """Run a worker that exits by itself (idle_exit_s); fail instead of hanging the session."""
    out: dict[str, Any] = {}
    stop = threading.Event()

    def target() -> None:
        try:
            out["result"] = fn(*args, stop, **kwargs)
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        stop.set()
        t.join(15)
        pytest.fail(f"{fn.__name__} did not exit in time")
    if "error" in out:
        raise out["error"]
    return out["result"]


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any LINEWATCH_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEWATCH_")}
    env.update(extra)
    return env


def scorer_env(kafka: KafkaSettings, redis_settings: RedisSettings) -> dict[str, str]:
    return {
        "LINEWATCH_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers or "",
        "LINEWATCH_KAFKA__TOPIC_PREFIX": kafka.topic_prefix,
        "LINEWATCH_KAFKA__PARTITIONS": str(kafka.partitions),
        "LINEWATCH_KAFKA__SESSION_TIMEOUT_MS": "6000",
        "LINEWATCH_REDIS__URL": redis_settings.url or "",
        "LINEWATCH_REDIS__KEY_PREFIX": redis_settings.key_prefix,
        "LINEWATCH_ENGINE__BACKBONE": SMALL,
        "LINEWATCH_ENGINE__PRETRAINED": "random",
        "LINEWATCH_ENGINE__PRECISION": "fp32",
        "LINEWATCH_SCORING__MAX_BATCH": "2",
        "LINEWATCH_SCORING__STALENESS_S": "3600",
    }


# -- a killed scorer ------------------------------------------------------------------------------
def test_scorer_environment_is_what_the_subprocess_sees(kafka_settings: KafkaSettings,
                                                        redis_settings: RedisSettings,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    for k in [k for k in os.environ if k.startswith("LINEWATCH_")]:
        monkeypatch.delenv(k)
    for k, v in scorer_env(kafka_settings, redis_settings).items():
        monkeypatch.setenv(k, v)
    s = load_settings()
    assert (s.kafka.bootstrap_servers, s.kafka.topic_prefix, s.kafka.partitions, s.kafka.session_timeout_ms) == (
        kafka_settings.bootstrap_servers, kafka_settings.topic_prefix, 2, 6000)
    assert (s.redis.url, s.redis.key_prefix) == (redis_settings.url, redis_settings.key_prefix)
    assert (s.engine.backbone, s.engine.pretrained, s.engine.precision) == (SMALL, "random", "fp32")
    assert s.scoring.max_batch == 2 and s.scoring.staleness_s == 3600.0
    # `float | None`: "null" in a leaf variable disables the limit; a number that isn't one is an error.
    monkeypatch.setenv("LINEWATCH_SCORING__STALENESS_S", "null")
    s = load_settings()
    assert s.scoring.staleness_s is None and s.scoring.max_batch == 2
    monkeypatch.setenv("LINEWATCH_SCORING__STALENESS_S", "soon")
    with pytest.raises(ValueError, match="staleness_s"):
        load_settings()


def test_sigkilled_scorer_loses_no_frame(kafka_settings: KafkaSettings, redis_settings: RedisSettings,
                                         images: list[np.ndarray], tmp_path: Path) -> None:
    now = time.time()
    frames = [(f"cam-{c}", s, images[(s + 3 * c) % len(images)], now) for c in range(2) for s in range(15)]
    publish(kafka_settings, frames)
    expected = {(c, s) for c, s, _, _ in frames}
    cmd = [sys.executable, "-m", "pipeline.cli", "score"]
    env = clean_env(**scorer_env(kafka_settings, redis_settings))
    procs: list[subprocess.Popen] = []
    logs = [tmp_path / "first.log", tmp_path / "second.log"]

    def start(log: Path) -> subprocess.Popen:
        with log.open("wb") as fh:
            procs.append(subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT))
        return procs[-1]

    def tail(log: Path) -> str:
        return log.read_text(errors="replace")[-3000:]

    reader: TopicReader | None = None
    try:
        first = start(logs[0])
        reader = TopicReader(kafka_settings, "scores")  # publish() created every topic
        reader.until(lambda recs: len(recs) >= 6 or first.poll() is not None, timeout_s=120)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert first.returncode == -signal.SIGKILL, tail(logs[0])
        before = set(score_keys(reader.until(lambda _: False, timeout_s=0, settle_s=1.0)))
        assert 6 <= len(before) < len(expected), f"not killed mid-stream: {len(before)} scored\n{tail(logs[0])}"

        second = start(logs[1])
        records = reader.until(lambda recs: set(score_keys(recs)) >= expected, timeout_s=120, settle_s=1.0)
        keys = score_keys(records)
        assert set(keys) == expected, tail(logs[1])
        # Only the batch in flight at the kill (max_batch=2) may have been scored twice: the second
        # scorer resumed from the committed offsets instead of rescoring the >= 6 scored before.
        assert len(keys) - len(expected) <= 2, sorted(keys)
        second.send_signal(signal.SIGTERM)  # a graceful stop: finish the batch, leave the group
        assert second.wait(30) == 0, tail(logs[1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        if reader is not None:
            reader.close()


# -- alerting through the broker ---------------------------------------------------------------------
def runs_of(flags: list[bool]) -> list[tuple[int, int]]:
    """Maximal runs of True as (first index, last index)."""
    runs: list[tuple[int, int]] = []
    for i, flag in enumerate(flags):
        if flag and (i == 0 or not flags[i - 1]):
            runs.append((i, i))
        elif flag:
            runs[-1] = (runs[-1][0], i)
    return runs


def test_defect_events_follow_the_scores_through_the_broker(
        kafka_settings: KafkaSettings, redis_settings: RedisSettings, redis_client: redis.Redis,
        images: list[np.ndarray]) -> None:
    engine = make_engine()
    # Rank the images by the score the worker will give them (same JPEG round trip, same engine)
    # and split them where the gap is widest: "high" images are anomalous, "low" ones are not.
    solo = [engine.score([decode_image(encode_jpeg(im))], CLASS)[0].image_score for im in images]
    order = np.argsort(solo)
    cut = max(range(2, len(order) - 1), key=lambda i: solo[order[i]] - solo[order[i - 1]])
    low, high = [int(i) for i in order[:cut]], [int(i) for i in order[cut:]]
    threshold = (solo[order[cut - 1]] + solo[order[cut]]) / 2
    patterns = {"cam-a": "LHHLHLLHHH", "cam-b": "HLLHHHLHLL"}
    sizes = {"cam-a": (320, 130), "cam-b": (288, 117)}
    t0 = time.time() - 60
    frames = []
    for cam, pattern in patterns.items():
        for seq, kind in enumerate(pattern):
            pool = high if kind == "H" else low
            frames.append((cam, seq, cv2.resize(images[pool[seq % len(pool)]], sizes[cam]), t0 + seq * 1.0))
    publish(kafka_settings, frames)

    settings = Settings(
        kafka=kafka_settings, redis=redis_settings,
        engine=EngineSettings(backbone=SMALL, pretrained="random", precision="fp32"),
        scoring=ScoringSettings(max_batch=8, staleness_s=None, group_id=f"{kafka_settings.topic_prefix}-score"),
        # One anomalous frame opens an event; 1.5 s of capture time (frames are 1 s apart) without one
        # closes it: every maximal run of anomalous frames is exactly one event.
        alert=AlertSettings(k=1, n=1, quiet_s=1.5, silence_s=1.5, group_id=f"{kafka_settings.topic_prefix}-alert"),
    )
    stats = run_in_thread(run_score, settings, engine=engine, idle_exit_s=4.0)
    assert stats.scored == 20
    scores = TopicReader(kafka_settings, "scores")
    try:
        msgs = [ScoreMessage.model_validate_json(r.value)
                for r in scores.until(lambda recs: len(recs) >= 20, timeout_s=30)]
    finally:
        scores.close()
    by_cam = {cam: sorted((m for m in msgs if m.frame.camera_id == cam), key=lambda m: m.frame.seq)
              for cam in patterns}
    assert {cam: [m.frame.seq for m in ms] for cam, ms in by_cam.items()} == {cam: list(range(10)) for cam in patterns}
    ThresholdStore(redis_client, redis_settings.key_prefix).set(CLASS, threshold)

    expected: dict[str, list[tuple[int, int, int]]] = {}  # camera -> (first, last, peak seq) per run
    for cam, ms in by_cam.items():
        flags = [m.image_score >= threshold for m in ms]
        assert "".join("H" if f else "L" for f in flags) == patterns[cam]  # scores split as planned
        expected[cam] = [(a, b, max(range(a, b + 1), key=lambda s: ms[s].image_score)) for a, b in runs_of(flags)]

    alert_stats = run_in_thread(run_alert, settings, idle_exit_s=4.0)
    n_runs = sum(len(r) for r in expected.values())
    assert (alert_stats.events_opened, alert_stats.events_closed) == (n_runs, n_runs)
    reader = TopicReader(kafka_settings, "defects")
    try:
        records = reader.until(lambda recs: len(recs) >= 2 * n_runs, timeout_s=30, settle_s=0.5)
    finally:
        reader.close()
    events = [DefectEvent.model_validate_json(r.value) for r in records]
    assert all(r.key == e.camera_id.encode() for r, e in zip(records, events, strict=True))
    assert len({(e.event_id, e.status) for e in events}) == len(events) == 2 * n_runs
    for cam, runs in expected.items():
        mine = [e for e in events if e.camera_id == cam]
        opened = sorted((e for e in mine if e.status == "open"), key=lambda e: e.first_seq)
        closed = sorted((e for e in mine if e.status == "closed"), key=lambda e: e.first_seq)
        assert [(e.first_seq, e.last_seq) for e in opened] == [(a, a) for a, _, _ in runs]
        assert [(e.first_seq, e.last_seq, e.peak_seq) for e in closed] == runs
        assert [e.n_frames for e in closed] == [b - a + 1 for a, b, _ in runs]
        assert [e.event_id for e in opened] == [e.event_id for e in closed] == [
            DefectEvent.make_id(cam, a) for a, _, _ in runs]
        width, height = sizes[cam]
        for e in mine:
            assert e.threshold == pytest.approx(threshold)
            assert e.peak_score == pytest.approx(by_cam[cam][e.peak_seq].image_score)
            assert (e.width, e.height) == (width, height)
            mask = decode_png(e.mask_png)
            assert mask.shape == (height, width) and set(np.unique(mask)) <= {0, 255} and mask.any()
            thumb = decode_image(e.thumbnail_jpeg)
            assert thumb.shape[1] == 256 and thumb.ndim == 3


# -- `linewatch run` ---------------------------------------------------------------------------------
def write_stream(images: Path, folder: Path, count: int, size: tuple[int, int]) -> Path:
    """The first ``count`` images of a folder, resized, as a recorded stream f00.jpg, f01.jpg, ..."""
    folder.mkdir()
    for i, p in enumerate(sorted(images.glob("*.jpg"))[:count]):
        cv2.imwrite(str(folder / f"f{i:02d}.jpg"), cv2.resize(cv2.imread(str(p)), size))
    return folder


def test_linewatch_run_replays_a_folder_on_embedded_infrastructure(shared_data: Path, tmp_path: Path) -> None:
    stream = write_stream(shared_data / "test" / "pitting", tmp_path / "stream", 6, (320, 130))
    cfg = tmp_path / "site.yaml"
    cfg.write_text(
        "engine: {backbone: ViT-S-32, pretrained: random, precision: fp32}\n"
        # Every frame is anomalous and they are captured back to back: one event, closed after 0.5 s.
        "alert: {quiet_s: 0.5, silence_s: 0.5, k: 1, n: 1, default_threshold: 0.0}\n"
        f"cameras:\n  - {{id: cam-1, product_class: {CLASS}, source: '{stream}'}}\n"
    )
    run_dir = tmp_path / "run"
    # A broker or cache configured in the test's own environment must not leak into the site.
    env = clean_env()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "--config", str(cfg), "run", "--replay",
                           "--exit-when-done", "--run-dir", str(run_dir), "--data-dir", str(tmp_path / "data"),
                           "--no-api"],
                          capture_output=True, text=True, timeout=150, env=env)
    logs = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in run_dir.glob("*.log"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + logs
    assert "summary: frames=6 scores=6 events=1" in proc.stdout, proc.stdout + logs
    assert "embedded Kafka-compatible broker" in proc.stdout and "embedded cache" in proc.stdout
    assert "[event closed]" in proc.stdout and "RANDOM WEIGHTS" in proc.stdout
    assert {p.name for p in run_dir.glob("*.log")} == {"capture.log", "score.log", "alert.log", "deliver.log"}


def test_linewatch_run_stops_cleanly_on_ctrl_c(shared_data: Path, tmp_path: Path) -> None:
    stream = write_stream(shared_data / "test" / "good", tmp_path / "stream", 2, (160, 64))
    cfg = tmp_path / "site.yaml"
    # A looping source never ends: only Ctrl-C stops this site.
    cfg.write_text("engine: {backbone: ViT-S-32, pretrained: random, precision: fp32}\n"
                   f"cameras:\n  - {{id: cam-1, product_class: {CLASS}, source: '{stream}', fps: 2, loop: true}}\n")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "--config", str(cfg), "run", "--run-dir",
                             str(tmp_path / "run"), "--data-dir", str(tmp_path / "data"), "--no-api"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=clean_env(), start_new_session=True)
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 240  # the model loads before capture (and this line) starts
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "workers started" in line or not line:
            break
    started = next((ln for ln in lines if "workers started" in ln), None)
    assert started, "".join(lines)
    pids = [int(pid) for pid in re.findall(r"pid (\d+)", started)]
    broker_port = int(re.search(r"broker \(tansu\) at 127\.0\.0\.1:(\d+)", "".join(lines)).group(1))  # type: ignore[union-attr]
    assert len(pids) == 4
    time.sleep(3)  # let the workers get going
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode in (0, 130), out
    assert "summary:" in out
    for pid in pids:
        assert not _alive(pid), f"worker pid {pid} survived Ctrl-C"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", broker_port), timeout=1).close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead but unreaped: its parent has exited, so init reaps it soon.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"
