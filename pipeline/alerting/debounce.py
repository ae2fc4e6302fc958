"""Per-camera debouncing: anomalous frames -> open/close transitions. Pure: no I/O, no clocks.

A frame is anomalous when its image score reaches the product class's threshold. An event opens when
``k`` of the last ``n`` received frames are anomalous (its first frame is the earliest anomalous frame
in that window); while open, anomalous frames extend it; it closes once ``quiet_s`` seconds of capture
time pass without an anomalous frame, or (`tick`) when the camera sends nothing for ``silence_s`` of
wall clock. Frames whose seq is not above the last processed one are
redeliveries and change nothing, so at-least-once delivery cannot open an event twice.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pipeline.config import AlertSettings
from schemas.events import DefectEvent
from schemas.scores import ScoreMessage

STATE_VERSION = 1

TransitionKind = Literal["open", "close"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


@dataclass(frozen=True)
class FrameSnapshot:
    """Everything needed to render a frame later (mask, regions, thumbnail) without refetching it."""

    seq: int
    capture_ts: float
    score: float
    threshold: float
    width: int
    height: int
    map_png: bytes
    map_min: float
    map_max: float
    thumbnail_jpeg: bytes
    # Where the frame lies in Kafka and what scored it (JSON dicts; None in states saved before).
    source: dict[str, Any] | None = None
    provenance: dict[str, Any] | None = None

    @classmethod
    def from_score(cls, score: ScoreMessage, threshold: float) -> FrameSnapshot:
        f = score.frame
        return cls(
            seq=f.seq, capture_ts=f.capture_ts, score=score.image_score, threshold=threshold,
            width=f.width, height=f.height, map_png=bytes(score.anomaly_map_png),
            map_min=score.map_min, map_max=score.map_max, thumbnail_jpeg=bytes(score.thumbnail_jpeg),
            source=score.source.model_dump() if score.source is not None else None,
            provenance={"method": score.method, "model_fingerprint": score.model_fingerprint,
                        "prompt_version": score.prompt_version, "reference_version": score.reference_version},
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq, "capture_ts": self.capture_ts, "score": self.score,
            "threshold": self.threshold, "width": self.width, "height": self.height,
            "map_png": _b64(self.map_png), "map_min": self.map_min, "map_max": self.map_max,
            "thumbnail_jpeg": _b64(self.thumbnail_jpeg),
            "source": self.source, "provenance": self.provenance,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FrameSnapshot:
        return cls(
            seq=int(d["seq"]), capture_ts=float(d["capture_ts"]), score=float(d["score"]),
            threshold=float(d["threshold"]), width=int(d["width"]), height=int(d["height"]),
            map_png=_unb64(d["map_png"]), map_min=float(d["map_min"]), map_max=float(d["map_max"]),
            thumbnail_jpeg=_unb64(d["thumbnail_jpeg"]),
            source=d.get("source"), provenance=d.get("provenance"),
        )


@dataclass(frozen=True)
class WindowEntry:
    """One received frame in the k-of-n window.

    ``claimed`` marks anomalous frames already part of an event, so they never count towards another.
    ``snapshot`` is kept only for unclaimed anomalous frames that could still become an event's peak.
    """

    seq: int
    capture_ts: float
    score: float
    anomalous: bool
    claimed: bool = False
    snapshot: FrameSnapshot | None = None

    @property
    def pending(self) -> bool:
        return self.anomalous and not self.claimed

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq, "capture_ts": self.capture_ts, "score": self.score,
            "anomalous": self.anomalous, "claimed": self.claimed,
            "snapshot": self.snapshot.to_dict() if self.snapshot else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WindowEntry:
        snap = d.get("snapshot")
        return cls(
            seq=int(d["seq"]), capture_ts=float(d["capture_ts"]), score=float(d["score"]),
            anomalous=bool(d["anomalous"]), claimed=bool(d.get("claimed", False)),
            snapshot=FrameSnapshot.from_dict(snap) if snap else None,
        )


@dataclass(frozen=True)
class EventState:
    """An open (or just closed) event; ``peak`` is the highest-scoring anomalous frame so far."""

    event_id: str
    camera_id: str
    replay_session: str | None
    line_id: str
    product_class: str
    first_seq: int
    first_ts: float
    last_seq: int
    last_ts: float
    n_frames: int
    peak: FrameSnapshot

    @property
    def peak_seq(self) -> int:
        return self.peak.seq

    @property
    def peak_score(self) -> float:
        return self.peak.score

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id, "camera_id": self.camera_id, "replay_session": self.replay_session,
            "line_id": self.line_id, "product_class": self.product_class,
            "first_seq": self.first_seq, "first_ts": self.first_ts,
            "last_seq": self.last_seq, "last_ts": self.last_ts, "n_frames": self.n_frames,
            "peak": self.peak.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EventState:
        return cls(
            event_id=str(d["event_id"]), camera_id=str(d["camera_id"]),
            replay_session=d.get("replay_session"),
            line_id=str(d["line_id"]), product_class=str(d["product_class"]),
            first_seq=int(d["first_seq"]), first_ts=float(d["first_ts"]),
            last_seq=int(d["last_seq"]), last_ts=float(d["last_ts"]), n_frames=int(d["n_frames"]),
            peak=FrameSnapshot.from_dict(d["peak"]),
        )


@dataclass(frozen=True)
class Transition:
    """What `step`/`tick` decided; ``event`` is a snapshot taken at the moment of the transition."""

    kind: TransitionKind
    event: EventState


@dataclass
class CameraState:
    """Debounce state of one camera in one session (live: ``replay_session`` None).

    ``last_received_at`` is the worker's clock when the last frame was processed; `tick` closes the
    open event once the camera has been silent for ``silence_s`` of it.
    """

    camera_id: str
    replay_session: str | None = None
    last_seq: int | None = None
    last_capture_ts: float | None = None
    last_received_at: float | None = None
    window: list[WindowEntry] = field(default_factory=list)
    event: EventState | None = None

    @property
    def key(self) -> tuple[str, str | None]:
        return (self.camera_id, self.replay_session)

    def to_dict(self) -> dict[str, Any]:
        return {
            "v": STATE_VERSION,
            "camera_id": self.camera_id, "replay_session": self.replay_session,
            "last_seq": self.last_seq, "last_capture_ts": self.last_capture_ts,
            "last_received_at": self.last_received_at,
            "window": [e.to_dict() for e in self.window],
            "event": self.event.to_dict() if self.event else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CameraState:
        if d.get("v") != STATE_VERSION:
            raise ValueError(f"unsupported camera state version {d.get('v')!r}")
        ev = d.get("event")
        return cls(
            camera_id=str(d["camera_id"]), replay_session=d.get("replay_session"),
            last_seq=None if d.get("last_seq") is None else int(d["last_seq"]),
            last_capture_ts=None if d.get("last_capture_ts") is None else float(d["last_capture_ts"]),
            last_received_at=None if d.get("last_received_at") is None else float(d["last_received_at"]),
            window=[WindowEntry.from_dict(e) for e in d.get("window", [])],
            event=EventState.from_dict(ev) if ev else None,
        )


def is_redelivery(state: CameraState, score: ScoreMessage) -> bool:
    """A frame already processed: the last seq again, or a lower seq not captured later.

    A seq below the last one on a frame captured later is a restarted numbering (a capture
    worker restarted at 0, or the camera once sent a huge seq): it is processed, and the camera's
    numbering continues from it. Otherwise one frame with seq 2**62 would mute the camera for good.
    """
    if state.last_seq is None or score.frame.seq > state.last_seq:
        return False
    return (score.frame.seq == state.last_seq or state.last_capture_ts is None
            or score.frame.capture_ts <= state.last_capture_ts)


def step(state: CameraState, score: ScoreMessage, threshold: float, settings: AlertSettings,
         received_at: float | None = None) -> list[Transition]:
    """Feed one score (of this camera/session) into ``state`` (mutated in place).

    ``received_at`` is the caller's clock (defaults to the score's ``scored_ts``). Returns at most a
    close (the quiet period elapsed before this frame) followed by an open.
    """
    f = score.frame
    if (f.camera_id, f.replay_session) != state.key:
        raise ValueError(f"score for {(f.camera_id, f.replay_session)} fed to state {state.key}")
    if is_redelivery(state, score):
        return []

    out: list[Transition] = []
    ev = state.event
    if ev is not None and f.capture_ts - ev.last_ts >= settings.quiet_s:
        out.append(_close(state))

    anomalous = score.image_score >= threshold
    if state.event is not None:
        if anomalous:
            state.event = _extend(state.event, FrameSnapshot.from_score(score, threshold))
        # Frames seen while an event is open belong to it, never to a later event.
        _push(state, WindowEntry(f.seq, f.capture_ts, score.image_score, anomalous, claimed=True), settings)
    else:
        snap = FrameSnapshot.from_score(score, threshold) if anomalous else None
        _push(state, WindowEntry(f.seq, f.capture_ts, score.image_score, anomalous, snapshot=snap), settings)
        if anomalous:
            opened = _maybe_open(state, score, settings)
            if opened is not None:
                out.append(opened)

    state.last_seq = f.seq
    state.last_capture_ts = f.capture_ts
    state.last_received_at = score.scored_ts if received_at is None else received_at
    return out


def tick(state: CameraState, now: float, settings: AlertSettings) -> list[Transition]:
    """Close the open event of a camera gone silent: no score for ``silence_s`` of wall clock.

    Quiet periods are judged on capture time in `step`; the wall clock only ends events of cameras
    that stopped sending, so a scorer lagging behind (less than ``silence_s``) never splits a defect.
    ``silence_s`` below ``quiet_s`` counts as ``quiet_s``.
    """
    ev = state.event
    if ev is None or state.last_received_at is None:
        return []
    if now - state.last_received_at >= max(settings.silence_s, settings.quiet_s):
        return [_close(state)]
    return []


def _push(state: CameraState, entry: WindowEntry, settings: AlertSettings) -> None:
    """Append to the window, keep the last n, and drop snapshots that can no longer be a peak."""
    window = state.window
    if entry.snapshot is not None:
        # An earlier, lower-scoring frame leaves the window before this one, so it can never be the
        # peak of an event that this frame is not also part of: its (large) snapshot can go.
        window = [
            replace(e, snapshot=None) if e.snapshot is not None and e.score < entry.score else e
            for e in window
        ]
    window.append(entry)
    state.window = window[-settings.n:]


def _maybe_open(state: CameraState, score: ScoreMessage, settings: AlertSettings) -> Transition | None:
    pending = [e for e in state.window if e.pending]
    if len(pending) < settings.k:
        return None
    first = pending[0]
    candidates = [e for e in pending if e.snapshot is not None]
    # Earliest frame wins a tie, matching how a running peak only moves on a strictly higher score.
    peak = max(candidates, key=lambda e: e.score)  # max() keeps the first of equal keys
    assert peak.snapshot is not None
    f = score.frame
    ev = EventState(
        event_id=DefectEvent.make_id(f.camera_id, first.seq, f.replay_session),
        camera_id=f.camera_id, replay_session=f.replay_session,
        line_id=f.line_id, product_class=f.product_class,
        first_seq=first.seq, first_ts=first.capture_ts,
        last_seq=f.seq, last_ts=f.capture_ts, n_frames=len(pending), peak=peak.snapshot,
    )
    state.event = ev
    state.window = [replace(e, claimed=True, snapshot=None) if e.pending else e for e in state.window]
    return Transition("open", ev)


def _extend(ev: EventState, snap: FrameSnapshot) -> EventState:
    return replace(
        ev,
        last_seq=snap.seq,
        last_ts=max(ev.last_ts, snap.capture_ts),
        n_frames=ev.n_frames + 1,
        peak=snap if snap.score > ev.peak.score else ev.peak,
    )


def _close(state: CameraState) -> Transition:
    assert state.event is not None
    ev, state.event = state.event, None
    return Transition("close", ev)
