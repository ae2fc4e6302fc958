"""Learning from the line (issue 13), end to end on the real broker and Redis: a replay raises an
event, an operator marks it a false alarm, and the same frames replayed again raise none."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest
import redis
from prometheus_client import REGISTRY

from pipeline.api.store import EventStore
from pipeline.config import AlertSettings, KafkaSettings, RedisSettings, ReferenceSettings, Settings
from pipeline.imaging import decode_image, encode_jpeg, read_image
from pipeline.labels import label_event
from pipeline.recording import Recorder
from pipeline.references.store import ReferenceStore
from pipeline.replay.inputs import Labels, open_input
from pipeline.replay.runner import run_replay
from schemas.events import DefectEvent
from schemas.frames import FrameRef
from schemas.labels import Label
from tests.streaming_helpers import Background, read_topic, site_settings, small_engine
from workers.alert import run_alert
from workers.score import run_score

T0 = 1_767_225_600.0
CLASS = "ball_screw"
# With ViT-S-32 random weights and three good references, good frames score about 0.265..0.270 and
# the first pitted frame 0.284; with that pitted frame among the references it scores 0.264.
THRESHOLD = 0.2755


@pytest.fixture(scope="module")
def frames(shared_data: Path) -> dict[str, list[bytes]]:
    def load(folder: str, n: int) -> list[bytes]:
        paths = sorted((shared_data / "test" / folder).glob("*.jpg"))[:n]
        return [encode_jpeg(cv2.resize(read_image(str(p)), (160, 64), interpolation=cv2.INTER_AREA)) for p in paths]

    return {"good": load("good", 6), "bad": load("pitting", 1)}


@pytest.fixture
def settings(kafka_settings: KafkaSettings, redis_settings: RedisSettings) -> Settings:
    s = site_settings(kafka_settings, redis_settings, max_batch=4, max_wait_ms=50)
    s.alert = AlertSettings(k=1, n=1, quiet_s=0.5, default_threshold=THRESHOLD, min_region_area=0,
                            group_id=s.alert.group_id)
    s.references = ReferenceSettings(poll_s=0.2)
    return s


@pytest.fixture
def workers(settings: Settings) -> Iterator[None]:
    with Background(run_score, settings, engine=small_engine()), Background(run_alert, settings):
        yield


def record(root: Path, jpegs: list[bytes]) -> Path:
    with Recorder(root, "cam-1", segment_s=600) as rec:
        for seq, data in enumerate(jpegs):
            rec.write(data, FrameRef(camera_id="cam-1", line_id="line-1", product_class=CLASS, seq=seq,
                                     capture_ts=T0 + 0.2 * seq, width=160, height=64))
    return root


def replay(settings: Settings, rec: Path, out: Path) -> tuple[str, int]:
    summary, _ = run_replay(settings, open_input(rec, Labels()), str(rec), out, speed=None, progress=False)
    assert summary.complete, summary.notes
    return summary.session, summary.events


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_false_alarm_teaches_the_scorers(settings: Settings, workers: None, frames: dict[str, list[bytes]],
                                           redis_client: redis.Redis, tmp_path: Path) -> None:
    refs = ReferenceStore(redis_client, settings.redis.key_prefix)
    refs.create(CLASS, frames["good"][:3], source="test")
    good, bad = frames["good"], frames["bad"]
    rec = record(tmp_path / "rec", [good[3], good[4], bad[0], good[5]])

    session, n_events = replay(settings, rec, tmp_path / "r1")
    assert n_events == 1
    report = json.loads((tmp_path / "r1" / "report.json").read_text())
    assert report["notes"][0].startswith("RANDOM WEIGHTS")  # the report says so on itself
    events = [DefectEvent.model_validate_json(r.value) for r in read_topic(settings.kafka, "defects", 1)]
    opened = [e for e in events if e.replay_session == session and e.status == "open"]
    assert len(opened) == 1 and opened[0].peak_seq == 2
    event = opened[0]
    # The event says where its peak frame lies and what scored it.
    assert event.peak_source is not None and event.peak_source.topic == settings.kafka.topic("frames")
    assert event.provenance is not None and event.provenance.reference_version == f"{CLASS}:v1"
    assert event.provenance.method == "winclip" and event.provenance.prompt_version
    assert ":random-" in (event.provenance.model_fingerprint or "")
    thumb = decode_image(event.thumbnail_jpeg)
    assert thumb[2, -3, 0] > 150 and thumb[2, -3, 1] < 90  # the red RANDOM WEIGHTS banner

    store = EventStore(redis_client, settings.redis.key_prefix)
    assert store.put(event) is not None
    before = counter("linewatch_event_labels_total", camera="cam-1", product_class=CLASS, label="false_alarm")
    result = label_event(settings, redis_client, event.event_id, "false_alarm", note="serial number", by="ops-7")
    assert result.published, result.publish_error
    label = result.label
    assert label.teach_error is None and label.reference_version == f"{CLASS}:v2"
    assert counter("linewatch_event_labels_total", camera="cam-1", product_class=CLASS,
                   label="false_alarm") == before + 1
    kept = store.get(event.event_id)
    assert kept is not None and kept["label"]["label"] == "false_alarm" and kept["label"]["by"] == "ops-7"
    audit = [Label.model_validate_json(r.value) for r in read_topic(settings.kafka, "labels", 1)]
    assert [(a.event_id, a.label, a.note) for a in audit] == [(event.event_id, "false_alarm", "serial number")]
    v2 = refs.current(CLASS)
    assert v2 is not None and v2.version == 2 and v2.parent == 1 and len(v2.images) == 4

    session2, n_events2 = replay(settings, rec, tmp_path / "r2")
    assert n_events2 == 0
    # The scorers picked the new version up without a restart, and say so on every score.
    scores = [json.loads(r.value) for r in read_topic(settings.kafka, "scores", 8)]
    second = [s for s in scores if s["frame"]["replay_session"] == session2]
    assert len(second) == 4 and {s["reference_version"] for s in second} == {f"{CLASS}:v2"}
    peak = next(s for s in second if s["frame"]["seq"] == 2)
    assert peak["image_score"] < THRESHOLD


def test_labelling_twice_teaches_once(settings: Settings, redis_client: redis.Redis,
                                      frames: dict[str, list[bytes]], tmp_path: Path) -> None:
    """Relabelling keeps the first taught version; a recording stands in for the frames topic."""
    rec = record(tmp_path / "rec", frames["good"][:2] + frames["bad"])
    refs = ReferenceStore(redis_client, settings.redis.key_prefix)
    refs.create(CLASS, frames["good"][2:4], source="test")
    event = DefectEvent(event_id="ev-1", status="closed", camera_id="cam-1", line_id="line-1", product_class=CLASS,
                        first_seq=2, last_seq=2, first_ts=T0 + 0.4, last_ts=T0 + 0.4, peak_seq=2, peak_score=0.3,
                        threshold=THRESHOLD, n_frames=1, width=160, height=64, regions=[],
                        mask_png=b"\x89PNG", thumbnail_jpeg=frames["bad"][0])
    EventStore(redis_client, settings.redis.key_prefix).put(event)
    first = label_event(settings, redis_client, "ev-1", "false_alarm", recording=rec).label
    again = label_event(settings, redis_client, "ev-1", "false_alarm", recording=rec).label
    assert first.reference_version == again.reference_version == f"{CLASS}:v2"
    assert [r.version for r in refs.versions(CLASS)] == [1, 2]
    assert refs.images(refs.current(CLASS))[-1] == frames["bad"][0]  # type: ignore[arg-type]
    confirmed = label_event(settings, redis_client, "ev-1", "confirmed", by="qa").label
    assert confirmed.reference_version is None and [r.version for r in refs.versions(CLASS)] == [1, 2]
