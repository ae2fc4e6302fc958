"""Replay and re-score against the real broker and Redis, with scoring and alert workers in threads."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import redis

from pipeline.cli import main
from pipeline.cli.replay_cmds import _print_summary
from pipeline.config import AlertSettings, DeliverSettings, KafkaSettings, RedisSettings, Settings
from pipeline.delivery.store import SubscriptionStore
from pipeline.imaging import encode_jpeg, read_image
from pipeline.recording import Recorder
from pipeline.replay.inputs import Labels, open_input, parse_time
from pipeline.replay.rescore import parse_offsets, rescore
from pipeline.replay.runner import run_replay
from schemas.frames import FrameRef
from schemas.scores import ScoreMessage
from schemas.subscriptions import Subscription
from tests.streaming_helpers import Background, publish_frames, read_topic, site_settings, small_engine
from tests.webhook_receiver import WebhookReceiver
from workers.alert import run_alert
from workers.deliver import run_deliver
from workers.score import run_score

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
SECRET = "replay-secret-0123456789"


@pytest.fixture(scope="module")
def images(shared_data: Path) -> list[np.ndarray]:
    paths = sorted((shared_data / "test" / "good").glob("*.jpg"))[:3] + sorted(
        (shared_data / "test" / "pitting").glob("*.jpg"))[:3]
    return [cv2.resize(read_image(str(p)), (160, 64), interpolation=cv2.INTER_AREA) for p in paths]


def record(root: Path, camera: str, images: list[np.ndarray], times: list[float], cls: str = "ball_screw",
           segment_s: float = 60.0) -> Path:
    with Recorder(root, camera, segment_s=segment_s) as rec:
        for seq, (img, ts) in enumerate(zip(images, times, strict=True)):
            rec.write(encode_jpeg(img), FrameRef(camera_id=camera, line_id="line-1", product_class=cls, seq=seq,
                                                 capture_ts=ts, width=img.shape[1], height=img.shape[0]))
    return root


@pytest.fixture
def settings(kafka_settings: KafkaSettings, redis_settings: RedisSettings) -> Settings:
    s = site_settings(kafka_settings, redis_settings, max_batch=4, max_wait_ms=50)
    # Every frame is "anomalous" under a zero threshold, so a replay opens events deterministically.
    s.alert = AlertSettings(k=1, n=1, quiet_s=0.5, silence_s=1.0, default_threshold=0.0, min_region_area=0,
                            group_id=s.alert.group_id)
    s.deliver = DeliverSettings(allow_private_networks=True, reload_s=0.2, group_id=s.deliver.group_id)
    return s


@pytest.fixture
def workers(settings: Settings) -> Iterator[None]:
    with Background(run_score, settings, engine=small_engine()), Background(run_alert, settings):
        yield


# -- inputs -------------------------------------------------------------------------------------
def test_parse_time_forms() -> None:
    assert parse_time("90", T0) == T0 + 90
    assert parse_time("15m", T0) == T0 + 900
    assert parse_time(str(T0 + 5), T0) == T0 + 5
    assert parse_time("2026-01-01T00:00:30Z", T0) == T0 + 30
    with pytest.raises(ValueError, match="timezone"):
        parse_time("2026-01-01T00:00:30", T0)
    with pytest.raises(ValueError, match="bad duration"):
        parse_time("yesterday", T0)


def test_recording_input_orders_filters_and_selects(tmp_path: Path, images: list[np.ndarray]) -> None:
    record(tmp_path, "cam-a", images[:3], [T0, T0 + 2, T0 + 4])
    record(tmp_path, "cam-b", images[3:], [T0 + 1, T0 + 3, T0 + 61], segment_s=60)
    frames = list(open_input(tmp_path, Labels()).frames)
    assert [(f.camera_id, f.seq) for f in frames] == [("cam-a", 0), ("cam-b", 0), ("cam-a", 1), ("cam-b", 1),
                                                      ("cam-a", 2), ("cam-b", 2)]
    assert frames[0].product_class == "ball_screw" and frames[0].width == 160
    assert frames[0].load() == (tmp_path / "cam-a").glob("*/0000000000.jpg").__next__().read_bytes()
    only_b = list(open_input(tmp_path, Labels(camera_id="cam-b")).frames)
    assert [f.seq for f in only_b] == [0, 1, 2]
    window = list(open_input(tmp_path, Labels(product_class="bolt"), t_from="2", t_to="4").frames)
    assert [(f.camera_id, f.seq) for f in window] == [("cam-a", 1), ("cam-b", 1), ("cam-a", 2)]
    assert {f.product_class for f in window} == {"bolt"}
    with pytest.raises(ValueError, match="no frames"):
        open_input(tmp_path, Labels(camera_id="cam-z"))


def test_plain_folder_and_video_inputs(tmp_path: Path, images: list[np.ndarray]) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, img in enumerate(images[:3]):
        cv2.imwrite(str(folder / f"f{i + 1}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    with pytest.raises(ValueError, match="--class"):
        open_input(folder, Labels())
    frames = list(open_input(folder, Labels(product_class="c"), fps=2.0).frames)
    assert [f.capture_ts for f in frames] == [0.0, 0.5, 1.0] and frames[0].camera_id == "folder"
    assert frames[0].load()[:2] == b"\xff\xd8"  # PNG files are published as JPEG

    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (160, 64))
    for img in images:
        writer.write(cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    writer.release()
    source = open_input(video, Labels(camera_id="v1", product_class="c"), t_from="0.3")
    vframes = list(source.frames)
    assert source.total == 6 and not source.reloadable  # a video's frames are not kept for the report
    assert [f.seq for f in vframes] == [2, 3, 4, 5] and vframes[0].capture_ts == pytest.approx(0.4)
    assert (vframes[0].width, vframes[0].height) == (160, 64)


# -- replay through the workers -----------------------------------------------------------------
def test_replay_at_speed_4_takes_a_quarter_and_reports(settings: Settings, workers: None, tmp_path: Path,
                                                       images: list[np.ndarray]) -> None:
    times = [T0 + 1.5 * i for i in range(6)]  # 7.5 s span
    rec = record(tmp_path / "rec", "cam-1", images, times)
    summary, report = run_replay(settings, open_input(rec, Labels()), str(rec), tmp_path / "report", speed=4.0,
                                 progress=False)
    assert summary.complete, summary.notes
    assert summary.frames_published == summary.frames_scored == 6
    assert summary.span_s == pytest.approx(7.5)
    # The last frame goes out span/4 after the first; a little slack for a loaded machine.
    assert 7.5 / 4 - 0.05 <= summary.publish_s <= 7.5 / 4 + 1.5
    rows = list(csv.DictReader((report.parent / "scores.csv").open()))
    assert [(r["camera_id"], int(r["seq"])) for r in rows] == [("cam-1", i) for i in range(6)]
    assert float(rows[2]["capture_ts"]) == pytest.approx(times[2])  # original times are kept
    data = json.loads(report.read_text())
    assert data["session"] == summary.session and data["events"] and summary.events == len(data["events"])
    for ev in data["events"]:
        assert ev["replay_session"] == summary.session and ev["status"] == "closed"
        overlay = read_image(str(report.parent / ev["overlay"]))
        assert overlay.shape[:2] == (64, 160)  # drawn on the full-resolution peak frame


def test_replay_at_max_speed_does_not_wait(settings: Settings, workers: None, tmp_path: Path,
                                           images: list[np.ndarray]) -> None:
    rec = record(tmp_path / "rec", "cam-1", images[:3], [T0, T0 + 100, T0 + 200])
    summary, _ = run_replay(settings, open_input(rec, Labels()), str(rec), tmp_path / "r", speed=None,
                            progress=False)
    assert summary.complete and summary.frames_scored == 3
    assert summary.publish_s < 5.0 and summary.span_s == pytest.approx(200)


def test_replay_events_stay_out_of_live_subscriptions(settings: Settings, workers: None, tmp_path: Path,
                                                      images: list[np.ndarray], redis_client: redis.Redis) -> None:
    rec = record(tmp_path / "rec", "cam-1", images[:2], [T0, T0 + 0.2])
    store = SubscriptionStore(redis_client, settings.redis.key_prefix)
    with WebhookReceiver(SECRET) as rx, Background(run_deliver, settings):
        store.add(Subscription.model_validate({"id": "live", "channel": {"type": "webhook", "url": rx.url,
                                                                         "secret": SECRET}}))
        quiet, _ = run_replay(settings, open_input(rec, Labels()), str(rec), tmp_path / "q", speed=None,
                              progress=False)
        assert quiet.events >= 1
        loud, _ = run_replay(settings, open_input(rec, Labels()), str(rec), tmp_path / "l", speed=None,
                             alerts=True, progress=False)
        assert loud.events == quiet.events
        rx.wait_for(loud.events)
        time.sleep(1.5)  # the deliver worker has long passed the quiet replay's events by now
    sessions = {body["event"]["replay_session"] for body in rx.accepted.values()}
    assert sessions == {loud.session}
    assert len(rx.accepted) == loud.events


def test_replay_with_alerts_summarises_deliveries_and_dead_letters(
        settings: Settings, workers: None, tmp_path: Path, images: list[np.ndarray], redis_client: redis.Redis,
        capsys: pytest.CaptureFixture[str]) -> None:
    rec = record(tmp_path / "rec", "cam-1", images[:2], [T0, T0 + 0.2])
    store = SubscriptionStore(redis_client, settings.redis.key_prefix)
    with WebhookReceiver(SECRET) as rx, WebhookReceiver(SECRET, default=500) as down, \
            Background(run_deliver, settings):
        store.add(Subscription.model_validate({"id": "ok", "channel": {"type": "webhook", "url": rx.url,
                                                                       "secret": SECRET}}))
        store.add(Subscription.model_validate({"id": "down", "channel": {
            "type": "webhook", "url": down.url, "secret": SECRET, "max_attempts": 1}}))
        summary, report = run_replay(settings, open_input(rec, Labels()), str(rec), tmp_path / "r", speed=None,
                                     alerts=True, progress=False)
    assert summary.complete, summary.notes
    assert summary.events >= 1 and len(rx.accepted) >= 1
    # Each message the subscriptions want: delivered to "ok", dead-lettered at "down", none left pending.
    assert summary.deliveries == {"delivered": len(rx.accepted), "dead_lettered": len(rx.accepted),
                                  "coalesced": 0, "pending": 0}
    assert summary.dead_letter_subscriptions == ["down"] and down.requests
    assert json.loads(report.read_text())["deliveries"] == summary.deliveries
    _print_summary(summary, report)
    out = capsys.readouterr().out
    assert f"deliveries: delivered={len(rx.accepted)} dead-lettered={len(rx.accepted)}" in out
    assert "`linewatch subscriptions dead-letters down`" in out


def test_replay_cli_embedded_with_alerts_runs_a_deliver_worker(redis_settings: RedisSettings, tmp_path: Path,
                                                                images: list[np.ndarray],
                                                                redis_client: redis.Redis) -> None:
    rec = record(tmp_path / "rec", "cam-1", images[:2], [T0, T0 + 0.2])
    store = SubscriptionStore(redis_client, redis_settings.key_prefix)
    cfg = tmp_path / "replay.yaml"
    # No broker configured: the command brings up its own, with score, alert and (--alerts) deliver workers.
    cfg.write_text(
        "engine: {backbone: ViT-S-32, pretrained: random, precision: fp32}\n"
        "alert: {quiet_s: 0.5, silence_s: 1.0, k: 1, n: 1, default_threshold: 0.0, min_region_area: 0}\n"
        f"redis: {{url: '{redis_settings.url}', key_prefix: '{redis_settings.key_prefix}'}}\n"
        "deliver: {allow_private_networks: true, reload_s: 0.2}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEWATCH_")}
    with WebhookReceiver(SECRET) as rx:
        store.add(Subscription.model_validate({"id": "ok", "channel": {"type": "webhook", "url": rx.url,
                                                                       "secret": SECRET}}))
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "--config", str(cfg), "replay", str(rec),
                               "--alerts", "--speed", "max", "--no-progress", "--report", str(tmp_path / "r"),
                               "--run-dir", str(tmp_path / "run")],
                              capture_output=True, text=True, timeout=300, env=env)
    logs = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in (tmp_path / "run").glob("*.log"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + logs
    assert "embedded workers: score, alert, deliver" in proc.stdout
    assert len(rx.accepted) >= 1, proc.stdout + logs
    assert f"deliveries: delivered={len(rx.accepted)} dead-lettered=0 coalesced=0 pending=0" in proc.stdout


def test_replay_without_workers_reports_a_stall(settings: Settings, tmp_path: Path,
                                                images: list[np.ndarray]) -> None:
    rec = record(tmp_path / "rec", "cam-1", images[:1], [T0])
    summary, report = run_replay(settings, open_input(rec, Labels()), str(rec), tmp_path / "r", speed=None,
                                 progress=False, first_score_timeout_s=1.0, stall_timeout_s=1.0)
    assert not summary.complete and summary.frames_published == 1 and summary.frames_scored == 0
    assert "never scored" in summary.notes[0]
    assert report.is_file()


def test_replay_cli(settings: Settings, workers: None, tmp_path: Path, images: list[np.ndarray],
                    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    rec = record(tmp_path / "rec", "cam-1", images[:2], [T0, T0 + 0.4])
    monkeypatch.setenv("LINEWATCH_KAFKA__BOOTSTRAP_SERVERS", settings.kafka.bootstrap_servers or "")
    monkeypatch.setenv("LINEWATCH_KAFKA__TOPIC_PREFIX", settings.kafka.topic_prefix)
    monkeypatch.setenv("LINEWATCH_REDIS__URL", settings.redis.url or "")
    monkeypatch.setenv("LINEWATCH_REDIS__KEY_PREFIX", settings.redis.key_prefix)
    code = main(["replay", str(rec), "--speed", "max", "--report", str(tmp_path / "cli"), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "frames=2 scored=2" in out and (tmp_path / "cli" / "scores.csv").is_file()
    assert main(["replay", str(tmp_path / "missing")]) == 2
    assert "nothing to replay" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["replay", str(rec), "--speed", "fast"])


# -- rescore ------------------------------------------------------------------------------------
def test_parse_offsets() -> None:
    assert parse_offsets(["0:5", "1:7"], "x") == {0: 5, 1: 7}
    assert parse_offsets(["3"], "x") == {None: 3}
    with pytest.raises(ValueError, match="PARTITION:OFFSET"):
        parse_offsets(["a:b"], "x")


def test_rescore_reads_the_range_into_a_separate_topic(settings: Settings, tmp_path: Path,
                                                       images: list[np.ndarray]) -> None:
    settings.kafka.partitions = 1
    publish_frames(settings.kafka, [("cam-1", i, img) for i, img in enumerate(images)])
    summary, report = rescore(settings, small_engine(), {0: 1}, {0: 4}, "rescore", tmp_path / "r", "rescore-t",
                              progress=False)
    assert summary.complete and summary.frames_published == 3 and summary.frames_scored == 3
    results = [ScoreMessage.model_validate_json(r.value) for r in read_topic(settings.kafka, "rescore", 3)]
    assert sorted(r.frame.seq for r in results) == [1, 2, 3]
    assert read_topic(settings.kafka, "scores", 0, timeout_s=2.0, until=lambda _: False) == []  # live untouched
    rows = list(csv.DictReader((report.parent / "scores.csv").open()))
    assert [int(r["seq"]) for r in rows] == [1, 2, 3]
    assert summary.events >= 1 and len(list((report.parent / "events").glob("*.jpg"))) == summary.events
    with pytest.raises(ValueError, match="live topic"):
        rescore(settings, small_engine(), {0: 0}, {}, "scores", tmp_path / "x", "rescore-u", progress=False)
    with pytest.raises(ValueError, match="partitions"):
        rescore(settings, small_engine(), {5: 0}, {}, "rescore", tmp_path / "x", "rescore-v", progress=False)
