"""The alert stage: batches of scores -> DefectEvent messages, with camera states cached and persisted.

I/O is limited to Redis (thresholds, camera states); Kafka stays in the worker. Call order per batch:
``process`` -> ``tick`` -> produce and flush events -> ``persist`` -> commit offsets, so a crash at
any point replays records onto the last persisted state, where the seq check drops what was seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import MappingProxyType

from pipeline import imaging
from pipeline.alerting.debounce import CameraState, Transition, is_redelivery, step, tick
from pipeline.alerting.render import build_event
from pipeline.alerting.state_store import CameraStateStore, StateKey
from pipeline.camera_tuning import CameraTuningStore, apply_ignore, effective
from pipeline.config import AlertSettings, CameraConfig
from pipeline.logging import get_logger
from pipeline.metrics import EVENTS_OPENED
from pipeline.overlay import is_random, stamp_random
from pipeline.redis_store import ThresholdStore
from schemas.events import DefectEvent
from schemas.scores import FrameSource, Provenance, ScoreMessage

log = get_logger(__name__)


def score_key(score: ScoreMessage) -> StateKey:
    return (score.frame.camera_id, score.frame.replay_session)


class AlertStage:
    """Per-camera debouncing over many cameras; states load lazily from Redis on first sight."""

    def __init__(
        self,
        settings: AlertSettings,
        thresholds: ThresholdStore,
        state_store: CameraStateStore,
        clock: Callable[[], float] = time.time,
        idle_evict_s: float | None = 3600.0,
        cameras: Sequence[CameraConfig] = (),
        tuning: CameraTuningStore | None = None,
    ) -> None:
        self._settings = settings
        # Per-camera threshold overrides and ignore regions: configuration, then live overrides.
        self._cameras = {c.id: c for c in cameras}
        self._tuning = tuning
        self._thresholds = thresholds
        self._store = state_store
        self._clock = clock
        # Finished replays and retired cameras would otherwise stay cached forever; Redis keeps them.
        self._idle_evict_s = idle_evict_s
        self._states: dict[StateKey, CameraState] = {}
        self._dirty: set[StateKey] = set()
        self._warned_regression: set[StateKey] = set()

    @property
    def states(self) -> Mapping[StateKey, CameraState]:
        return MappingProxyType(self._states)

    def threshold_for(self, product_class: str, table: Mapping[str, float] | None = None) -> float:
        """Calibrated threshold of the class, else the configured default."""
        value = self._thresholds.get(product_class) if table is None else table.get(product_class)
        return self._settings.default_threshold if value is None else value

    def process(self, scores: Sequence[ScoreMessage], now: float | None = None) -> list[DefectEvent]:
        """Feed scores in order; returns the open/closed events they caused, in order."""
        if not scores:
            return []
        now = self._clock() if now is None else now
        self._load([score_key(s) for s in scores])
        # One HGETALL per batch: a freshly calibrated threshold applies from the next batch on.
        table = self._thresholds.all()
        tuning = self._tuning.all() if self._tuning is not None else {}
        events: list[DefectEvent] = []
        for score in scores:
            key = score_key(score)
            state = self._states[key]
            if is_redelivery(state, score):
                self._log_redelivery(state, score)
                continue
            camera_threshold, ignore = effective(self._cameras.get(score.frame.camera_id),
                                                 tuning.get(score.frame.camera_id))
            score = apply_ignore(score, ignore)
            threshold = (camera_threshold if camera_threshold is not None
                         else self.threshold_for(score.frame.product_class, table))
            transitions = step(state, score, threshold, self._settings, received_at=now)
            self._dirty.add(key)
            events.extend(self._emit(t) for t in transitions)
        return events

    def tick(self, now: float | None = None) -> list[DefectEvent]:
        """Close events of cameras that went quiet; only cameras this stage has loaded are judged."""
        now = self._clock() if now is None else now
        events: list[DefectEvent] = []
        idle: list[StateKey] = []
        for key, state in self._states.items():
            transitions = tick(state, now, self._settings)
            if transitions:
                self._dirty.add(key)
                events.extend(self._emit(t) for t in transitions)
            elif (self._idle_evict_s is not None and state.event is None and key not in self._dirty
                  and state.last_received_at is not None
                  and now - state.last_received_at >= self._idle_evict_s):
                idle.append(key)  # persisted and quiet: reloaded from Redis if it speaks again
        self.evict(idle)
        return events

    def persist(self) -> int:
        """Save every state changed since the last persist (one round trip); returns how many."""
        if not self._dirty:
            return 0
        n = self._store.save_many(self._states[k] for k in self._dirty if k in self._states)
        self._dirty.clear()
        return n

    def evict(self, keys: Iterable[StateKey]) -> None:
        """Forget cached states (e.g. their partition moved to another worker), unsaved changes too.

        The new owner reloads from Redis what was persisted before the matching offsets were committed.
        """
        for key in keys:
            self._states.pop(key, None)
            self._dirty.discard(key)

    # -- internals ----------------------------------------------------------------------------
    def _load(self, keys: Iterable[StateKey]) -> None:
        missing = list(dict.fromkeys(k for k in keys if k not in self._states))
        if not missing:
            return
        found = self._store.load_many(missing)
        for key in missing:
            state = found.get(key)
            if state is not None:
                log.info("alert_state_loaded", camera=key[0], session=key[1], last_seq=state.last_seq,
                         open_event=state.event.event_id if state.event else None)
            self._states[key] = state if state is not None else CameraState(camera_id=key[0],
                                                                             replay_session=key[1])

    def _log_redelivery(self, state: CameraState, score: ScoreMessage) -> None:
        f = score.frame
        if state.last_capture_ts is not None and f.capture_ts > state.last_capture_ts:
            # A newer frame with an old seq is no redelivery: the camera's numbering restarted
            # (e.g. its capture worker restarted at seq 0). Its frames are dropped until seq passes
            # last_seq, so say so loudly, once per camera.
            if state.key not in self._warned_regression:
                self._warned_regression.add(state.key)
                log.warning("alert_seq_regressed", camera=f.camera_id, session=f.replay_session,
                            seq=f.seq, last_seq=state.last_seq, capture_ts=f.capture_ts,
                            last_capture_ts=state.last_capture_ts)
            return
        log.debug("alert_redelivery_ignored", camera=f.camera_id, session=f.replay_session,
                  seq=f.seq, last_seq=state.last_seq)

    def _emit(self, transition: Transition) -> DefectEvent:
        ev = transition.event
        status = "open" if transition.kind == "open" else "closed"
        event = build_event(ev, status, self._settings.min_region_area)
        if ev.peak.source is not None:
            event.peak_source = FrameSource.model_validate(ev.peak.source)
        event.peak_map_png, event.peak_map_min, event.peak_map_max = ev.peak.map_png, ev.peak.map_min, ev.peak.map_max
        if ev.peak.provenance is not None:
            event.provenance = Provenance.model_validate(ev.peak.provenance)
            if is_random(event.provenance.model_fingerprint):  # the picture says so on itself
                thumb = imaging.decode_image(event.thumbnail_jpeg)
                event.thumbnail_jpeg = imaging.encode_jpeg(stamp_random(thumb), quality=85)
        bound = log.bind(camera=ev.camera_id, event_id=ev.event_id, session=ev.replay_session)
        if status == "open":
            EVENTS_OPENED.labels(camera=ev.camera_id, product_class=ev.product_class).inc()
        bound.info(f"defect_event_{status}", first_seq=ev.first_seq, last_seq=ev.last_seq,
                   peak_seq=ev.peak_seq, peak_score=round(ev.peak_score, 4), n_frames=ev.n_frames,
                   regions=len(event.regions))
        return event
