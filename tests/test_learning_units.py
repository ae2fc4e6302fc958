"""Coreset, reference set versions, camera tuning and ignore regions (real Redis, no broker)."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from pipeline import imaging
from pipeline.alerting.stage import AlertStage
from pipeline.alerting.state_store import CameraStateStore
from pipeline.camera_tuning import CameraTuningStore, apply_ignore, effective, ignore_mask
from pipeline.config import AlertSettings, CameraConfig, RedisSettings
from pipeline.redis_store import ThresholdStore
from pipeline.references.coreset import greedy_coreset, subsample_memory
from pipeline.references.store import ReferenceStore
from pipeline.references.sync import ReferenceSync
from schemas.frames import FrameRef
from schemas.scores import ScoreMessage

T0 = 1_767_225_600.0


def test_coreset_is_bounded_and_covers_every_cluster() -> None:
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((6, 32)) * 10
    points = np.concatenate([c + rng.standard_normal((500, 32)) * 0.01 for c in centres]).astype(np.float32)
    idx = greedy_coreset(points, 6)
    assert len(idx) == 6 and len(set(idx.tolist())) == 6
    assert {int(i) // 500 for i in idx} == set(range(6))  # one pick per cluster: it covers them all
    assert greedy_coreset(points[:4], 10).tolist() == [0, 1, 2, 3]
    bounded = subsample_memory({"patches": points, "windows_0": points[:100]}, 64)
    assert bounded["patches"].shape == (64, 32) and bounded["windows_0"].shape == (64, 32)
    with pytest.raises(ValueError, match="positive"):
        greedy_coreset(points, 0)


def test_reference_versions_add_remove_and_poll(redis_client: redis.Redis, redis_settings: RedisSettings) -> None:
    refs = ReferenceStore(redis_client, redis_settings.key_prefix)
    sync = ReferenceSync(refs, max_patches=100, poll_s=0.0)
    assert sync.changed() == set()
    v1 = refs.create("bolt", [b"a", b"b"], source="test")
    v2 = refs.create("bolt", [b"b", b"c"], source="false_alarm:e1", parent=v1, by="ops")
    assert (v1.tag, v2.tag) == ("bolt:v1", "bolt:v2")
    assert v2.added == [v2.images[2]] and len(v2.images) == 3 and v2.parent == 1
    assert refs.images(v2) == [b"a", b"b", b"c"]
    assert sync.changed() == {"bolt"} and sync.changed() == set()
    assert refs.current_versions() == {"bolt": 2} and refs.classes() == ["bolt"]
    now = refs.remove("bolt", 2)
    assert now is not None and now.version == 1 and refs.images(now) == [b"a", b"b"]
    assert sync.changed() == {"bolt"}
    assert refs.remove("bolt", 1) is None and refs.current_versions() == {}
    with pytest.raises(KeyError):
        refs.remove("bolt", 1)
    with pytest.raises(ValueError, match="at least one image"):
        refs.create("bolt", [], source="test")


def _score(camera: str, seq: int, score: float, amap: np.ndarray) -> ScoreMessage:
    png, lo, hi = imaging.quantize_map(amap, 16)
    return ScoreMessage(frame=FrameRef(camera_id=camera, line_id="l", product_class="screw", seq=seq,
                                       capture_ts=T0 + seq, width=64, height=48),
                        image_score=score, anomaly_map_png=png, map_min=lo, map_max=hi,
                        thumbnail_jpeg=imaging.encode_jpeg(np.full((24, 32, 3), 90, np.uint8)),
                        model_fingerprint="test", method="winclip", latency_ms=1.0, scored_ts=T0 + seq)


def _hot_corner() -> np.ndarray:
    amap = np.full((16, 16), 0.1, np.float32)
    amap[:4, :4] = 0.9  # a hot top-left corner, as a fixture's reflection would be
    return amap


def test_ignore_region_zeroes_the_map_and_caps_the_score() -> None:
    score = _score("cam-1", 1, 0.9, _hot_corner())
    out = apply_ignore(score, [[(0.0, 0.0), (0.3, 0.0), (0.3, 0.3), (0.0, 0.3)]])
    amap = imaging.dequantize_map(out.anomaly_map_png, out.map_min, out.map_max)
    assert amap[:4, :4].max() == pytest.approx(0.0, abs=1e-6) and amap[8:, 8:].min() == pytest.approx(0.1, abs=0.01)
    assert out.image_score == pytest.approx(0.1, abs=0.01)
    assert apply_ignore(score, []) is score
    assert ignore_mask([[(0.5, 0.5), (1.0, 0.5), (1.0, 1.0)]], 10, 10)[9, 9]


def test_camera_tuning_overrides_configuration(redis_client: redis.Redis, redis_settings: RedisSettings) -> None:
    cam = CameraConfig(id="cam-1", product_class="screw", source="x", threshold=0.4,
                       ignore_regions=[[(0, 0), (0.5, 0), (0.5, 0.5)]])
    store = CameraTuningStore(redis_client, redis_settings.key_prefix)
    assert effective(cam, store.get("cam-1")) == (0.4, [[(0, 0), (0.5, 0), (0.5, 0.5)]])
    store.update("cam-1", threshold=0.7, by="lead")
    store.update("cam-1", ignore_regions=[])
    assert effective(cam, store.get("cam-1")) == (0.7, [])
    assert store.get("cam-1").by == "lead"
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        store.update("cam-1", ignore_regions=[[(0, 0), (2, 0), (0, 1)]])
    with pytest.raises(ValueError, match="at least 3"):
        store.update("cam-1", ignore_regions=[[(0, 0), (1, 1)]])


def test_alert_stage_applies_camera_threshold_and_ignore_regions_live(redis_client: redis.Redis,
                                                                      redis_settings: RedisSettings) -> None:
    prefix = redis_settings.key_prefix
    tuning = CameraTuningStore(redis_client, prefix)
    stage = AlertStage(AlertSettings(k=1, n=1, quiet_s=100, default_threshold=0.5, min_region_area=0),
                       ThresholdStore(redis_client, prefix), CameraStateStore(redis_client, prefix),
                       cameras=[CameraConfig(id="cam-2", product_class="screw", source="x", threshold=0.95)],
                       tuning=tuning)
    hot = _hot_corner()
    # cam-1 opens at the class default; cam-2's configured threshold keeps it quiet.
    assert [e.camera_id for e in stage.process([_score("cam-1", 1, 0.9, hot), _score("cam-2", 1, 0.9, hot)])] \
        == ["cam-1"]
    tuning.update("cam-3", ignore_regions=[[(0, 0), (0.3, 0), (0.3, 0.3), (0, 0.3)]])
    assert stage.process([_score("cam-3", 1, 0.9, hot)]) == []  # its only hot spot is ignored
    tuning.update("cam-2", threshold=0.6)  # lowered live, from the next batch on
    opened = stage.process([_score("cam-2", 2, 0.9, hot)])
    assert len(opened) == 1 and opened[0].threshold == pytest.approx(0.6)


def test_reference_features_round_trip_for_both_methods() -> None:
    """Memory as arrays (what Redis keeps) installs the same memory as set_references, for WinCLIP and ALFA."""
    from tests.streaming_helpers import small_engine

    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 255, (64, 96, 3), dtype=np.uint8) for _ in range(3)]
    for method in ("winclip", "alfa"):
        engine = small_engine(method)
        engine.set_references("c", frames[:2])
        direct = [r.image_score for r in engine.score(frames, "c")]
        arrays = engine.reference_features(frames[:2], chunk=1)
        assert arrays["patches"].shape[0] == 2 * engine.backbone.n_patches
        engine.set_reference_features("c", subsample_memory(arrays, 10_000), k_shot=2)
        via_arrays = [r.image_score for r in engine.score(frames, "c")]
        assert via_arrays == pytest.approx(direct, abs=1e-5), method
        assert engine.prompt_version("c")
        engine.clear_references("c")
        assert engine.k_shot("c") == 0


def test_reference_sync_keeps_memory_and_retries_when_redis_fails() -> None:
    from pipeline.redis_store import connect

    dead = connect(RedisSettings(url="redis://127.0.0.1:1/0", socket_timeout_s=0.2))
    sync = ReferenceSync(ReferenceStore(dead, "x"), max_patches=10, poll_s=0.0)
    assert sync.changed() == set()  # unreachable: nothing changes, nothing raises
    sync._table = {"bolt": 3}  # as if polled before Redis went away
    assert sync.load(None, "bolt") is None  # type: ignore[arg-type]  # nothing was installed: nothing kept
    assert "bolt" in sync._retry
