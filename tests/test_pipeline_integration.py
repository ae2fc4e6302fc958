"""End to end across processes: a killed scorer loses nothing, alerts through the broker, `linewatch run`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import AlertSettings, KafkaSettings, RedisSettings
from pipeline.imaging import decode_image, decode_png, read_image
from pipeline.redis_store import ThresholdStore, connect
from schemas import DefectEvent, ScoreMessage
from tests.streaming_helpers import Background, publish_frames, read_topic, site_settings, small_engine
from workers.alert import run_alert
from workers.score import run_score


@pytest.fixture(scope="module")
def images(shared_data: Path) -> list[np.ndarray]:
    paths = sorted((shared_data / "test" / "good").glob("*.jpg"))[:4] + sorted(
        (shared_data / "test" / "pitting").glob("*.jpg"))[:4]
    return [cv2.resize(read_image(str(p)), (320, 130)) for p in paths]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEWATCH_")}
    env.update(extra)
    return env


def scorer(kafka: KafkaSettings, redis: RedisSettings, log: Path) -> subprocess.Popen:
    env = clean_env(
        LINEWATCH_KAFKA__BOOTSTRAP_SERVERS=kafka.bootstrap_servers or "",
        LINEWATCH_KAFKA__TOPIC_PREFIX=kafka.topic_prefix,
        LINEWATCH_KAFKA__PARTITIONS=str(kafka.partitions),
        LINEWATCH_KAFKA__SESSION_TIMEOUT_MS="6000",
        LINEWATCH_REDIS__URL=redis.url or "",
        LINEWATCH_REDIS__KEY_PREFIX=redis.key_prefix,
        LINEWATCH_ENGINE__BACKBONE="ViT-S-32",
        LINEWATCH_ENGINE__PRETRAINED="random",
        LINEWATCH_ENGINE__PRECISION="fp32",
        LINEWATCH_SCORING__MAX_BATCH="2",
        LINEWATCH_SCORING__STALENESS_S="3600",
    )
    with log.open("ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "score"], env=env, stdout=fh,
                                stderr=subprocess.STDOUT)


def scored_keys(records: list) -> set[tuple[str, int]]:
    return {(m.frame.camera_id, m.frame.seq) for m in (ScoreMessage.model_validate_json(r.value) for r in records)}


def test_sigkilled_scorer_loses_no_frame(kafka_settings: KafkaSettings, redis_settings: RedisSettings,
                                         images: list[np.ndarray], tmp_path: Path) -> None:
    frames = [(f"cam-{c}", s, images[(s + c) % len(images)]) for c in range(2) for s in range(15)]
    publish_frames(kafka_settings, frames)
    expected = {(c, s) for c, s, _ in frames}
    procs = []
    try:
        procs.append(scorer(kafka_settings, redis_settings, tmp_path / "first.log"))
        first = read_topic(kafka_settings, "scores", 4, timeout_s=90)
        assert len(scored_keys(first)) >= 4, (tmp_path / "first.log").read_text()[-2000:]
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(10)
        assert len(scored_keys(first)) < len(expected), "the first scorer finished before it was killed"
        procs.append(scorer(kafka_settings, redis_settings, tmp_path / "second.log"))
        records = read_topic(kafka_settings, "scores", len(expected), timeout_s=120,
                             until=lambda recs: scored_keys(recs) >= expected)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert scored_keys(records) == expected


def test_alerts_through_the_broker(kafka_settings: KafkaSettings, redis_settings: RedisSettings,
                                   images: list[np.ndarray]) -> None:
    order = [0, 1, 4, 5, 6, 2, 3, 7, 0, 1]
    publish_frames(kafka_settings, [("cam", s, images[i]) for s, i in enumerate(order)])
    settings = site_settings(kafka_settings, redis_settings)
    run_score(settings, threading.Event(), engine=small_engine(), idle_exit_s=4.0)
    msgs = sorted((ScoreMessage.model_validate_json(r.value) for r in read_topic(kafka_settings, "scores", 10)),
                  key=lambda m: m.frame.seq)
    scores = [m.image_score for m in msgs]
    threshold = float(np.median(scores))
    ThresholdStore(connect(redis_settings), redis_settings.key_prefix).set("ball_screw", threshold)
    anomalous = [s >= threshold for s in scores]
    runs = []  # maximal runs of consecutive anomalous frames: one event each with k=n=1
    for seq, flag in enumerate(anomalous):
        if flag and (seq == 0 or not anomalous[seq - 1]):
            runs.append([seq, seq])
        elif flag:
            runs[-1][1] = seq
    settings.alert = AlertSettings(k=1, n=1, quiet_s=0.0, min_region_area=1)
    with Background(run_alert, settings, idle_exit_s=6.0):
        records = read_topic(kafka_settings, "defects", 2 * len(runs), timeout_s=60)
    events = [DefectEvent.model_validate_json(r.value) for r in records]
    closed = sorted((e for e in events if e.status == "closed"), key=lambda e: e.first_seq)
    assert [[e.first_seq, e.last_seq] for e in closed] == runs
    assert len({e.event_id for e in events}) == len(runs)
    for e in closed:
        mask = decode_png(e.mask_png)
        assert mask.shape == (130, 320) and set(np.unique(mask)) <= {0, 255}
        assert decode_image(e.thumbnail_jpeg).size > 0
        assert e.threshold == pytest.approx(threshold)


def test_linewatch_run_replays_a_folder_end_to_end(shared_data: Path, tmp_path: Path) -> None:
    stream = tmp_path / "stream"
    stream.mkdir()
    for i, p in enumerate(sorted((shared_data / "test" / "pitting").glob("*.jpg"))[:6]):
        cv2.imwrite(str(stream / f"f{i:02d}.jpg"), cv2.resize(cv2.imread(str(p)), (320, 130)))
    cfg = tmp_path / "site.yaml"
    cfg.write_text(
        "engine: {backbone: ViT-S-32, pretrained: random, precision: fp32}\n"
        "alert: {quiet_s: 0.5, k: 1, n: 1, default_threshold: 0.0}\n"
        f"cameras:\n  - {{id: cam-1, product_class: ball_screw, source: '{stream}'}}\n"
    )
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "--config", str(cfg), "run", "--replay",
                           "--exit-when-done", "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=180, env=clean_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "summary: frames=6 scores=6 events=1" in proc.stdout
    assert "RANDOM WEIGHTS" in proc.stdout
    assert "[event closed]" in proc.stdout
    assert {p.name for p in (tmp_path / "run").glob("*.log")} == {"capture.log", "score.log", "alert.log"}
    assert time.monotonic() - started < 180
