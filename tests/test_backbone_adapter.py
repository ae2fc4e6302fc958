"""The adapter is the only place that touches open_clip internals; these guard it."""

from __future__ import annotations

import pytest
import torch

from pipeline.engine.backbone import BackboneError
from pipeline.engine.scoring import window_masks
from tests.engine_helpers import DEFAULT, SMALL, backbone


@pytest.mark.parametrize("name", [SMALL, DEFAULT])
def test_adapter_matches_public_encode_image(name: str) -> None:
    bb, _ = backbone(name)
    images = torch.randn(2, 3, *bb.image_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        public_pooled, _tokens = bb.model.encode_image(images) if bb.visual.output_tokens else (
            bb.model.encode_image(images), None)
        ours = bb.encode(images)
    assert ours.pooled.shape == (2, bb.embed_dim)
    assert ours.patches.shape == (2, bb.n_patches, bb.width)
    assert ours.embeds.shape == (2, 1 + bb.n_patches, bb.width)
    assert torch.allclose(ours.pooled, public_pooled, atol=1e-5)


@pytest.mark.parametrize("name", [SMALL, DEFAULT])
def test_full_grid_window_reproduces_image_embedding(name: str) -> None:
    bb, _ = backbone(name)
    images = torch.randn(2, 3, *bb.image_size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        tokens = bb.encode(images)
        full = torch.arange(bb.n_patches).unsqueeze(1)
        window = bb.encode_windows(tokens.embeds, full)[:, 0]
    assert float((window - tokens.pooled).abs().max()) < 1e-4


def test_window_shapes_default_backbone() -> None:
    bb, _ = backbone(DEFAULT)
    assert bb.grid_size == (15, 15)
    images = torch.randn(1, 3, 240, 240)
    with torch.inference_mode():
        tokens = bb.encode(images)
        w2 = bb.encode_windows(tokens.embeds, window_masks(bb.grid_size, 2))
        w3 = bb.encode_windows(tokens.embeds, window_masks(bb.grid_size, 3))
    assert w2.shape == (1, 196, 640) and w3.shape == (1, 169, 640)
    assert tokens.patches.shape == (1, 225, 896)


def test_wrong_sequence_layout_is_caught_by_the_self_check() -> None:
    """The failure anomalib hit silently (sequence-first vs batch-first) must raise here."""
    bb, _ = backbone(SMALL)
    assert bb._standard  # blocks computed by the adapter itself
    bb._standard, bb.batch_first = False, False  # open_clip's own blocks, fed the wrong layout
    try:
        with pytest.raises(BackboneError, match="disagrees"):
            bb.self_check()
        bb.batch_first = True  # the right layout through open_clip's own blocks agrees
        assert bb.self_check() < 1e-4
    finally:
        bb._standard, bb.batch_first = True, True
    assert bb.self_check() < 1e-4


def test_trimmed_text_encoding_equals_open_clip() -> None:
    bb, _ = backbone(SMALL)
    prompts = ["a photo of a flawless ball screw.", "a photo of the ball screw with damage.",
               "a photo of a flawless ball screw."]
    with torch.inference_mode():
        ours = bb.encode_text(prompts)
        public = bb.model.encode_text(bb.tokenize(prompts))
    assert ours.shape == (3, bb.embed_dim)
    assert torch.allclose(ours, public, atol=1e-5)


def test_value_attention_block_shapes() -> None:
    bb, _ = backbone(SMALL)
    x = torch.randn(2, 1 + bb.n_patches, bb.width)
    with torch.inference_mode():
        out = bb.last_block_value_attention(x)
        vanilla, _ = bb.run_blocks(x, start=bb.n_layers - 1)
    assert out.shape == x.shape
    assert not torch.allclose(out, vanilla)
