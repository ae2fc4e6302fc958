"""Redis state behind the API: defect events, the latest frame per camera, and the live event feed.

Keys (``p`` is ``redis.key_prefix``):
    p:api:events              zset  event id, scored by first_ts (paging newest first, trimming oldest)
    p:api:event:<id>          str   event JSON without binaries (see ``event_summary``)
    p:api:event:<id>:mask     str   mask PNG
    p:api:event:<id>:thumb    str   thumbnail JPEG
    p:api:event:<id>:label    str   the operator's label JSON (``schemas.labels.Label``), merged into reads
    p:api:cameras             hash  camera id -> latest score summary JSON
    p:api:cameras:seen        zset  camera id, scored by its last update (pruning silent cameras)
    p:api:camera:<id>:jpeg    str   latest thumbnail with the heat overlay of its anomaly map (expires)
    p:api:camera:<id>:timeline list score points {ts, score, seq, replay}, newest last, bounded
    p:api:event:<id>:map      str   the peak frame's quantised anomaly map PNG (heat views)
    p:events:live             pub/sub channel: event summaries, fanned out to every replica's SSE clients
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import RedisError

from pipeline import imaging, overlay
from pipeline.alerting.render import event_overlay
from pipeline.config import ApiSettings
from pipeline.logging import get_logger
from schemas.events import DefectEvent
from schemas.scores import ScoreMessage

log = get_logger(__name__)

# `session=*` selects live and replayed events alike; no session selects live events only.
ALL_SESSIONS = "*"
# Ids become parts of Redis keys and URLs: no separators, bounded length.
EVENT_ID_PATTERN = r"^[A-Za-z0-9_.\-]{1,128}$"
BINARY_FIELDS = ("mask_png", "thumbnail_jpeg", "peak_map_png")
# A replayed frame does not replace a live camera's frame younger than this (replays of a camera
# that is also live would otherwise make its tile flicker between the two).
LIVE_PRECEDENCE_S = 60.0
# Score timeline points kept per camera (one per rendered frame, about one a second: ~10 minutes).
TIMELINE_POINTS = 600


def event_summary(event: DefectEvent) -> dict[str, Any]:
    """The event as the API shows it: JSON without binaries, plus links to its images."""
    data = event.model_dump(mode="json", exclude=set(BINARY_FIELDS))
    root = f"/api/v1/events/{event.event_id}"
    data["links"] = {"self": root, "mask": f"{root}/mask.png", "thumbnail": f"{root}/thumbnail.jpg",
                     "overlay": f"{root}/overlay.jpg"}
    return data


@dataclass(frozen=True)
class EventQuery:
    camera: str | None = None
    line: str | None = None
    product_class: str | None = None
    status: str | None = None
    # None: live events only; ALL_SESSIONS: everything; otherwise that replay session.
    session: str | None = None
    limit: int = 50
    # A ``next`` cursor from a previous page, or epoch seconds (events that started strictly before).
    before: str | None = None
    # "confirmed", "false_alarm", "none" (unlabelled) or None (any).
    label: str | None = None

    def matches(self, data: dict[str, Any]) -> bool:
        if self.session != ALL_SESSIONS and data.get("replay_session") != self.session:
            return False
        if self.label is not None:
            given = (data.get("label") or {}).get("label")
            if given != (None if self.label == "none" else self.label):
                return False
        wanted = {"camera_id": self.camera, "line_id": self.line, "product_class": self.product_class,
                  "status": self.status}
        return all(value is None or data.get(field) == value for field, value in wanted.items())


@dataclass(frozen=True)
class EventPage:
    events: list[dict[str, Any]]
    next: str | None


def make_cursor(first_ts: float, event_id: str) -> str:
    return f"{first_ts!r}:{event_id}"


def parse_before(before: str) -> tuple[float, bytes | None]:
    """``ts:id`` cursor or plain epoch seconds -> (ts, id or None); ValueError when neither."""
    ts_text, sep, event_id = before.partition(":")
    ts = float(ts_text)
    if not math.isfinite(ts) or (sep and not event_id):
        raise ValueError(f"invalid cursor {before!r}")
    return ts, (event_id.encode() if sep else None)


class EventStore:
    """Defect events by id, newest first; a closed event replaces its open version."""

    def __init__(self, client: redis.Redis, prefix: str, max_events: int = 10_000, scan_batch: int = 200) -> None:
        self._client = client
        self._prefix = prefix
        self._index = f"{prefix}:api:events"
        self.max_events = max_events
        self._batch = scan_batch

    def _key(self, event_id: str | bytes, suffix: str = "") -> str:
        eid = event_id.decode() if isinstance(event_id, bytes) else event_id
        return f"{self._prefix}:api:event:{eid}{suffix}"

    # -- writes --------------------------------------------------------------------------------
    def put(self, event: DefectEvent) -> dict[str, Any] | None:
        """Store the event; returns its summary, or None when a stale 'open' would replace 'closed'."""
        if not re.fullmatch(EVENT_ID_PATTERN, event.event_id):
            raise ValueError(f"event id {event.event_id[:200]!r} does not match {EVENT_ID_PATTERN}")
        summary = event_summary(event)
        text = json.dumps(summary)
        key = self._key(event.event_id)

        def write(pipe: redis.client.Pipeline) -> bool:
            if event.status == "open":
                # At-least-once delivery may bring an open event back after it closed: keep the close.
                raw = pipe.get(key)
                if raw is not None and json.loads(raw).get("status") == "closed":
                    return False
            pipe.multi()
            pipe.set(key, text)
            pipe.set(self._key(event.event_id, ":mask"), event.mask_png)
            pipe.set(self._key(event.event_id, ":thumb"), event.thumbnail_jpeg)
            if event.peak_map_png is not None:
                pipe.set(self._key(event.event_id, ":map"), event.peak_map_png)
            pipe.zadd(self._index, {event.event_id: event.first_ts})
            return True

        if not self._client.transaction(write, key, value_from_callable=True):
            return None
        self._trim()
        return summary

    def _trim(self) -> None:
        excess = int(self._client.zcard(self._index)) - self.max_events
        if excess <= 0:
            return
        # ZPOPMIN is atomic, so replicas trimming at once never drop more than the excess.
        popped = self._client.zpopmin(self._index, excess)
        keys = [self._key(eid, suffix) for eid, _ in popped for suffix in ("", ":mask", ":thumb", ":label", ":map")]
        if keys:
            self._client.delete(*keys)

    # -- reads ---------------------------------------------------------------------------------
    def get(self, event_id: str) -> dict[str, Any] | None:
        raw, label = self._client.mget([self._key(event_id), self._key(event_id, ":label")])
        if raw is None:
            return None
        data = json.loads(raw)
        data["label"] = json.loads(label) if label is not None else None
        return data

    def set_label(self, event_id: str, label: dict[str, Any]) -> bool:
        """Keep a label with the event (replacing an earlier one); False when the event is unknown."""
        if not self._client.exists(self._key(event_id)):
            return False
        self._client.set(self._key(event_id, ":label"), json.dumps(label))
        return True

    def label(self, event_id: str) -> dict[str, Any] | None:
        raw = self._client.get(self._key(event_id, ":label"))
        return json.loads(raw) if raw is not None else None

    def mask(self, event_id: str) -> bytes | None:
        raw = self._client.get(self._key(event_id, ":mask"))
        return bytes(raw) if raw is not None else None

    def thumbnail(self, event_id: str) -> bytes | None:
        raw = self._client.get(self._key(event_id, ":thumb"))
        return bytes(raw) if raw is not None else None

    def event(self, event_id: str) -> DefectEvent | None:
        """The whole event with its binaries (for rendering), or None."""
        summary, mask, thumb, amap = self._client.mget(
            [self._key(event_id), self._key(event_id, ":mask"), self._key(event_id, ":thumb"),
             self._key(event_id, ":map")])
        if summary is None or mask is None or thumb is None:
            return None
        data = {k: v for k, v in json.loads(summary).items() if k not in ("links", "label")}
        return DefectEvent.model_validate({**data, "mask_png": bytes(mask), "thumbnail_jpeg": bytes(thumb),
                                           "peak_map_png": bytes(amap) if amap is not None else None})

    def count(self) -> int:
        return int(self._client.zcard(self._index))

    def query(self, q: EventQuery) -> EventPage:
        """One page, newest first; ``next`` is set only when another matching event exists."""
        ts, event_id = parse_before(q.before) if q.before else (None, None)
        found: list[dict[str, Any]] = []
        for ids in self._scan(ts, event_id):
            raws = self._client.mget([self._key(eid) for eid in ids])
            labels = self._client.mget([self._key(eid, ":label") for eid in ids])
            for raw, label in zip(raws, labels, strict=True):
                if raw is None:  # trimmed since the index was read
                    continue
                data = json.loads(raw)
                data["label"] = json.loads(label) if label is not None else None
                if q.matches(data):
                    found.append(data)
                    if len(found) > q.limit:
                        last = found[q.limit - 1]
                        return EventPage(found[:q.limit], make_cursor(last["first_ts"], last["event_id"]))
        return EventPage(found, None)

    def _scan(self, ts: float | None, after_id: bytes | None) -> Iterator[list[bytes]]:
        """Event ids newest first (ties: reverse byte order of the id, as Redis sorts them), in batches.

        Keyset paging on (first_ts, id): equal timestamps are read as a whole run, so a page boundary
        inside a run of equal first_ts loses and repeats nothing.
        """
        upper = "+inf"
        if ts is not None:
            if after_id is not None:
                same = [m for m in self._client.zrevrangebyscore(self._index, ts, ts) if m < after_id]
                if same:
                    yield same
            upper = f"({ts!r}"
        while True:
            rows = self._client.zrevrangebyscore(self._index, upper, "-inf", start=0, num=self._batch,
                                                 withscores=True)
            if not rows:
                return
            last = rows[-1][1]
            ids = [m for m, s in rows if s != last] + self._client.zrevrangebyscore(self._index, last, last)
            yield ids
            if len(rows) < self._batch:
                return
            upper = f"({last!r}"


def render_overlay(event: DefectEvent) -> bytes:
    """The event's thumbnail with its mask, outline and region boxes drawn, as JPEG."""
    frame = imaging.decode_image(event.thumbnail_jpeg)
    return imaging.encode_jpeg(event_overlay(frame, event), quality=90)


def render_latest(score: ScoreMessage) -> bytes:
    """The score's thumbnail with its anomaly map as a heat overlay, as JPEG.

    A fixed 0..1 scale (scores are probabilities) rather than the map's own range, so a normal
    frame looks calm and only a defect glows.
    """
    image = imaging.decode_image(score.thumbnail_jpeg)
    amap = imaging.dequantize_map(score.anomaly_map_png, score.map_min, score.map_max, image.shape[:2])
    picture = imaging.heat_overlay(image, amap, vmin=0.0, vmax=1.0, alpha=overlay.HEAT_ALPHA)
    return imaging.encode_jpeg(overlay.stamp_random(picture) if overlay.is_random(score.model_fingerprint)
                               else picture, quality=85)


class CameraStore:
    """The latest scored frame per camera.

    Camera ids come from messages, so the set is bounded: a camera silent for ``ttl_s`` is dropped
    (its picture key expires by itself, its caption is pruned), and beyond ``max_cameras`` the
    longest-silent ones go first.
    """

    def __init__(self, client: redis.Redis, prefix: str, ttl_s: float = 24 * 3600.0,
                 max_cameras: int = 1000, prune_every_s: float = 10.0) -> None:
        self._client = client
        self._prefix = prefix
        self._key = f"{prefix}:api:cameras"
        self._seen_key = f"{prefix}:api:cameras:seen"  # zset camera id -> last update time
        self.ttl_s = ttl_s
        self.max_cameras = max_cameras
        self._prune_every_s = prune_every_s
        self._pruned_at = 0.0

    @classmethod
    def bounded(cls, client: redis.Redis, prefix: str, settings: ApiSettings) -> CameraStore:
        return cls(client, prefix, settings.camera_ttl_s, settings.max_cameras)

    def _jpeg_key(self, camera_id: str) -> str:
        return f"{self._prefix}:api:camera:{camera_id}:jpeg"

    def put(self, score: ScoreMessage, jpeg: bytes) -> bool:
        """Record the camera's latest frame; False when a replayed frame yields to a recent live one."""
        frame = score.frame
        if frame.replay_session is not None:
            current = self.get(frame.camera_id)
            if (current is not None and current.get("replay_session") is None
                    and time.time() - float(current.get("updated_ts", 0)) < LIVE_PRECEDENCE_S):
                return False
        now = time.time()
        record = {"camera_id": frame.camera_id, "line_id": frame.line_id, "product_class": frame.product_class,
                  "seq": frame.seq, "capture_ts": frame.capture_ts, "width": frame.width, "height": frame.height,
                  "image_score": score.image_score, "method": score.method, "scored_ts": score.scored_ts,
                  "model_fingerprint": score.model_fingerprint, "reference_version": score.reference_version,
                  "replay_session": frame.replay_session, "updated_ts": now,
                  "latest_url": f"/api/v1/cameras/{frame.camera_id}/latest.jpg"}
        pipe = self._client.pipeline(transaction=True)  # the picture and its caption change together
        pipe.hset(self._key, frame.camera_id, json.dumps(record))
        pipe.set(self._jpeg_key(frame.camera_id), jpeg, px=int(self.ttl_s * 1000))
        pipe.zadd(self._seen_key, {frame.camera_id: now})
        # The score timeline (one point per rendered frame, the newest TIMELINE_POINTS kept).
        point = {"ts": frame.capture_ts, "score": score.image_score, "seq": frame.seq,
                 "replay": frame.replay_session is not None}
        pipe.rpush(self._timeline_key(frame.camera_id), json.dumps(point))
        pipe.ltrim(self._timeline_key(frame.camera_id), -TIMELINE_POINTS, -1)
        pipe.expire(self._timeline_key(frame.camera_id), int(self.ttl_s))
        pipe.execute()
        if now - self._pruned_at >= self._prune_every_s or int(self._client.zcard(self._seen_key)) > self.max_cameras:
            self.prune(now)
        return True

    def prune(self, now: float | None = None) -> int:
        """Forget cameras silent for ttl_s and the longest-silent beyond max_cameras; returns how many."""
        now = time.time() if now is None else now
        self._pruned_at = now
        gone = [m for m in self._client.zrangebyscore(self._seen_key, "-inf", f"({now - self.ttl_s!r}")]
        excess = int(self._client.zcard(self._seen_key)) - len(gone) - self.max_cameras
        if excess > 0:
            oldest = self._client.zrange(self._seen_key, 0, len(gone) + excess - 1)
            gone = list(dict.fromkeys([*gone, *oldest]))
        if not gone:
            return 0
        ids = [g.decode() if isinstance(g, bytes) else str(g) for g in gone]
        pipe = self._client.pipeline(transaction=True)
        pipe.zrem(self._seen_key, *ids)
        pipe.hdel(self._key, *ids)
        pipe.delete(*[self._jpeg_key(i) for i in ids], *[self._timeline_key(i) for i in ids])
        pipe.execute()
        log.info("api_cameras_pruned", cameras=len(ids))
        return len(ids)

    def _timeline_key(self, camera_id: str) -> str:
        return f"{self._prefix}:api:camera:{camera_id}:timeline"

    def timeline(self, camera_id: str, since: float | None = None) -> list[dict[str, Any]]:
        points = [json.loads(raw) for raw in self._client.lrange(self._timeline_key(camera_id), 0, -1)]
        return [p for p in points if since is None or p["ts"] >= since]

    def get(self, camera_id: str) -> dict[str, Any] | None:
        raw = self._client.hget(self._key, camera_id)
        return json.loads(raw) if raw is not None else None

    def all(self) -> list[dict[str, Any]]:
        cutoff = time.time() - self.ttl_s
        records = [json.loads(raw) for raw in self._client.hvals(self._key)]
        return sorted((r for r in records if float(r.get("updated_ts", 0)) >= cutoff), key=lambda r: r["camera_id"])

    def jpeg(self, camera_id: str) -> bytes | None:
        raw = self._client.get(self._jpeg_key(camera_id))
        return bytes(raw) if raw is not None else None


# -- live feed ------------------------------------------------------------------------------------
def live_channel(prefix: str) -> str:
    return f"{prefix}:events:live"


def publish_live(client: redis.Redis, prefix: str, summary: dict[str, Any]) -> int:
    """Announce an event to every replica's stream clients; returns how many replicas listen."""
    return int(client.publish(live_channel(prefix), json.dumps(summary)))


class Listener:
    """One stream client's queue, bound to the event loop that reads it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, maxsize: int) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize)
        self.overflowed = False

    def offer(self, item: str | None) -> None:
        # Runs in the event loop thread (via call_soon_threadsafe).
        if self.overflowed:
            return
        if item is not None and self.queue.full():
            # A client too slow to keep up is cut off; its EventSource reconnects and reloads the list.
            self.overflowed = True
            item = None
        if item is None:
            with contextlib.suppress(asyncio.QueueEmpty):
                while self.queue.full():
                    self.queue.get_nowait()
        self.queue.put_nowait(item)


class LiveFeed:
    """Subscribes once per process to the live channel and hands each message to every listener."""

    def __init__(self, client: redis.Redis, prefix: str, queue_size: int = 256) -> None:
        self._client = client
        self.channel = live_channel(prefix)
        self._queue_size = queue_size
        self._listeners: set[Listener] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="api-live-feed", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        """Start listening; returns once subscribed so no event published afterwards is missed."""
        self._thread.start()
        if not self._subscribed.wait(timeout):
            log.warning("live_feed_not_subscribed", channel=self.channel, waited_s=timeout)

    def listen(self) -> Listener:
        """A new listener on the calling event loop; pair with ``forget``."""
        listener = Listener(asyncio.get_running_loop(), self._queue_size)
        with self._lock:
            self._listeners.add(listener)
        return listener

    def forget(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.discard(listener)

    @property
    def listeners(self) -> int:
        with self._lock:
            return len(self._listeners)

    def end_streams(self) -> None:
        """End every open stream now (they would otherwise hold a graceful shutdown open)."""
        self._fan_out(None)

    def close(self) -> None:
        self._stop.set()
        self._fan_out(None)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)

    def _fan_out(self, item: str | None) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            with contextlib.suppress(RuntimeError):  # its loop already closed
                listener.loop.call_soon_threadsafe(listener.offer, item)

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = self._client.pubsub()
            try:
                pubsub.subscribe(self.channel)
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if msg is None:
                        continue
                    if msg["type"] == "subscribe":
                        self._subscribed.set()
                    elif msg["type"] == "message":
                        data = msg["data"]
                        self._fan_out(data.decode() if isinstance(data, bytes) else str(data))
            except RedisError as exc:
                # Messages published meanwhile are lost: end every stream so clients reconnect and reload.
                log.warning("live_feed_redis_error", channel=self.channel, error=repr(exc))
                self._fan_out(None)
                self._stop.wait(1.0)
            finally:
                with contextlib.suppress(RedisError):
                    pubsub.close()
