"""Replay: publish recorded frames with their original relative timing, then follow them through.

The frames go to the live frames topic tagged with a replay session, so the deployed scoring and
alert workers handle them (no staleness limit, alert state kept apart, events carrying the
session). A follower reads scores, events and dead letters of that session only and ends the run
once every published frame is accounted for and the session's events are closed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kafka import KafkaProducer
from pydantic import ValidationError

from pipeline import imaging
from pipeline.bus import read_dead_letter, topic_name
from pipeline.config import KafkaSettings
from pipeline.logging import get_logger
from pipeline.replay.inputs import ReplayFrame, ReplayInput
from pipeline.runtime.envelope import Envelope, Record, StageResult
from pipeline.runtime.follow import Follower
from schemas.events import DefectEvent
from schemas.frames import FrameHeader
from schemas.scores import ScoreMessage

log = get_logger(__name__)

# Times below this are offsets from the input's start (plain folders, video), not epoch seconds.
_EPOCH_FLOOR = 1e9


@dataclass
class Published:
    frames: int = 0
    first_ts: float | None = None
    last_ts: float | None = None
    seconds: float = 0.0
    done: bool = False
    error: str | None = None
    # (camera, seq) -> loader, so the report can draw events on the full-resolution peak frame.
    loaders: dict[tuple[str, int], Callable[[], bytes]] = field(default_factory=dict)

    @property
    def span_s(self) -> float:
        return 0.0 if self.first_ts is None or self.last_ts is None else self.last_ts - self.first_ts


def _dimensions(frame: ReplayFrame, data: bytes) -> tuple[int, int]:
    if frame.width and frame.height:
        return int(frame.width), int(frame.height)
    h, w = imaging.decode_image(data).shape[:2]
    return w, h


def publish_frames(source: ReplayInput, producer: KafkaProducer, kafka: KafkaSettings, session: str,
                   speed: float | None, stop: threading.Event, result: Published,
                   keep_loaders: bool = True) -> Published:
    """Send every frame, paced at ``speed`` x the recorded timing (None: as fast as possible)."""
    topic = topic_name(kafka, "frames")
    started = time.monotonic()
    wall_origin = time.time()
    origin: float | None = None
    try:
        for frame in source.frames:
            if stop.is_set():
                break
            if origin is None:
                origin = frame.capture_ts
            if speed is not None:
                delay = started + (frame.capture_ts - origin) / speed - time.monotonic()
                if delay > 0 and stop.wait(delay):
                    break
            data = frame.load()
            width, height = _dimensions(frame, data)
            capture_ts = frame.capture_ts if frame.capture_ts >= _EPOCH_FLOOR else wall_origin + frame.capture_ts
            header = FrameHeader(camera_id=frame.camera_id, line_id=frame.line_id,
                                 product_class=frame.product_class, seq=frame.seq, capture_ts=capture_ts,
                                 width=width, height=height, encoding="jpeg", replay_session=session)
            producer.send(topic, key=frame.camera_id.encode(), value=data, headers=header.to_header())
            if keep_loaders:
                result.loaders[(frame.camera_id, frame.seq)] = frame.load
            result.frames += 1
            result.first_ts = capture_ts if result.first_ts is None else result.first_ts
            result.last_ts = capture_ts
        producer.flush()
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        log.exception("replay_publish_failed", session=session)
    finally:
        result.seconds = time.monotonic() - started
        result.done = True
    return result


class SessionFollower(Follower):
    """Scores, events and dead letters of one replay session, read from where the topics end now.

    A read-only stage on the stream runtime; the replay runner drives it with ``poll``."""

    def __init__(self, kafka: KafkaSettings, session: str,
                 on_event: Callable[[DefectEvent], None] | None = None) -> None:
        self.session = session
        self._on_event = on_event
        self._topics = {name: topic_name(kafka, name) for name in ("scores", "defects", "dlq")}
        self.scores: dict[tuple[str, int], ScoreMessage] = {}
        self.events: dict[str, DefectEvent] = {}
        self.transitions: list[DefectEvent] = []  # every open and close message, for the delivery summary
        self.rejected: set[tuple[str, int]] = set()
        self._mine = 0
        super().__init__(kafka, "replay-follow", ("scores", "defects", "dlq"), also_create=("frames",))

    def poll(self, timeout_ms: int = 200) -> int:
        """Read what arrived; returns how many records of this session."""
        before = self._mine
        super().poll(timeout_ms)
        return self._mine - before

    def decode(self, env: Envelope) -> Envelope:
        return env  # judged in handle: another session's malformed record is not ours to dead-letter

    def handle(self, records: Sequence[Record[Envelope]]) -> StageResult:
        for rec in records:
            self._mine += self._take(rec.envelope.topic, rec.envelope)
        return StageResult()

    def _take(self, topic: str, rec: object) -> int:
        value = rec.value  # type: ignore[attr-defined]
        try:
            if topic == self._topics["scores"]:
                score = ScoreMessage.model_validate_json(value)
                if score.frame.replay_session != self.session:
                    return 0
                self.scores[(score.frame.camera_id, score.frame.seq)] = score
            elif topic == self._topics["defects"]:
                event = DefectEvent.model_validate_json(value)
                if event.replay_session != self.session:
                    return 0
                self.events[event.event_id] = event  # a closing message replaces the opening one
                self.transitions.append(event)
                if self._on_event is not None:
                    self._on_event(event)
            else:
                header = FrameHeader.from_headers(list(rec.headers))  # type: ignore[attr-defined]
                if header.replay_session != self.session:
                    return 0
                read_dead_letter(list(rec.headers))  # type: ignore[attr-defined]
                self.rejected.add((header.camera_id, header.seq))
        except (ValidationError, ValueError):
            return 0  # someone else's malformed record: not ours to judge
        return 1

    @property
    def accounted(self) -> int:
        return len(self.scores.keys() | self.rejected)

    @property
    def open_events(self) -> int:
        return sum(1 for e in self.events.values() if e.status == "open")

