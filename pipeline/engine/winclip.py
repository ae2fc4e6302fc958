"""WinCLIP (zero-shot) and WinCLIP+ (few-normal-shot) on a `ClipBackbone`.

Plain torch, no framework: text prototypes and reference memories are passed in, so the model
itself holds only the backbone and the window geometry.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from pipeline.engine.backbone import ClipBackbone
from pipeline.engine.prompting import compositional_prompts
from pipeline.engine.scoring import (
    coverage_matrix,
    harmonic_aggregation,
    harmonic_fusion,
    nearest_reference_distance,
    two_class_score,
    window_masks,
)

TEMPERATURE = 0.07  # anomalib's value (CLIP's initial temperature); parity depends on it


@dataclass(frozen=True)
class WindowEncoding:
    """image: (B, D); windows: per scale (B, W_s, D); patches: (B, P, C)."""

    image: torch.Tensor
    windows: list[torch.Tensor]
    patches: torch.Tensor


@dataclass(frozen=True)
class ReferenceMemory:
    """WinCLIP+ memories of k normal images: patches (k*P, C); windows per scale (k*W_s, D)."""

    patches: torch.Tensor
    windows: list[torch.Tensor]
    k_shot: int


class WinClip:
    def __init__(self, backbone: ClipBackbone, scales: tuple[int, ...] = (2, 3),
                 temperature: float = TEMPERATURE, window_dtype: torch.dtype | None = None,
                 image_backbone: ClipBackbone | None = None) -> None:
        self.backbone = backbone
        # Image forwards may run on a lower-precision copy of the image tower (fast mode).
        self.image_backbone = image_backbone or backbone
        self.scales = scales
        self.temperature = temperature
        # Window stage precision: a lower-precision autocast here is the "fast" mode.
        self.window_dtype = window_dtype
        self.masks = [window_masks(backbone.grid_size, k).to(backbone.device) for k in scales]
        self.coverage = [coverage_matrix(m.cpu(), backbone.n_patches).to(backbone.device) for m in self.masks]

    # -- text --------------------------------------------------------------------------------
    def text_prototypes(self, object_name: str) -> torch.Tensor:
        """(2, D): mean of the raw normal and anomalous prompt embeddings (not normalised first)."""
        normal, anomalous = compositional_prompts(object_name)
        emb = self.backbone.encode_text(normal + anomalous)
        return torch.stack((emb[: len(normal)].mean(0), emb[len(normal) :].mean(0)))

    # -- image -------------------------------------------------------------------------------
    def _window_context(self) -> object:
        if self.window_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.backbone.device.type, dtype=self.window_dtype)

    def encode(self, images: torch.Tensor) -> WindowEncoding:
        """(B, 3, H, W) normalised images -> image, window and patch embeddings."""
        tokens = self.image_backbone.encode(images.to(self.image_backbone.dtype))
        with self._window_context():
            windows = [self.image_backbone.encode_windows(tokens.embeds, m).float() for m in self.masks]
        return WindowEncoding(image=tokens.pooled.float(), windows=windows, patches=tokens.patches.float())

    def reference_memory(self, images: torch.Tensor) -> ReferenceMemory:
        enc = self.encode(images)
        return ReferenceMemory(
            patches=enc.patches.reshape(-1, enc.patches.shape[-1]),
            windows=[w.reshape(-1, w.shape[-1]) for w in enc.windows],
            k_shot=images.shape[0],
        )

    # -- scoring -----------------------------------------------------------------------------
    def zero_shot(self, enc: WindowEncoding, prototypes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns image scores (B,) and the fused patch map (B, P)."""
        normal, anomalous = prototypes[0], prototypes[1]
        image_scores = two_class_score(enc.image, normal, anomalous, self.temperature)
        maps = [image_scores[:, None].expand(-1, self.backbone.n_patches)]
        for windows, cover in zip(enc.windows, self.coverage, strict=True):
            maps.append(harmonic_aggregation(two_class_score(windows, normal, anomalous, self.temperature), cover))
        return image_scores, harmonic_fusion(maps)

    def few_shot(self, enc: WindowEncoding, memory: ReferenceMemory) -> torch.Tensor:
        """Vision-only map (B, P): arithmetic mean of patch and per-scale window association maps."""
        maps = [nearest_reference_distance(enc.patches, memory.patches)]
        for windows, mem, cover in zip(enc.windows, memory.windows, self.coverage, strict=True):
            maps.append(harmonic_aggregation(nearest_reference_distance(windows, mem), cover))
        return torch.stack(maps).mean(0)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, prototypes: torch.Tensor,
                 memory: ReferenceMemory | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (B,) and patch-grid maps (B, gh, gw)."""
        enc = self.encode(images)
        scores, grid = self.zero_shot(enc, prototypes)
        if memory is not None:
            few = self.few_shot(enc, memory)
            grid = (grid + few) / 2
            scores = (scores + few.amax(dim=-1)) / 2
        return scores, grid.reshape(-1, *self.backbone.grid_size)
