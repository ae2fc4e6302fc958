"""The alert stage on envelopes, with in-memory state and thresholds: no broker, no Redis."""

from __future__ import annotations

from kafka import TopicPartition

from pipeline.alerting.stage import AlertStage
from pipeline.alerting.state_store import MemoryStateStore, MemoryThresholds
from pipeline.config import AlertSettings
from pipeline.runtime.envelope import Envelope, Record
from schemas.events import DefectEvent
from schemas.scores import ScoreMessage
from tests.test_alert_worker import T0, make_score

TOPIC = "lw.scores"
SETTINGS = AlertSettings(k=2, n=3, quiet_s=1.5, silence_s=10.0, default_threshold=0.5, min_region_area=4)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def records(scores: list[ScoreMessage], partition: int = 0, first_offset: int = 0) -> list[Record[ScoreMessage]]:
    return [Record(Envelope(TOPIC, partition, first_offset + i, s.model_dump_json().encode(),
                            key=s.frame.camera_id.encode()), s) for i, s in enumerate(scores)]


def events_of(result: object) -> list[DefectEvent]:
    return [DefectEvent.model_validate_json(o.value) for o in result.outputs]  # type: ignore[attr-defined]


def stage(store: MemoryStateStore, clock: Clock, thresholds: dict[str, float] | None = None) -> AlertStage:
    return AlertStage(SETTINGS, MemoryThresholds(thresholds), store, clock=clock)


def test_handle_emits_events_as_outputs_keyed_by_camera() -> None:
    clock = Clock(T0)
    st = stage(MemoryStateStore(), clock)
    result = st.handle(records([make_score("cam-1", i, s) for i, s in enumerate([0.1, 0.9, 0.9])]))
    (out,) = result.outputs
    assert out.topic == "defects" and out.key == b"cam-1"
    (ev,) = events_of(result)
    assert (ev.status, ev.first_seq, ev.event_id) == ("open", 1, DefectEvent.make_id("cam-1", 1))
    assert st.counts.scores == 3 and st.counts.events_opened == 1


def test_thresholds_come_from_the_protocol() -> None:
    st = stage(MemoryStateStore(), Clock(T0), thresholds={"screw": 0.95})
    assert st.handle(records([make_score("cam-1", i, 0.9) for i in range(3)])).outputs == []


def test_rollback_forgets_unsaved_changes_and_a_replay_emits_the_same_event_id() -> None:
    store, clock = MemoryStateStore(), Clock(T0)
    st = stage(store, clock)
    batch = records([make_score("cam-1", i, 0.9) for i in range(2)])
    (first,) = events_of(st.handle(batch))
    st.rollback()  # e.g. the events were not acknowledged: nothing was persisted
    (again,) = events_of(st.handle(batch))
    assert again.event_id == first.event_id and again.status == "open"
    st.after_acked()
    assert st.handle(batch).outputs == []  # persisted: a redelivery is dropped by seq


def test_a_new_owner_closes_the_open_event_of_a_silent_camera_without_another_score() -> None:
    store, clock = MemoryStateStore(), Clock(T0)
    dead = stage(store, clock)
    dead.on_assigned({TopicPartition(TOPIC, 0)})
    assert [e.status for e in events_of(dead.handle(records([make_score("cam-1", i, 0.9) for i in range(2)])))] \
        == ["open"]
    dead.after_acked()  # persisted with the partition index; then the worker dies

    clock.now = T0 + 60  # the camera went silent long ago
    heir = stage(store, clock)
    assert events_of(heir.on_tick()) == []  # nothing assigned yet: nothing known
    heir.on_assigned({TopicPartition(TOPIC, 0)})
    (closed,) = events_of(heir.on_tick())
    assert (closed.status, closed.event_id) == ("closed", DefectEvent.make_id("cam-1", 0))


def test_revoked_partitions_forget_their_cameras() -> None:
    store, clock = MemoryStateStore(), Clock(T0)
    st = stage(store, clock)
    st.handle(records([make_score("cam-1", 0, 0.9)], partition=0) + records([make_score("cam-2", 0, 0.9)], 1))
    st.after_acked()
    st.on_revoked({TopicPartition(TOPIC, 1)})
    assert set(st.states) == {("cam-1", None)}


def test_events_follow_capture_time_when_the_scorer_lags() -> None:
    store, clock = MemoryStateStore(), Clock(T0)
    st = stage(store, clock)
    out: list[DefectEvent] = []
    for burst in range(4):  # 4 s of capture time, scored in bursts 5 s of wall clock apart
        out += events_of(st.handle(records([make_score("cam-1", burst * 10 + i, 0.9) for i in range(10)],
                                           first_offset=burst * 10)))
        st.after_acked()
        clock.now += 5.0
        out += events_of(st.on_tick())
    assert [e.status for e in out] == ["open"]
