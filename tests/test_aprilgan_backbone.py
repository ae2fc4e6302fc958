"""The adapter's intermediate-token accessor (AprilGAN's stages) against open_clip's public API."""

from __future__ import annotations

import pytest
import torch

from pipeline.engine.aprilgan import default_stages
from tests.engine_helpers import DEFAULT, SMALL, backbone


@pytest.mark.parametrize("name", [SMALL, DEFAULT])
def test_stage_tokens_match_forward_intermediates(name: str) -> None:
    bb, _ = backbone(name)
    stages = default_stages(bb.n_layers)
    images = torch.randn(2, 3, *bb.image_size, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        pooled, tokens = bb.stage_tokens(images, stages)
        public = bb.visual.forward_intermediates(images, indices=[s - 1 for s in stages],
                                                 normalize_intermediates=False, output_fmt="NLC")
        encoded = bb.model.encode_image(images)
    assert len(tokens) == len(stages) == len(public["image_intermediates"])
    for ours, theirs in zip(tokens, public["image_intermediates"], strict=True):
        assert ours.shape == (2, bb.n_patches, bb.width)
        assert float((ours - theirs).abs().max()) < 1e-4
    assert float((pooled - encoded).abs().max()) < 1e-4
    # Different stages really are different layers (an index offset would show up above).
    assert float((tokens[0] - tokens[-1]).abs().max()) > 1e-2


def test_stage_tokens_reject_layers_outside_the_tower() -> None:
    bb, _ = backbone(SMALL)
    with pytest.raises(ValueError, match="outside"):
        bb.stage_tokens(torch.zeros(1, 3, *bb.image_size), (0, bb.n_layers))
    with pytest.raises(ValueError, match="outside"):
        bb.stage_tokens(torch.zeros(1, 3, *bb.image_size), (bb.n_layers + 1,))


def test_default_stages() -> None:
    assert default_stages(24) == (6, 12, 18, 24)
    assert default_stages(12) == (3, 6, 9, 12)
