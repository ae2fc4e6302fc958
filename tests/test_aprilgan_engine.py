"""AprilGAN through AnomalyEngine on a small random backbone: one forward, shapes, scores, memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import EngineSettings
from pipeline.engine import aprilgan as ag
from pipeline.engine.engine import AnomalyEngine
from pipeline.imaging import read_image
from tests.engine_helpers import SMALL, backbone


def make_engine(precision: str = "fp32", projections: Path | None = None) -> AnomalyEngine:
    bb, fp = backbone(SMALL)
    settings = EngineSettings(method="aprilgan", backbone=SMALL, pretrained="random", precision=precision,
                              device="cpu", projections=projections)
    return AnomalyEngine(settings, backbone=bb, fingerprint=fp)


@pytest.fixture(scope="module")
def frames(shared_data: Path) -> list[np.ndarray]:
    paths = sorted((shared_data / "test" / "pitting").glob("*.jpg"))[:2]
    return [read_image(str(p)) for p in paths]


def test_one_backbone_forward_per_frame_zero_and_few_shot(frames: list[np.ndarray]) -> None:
    engine = make_engine()
    engine.prepare("ball_screw")
    engine.set_references("ball_screw", frames[:1])
    assert engine.k_shot("ball_screw") == 1
    calls: list[int] = []
    hook = engine.backbone.blocks[0].ln_1.register_forward_hook(lambda _m, inp, _o: calls.append(inp[0].shape[0]))
    try:
        results = engine.score(frames, "ball_screw")
    finally:
        hook.remove()
    assert calls == [len(frames)]  # one batched forward, no windows, no second pass for the memory
    for frame, r in zip(frames, results, strict=True):
        assert r.frame_map().shape == frame.shape[:2] and r.anomaly_map.dtype == np.float32
        assert 0.0 <= r.image_score <= 1.0 and np.isfinite(r.anomaly_map).all()


def test_reference_frame_has_zero_memory_distance(frames: list[np.ndarray]) -> None:
    engine = make_engine()
    engine.set_references("ball_screw", frames[:1])
    memory = engine._references["ball_screw"]
    assert isinstance(memory, ag.AprilGanMemory) and memory.tokens.shape[:2] == (4, engine.backbone.n_patches)
    assert engine.aprilgan is not None
    batch = engine._prepare(frames)
    with torch.inference_mode():
        out = engine.aprilgan.grid(batch, engine._text_for("ball_screw"), memory)
    assert out.distances is not None
    assert float(out.distances[0].abs().max()) < 1e-4 < float(out.distances[1].max())
    # Few-shot maps add the memory term to the zero-shot maps.
    _, zero = make_engine().score_tensor(batch, "ball_screw")
    _, few = engine.score_tensor(batch, "ball_screw")
    assert torch.allclose(few[0], zero[0], atol=1e-4) and float((few[1] - zero[1]).min()) > 0


def test_untrained_projections_are_the_stand_in() -> None:
    engine = make_engine()
    assert engine.aprilgan is not None
    p = engine.aprilgan.projections
    assert not p.trained and p.stages == (3, 6, 9, 12)
    assert torch.equal(p.weight[0], torch.eye(engine.backbone.width))  # ViT-S-32: width == embed dim


def test_streaming_score_definition() -> None:
    text = torch.tensor([0.2, 0.9])
    assert torch.allclose(ag.streaming_score(text, torch.tensor([2.0, 8.0]), 4.0), torch.tensor([0.35, 0.95]))
    assert ag.map_ceiling(4, few_shot=False) == 4.0 and ag.map_ceiling(4, few_shot=True) == 12.0
    with pytest.raises(ValueError, match="undefined"):
        ag.set_normalised_score(text, torch.tensor([1.0, 1.0]))


def test_bf16_image_tower_stays_close(frames: list[np.ndarray]) -> None:
    exact, fast = make_engine(), make_engine("bf16")
    assert fast.aprilgan is not None and fast.aprilgan.image_backbone.dtype == torch.bfloat16
    for e, f in zip(exact.score(frames, "ball_screw"), fast.score(frames, "ball_screw"), strict=True):
        assert abs(e.image_score - f.image_score) < 0.05
        assert np.corrcoef(e.anomaly_map.ravel(), f.anomaly_map.ravel())[0, 1] > 0.95


def test_bad_projection_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="projections file not found"):
        make_engine(projections=tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ag.ProjectionsError, match="not a readable"):
        make_engine(projections=garbage)
    empty = tmp_path / "empty.pt"
    torch.save({"something": torch.zeros(1)}, empty)
    with pytest.raises(ag.ProjectionsError, match="no projection weights"):
        make_engine(projections=empty)
