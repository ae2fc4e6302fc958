"""The alert stage: batches of scores -> DefectEvent messages, with camera states cached and persisted.

States and thresholds sit behind small protocols (``state_store``: Redis for workers, memory for
rescore and tests); Kafka stays in the runtime. Order per batch (the runtime's): ``handle`` ->
``on_tick`` -> produce events and wait for their acks -> ``after_acked`` (persist) -> commit.
A kill before the persist replays the records onto the last persisted state: the same events come
out again with the same ids (event ids are camera + session + first frame), so delivery is at
least once and a duplicate is recognisable by its id; a kill after it drops them by seq.

Failover: every state is indexed by the partition its scores arrive on; a worker that is assigned
a partition loads those states at once, so an event left open by a dead worker is closed by the
wall clock (``alert.silence_s``) whether or not its camera ever sends another score.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from pipeline import imaging
from pipeline.alerting.debounce import CameraState, Transition, is_redelivery, step, tick
from pipeline.alerting.render import build_event
from pipeline.alerting.state_store import StateKey, StateStore, Thresholds
from pipeline.camera_tuning import CameraTuningStore, apply_ignore, effective
from pipeline.config import AlertSettings, CameraConfig
from pipeline.logging import get_logger
from pipeline.metrics import CAMERA_LABEL, CLASS_LABEL, EVENTS_OPENED
from pipeline.overlay import is_random, stamp_random
from pipeline.runtime.envelope import Output, Record, StageResult
from pipeline.runtime.loop import Stage
from schemas.events import DefectEvent
from schemas.scores import FrameSource, Provenance, ScoreMessage

log = get_logger(__name__)


def score_key(score: ScoreMessage) -> StateKey:
    return (score.frame.camera_id, score.frame.replay_session)


@dataclass
class AlertCounts:
    scores: int = 0
    events_opened: int = 0
    events_closed: int = 0


class AlertStage(Stage):
    """Per-camera debouncing over many cameras; states load from the store on assignment or first sight."""

    def __init__(
        self,
        settings: AlertSettings,
        thresholds: Thresholds,
        state_store: StateStore,
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
        self._owner: dict[StateKey, str] = {}  # state key -> "topic:partition" its scores arrive on
        self._unindexed: dict[str, set[StateKey]] = {}
        self._to_load: set[str] = set()  # assigned partitions whose states are not loaded yet
        self.counts = AlertCounts()

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
            if state.last_seq is not None and score.frame.seq < state.last_seq:
                log.warning("alert_seq_restarted", camera=score.frame.camera_id, session=score.frame.replay_session,
                            seq=score.frame.seq, last_seq=state.last_seq)
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
        for key in idle:
            self._owner.pop(key, None)
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

    # -- on the stream runtime ------------------------------------------------------------------
    def handle(self, records: Sequence[Record[ScoreMessage]]) -> StageResult:
        for rec in records:
            key = score_key(rec.message)
            partition = f"{rec.envelope.topic}:{rec.envelope.partition}"
            if self._owner.get(key) != partition:
                self._owner[key] = partition
                self._unindexed.setdefault(partition, set()).add(key)
        self.counts.scores += len(records)
        return self._outputs(self.process([r.message for r in records]))

    def on_tick(self) -> StageResult:
        if self._to_load:
            self._load_partitions()
        return self._outputs(self.tick())

    def after_acked(self) -> None:
        """Events are acknowledged: persist the states (and partition index) behind them."""
        for partition, keys in list(self._unindexed.items()):
            self._store.index(partition, keys)
            del self._unindexed[partition]
        self.persist()

    def rollback(self) -> None:
        """Unsaved changes are dropped; the states reload from the store and the records replay."""
        self.evict(list(self._dirty))
        self._unindexed.clear()

    def on_assigned(self, partitions: set) -> None:
        self._to_load |= {f"{tp.topic}:{tp.partition}" for tp in partitions}
        self._load_partitions()

    def on_revoked(self, partitions: set) -> None:
        names = {f"{tp.topic}:{tp.partition}" for tp in partitions}
        self._to_load -= names
        gone = [key for key, owner in self._owner.items() if owner in names]
        self.evict(gone)
        for key in gone:
            del self._owner[key]
        if gone:
            log.info("alert_states_evicted", cameras=len(gone))

    def _load_partitions(self) -> None:
        """States of cameras indexed on newly assigned partitions: their open events get closed by
        the wall clock (``tick``) even if the camera never sends another score."""
        for partition in sorted(self._to_load):
            keys = self._store.indexed(partition)
            for key in keys:
                self._owner.setdefault(key, partition)
            self._load(keys)
            self._to_load.discard(partition)
            opened = [k for k in keys if (st := self._states.get(k)) is not None and st.event is not None]
            log.info("alert_partition_loaded", partition=partition, cameras=len(keys), open_events=len(opened))

    def _outputs(self, events: list[DefectEvent]) -> StageResult:
        for ev in events:
            if ev.status == "open":
                self.counts.events_opened += 1
            else:
                self.counts.events_closed += 1
        return StageResult(outputs=[Output("defects", ev.model_dump_json().encode(), key=ev.camera_id.encode())
                                    for ev in events])

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
            EVENTS_OPENED.labels(camera=CAMERA_LABEL(ev.camera_id), product_class=CLASS_LABEL(ev.product_class)).inc()
        bound.info(f"defect_event_{status}", first_seq=ev.first_seq, last_seq=ev.last_seq,
                   peak_seq=ev.peak_seq, peak_score=round(ev.peak_score, 4), n_frames=ev.n_frames,
                   regions=len(event.regions))
        return event
