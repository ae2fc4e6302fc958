"""WinCLIP / WinCLIP+ parity with anomalib's WinClipModel on identical synthetic weights.

No pretrained weights exist here, so parity with the public reference implementation is the
proof of correctness. The fixtures come from tests/reference/make_fixtures.py, run with anomalib
2.7 beside open_clip 2.24.0 (the last open_clip its window code is correct with).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import EngineSettings
from pipeline.engine.engine import AnomalyEngine
from pipeline.engine.weights import create_random_model, load_backbone
from tests.engine_helpers import DEFAULT, backbone

FIXTURE = Path(__file__).parent / "reference" / "fixtures" / "winclip_parity.npz"


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIXTURE, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def engine(ref: dict[str, np.ndarray]) -> AnomalyEngine:
    assert str(ref["backbone"]) == DEFAULT and int(ref["seed"]) == 0
    bb, fp = backbone(DEFAULT)
    settings = EngineSettings(method="winclip", backbone=DEFAULT, pretrained="random", precision="fp32")
    return AnomalyEngine(settings, backbone=bb, fingerprint=fp)


def test_fixture_came_from_the_right_reference(ref: dict[str, np.ndarray]) -> None:
    assert str(ref["open_clip_version"]) == "2.24.0"
    assert str(ref["anomalib_version"]).startswith("2.7")


def test_text_prototypes_match(engine: AnomalyEngine, ref: dict[str, np.ndarray]) -> None:
    ours = engine.winclip.text_prototypes(str(ref["class_name"])).numpy()
    assert np.abs(ours - ref["text_embeddings"]).max() < 1e-4


def test_embeddings_match(engine: AnomalyEngine, ref: dict[str, np.ndarray]) -> None:
    with torch.inference_mode():
        enc = engine.winclip.encode(torch.from_numpy(ref["images"]))
    assert np.abs(enc.image.numpy() - ref["image_embeddings"]).max() < 1e-4
    # Stored as float16 to keep the fixture small: compare at that precision.
    for ours, key in zip(enc.windows, ("window_embeddings_2", "window_embeddings_3"), strict=True):
        assert ours.shape == ref[key].shape
        assert np.abs(ours.numpy() - ref[key].astype(np.float32)).max() < 5e-3
    assert np.abs(enc.patches.numpy() - ref["patch_embeddings"].astype(np.float32)).max() < 5e-3


def test_zero_shot_scores_and_maps_match(engine: AnomalyEngine, ref: dict[str, np.ndarray]) -> None:
    scores, maps = engine.score_tensor(torch.from_numpy(ref["images"]), "ball screw")
    assert maps.shape == ref["zs_maps"].shape
    assert np.abs(scores.numpy() - ref["zs_scores"]).max() < 1e-4
    assert np.abs(maps.numpy() - ref["zs_maps"]).max() < 1e-3


def test_few_shot_scores_and_maps_match(ref: dict[str, np.ndarray]) -> None:
    bb, fp = backbone(DEFAULT)
    settings = EngineSettings(method="winclip", backbone=DEFAULT, pretrained="random", precision="fp32")
    engine = AnomalyEngine(settings, backbone=bb, fingerprint=fp)
    engine.set_reference_batch("ball screw", torch.from_numpy(ref["ref_images"]))
    assert engine.k_shot("ball screw") == 2
    scores, maps = engine.score_tensor(torch.from_numpy(ref["images"]), "ball screw")
    assert np.abs(scores.numpy() - ref["fs_scores"]).max() < 1e-4
    assert np.abs(maps.numpy() - ref["fs_maps"]).max() < 1e-3
    # The few-shot branch really changes the result (the test would notice it being skipped).
    assert np.abs(ref["fs_maps"] - ref["zs_maps"]).max() > 1e-3


def test_checkpoint_file_gives_the_same_parity(tmp_path: Path, ref: dict[str, np.ndarray]) -> None:
    """The same weights saved to a file and loaded through the real path reproduce the reference."""
    ckpt = tmp_path / "winclip-random.pt"
    torch.save(create_random_model(DEFAULT, seed=0).state_dict(), ckpt)
    bb, fp = load_backbone(DEFAULT, str(ckpt))
    settings = EngineSettings(method="winclip", backbone=DEFAULT, pretrained=str(ckpt), precision="fp32")
    engine = AnomalyEngine(settings, backbone=bb, fingerprint=fp)
    scores, _ = engine.score_tensor(torch.from_numpy(ref["images"][:1]), "ball screw")
    assert abs(float(scores[0]) - float(ref["zs_scores"][0])) < 1e-4
