"""The learning routes of the API against a real server, broker and Redis: labels (kept, published,
teaching), the event view's images at full resolution, per-camera tuning, timelines and shift stats."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from pipeline.bus import make_producer, topic_name
from pipeline.config import ApiSettings, KafkaSettings, RedisSettings, Settings
from pipeline.embedded import free_port
from pipeline.imaging import decode_image, encode_jpeg, quantize_map
from pipeline.redis_store import connect
from pipeline.references.store import ReferenceStore
from schemas.labels import Label
from schemas.scores import FrameSource, Provenance
from tests.streaming_helpers import frame_header, read_topic
from tests.test_api import (
    HEIGHT,
    TOKEN,
    WIDTH,
    ApiServer,
    make_event,
    make_score,
    publish,
    publish_events,
    running_api,
    unique,
    wait_until,
)

RANDOM_FP = "abc:ViT-S-32:random-seed0"


@pytest.fixture(scope="module")
def api(broker: str, redis_server: str) -> Iterator[ApiServer]:
    prefix = f"t-apil-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        kafka=KafkaSettings(bootstrap_servers=broker, topic_prefix=prefix, partitions=2, request_timeout_ms=10_000),
        redis=RedisSettings(url=redis_server, key_prefix=prefix),
        api=ApiSettings(host="127.0.0.1", port=free_port(), token=TOKEN, group_id=f"{prefix}-api"),
    )
    with running_api(settings) as server:
        yield server


def publish_frame(server: ApiServer, camera: str, seq: int, image: np.ndarray) -> FrameSource:
    header = frame_header(camera, seq, image)
    producer = make_producer(server.settings.kafka)
    meta = producer.send(topic_name(server.settings.kafka, "frames"), key=camera.encode(), value=encode_jpeg(image),
                         headers=header.to_header(), partition=0).get(timeout=10)
    producer.close()
    return FrameSource(topic=meta.topic, partition=meta.partition, offset=meta.offset)


def stored(server: ApiServer, event_id: str) -> dict:
    return wait_until(lambda: (r := server.http.get(f"/api/v1/events/{event_id}")).status_code == 200 and r.json(),
                      30, f"event {event_id} stored")


def test_label_teach_and_event_views(api: ApiServer) -> None:
    server = api
    http = server.http
    camera = unique("cam-label")
    frame = np.full((HEIGHT, WIDTH, 3), 90, np.uint8)
    frame[:, WIDTH // 2:] = 200
    event = make_event(camera, first_seq=10, ts=time.time())
    amap = np.full((16, 16), 0.1, np.float32)
    amap[:8, :8] = 0.9
    png, lo, hi = quantize_map(amap, 16)
    event.peak_source = publish_frame(server, camera, event.peak_seq, frame)
    event.provenance = Provenance(method="winclip", model_fingerprint=RANDOM_FP, prompt_version="p1")
    event.peak_map_png, event.peak_map_min, event.peak_map_max = png, lo, hi
    publish_events(server.settings.kafka, [event])
    data = stored(server, event.event_id)
    assert data["label"] is None and data["provenance"]["model_fingerprint"] == RANDOM_FP

    # The raw frame at full resolution, with the random-weights banner on top; heat and mask views too.
    raw = decode_image(http.get(f"/api/v1/events/{event.event_id}/view/raw.jpg").content)
    assert raw.shape == (HEIGHT, WIDTH, 3)
    assert raw[2, WIDTH - 3, 0] > 150 and raw[2, WIDTH - 3, 1] < 80  # the red banner
    assert abs(int(raw[HEIGHT - 2, 2, 1]) - 90) < 12 and abs(int(raw[HEIGHT - 2, WIDTH - 2, 1]) - 200) < 12
    for kind in ("heat", "mask"):
        view = http.get(f"/api/v1/events/{event.event_id}/view/{kind}.jpg")
        assert view.status_code == 200 and decode_image(view.content).shape == (HEIGHT, WIDTH, 3)
    assert http.get(f"/api/v1/events/{event.event_id}/view/other.jpg").status_code == 422

    r = http.post(f"/api/v1/events/{event.event_id}/label", json={"label": "false_alarm", "by": "ops",
                                                                    "note": "fixture"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["published"] and body["label"]["reference_version"] == "ball_screw:v1"
    assert stored(server, event.event_id)["label"]["label"] == "false_alarm"
    client = connect(server.settings.redis)
    try:
        ref = ReferenceStore(client, server.settings.redis.key_prefix).current("ball_screw")
        assert ref is not None and ref.source == f"false_alarm:{event.event_id}" and len(ref.images) == 1
    finally:
        client.close()
    audit = [Label.model_validate_json(rec.value) for rec in read_topic(server.settings.kafka, "labels", 1)]
    assert any(a.event_id == event.event_id and a.by == "ops" for a in audit)

    listed = server.events(camera=camera)["events"]
    assert listed[0]["label"]["label"] == "false_alarm"
    assert http.post("/api/v1/events/nope/label", json={"label": "confirmed"}).status_code == 404
    assert http.post(f"/api/v1/events/{event.event_id}/label", json={"label": "maybe"}).status_code == 422
    assert http.get("/api/v1/references").json()[0]["current"] == 1


def test_camera_tuning_timeline_and_stats(api: ApiServer) -> None:
    server = api
    http = server.http
    camera = unique("cam-tune")
    r = http.get(f"/api/v1/cameras/{camera}/tuning")
    assert r.json()["effective_threshold"] == server.settings.alert.default_threshold
    square = [[0.1, 0.1], [0.4, 0.1], [0.4, 0.4], [0.1, 0.4]]
    r = http.put(f"/api/v1/cameras/{camera}/tuning", json={"threshold": 0.72, "ignore_regions": [square], "by": "lead"})
    assert r.status_code == 200, r.text
    assert r.json()["effective_threshold"] == 0.72 and r.json()["ignore_regions"] == [square]
    assert http.put(f"/api/v1/cameras/{camera}/tuning", json={"ignore_regions": [[[0, 0], [1, 1]]]}).status_code == 422
    r = http.put(f"/api/v1/cameras/{camera}/tuning", json={"threshold": None})
    assert r.json()["threshold_override"] is None and r.json()["ignore_regions"] == [square]

    publish(server.settings.kafka, "scores", [(camera, make_score(camera, seq=s).model_dump_json().encode())
                                             for s in (1, 2, 3)])
    timeline = wait_until(lambda: (t := http.get(f"/api/v1/cameras/{camera}/timeline").json())["points"] and t,
                          30, "timeline points")
    assert timeline["threshold"] == server.settings.alert.default_threshold
    assert all(p["score"] == 0.93 for p in timeline["points"])

    events = [make_event(camera, first_seq=s, ts=time.time()) for s in (0, 10, 20)]
    publish_events(server.settings.kafka, events)
    for ev in events:
        stored(server, ev.event_id)
    http.post(f"/api/v1/events/{events[0].event_id}/label", json={"label": "confirmed"})
    http.post(f"/api/v1/events/{events[1].event_id}/label", json={"label": "false_alarm", "teach": False})
    rows = {row["camera_id"]: row for row in http.get("/api/v1/stats").json()["cameras"]}
    assert rows[camera] == {"camera_id": camera, "events": 3, "confirmed": 1, "false_alarm": 1, "unlabelled": 1,
                            "false_alarm_rate": 0.5}
