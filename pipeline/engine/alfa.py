"""ALFA-style training-free scoring: contextual prompt weighting and a fine-grained aligner.

Reference design from ../shared/papers/methods.md section 3.3 (the paper's equations are not
public): per-image top-K prompt weighting with an ambiguity penalty, and patch tokens of several
layers projected into the joint space along the class token's path, with value-value attention in
the last block for locality. One backbone forward per frame, no windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from pipeline.engine.alfa_prompts import PromptSet
from pipeline.engine.backbone import ClipBackbone
from pipeline.engine.scoring import nearest_reference_distance, two_class_score


@dataclass(frozen=True)
class PromptPools:
    """L2-normalised prompt embeddings (M_n, D), (M_a, D) and their ambiguity penalties (M_n,), (M_a,)."""

    normal: torch.Tensor
    abnormal: torch.Tensor
    amb_normal: torch.Tensor
    amb_abnormal: torch.Tensor


def filter_pool(emb: torch.Tensor, dedupe: float) -> torch.Tensor:
    """Indices of prompts kept after greedy near-duplicate removal (cosine > dedupe). emb: (M, D) normed."""
    keep: list[int] = []
    for i in range(emb.shape[0]):
        if not keep or float((emb[keep] @ emb[i]).max()) <= dedupe:
            keep.append(i)
    return torch.tensor(keep, dtype=torch.long)


def build_pools(normal: torch.Tensor, abnormal: torch.Tensor, dedupe: float = 0.95) -> PromptPools:
    """Raw text embeddings -> filtered, balanced, normalised pools with ambiguity penalties.

    Drops near duplicates, then prompts closer to the opposite pool's mean than to their own
    (cross-semantic ambiguity), then truncates the larger pool so neither wins by count.
    """
    n, a = F.normalize(normal.float(), dim=-1), F.normalize(abnormal.float(), dim=-1)
    n, a = n[filter_pool(n, dedupe)], a[filter_pool(a, dedupe)]
    mean_n, mean_a = F.normalize(n.mean(0), dim=0), F.normalize(a.mean(0), dim=0)
    n_ok, a_ok = (n @ mean_n) >= (n @ mean_a), (a @ mean_a) >= (a @ mean_n)
    # Never empty a pool: with weak weights everything can look ambiguous.
    n = n[n_ok] if int(n_ok.sum()) >= 2 else n
    a = a[a_ok] if int(a_ok.sum()) >= 2 else a
    m = min(n.shape[0], a.shape[0])
    n, a = n[:m], a[:m]
    return PromptPools(n, a, (n @ a.T).amax(1), (a @ n.T).amax(1))


def contextual_prototypes(image: torch.Tensor, pools: PromptPools, top_k: int = 10, lam: float = 0.5,
                          tau_c: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image adapted prototypes. image: (B, D) -> normal (B, D), abnormal (B, D), both normalised."""
    v = F.normalize(image.float(), dim=-1)

    def adapt(pool: torch.Tensor, amb: torch.Tensor) -> torch.Tensor:
        c = v @ pool.T - lam * amb  # (B, M)
        k = min(top_k, pool.shape[0])
        top, idx = c.topk(k, dim=-1)
        w = (top / tau_c).softmax(dim=-1)  # (B, k)
        return F.normalize((w.unsqueeze(-1) * pool[idx]).sum(1), dim=-1)

    return adapt(pools.normal, pools.amb_normal), adapt(pools.abnormal, pools.amb_abnormal)


@dataclass(frozen=True)
class AlfaParams:
    top_k: int = 10
    lam: float = 0.5
    tau: float = 0.01
    tau_c: float = 0.01
    alpha: float = 0.5  # image score = alpha * global + (1 - alpha) * max of the local map
    value_attention: bool = True
    layers: tuple[int, ...] | None = None  # default: n/2, 3n/4, n


class Alfa:
    def __init__(self, backbone: ClipBackbone, params: AlfaParams | None = None,
                 image_backbone: ClipBackbone | None = None) -> None:
        self.backbone = backbone
        # Image forwards may run on a lower-precision copy of the image tower (``precision: bf16``).
        self.image_backbone = image_backbone or backbone
        self.params = params or AlfaParams()
        n = backbone.n_layers
        self.layers = self.params.layers or (n // 2, (3 * n) // 4, n)
        if any(not 1 <= layer <= n for layer in self.layers):
            raise ValueError(f"ALFA layers {self.layers} outside 1..{n}")

    def text_pools(self, prompts: PromptSet) -> PromptPools:
        emb = self.backbone.encode_text(list(prompts.normal) + list(prompts.abnormal))
        return build_pools(emb[: len(prompts.normal)], emb[len(prompts.normal) :])

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """One forward: image embedding (B, D), projected patch tokens per layer [(B, P, D)],
        final patch tokens (B, P, C) (for the optional reference memory)."""
        bb = self.image_backbone
        x = bb.visual.ln_pre(bb.visual.patch_dropout(bb.embed(images.to(bb.dtype))))
        inner = tuple(layer for layer in self.layers if layer < bb.n_layers)
        x, taken = bb.run_blocks(x, stop=bb.n_layers - 1, collect=inner)
        final, _ = bb.run_blocks(x, start=bb.n_layers - 1)
        pooled, patches = bb.pool(final)
        local = [bb.project_patches(taken[layer][:, 1:]) for layer in inner]
        if bb.n_layers in self.layers:
            last = bb.last_block_value_attention(x) if self.params.value_attention else final
            local.append(bb.project_patches(last[:, 1:]))
        return pooled.float(), [t.float() for t in local], patches.float()

    def reference_memory(self, images: torch.Tensor) -> torch.Tensor:
        """(k, 3, H, W) normal images -> (k*P, C) patch memory."""
        _, _, patches = self.encode(images)
        return patches.reshape(-1, patches.shape[-1])

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, pools: PromptPools,
                 memory: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Image scores (B,) and patch-grid maps (B, gh, gw), unsmoothed."""
        p = self.params
        image, local, patches = self.encode(images)
        t_n, t_a = contextual_prototypes(image, pools, p.top_k, p.lam, p.tau_c)
        global_score = two_class_score(image, t_n, t_a, p.tau)
        maps = torch.stack([two_class_score(u, t_n[:, None], t_a[:, None], p.tau) for u in local]).mean(0)
        if memory is not None:
            maps = (maps + nearest_reference_distance(patches, memory)) / 2
        scores = p.alpha * global_score + (1 - p.alpha) * maps.amax(dim=-1)
        return scores, maps.reshape(-1, *self.backbone.grid_size)
