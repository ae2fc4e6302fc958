"""AnomalyEngine behaviour on a small random backbone: shapes, determinism, few-shot, caching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import EngineSettings
from pipeline.engine.engine import AnomalyEngine
from pipeline.engine.precision import FP32, resolve_precision
from pipeline.engine.prompt_cache import MemoryCache, decode_bundle, encode_bundle
from pipeline.imaging import read_image
from tests.engine_helpers import SMALL, backbone


def make_engine(method: str = "winclip", cache: MemoryCache | None = None) -> AnomalyEngine:
    bb, fp = backbone(SMALL)
    settings = EngineSettings(method=method, backbone=SMALL, pretrained="random", precision="fp32")
    return AnomalyEngine(settings, cache=cache, backbone=bb, fingerprint=fp)


@pytest.fixture(scope="module")
def frames(shared_data: Path) -> list[np.ndarray]:
    paths = sorted((shared_data / "test" / "pitting").glob("*.jpg"))[:2]
    return [read_image(str(p)) for p in paths]


def test_maps_come_back_at_model_resolution_for_each_frame_size(frames: list[np.ndarray]) -> None:
    engine = make_engine()
    gray = frames[0].mean(axis=2).astype(np.uint8)[:300, :500]
    single = frames[1][:200, :200, :1]
    rgba = np.dstack([frames[1][:123, :321], np.full((123, 321), 255, np.uint8)])
    inputs = [frames[0], gray, single, rgba]
    results = engine.score(inputs, "ball_screw")
    assert [r.frame_size for r in results] == [f.shape[:2] for f in inputs]
    assert {r.anomaly_map.shape for r in results} == {engine.input_size}
    assert [r.frame_map().shape for r in results] == [f.shape[:2] for f in inputs]
    for r in results:
        assert r.anomaly_map.dtype == np.float32
        assert 0.0 <= r.image_score <= 1.0
        assert np.isfinite(r.anomaly_map).all()


def test_scores_are_deterministic_and_batch_independent(frames: list[np.ndarray]) -> None:
    engine = make_engine()
    a = engine.score(frames, "ball_screw")
    b = engine.score(frames, "ball_screw")
    singles = [engine.score([f], "ball_screw")[0] for f in frames]
    for x, y, s in zip(a, b, singles, strict=True):
        assert x.image_score == y.image_score
        assert np.array_equal(x.anomaly_map, y.anomaly_map)
        assert abs(x.image_score - s.image_score) < 1e-5
        assert np.abs(x.anomaly_map - s.anomaly_map).max() < 1e-4


def test_bad_frames_raise_clear_errors() -> None:
    engine = make_engine()
    with pytest.raises(ValueError, match="dtype"):
        engine.score([np.zeros((10, 10, 3), np.float32)], "x")
    with pytest.raises(ValueError, match="shape"):
        engine.score([np.zeros((10, 10, 2), np.uint8)], "x")
    assert engine.score([], "x") == []


def test_few_shot_reference_matches_itself(frames: list[np.ndarray], shared_data: Path) -> None:
    """A frame that is one of the references has zero visual distance everywhere (WinCLIP+)."""
    engine = make_engine()
    zero_shot = engine.score(frames[:1], "ball_screw")[0]
    engine.set_references("ball_screw", frames[:1])
    assert engine.k_shot("ball_screw") == 1
    batch = engine._prepare(frames[:1])
    with torch.inference_mode():
        enc = engine.winclip.encode(batch)
        few = engine.winclip.few_shot(enc, engine._references["ball_screw"])
    assert float(few.abs().max()) < 1e-4
    few_shot = engine.score(frames[:1], "ball_screw")[0]
    assert few_shot.image_score != zero_shot.image_score
    # Loading from a folder takes the first k images by name.
    assert engine.load_references("ball_screw", shared_data / "train" / "good", k_shot=2) == 2
    assert engine.k_shot("ball_screw") == 2


def test_missing_reference_folder_is_an_error(tmp_path: Path) -> None:
    engine = make_engine()
    with pytest.raises(FileNotFoundError, match="no images"):
        engine.load_references("ball_screw", tmp_path)


@pytest.mark.parametrize("method", ["winclip", "alfa"])
def test_text_embeddings_computed_once_per_cache(method: str) -> None:
    cache = MemoryCache()
    first = make_engine(method, cache)
    first.prepare("ball_screw")
    assert cache.misses == 1
    second = make_engine(method, cache)
    calls = []
    original = second.backbone.encode_text
    second.backbone.encode_text = lambda *a, **k: calls.append(1) or original(*a, **k)  # type: ignore[method-assign]
    try:
        second.prepare("ball_screw")
    finally:
        second.backbone.encode_text = original  # type: ignore[method-assign]
    assert calls == [] and cache.hits == 1
    second.prepare("metal_nut")
    assert cache.misses == 2


def test_bundles_round_trip_exactly() -> None:
    bundle = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], dtype=np.int64)}
    out = decode_bundle(encode_bundle(bundle))
    for k, v in bundle.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape and np.array_equal(out[k], v)
    with pytest.raises(ValueError):
        decode_bundle(b"garbage")


def test_winclip_runs_windows_and_alfa_a_single_forward(frames: list[np.ndarray]) -> None:
    calls: dict[str, list[int]] = {"winclip": [], "alfa": []}
    for method in calls:
        engine = make_engine(method)
        engine.prepare("ball_screw")
        hook = engine.backbone.blocks[0].ln_1.register_forward_hook(
            lambda _m, inp, _o, m=method: calls[m].append(inp[0].shape[1]))
        try:
            engine.score(frames, "ball_screw")
        finally:
            hook.remove()
    n = make_engine().backbone.n_patches
    assert calls["alfa"] == [1 + n]
    assert calls["winclip"] == [1 + n, 1 + 4, 1 + 9]


def test_precision_modes() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu, "winclip") is FP32
    assert resolve_precision("auto", cpu, "alfa") is FP32
    assert resolve_precision("bf16", cpu, "winclip").image_dtype == torch.bfloat16
    assert resolve_precision("fp16", cpu, "winclip").window_dtype == torch.float16
    assert resolve_precision("fp16", torch.device("cuda"), "alfa").model_dtype == torch.float16
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("int4", cpu, "winclip")


@pytest.mark.parametrize("method", ["winclip", "alfa"])
def test_bf16_image_tower_is_a_cast_copy_close_to_exact(method: str, frames: list[np.ndarray]) -> None:
    from scipy.stats import spearmanr

    bb, fp = backbone(SMALL)
    exact = make_engine(method)
    fast = AnomalyEngine(EngineSettings(method=method, backbone=SMALL, pretrained="random", precision="bf16"),
                         backbone=bb, fingerprint=fp)
    assert fast.precision.name == "bf16-image"
    tower = fast.winclip.image_backbone if method == "winclip" else fast.alfa.image_backbone
    # A copy: the shared backbone (text tower, exact mode) keeps its fp32 weights.
    assert tower is not bb and tower.dtype == torch.bfloat16 and bb.dtype == torch.float32
    calls: list[torch.dtype] = []
    hook = tower.blocks[0].ln_1.register_forward_hook(lambda _m, inp, _o: calls.append(inp[0].dtype))
    try:
        got = fast.score(frames, "ball_screw")
    finally:
        hook.remove()
    assert calls and set(calls) == {torch.bfloat16}
    want = exact.score(frames, "ball_screw")
    for g, w in zip(got, want, strict=True):
        assert g.anomaly_map.dtype == np.float32 and g.anomaly_map.shape == w.anomaly_map.shape
        assert abs(g.image_score - w.image_score) < 0.02
        assert spearmanr(g.anomaly_map.ravel()[::13], w.anomaly_map.ravel()[::13]).statistic > 0.98
