"""`linewatch api` end to end: real broker, real Redis, uvicorn on a loopback port, real HTTP (httpx).

One server (ingest + HTTP) serves the whole module to keep it fast; tests keep apart by using their
own camera ids and lines. Store-level tests at the bottom use Redis directly.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from pipeline.api.app import create_app, serve
from pipeline.api.ingest import Ingest
from pipeline.api.store import EventQuery, EventStore, live_channel
from pipeline.bus import create_topics, make_producer, read_dead_letter, topic_name
from pipeline.cli import main
from pipeline.config import ApiSettings, DeliverSettings, KafkaSettings, RedisSettings, Settings
from pipeline.delivery.store import DeliveryLedger
from pipeline.embedded import free_port
from pipeline.imaging import decode_image, decode_png, encode_jpeg, encode_png, quantize_map
from pipeline.redis_store import ThresholdStore, connect
from schemas.events import DefectEvent, Region
from schemas.frames import FrameRef
from schemas.scores import ScoreMessage
from schemas.subscriptions import DeadDelivery
from tests.streaming_helpers import Background, read_topic
from tests.webhook_receiver import WebhookReceiver

TOKEN = "api-test-token-0123456789"
SECRET = "s3cret-s3cret-s3cret"
WIDTH, HEIGHT = 64, 48


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.05)


def make_event(camera: str, first_seq: int = 0, ts: float = 1000.0, status: str = "open", score: float = 0.9,
               line: str = "line-1", cls: str = "ball_screw", session: str | None = None,
               event_id: str | None = None) -> DefectEvent:
    """A 64x48 event whose mask covers the top-left quarter; the thumbnail is a half-size gray frame."""
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[: HEIGHT // 2, : WIDTH // 2] = 255
    thumb = np.full((HEIGHT // 2, WIDTH // 2, 3), 128, np.uint8)
    return DefectEvent(
        event_id=event_id or DefectEvent.make_id(camera, first_seq, session), status=status, camera_id=camera,
        line_id=line, product_class=cls, first_seq=first_seq, last_seq=first_seq + 3, first_ts=ts,
        last_ts=ts + 1.0, peak_seq=first_seq + 1, peak_score=score, threshold=0.5, n_frames=4, width=WIDTH,
        height=HEIGHT, regions=[Region(x=0, y=0, width=WIDTH // 2, height=HEIGHT // 2, area=768)],
        mask_png=encode_png(mask), thumbnail_jpeg=encode_jpeg(thumb), replay_session=session,
    )


def make_score(camera: str, seq: int = 1, session: str | None = None) -> ScoreMessage:
    """A 40x30 gray frame whose anomaly map is hot (0.95) in the top-left quarter, cold (0.05) elsewhere."""
    amap = np.full((16, 16), 0.05, np.float32)
    amap[:8, :8] = 0.95
    png, lo, hi = quantize_map(amap, 16)
    now = time.time()
    frame = FrameRef(camera_id=camera, line_id="line-9", product_class="ball_screw", seq=seq, capture_ts=now,
                     width=40, height=30, replay_session=session)
    return ScoreMessage(frame=frame, image_score=0.93, anomaly_map_png=png, map_min=lo, map_max=hi,
                        thumbnail_jpeg=encode_jpeg(np.full((30, 40, 3), 128, np.uint8)), model_fingerprint="test",
                        method="winclip", latency_ms=5.0, scored_ts=now)


def publish(kafka: KafkaSettings, topic: str, items: list[tuple[str, bytes]], partition: int | None = None) -> None:
    producer = make_producer(kafka)
    for key, value in items:
        producer.send(topic_name(kafka, topic), key=key.encode(), value=value, partition=partition)
    producer.flush()
    producer.close()


def publish_events(kafka: KafkaSettings, events: list[DefectEvent]) -> None:
    publish(kafka, "defects", [(ev.camera_id, ev.model_dump_json().encode()) for ev in events])


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


@dataclass
class ApiServer:
    settings: Settings
    ingest: Ingest
    url: str
    http: httpx.Client  # authorised

    def events(self, **params: Any) -> dict[str, Any]:
        response = self.http.get("/api/v1/events", params=params)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture(scope="module")
def api_settings(broker: str, redis_server: str) -> Settings:
    prefix = f"t-api-{uuid.uuid4().hex[:8]}"
    return Settings(
        kafka=KafkaSettings(bootstrap_servers=broker, topic_prefix=prefix, partitions=2, request_timeout_ms=10_000),
        redis=RedisSettings(url=redis_server, key_prefix=prefix),
        api=ApiSettings(host="127.0.0.1", port=free_port(), token=TOKEN, max_events=1000, group_id=f"{prefix}-api"),
        deliver=DeliverSettings(allow_private_networks=True),
    )


@contextmanager
def running_api(settings: Settings, heartbeat_s: float = 0.5) -> Iterator[ApiServer]:
    """Ingest + HTTP server (`serve`, as `linewatch api` runs it) in a thread, until the block ends."""
    create_topics(settings.kafka, names=("defects", "scores"))
    ingest = Ingest(settings, render_interval_s=0.0)
    url = f"http://{settings.api.host}:{settings.api.port}"
    with Background(serve, settings, heartbeat_s=heartbeat_s, ingest=ingest) as bg, \
            httpx.Client(base_url=url, headers={"Authorization": f"Bearer {settings.api.token}"}, timeout=10.0) as http:

        def ready() -> bool:
            assert bg.thread.is_alive(), f"API server died: {bg.error!r}"
            try:
                return http.get("/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 60, "API readiness")
        yield ApiServer(settings, ingest, url, http)


@pytest.fixture(scope="module")
def server(api_settings: Settings) -> Iterator[ApiServer]:
    with running_api(api_settings) as api:
        yield api


# -- auth and open routes -------------------------------------------------------------------------
def test_token_is_required_for_the_api_only(server: ApiServer) -> None:
    with httpx.Client(base_url=server.url, timeout=10.0) as anon:
        assert anon.get("/api/v1/events").status_code == 401
        assert anon.get("/api/v1/events").headers["www-authenticate"] == "Bearer"
        assert anon.get("/api/v1/events", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert anon.get("/api/v1/events", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
        assert anon.get("/api/v1/cameras", params={"token": "wrong"}).status_code == 401
        assert anon.get("/api/v1/stream").status_code == 401
        assert anon.get("/api/v1/subscriptions").status_code == 401
        assert anon.get("/api/v1/events", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert anon.get("/api/v1/cameras", params={"token": TOKEN}).status_code == 200

        assert anon.get("/healthz").json() == {"status": "ok"}
        page = anon.get("/")
        assert page.status_code == 200 and 'id="events"' in page.text and TOKEN not in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert anon.get("/static/app.js").status_code == 200
        metrics = anon.get("/metrics")
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")


def test_api_refuses_to_start_without_a_token(api_settings: Settings, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"api\.token"):
        create_app(api_settings.model_copy(update={"api": ApiSettings(token=None)}))
    monkeypatch.delenv("LINEWATCH_API__TOKEN", raising=False)
    monkeypatch.delenv("LINEWATCH_CONFIG", raising=False)
    assert main(["api"]) == 2
    assert "api.token is not set" in capsys.readouterr().err


# -- events ---------------------------------------------------------------------------------------
def test_event_detail_images_and_close(server: ApiServer) -> None:
    camera = unique("cam-detail")
    opened = make_event(camera, ts=time.time())
    publish_events(server.settings.kafka, [opened])
    page = wait_until(lambda: server.events(camera=camera)["events"], what="event stored")
    assert [e["event_id"] for e in page] == [opened.event_id]
    summary = page[0]
    assert "mask_png" not in summary and "thumbnail_jpeg" not in summary
    assert summary["links"]["overlay"] == f"/api/v1/events/{opened.event_id}/overlay.jpg"

    detail = server.http.get(f"/api/v1/events/{opened.event_id}").json()
    assert detail == summary
    assert detail["status"] == "open" and detail["regions"] == [r.model_dump() for r in opened.regions]

    mask = server.http.get(summary["links"]["mask"])
    assert mask.headers["content-type"] == "image/png"
    assert np.array_equal(decode_png(mask.content), decode_png(opened.mask_png))
    thumb = server.http.get(summary["links"]["thumbnail"])
    assert thumb.headers["content-type"] == "image/jpeg" and thumb.content == opened.thumbnail_jpeg
    overlay = decode_image(server.http.get(summary["links"]["overlay"]).content)
    assert overlay.shape == (HEIGHT // 2, WIDTH // 2, 3)  # the thumbnail's size, mask resized onto it
    inside, outside = overlay[4:8, 4:8].mean(axis=(0, 1)), overlay[-6:-2, -6:-2].mean(axis=(0, 1))
    assert inside[0] > inside[2] + 40, f"masked area is not tinted red: {inside}"
    assert abs(outside[0] - outside[2]) < 15, f"unmasked area changed: {outside}"

    closed = opened.model_copy(update={"status": "closed", "last_seq": 9, "n_frames": 10})
    publish_events(server.settings.kafka, [closed])
    wait_until(lambda: server.events(camera=camera)["events"][0]["status"] == "closed", what="event closed")
    page = server.events(camera=camera)["events"]
    assert len(page) == 1 and page[0]["last_seq"] == 9 and page[0]["n_frames"] == 10
    assert server.events(camera=camera, status="open")["events"] == []

    assert server.http.get("/api/v1/events/no-such-event").status_code == 404
    assert server.http.get("/api/v1/events/no-such-event/overlay.jpg").status_code == 404
    assert server.http.get("/api/v1/events/bad:id").status_code == 422


def test_filters_and_paging_are_exact(server: ApiServer) -> None:
    line = unique("line-page")
    cam_a, cam_b = unique("cam-a"), unique("cam-b")
    session = unique("session")
    t0 = time.time()
    events = [
        make_event(cam_a, 0, t0 + 1, line=line),
        make_event(cam_a, 10, t0 + 2, line=line, status="closed"),
        make_event(cam_b, 0, t0 + 3, line=line, cls="nut"),
        make_event(cam_b, 10, t0 + 3, line=line),  # same first_ts as the previous: ties page by id
        make_event(cam_b, 20, t0 + 3, line=line, cls="nut"),
        make_event(cam_a, 20, t0 + 4, line=line),
        make_event(cam_a, 0, t0 + 5, line=line, session=session),
    ]
    publish_events(server.settings.kafka, events)
    wait_until(lambda: len(server.events(line=line, session="*", limit=100)["events"]) == len(events),
               what="all events stored")
    live = [e for e in events if e.replay_session is None]
    expected = sorted(live, key=lambda e: (e.first_ts, e.event_id), reverse=True)

    def ids(**params: Any) -> list[str]:
        return [e["event_id"] for e in server.events(line=line, limit=100, **params)["events"]]

    assert ids() == [e.event_id for e in expected]  # live only by default
    assert ids(session=session) == [events[-1].event_id]
    assert ids(session="*")[0] == events[-1].event_id
    assert ids(camera=cam_a) == [e.event_id for e in expected if e.camera_id == cam_a]
    assert ids(product_class="nut") == [e.event_id for e in expected if e.product_class == "nut"]
    assert ids(status="closed") == [events[1].event_id]
    assert ids(camera=cam_b, product_class="nut") == [e.event_id for e in expected
                                                      if e.camera_id == cam_b and e.product_class == "nut"]
    assert ids(camera="nobody") == []

    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"line": line, "limit": 2, **({"before": cursor} if cursor else {})}
        page = server.events(**params)
        pages.append([e["event_id"] for e in page["events"]])
        cursor = page["next"]
        if cursor is None:
            break
    assert pages == [[e.event_id for e in expected[i:i + 2]] for i in range(0, len(expected), 2)]

    assert ids(before=str(t0 + 3)) == [e.event_id for e in expected if e.first_ts < t0 + 3]
    assert server.http.get("/api/v1/events", params={"before": "yesterday"}).status_code == 422
    assert server.http.get("/api/v1/events", params={"limit": 0}).status_code == 422
    assert server.http.get("/api/v1/events", params={"status": "maybe"}).status_code == 422


def test_bad_records_are_skipped(server: ApiServer) -> None:
    camera = unique("cam-bad")
    invalid_before = server.ingest.stats.invalid_events
    good = make_event(camera, ts=time.time())
    publish(server.settings.kafka, "defects", [
        (camera, b"\x00 not json"),
        (camera, json.dumps({"event_id": "x", "status": "open"}).encode()),
        (camera, make_event(camera, 5, event_id="bad:id").model_dump_json().encode()),
        (camera, good.model_dump_json().encode()),
    ])
    wait_until(lambda: server.events(camera=camera)["events"], what="the good event after bad ones")
    assert [e["event_id"] for e in server.events(camera=camera)["events"]] == [good.event_id]
    assert server.ingest.stats.invalid_events - invalid_before == 3
    assert server.http.get("/readyz").status_code == 200
    # Each bad record went to the DLQ once, with its reason, and ingest went on past it.
    mine = camera.encode()
    dlq = read_topic(server.settings.kafka, "dlq", 1, timeout_s=30,
                     until=lambda recs: sum(r.key == mine for r in recs) >= 3)
    letters = [read_dead_letter(r.headers) for r in dlq if r.key == mine]
    assert len(letters) == 3 and {lt.stage for lt in letters} == {"api"}


# -- cameras --------------------------------------------------------------------------------------
def test_camera_latest_frame_with_heat_overlay(server: ApiServer) -> None:
    camera = unique("cam-grid")
    publish(server.settings.kafka, "scores", [(camera, make_score(camera, seq=7).model_dump_json().encode())])

    def listed() -> dict[str, Any] | None:
        return next((c for c in server.http.get("/api/v1/cameras").json() if c["camera_id"] == camera), None)

    cam = wait_until(listed, what="camera listed")
    assert (cam["line_id"], cam["product_class"], cam["seq"], cam["image_score"]) == ("line-9", "ball_screw", 7, 0.93)
    assert cam["replay_session"] is None and cam["latest_url"] == f"/api/v1/cameras/{camera}/latest.jpg"
    response = server.http.get(cam["latest_url"])
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["cache-control"] == "no-store"
    image = decode_image(response.content)
    assert image.shape == (30, 40, 3)
    hot, cold = image[2:10, 2:12].mean(axis=(0, 1)), image[-8:-2, -10:-2].mean(axis=(0, 1))
    assert hot[0] > hot[2] + 40, f"hot corner is not red: {hot}"
    assert cold[2] > cold[0] + 40, f"cold corner is not blue: {cold}"

    # A replayed frame does not replace a camera that is live right now. A live frame of another
    # camera follows it in the same partition: once that one is listed, the replayed one was handled.
    sentinel = unique("cam-sentinel")
    publish(server.settings.kafka, "scores", [(camera, make_score(camera, seq=99, session="s1").model_dump_json()
                                               .encode()),
                                              (sentinel, make_score(sentinel).model_dump_json().encode())],
            partition=0)
    wait_until(lambda: any(c["camera_id"] == sentinel for c in server.http.get("/api/v1/cameras").json()),
               what="sentinel camera listed")
    assert listed()["seq"] == 7  # type: ignore[index]
    assert server.http.get("/api/v1/cameras/nobody/latest.jpg").status_code == 404


# -- subscriptions --------------------------------------------------------------------------------
def test_subscriptions_through_the_api(server: ApiServer, redis_server: str) -> None:
    http = server.http
    sub_id = unique("hook")
    with WebhookReceiver(SECRET) as rx:
        body = {"id": sub_id, "channel": {"type": "webhook", "url": rx.url, "secret": SECRET, "timeout_s": 2.0,
                                          "max_attempts": 1}, "filters": {"cameras": ["press-*"]}}
        created = http.post("/api/v1/subscriptions", json=body)
        assert created.status_code == 201, created.text
        assert created.json()["secret"] is None and created.json()["subscription"]["channel"]["secret"] == "****"
        assert http.post("/api/v1/subscriptions", json=body).status_code == 409
        assert http.post("/api/v1/subscriptions", json={"id": "x"}).status_code == 422
        refused = http.post("/api/v1/subscriptions", json={**body, "id": unique("ftp"),
                                                           "channel": {**body["channel"], "url": "ftp://x/y"}})
        assert refused.status_code == 422

        listing = http.get("/api/v1/subscriptions")
        assert SECRET not in listing.text
        row = next(s for s in listing.json() if s["id"] == sub_id)
        assert row["channel"]["secret"] == "****" and row["filters"]["cameras"] == ["press-*"]
        assert row["dead_letters"] == 0

        result = http.post(f"/api/v1/subscriptions/{sub_id}/test").json()
        assert result == {"ok": True, "error": None}
        assert len(rx.wait_for(1, timeout=10)) == 1
        received = rx.requests[-1]
        assert received.signature_ok and received.body["test"] is True

        # A dead letter (as the deliver worker leaves it) is listed and redriven to the receiver.
        client = connect(server.settings.redis)
        try:
            ev = make_event("press-1", ts=time.time())
            DeliveryLedger(client, server.settings.redis.key_prefix).record_sent(
                sub_id, ev.camera_id, ev.event_id, None,
                dead=DeadDelivery(subscription_id=sub_id, delivery_id=ev.event_id, attempts=5, error="HTTP 500",
                                  failed_at=time.time(), event=ev.model_dump(mode="json")))
        finally:
            client.close()
        dead = http.get(f"/api/v1/subscriptions/{sub_id}/dead-letters").json()
        assert [(d["delivery_id"], d["camera_id"], d["attempts"]) for d in dead] == [(ev.event_id, "press-1", 5)]
        assert http.post(f"/api/v1/subscriptions/{sub_id}/redrive", json={"delivery_ids": ["nope"]}).status_code == 404
        redriven = http.post(f"/api/v1/subscriptions/{sub_id}/redrive")
        assert redriven.json() == {"delivered": [ev.event_id], "failed": {}}
        assert ev.event_id in rx.wait_for(2, timeout=10)
        assert http.get(f"/api/v1/subscriptions/{sub_id}/dead-letters").json() == []

    # Receiver gone: the test reports the failure instead of raising.
    failed = http.post(f"/api/v1/subscriptions/{sub_id}/test").json()
    assert failed["ok"] is False and failed["error"]

    assert http.delete(f"/api/v1/subscriptions/{sub_id}").status_code == 204
    assert all(s["id"] != sub_id for s in http.get("/api/v1/subscriptions").json())
    assert http.delete(f"/api/v1/subscriptions/{sub_id}").status_code == 404
    assert http.post(f"/api/v1/subscriptions/{sub_id}/test").status_code == 404


def test_generated_webhook_secret_is_shown_once(server: ApiServer) -> None:
    sub_id = unique("gen")
    created = server.http.post("/api/v1/subscriptions", json={
        "id": sub_id, "channel": {"type": "webhook", "url": "http://127.0.0.1:9/hook"}})
    assert created.status_code == 201, created.text
    secret = created.json()["secret"]
    assert isinstance(secret, str) and len(secret) >= 32
    assert secret not in server.http.get("/api/v1/subscriptions").text
    assert server.http.delete(f"/api/v1/subscriptions/{sub_id}").status_code == 204


# -- thresholds -----------------------------------------------------------------------------------
def test_thresholds_get_and_put(server: ApiServer) -> None:
    http = server.http
    cls = unique("class")
    assert all(t["product_class"] != cls for t in http.get("/api/v1/thresholds").json())
    put = http.put(f"/api/v1/thresholds/{cls}", json={"threshold": 0.42, "note": "tuned on line 3"})
    assert put.status_code == 200, put.text
    assert put.json()["threshold"] == 0.42 and put.json()["meta"]["note"] == "tuned on line 3"
    row = next(t for t in http.get("/api/v1/thresholds").json() if t["product_class"] == cls)
    assert row["threshold"] == 0.42 and row["meta"]["source"] == "api"
    client = connect(server.settings.redis)
    try:
        assert ThresholdStore(client, server.settings.redis.key_prefix).get(cls) == 0.42
    finally:
        client.close()
    assert http.put(f"/api/v1/thresholds/{cls}", json={"threshold": "high"}).status_code == 422
    assert http.put(f"/api/v1/thresholds/{cls}", json={}).status_code == 422
    assert http.put(f"/api/v1/thresholds/{cls}", content=b'{"threshold": NaN}',
                    headers={"Content-Type": "application/json"}).status_code == 422


# -- live stream ----------------------------------------------------------------------------------
def test_stream_delivers_events_published_after_connecting(server: ApiServer) -> None:
    camera = unique("cam-sse")
    event = make_event(camera, ts=time.time(), session="sse-replay")
    seen_heartbeat = False
    received: dict[str, Any] | None = None
    with server.http.stream("GET", "/api/v1/stream", params={"token": TOKEN}, headers={"Authorization": ""}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        assert next(lines) == "retry: 3000"
        assert next(lines) == ": connected"
        publish_events(server.settings.kafka, [event])
        deadline = time.monotonic() + 30
        kind = None
        for line in lines:
            assert time.monotonic() < deadline, "no event on the stream in time"
            if line == ": heartbeat":
                seen_heartbeat = True
            elif line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: ") and kind == "defect":
                data = json.loads(line.removeprefix("data: "))
                if data["event_id"] == event.event_id:
                    received = data
            if received is not None and seen_heartbeat:
                break
    assert received is not None and seen_heartbeat
    assert received["camera_id"] == camera and received["replay_session"] == "sse-replay"
    assert "mask_png" not in received and received["links"]["thumbnail"].endswith("/thumbnail.jpg")


# -- store ----------------------------------------------------------------------------------------
@pytest.fixture
def store(redis_client: redis.Redis, redis_settings: RedisSettings) -> EventStore:
    return EventStore(redis_client, redis_settings.key_prefix, max_events=100, scan_batch=3)


def test_store_trims_oldest_with_their_images(redis_client: redis.Redis, redis_settings: RedisSettings) -> None:
    small = EventStore(redis_client, redis_settings.key_prefix, max_events=3)
    events = [make_event("cam-trim", i, ts=1000.0 + i) for i in range(5)]
    for ev in events:
        assert small.put(ev) is not None
    assert small.count() == 3
    assert [e["event_id"] for e in small.query(EventQuery(limit=10)).events] == [e.event_id for e in events[:1:-1]]
    for gone in events[:2]:
        assert small.get(gone.event_id) is None and small.mask(gone.event_id) is None
        assert small.thumbnail(gone.event_id) is None


def test_store_keeps_a_close_over_a_late_open(store: EventStore) -> None:
    opened = make_event("cam-late")
    assert store.put(opened.model_copy(update={"status": "closed"})) is not None
    assert store.put(opened) is None
    assert store.get(opened.event_id)["status"] == "closed"  # type: ignore[index]
    roundtrip = store.event(opened.event_id)
    assert roundtrip is not None and roundtrip.mask_png == opened.mask_png and roundtrip.status == "closed"


def test_store_pages_through_runs_of_equal_timestamps(store: EventStore) -> None:
    # Batches of 3 while 7 events share one timestamp: page and batch boundaries fall inside the run.
    events = [make_event(f"cam-{i}", ts=2000.0 if 2 <= i < 9 else 1000.0 + i * 100) for i in range(12)]
    for ev in events:
        store.put(ev)
    expected = [e.event_id for e in sorted(events, key=lambda e: (e.first_ts, e.event_id.encode()), reverse=True)]
    for limit in (1, 2, 4, 5, 12, 50):
        got: list[str] = []
        before = None
        while True:
            page = store.query(EventQuery(limit=limit, before=before))
            assert len(page.events) <= limit
            got += [e["event_id"] for e in page.events]
            if page.next is None:
                break
            before = page.next
        assert got == expected, f"limit {limit}"


def test_live_channel_is_namespaced() -> None:
    assert live_channel("plant-a") == "plant-a:events:live"
