"""`linewatch references ...`, `calibrate --camera/--recording` and `events label|export` as real
subprocesses against real Redis (and the session broker, for the labels topic)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis

from pipeline.api.store import EventStore
from pipeline.camera_tuning import CameraTuningStore
from pipeline.config import KafkaSettings, RedisSettings
from pipeline.evaluation.mvtec import load_category
from pipeline.imaging import encode_jpeg, encode_png, read_image
from pipeline.recording import Recorder
from pipeline.references.store import ReferenceStore
from schemas.events import DefectEvent, Region
from schemas.frames import FrameRef
from tests.test_cli_engine import SMALL, clean_env, linewatch, ok

T0 = 1_767_225_600.0
W, H = 160, 64


@pytest.fixture
def recording(shared_data: Path, tmp_path: Path) -> Path:
    paths = sorted((shared_data / "test" / "good").glob("*.jpg"))[:3] + \
        sorted((shared_data / "test" / "pitting").glob("*.jpg"))[:2]
    with Recorder(tmp_path / "rec", "cam-1", segment_s=600) as rec:
        for seq, p in enumerate(paths):
            image = cv2.resize(read_image(str(p)), (W, H), interpolation=cv2.INTER_AREA)
            rec.write(encode_jpeg(image), FrameRef(camera_id="cam-1", line_id="line-1", product_class="ball_screw",
                                                   seq=seq, capture_ts=T0 + seq, width=W, height=H))
    return tmp_path / "rec"


@pytest.fixture
def env(redis_settings: RedisSettings, kafka_settings: KafkaSettings) -> dict[str, str]:
    return clean_env(LINEWATCH_REDIS__URL=str(redis_settings.url),
                     LINEWATCH_REDIS__KEY_PREFIX=redis_settings.key_prefix,
                     LINEWATCH_KAFKA__BOOTSTRAP_SERVERS=str(kafka_settings.bootstrap_servers),
                     LINEWATCH_KAFKA__TOPIC_PREFIX=kafka_settings.topic_prefix)


def test_references_collect_list_show_export_remove_and_calibrate(recording: Path, env: dict[str, str],
                                                                  redis_client: redis.Redis,
                                                                  redis_settings: RedisSettings,
                                                                  tmp_path: Path) -> None:
    proc = ok(linewatch("references", "collect", "--class", "ball_screw", "--recording", str(recording),
                        "--frames", "3", "--max-patches", "20", *SMALL, env=env))
    # ViT-S-32 at 224 px: 7x7 = 49 patches per frame, 3 frames -> 147 rows, coreset to 20.
    assert "ball_screw:v1: 3 frames" in proc.stdout and "patches 147 -> 20" in proc.stdout, proc.stdout
    assert "RANDOM WEIGHTS" in proc.stdout
    refs = ReferenceStore(redis_client, redis_settings.key_prefix)
    v1 = refs.current("ball_screw")
    assert v1 is not None and len(v1.images) == 3 and v1.source == f"collect:recording:{recording}"
    assert v1.memory_rows["winclip"]["patches"] == 20

    listed = ok(linewatch("references", "list", env=env)).stdout
    assert "ball_screw:v1" in listed and "yes" in listed
    shown = json.loads(ok(linewatch("references", "show", "ball_screw", env=env)).stdout)
    assert shown["tag"] == "ball_screw:v1" and shown["current"] and shown["n_images"] == 3
    out = tmp_path / "refs"
    ok(linewatch("references", "export", "ball_screw", "--out", str(out), env=env))
    assert len(list((out / "ball_screw").glob("*.jpg"))) == 3 and (out / "ball_screw" / "manifest.json").is_file()

    proc = ok(linewatch("calibrate", "--camera", "cam-1", "--class", "ball_screw", "--recording", str(recording),
                        "--quantile", "1.0", *SMALL, env=env))
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("scores of 5 normal frames: min ")
    assert "camera cam-1 (ball_screw): threshold" in lines[1] and "references ball_screw:v1" in lines[1]
    assert lines[2] == "replaces the default threshold 0.500000 (alert.default_threshold) for this camera"
    stored = CameraTuningStore(redis_client, redis_settings.key_prefix).get("cam-1").threshold
    assert stored is not None and f"threshold {stored:.6f}" in lines[1]

    gone = ok(linewatch("references", "remove", "ball_screw", "--version", "1", env=env)).stdout
    assert "current: none" in gone and refs.current("ball_screw") is None
    bad = linewatch("references", "remove", "ball_screw", "--version", "1", env=env)
    assert bad.returncode == 2 and "no reference set ball_screw:v1" in bad.stderr


def _event(seq: int, ts: float) -> DefectEvent:
    mask = np.zeros((H, W), np.uint8)
    mask[10:30, 20:60] = 255
    return DefectEvent(event_id=f"ev-{seq}", status="closed", camera_id="cam-1", line_id="line-1",
                       product_class="ball_screw", first_seq=seq, last_seq=seq, first_ts=ts, last_ts=ts, peak_seq=seq,
                       peak_score=0.9, threshold=0.5, n_frames=1, width=W, height=H,
                       regions=[Region(x=20, y=10, width=40, height=20, area=800)], mask_png=encode_png(mask),
                       thumbnail_jpeg=encode_jpeg(np.full((H // 2, W // 2, 3), 100, np.uint8)))


def test_events_label_and_export_for_eval(recording: Path, env: dict[str, str], redis_client: redis.Redis,
                                          redis_settings: RedisSettings, tmp_path: Path) -> None:
    store = EventStore(redis_client, redis_settings.key_prefix)
    for seq in (1, 3, 4):
        store.put(_event(seq, T0 + seq))
    proc = ok(linewatch("events", "label", "ev-1", "--false-alarm", "--by", "ops", "--recording", str(recording),
                        env=env))
    assert "ev-1: false_alarm by ops" in proc.stdout and "now ball_screw:v1" in proc.stdout
    for ev in ("ev-3", "ev-4"):
        ok(linewatch("events", "label", ev, "--confirmed", env=env))
    assert "ev-1" in ok(linewatch("events", "list", "--label", "false_alarm", "--session", "*", env=env)).stdout
    missing = linewatch("events", "label", "nope", "--confirmed", env=env)
    assert missing.returncode == 2 and "no event 'nope'" in missing.stderr

    out = tmp_path / "export"
    proc = ok(linewatch("events", "export", "--label", "confirmed", "--out", str(out), "--recording", str(recording),
                        env=env))
    assert "defect 2" in proc.stdout and "good 1" in proc.stdout and "train_good 1" in proc.stdout
    category = load_category(out, "ball_screw")
    assert sorted((it.defect, it.path.name) for it in category.test) == [
        ("defect", "ev-3.png"), ("defect", "ev-4.png"), ("good", "ev-1.png")]
    assert read_image(str(category.test[0].path)).shape == (H, W, 3)  # the recorded frame, full size
    evald = ok(linewatch("eval", str(out), "--category", "ball_screw", "--k-shot", "1", "--out",
                         str(tmp_path / "eval"), *SMALL, env=env))
    assert "image_auroc" in evald.stdout
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["warning"].startswith("RANDOM WEIGHTS")
