"""Pure tests of the alert state machine, rendering and calibration (no broker, no Redis)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import imaging
from pipeline.alerting.calibrate import threshold_from_scores
from pipeline.alerting.debounce import CameraState, Transition, step, tick
from pipeline.alerting.render import build_event, mask_from_map, regions_from_mask, thumbnail_with_overlay
from pipeline.config import AlertSettings
from schemas.events import DefectEvent, Region
from schemas.frames import FrameRef
from schemas.scores import ScoreMessage

T0 = 1_700_000_000.0
DT = 0.1  # seconds between frames
SETTINGS = AlertSettings(k=2, n=3, quiet_s=2.0, silence_s=2.0, default_threshold=0.5, min_region_area=4)


def _map_with_blob(seq: int) -> np.ndarray:
    """(16, 16) map with a hot 4x4 square whose position depends on seq (to tell peaks apart)."""
    m = np.full((16, 16), 0.1, np.float32)
    r = seq % 12
    m[r:r + 4, 2:6] = 0.9
    return m


def make_score(seq: int, score: float, *, ts: float | None = None, camera: str = "cam-1",
               session: str | None = None, product_class: str = "screw",
               anomaly_map: np.ndarray | None = None, width: int = 64, height: int = 48) -> ScoreMessage:
    capture_ts = T0 + seq * DT if ts is None else ts
    png, lo, hi = imaging.quantize_map(_map_with_blob(seq) if anomaly_map is None else anomaly_map, 16)
    thumb = imaging.encode_jpeg(np.full((24, 32, 3), 100, np.uint8))
    return ScoreMessage(
        frame=FrameRef(camera_id=camera, line_id="line-1", product_class=product_class, seq=seq,
                       capture_ts=capture_ts, width=width, height=height, replay_session=session),
        image_score=score,
        anomaly_map_png=png,
        map_min=lo,
        map_max=hi,
        thumbnail_jpeg=thumb,
        model_fingerprint="test",
        method="winclip",
        latency_ms=5.0,
        scored_ts=capture_ts + 0.05,
    )


def feed(state: CameraState, scores: list[float], *, start: int = 0, settings: AlertSettings = SETTINGS,
         threshold: float = 0.5) -> list[Transition]:
    out: list[Transition] = []
    for i, s in enumerate(scores):
        out.extend(step(state, make_score(start + i, s), threshold, settings))
    return out


def kinds(transitions: list[Transition]) -> list[str]:
    return [t.kind for t in transitions]


# -- debouncing ---------------------------------------------------------------------------------
def test_k_of_n_opens_only_when_k_anomalous_in_last_n() -> None:
    state = CameraState("cam-1")
    # s0 is alone, s3 too (s0 left the 3-frame window); s5 makes s3+s5 two of the last three.
    assert feed(state, [0.9, 0.1, 0.1, 0.9, 0.1]) == []
    (opened,) = feed(state, [0.9], start=5)
    assert opened.kind == "open"
    ev = opened.event
    assert (ev.first_seq, ev.last_seq, ev.n_frames) == (3, 5, 2)
    assert ev.first_ts == pytest.approx(T0 + 3 * DT)
    assert ev.event_id == DefectEvent.make_id("cam-1", 3, None)


def test_threshold_is_inclusive_and_single_frame_never_opens() -> None:
    state = CameraState("cam-1")
    assert feed(state, [0.5, 0.49, 0.49, 0.49]) == []  # 0.5 counts, but alone
    assert kinds(feed(state, [0.5, 0.5], start=4)) == ["open"]


def test_first_frame_is_earliest_anomalous_in_window_and_peak_is_max() -> None:
    settings = AlertSettings(k=2, n=4, quiet_s=2.0)
    state = CameraState("cam-1")
    (opened,) = feed(state, [0.1, 0.8, 0.2, 0.95], settings=settings)
    assert (opened.event.first_seq, opened.event.peak_seq, opened.event.peak_score) == (1, 3, 0.95)
    assert opened.event.peak.threshold == 0.5


def test_peak_tie_keeps_earliest_and_window_snapshot_pruning_keeps_true_peak() -> None:
    settings = AlertSettings(k=3, n=5, quiet_s=2.0)
    state = CameraState("cam-1")
    # s1 (0.9) outranks the later s3 (0.7); s4 ties s1, the earlier one wins.
    (opened,) = feed(state, [0.1, 0.9, 0.2, 0.7, 0.9], settings=settings)
    assert (opened.event.first_seq, opened.event.peak_seq, opened.event.n_frames) == (1, 1, 3)


def test_open_event_merges_anomalous_frames_within_quiet_period() -> None:
    state = CameraState("cam-1")
    transitions = feed(state, [0.9, 0.8, 0.1, 0.1, 0.1, 0.1, 0.97, 0.1, 0.6])
    assert kinds(transitions) == ["open"]  # one event, not two
    ev = state.event
    assert ev is not None
    assert (ev.first_seq, ev.last_seq, ev.n_frames, ev.peak_seq, ev.peak_score) == (0, 8, 4, 6, 0.97)
    assert ev.last_ts == pytest.approx(T0 + 8 * DT)
    # The open transition kept the event as it was when it opened.
    assert (transitions[0].event.last_seq, transitions[0].event.n_frames) == (1, 2)


def test_quiet_period_closes_on_later_message_capture_time() -> None:
    state = CameraState("cam-1")
    feed(state, [0.9, 0.9])  # open, last anomalous at T0 + 0.1
    assert step(state, make_score(2, 0.1, ts=T0 + DT + 1.99), 0.5, SETTINGS) == []
    (closed,) = step(state, make_score(3, 0.1, ts=T0 + DT + 2.01), 0.5, SETTINGS)
    assert closed.kind == "close"
    assert (closed.event.first_seq, closed.event.last_seq, closed.event.n_frames) == (0, 1, 2)
    assert state.event is None


def test_anomalous_frame_after_long_gap_closes_old_event_before_counting() -> None:
    state = CameraState("cam-1")
    feed(state, [0.9, 0.9])
    out = step(state, make_score(2, 0.9, ts=T0 + 10.0), 0.5, SETTINGS)
    assert kinds(out) == ["close"]
    assert out[0].event.last_seq == 1
    # The frames of the closed event do not count towards a new one; two fresh ones do.
    assert kinds(step(state, make_score(3, 0.9, ts=T0 + 10.1), 0.5, SETTINGS)) == ["open"]
    assert state.event is not None and state.event.first_seq == 2


def test_claimed_frames_do_not_reopen_after_close() -> None:
    settings = AlertSettings(k=2, n=5, quiet_s=0.25)
    state = CameraState("cam-1")
    assert kinds(feed(state, [0.9, 0.9, 0.1, 0.1, 0.1], settings=settings)) == ["open", "close"]
    # s0/s1 are still inside the 5-frame window but already belonged to the closed event.
    assert feed(state, [0.9], start=5, settings=settings) == []


def test_tick_closes_idle_camera_by_wall_clock() -> None:
    state = CameraState("cam-1")
    received = 5000.0
    for i, s in enumerate([0.9, 0.9]):
        step(state, make_score(i, s), 0.5, SETTINGS, received_at=received)
    assert tick(state, received + 1.9, SETTINGS) == []
    (closed,) = tick(state, received + 2.01, SETTINGS)
    assert closed.kind == "close" and closed.event.last_seq == 1
    assert state.event is None
    assert tick(state, received + 100.0, SETTINGS) == []


def test_tick_judges_historical_replay_by_elapsed_time_not_capture_age() -> None:
    # A replay of old footage: capture times are years old, yet the event must stay open while frames flow.
    state = CameraState("cam-1", replay_session="r1")
    old = 1_000_000_000.0  # 2001
    for i in range(2):
        step(state, make_score(i, 0.9, ts=old + i * DT, session="r1"), 0.5, SETTINGS, received_at=T0)
    assert tick(state, T0 + 1.0, SETTINGS) == []
    assert kinds(tick(state, T0 + 2.01, SETTINGS)) == ["close"]


def test_a_lagging_scorer_never_splits_a_defect() -> None:
    # 60 anomalous frames at 10 fps (6 s of capture time), scored in bursts with 5 s of wall clock
    # between them (batching, a rebalance, a busy machine): one event, closed by capture time.
    settings = AlertSettings(k=2, n=3, quiet_s=2.0, silence_s=30.0, default_threshold=0.5, min_region_area=4)
    state = CameraState("cam-1")
    wall = 9000.0
    out: list[Transition] = []
    for burst in range(6):
        for i in range(10):
            seq = burst * 10 + i
            out.extend(step(state, make_score(seq, 0.9), 0.5, settings, received_at=wall))
        wall += 5.0
        out.extend(tick(state, wall, settings))  # the wall clock moved 5 s > quiet_s: still one event
    assert kinds(out) == ["open"]
    out.extend(step(state, make_score(100, 0.1), 0.5, settings, received_at=wall))  # 4 s later on capture
    assert kinds(out) == ["open", "close"] and out[1].event.last_seq == 59
    assert {t.event.event_id for t in out} == {DefectEvent.make_id("cam-1", 0)}


def test_silent_camera_is_closed_after_silence_s_of_wall_clock() -> None:
    settings = AlertSettings(k=2, n=3, quiet_s=2.0, silence_s=30.0)
    state = CameraState("cam-1")
    for i in range(2):
        step(state, make_score(i, 0.9), 0.5, settings, received_at=100.0)
    assert tick(state, 129.0, settings) == []
    assert kinds(tick(state, 130.0, settings)) == ["close"]


def test_redelivered_scores_are_ignored_and_never_reopen() -> None:
    state = CameraState("cam-1")
    first = feed(state, [0.1, 0.9, 0.9, 0.9])
    assert kinds(first) == ["open"]
    before = state.to_dict()
    assert feed(state, [0.1, 0.9, 0.9, 0.9]) == []  # the same seqs again
    assert state.to_dict() == before
    # Even after the event closed, replaying its opening frames does nothing.
    assert kinds(step(state, make_score(4, 0.1, ts=T0 + 10), 0.5, SETTINGS)) == ["close"]
    assert feed(state, [0.9, 0.9, 0.9], start=1) == []


def test_replay_session_has_its_own_state_and_event_id() -> None:
    live, replay = CameraState("cam-1"), CameraState("cam-1", replay_session="r1")
    for i in range(2):
        live_t = step(live, make_score(i, 0.9), 0.5, SETTINGS)
        replay_t = step(replay, make_score(i, 0.9, session="r1"), 0.5, SETTINGS)
    assert live_t[0].event.event_id != replay_t[0].event.event_id
    assert replay_t[0].event.event_id == DefectEvent.make_id("cam-1", 0, "r1")
    with pytest.raises(ValueError, match="fed to state"):
        step(live, make_score(5, 0.9, session="r1"), 0.5, SETTINGS)


def test_state_round_trips_through_json_and_continues_identically() -> None:
    settings = AlertSettings(k=3, n=5, quiet_s=2.0)
    state = CameraState("cam-1", replay_session="r7")
    for i, s in enumerate([0.9, 0.1, 0.8]):  # two pending anomalous frames with snapshots
        step(state, make_score(i, s, session="r7"), 0.5, settings, received_at=T0 + i)
    restored = CameraState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert restored == state
    nxt = make_score(3, 0.95, session="r7")
    a, b = step(state, nxt, 0.5, settings), step(restored, nxt, 0.5, settings)
    assert a == b and kinds(a) == ["open"]
    assert a[0].event.first_seq == 0
    # With an open event inside, the round trip still holds.
    assert CameraState.from_dict(json.loads(json.dumps(restored.to_dict()))) == restored


def test_state_from_dict_rejects_unknown_version() -> None:
    d = CameraState("cam-1").to_dict()
    d["v"] = 99
    with pytest.raises(ValueError, match="version"):
        CameraState.from_dict(d)


# -- rendering ----------------------------------------------------------------------------------
def _two_blobs() -> np.ndarray:
    m = np.zeros((40, 60), np.float32)
    m[5:15, 10:20] = 1.0   # 10 x 10 = 100 px
    m[25:30, 40:48] = 0.8  # 5 x 8 = 40 px
    return m


def test_mask_is_at_frame_resolution_and_binary() -> None:
    mask = mask_from_map(_map_with_blob(0), 0.5, width=64, height=48)
    assert mask.shape == (48, 64) and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 255}
    # The 4x4 blob at rows 0-3, cols 2-5 of a 16x16 map covers about rows 0-12, cols 8-24 of 48x64.
    ys, xs = np.nonzero(mask)
    assert ys.max() <= 13 and xs.min() >= 7 and xs.max() <= 24


def test_regions_exact_on_two_blobs() -> None:
    mask = mask_from_map(_two_blobs(), 0.5, width=60, height=40)
    assert regions_from_mask(mask, 1) == [
        Region(x=10, y=5, width=10, height=10, area=100),
        Region(x=40, y=25, width=8, height=5, area=40),
    ]


def test_min_region_area_is_honoured_inclusively() -> None:
    mask = mask_from_map(_two_blobs(), 0.5, width=60, height=40)
    assert [r.area for r in regions_from_mask(mask, 40)] == [100, 40]
    assert [r.area for r in regions_from_mask(mask, 41)] == [100]
    assert regions_from_mask(mask, 101) == []


def test_mask_threshold_selects_blobs() -> None:
    # At 0.9 only the brighter blob passes.
    mask = mask_from_map(_two_blobs(), 0.9, width=60, height=40)
    assert regions_from_mask(mask, 1) == [Region(x=10, y=5, width=10, height=10, area=100)]


def test_mask_falls_back_to_top_percent_and_is_never_empty() -> None:
    rng = np.random.default_rng(0)
    noisy = rng.random((50, 80)).astype(np.float32) * 0.3
    mask = mask_from_map(noisy, 0.5, width=80, height=50)  # nothing reaches 0.5
    frac = (mask > 0).mean()
    assert 0 < frac <= 0.011
    assert mask[np.unravel_index(np.argmax(noisy), noisy.shape)] == 255  # the hottest pixel is in
    flat = mask_from_map(np.zeros((8, 8), np.float32), 0.5, width=20, height=10)
    assert flat.shape == (10, 20) and (flat == 255).all()


def test_thumbnail_overlay_is_a_jpeg_of_the_thumbnail_size() -> None:
    thumb = imaging.encode_jpeg(np.full((24, 32, 3), 100, np.uint8))
    out = thumbnail_with_overlay(thumb, _map_with_blob(0), 0.0, 1.0)
    img = imaging.decode_image(out)
    assert img.shape == (24, 32, 3)
    assert out[:2] == b"\xff\xd8"
    # The hot corner is red-ish, the cold area blue-ish: the overlay is really there.
    assert img[1, 6, 0] > img[1, 6, 2] and img[20, 28, 2] > img[20, 28, 0]


def test_build_event_renders_peak_frame() -> None:
    state = CameraState("cam-1")
    (opened,) = feed(state, [0.7, 0.9])
    ev = build_event(opened.event, "open", min_region_area=4)
    assert ev.status == "open" and ev.event_id == DefectEvent.make_id("cam-1", 0)
    assert (ev.first_seq, ev.last_seq, ev.peak_seq, ev.n_frames) == (0, 1, 1, 2)
    assert (ev.width, ev.height, ev.threshold, ev.product_class) == (64, 48, 0.5, "screw")
    mask = imaging.decode_png(ev.mask_png)
    assert mask.shape == (48, 64)
    assert len(ev.regions) == 1
    # Peak is s1, whose blob starts at map row 1 (x3 per frame row): not s0's row 0.
    assert ev.regions[0].y >= 2
    assert imaging.decode_image(ev.thumbnail_jpeg).shape == (24, 32, 3)
    # It survives the wire format.
    assert DefectEvent.model_validate_json(ev.model_dump_json()) == ev


# -- calibration --------------------------------------------------------------------------------
def test_threshold_from_scores_quantile_and_margin() -> None:
    scores = [i / 100 for i in range(101)]  # 0.00 .. 1.00
    assert threshold_from_scores(scores, 0.99) == pytest.approx(0.99)
    assert threshold_from_scores(scores, 0.5, margin=0.05) == pytest.approx(0.55)
    assert threshold_from_scores([0.3, 0.7], 1.0) == pytest.approx(0.7)


@pytest.mark.parametrize(("scores", "quantile", "match"), [
    ([], 0.99, "at least one"),
    ([0.1], 0.0, "quantile"),
    ([0.1], 1.5, "quantile"),
    ([0.1], float("nan"), "quantile"),
    ([0.1, float("nan")], 0.9, "finite"),
])
def test_threshold_from_scores_rejects_bad_input(scores: list[float], quantile: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        threshold_from_scores(scores, quantile)
