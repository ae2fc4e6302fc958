"""AprilGAN (Chen, Han, Zhang, VAND 2023): multi-stage patch alignment with learned projections.

Specification with provenance: ../shared/papers/aprilgan.md; parity with the authors' code
(ByChelsea/VAND-APRIL-GAN) on synthetic weights: tests/test_aprilgan_parity.py.

Per frame, ONE backbone forward gives the pooled embedding and the raw residual stream of S
intermediate blocks (default: n/4, n/2, 3n/4, n; blocks 6/12/18/24 of ViT-L). Each stage's patch
tokens go through their own linear projection into the joint space, are L2-normalised and compared
with the compositional prompt ensemble's normal/abnormal text features (logits = 100 x cosine);
the logits are upsampled (bilinear, align_corners=True) and THEN softmaxed, and the S abnormal
probability maps are summed (range [0, S]; no smoothing, as the reference). Few-shot adds, per
stage, the nearest-neighbour distance (1 - cos) of each raw patch token to a memory of the raw
patch tokens of the class's normal references, upsampled and summed (range [0, 2S]).

Maps are computed at the patch grid; the one upsampling to the model's input resolution is
`maps_at_resolution` (the reference's order of operations needs it before the softmax).

Two decisions where the reference does not fit a stream (README, "The anomaly engine"):
- Fixed logit scale 100 (``LOGIT_SCALE``), as the reference, not the model's own ``logit_scale``:
  the projections are trained against it, so it is part of the checkpoint's meaning.
- Image score. The reference's zero-shot score is the text score alone, and its few-shot score
  min-max-normalises the map maxima over the whole test set of a class (transductive; kept only as
  `set_normalised_score` for the parity test). A stream scores one frame at a time, so here every
  frame gets ``0.5 * (text score + map max / ceiling)``, the ceiling being the map's largest
  possible value (S zero-shot, 3S few-shot): per frame, in [0, 1], monotone in both terms.
  Operating points come from per-class calibration (``linewatch calibrate``), which is where the
  reference's per-class normalisation effectively lived.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F

from pipeline.engine.aprilgan_prompts import ABNORMAL_STATES, NORMAL_STATES, TEMPLATES, ensemble_prompts
from pipeline.engine.backbone import ClipBackbone
from pipeline.logging import get_logger

log = get_logger(__name__)

LOGIT_SCALE = 100.0
CHECKPOINT_FORMAT = "linewatch-aprilgan-projections"
CHECKPOINT_VERSION = 1
PROMPT_DATA = (NORMAL_STATES, ABNORMAL_STATES, TEMPLATES)


class ProjectionsError(ValueError):
    """A projections file that cannot be used with this backbone (one-line user error)."""


def default_stages(n_layers: int, count: int = 4) -> tuple[int, ...]:
    """1-based blocks at equal depth fractions: (6, 12, 18, 24) for 24 blocks, (3, 6, 9, 12) for 12."""
    return tuple(n_layers * (i + 1) // count for i in range(count))


# -- pure tensor functions ---------------------------------------------------------------------

def ensemble_text_features(normal: torch.Tensor, abnormal: torch.Tensor) -> torch.Tensor:
    """Raw prompt embeddings (N_n, D), (N_a, D) -> (D, 2) text features, column 0 normal, 1 abnormal.

    Each prompt is L2-normalised, each group averaged, and the mean L2-normalised again.
    """
    groups = [F.normalize(F.normalize(g.float(), dim=-1).mean(0), dim=0) for g in (normal, abnormal)]
    return torch.stack(groups, dim=1)


def text_score(pooled: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Pooled image embeddings (B, D), text (D, 2) -> P(abnormal) (B,) = softmax(100 f.T)[1]."""
    return (LOGIT_SCALE * F.normalize(pooled.float(), dim=-1) @ text).softmax(dim=-1)[:, 1]


def project_tokens(tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Raw stage tokens (B, P, C), weight (D, C), bias (D,) -> L2-normalised (B, P, D)."""
    return F.normalize(F.linear(tokens, weight, bias), dim=-1)


def stage_logits(projected: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Normalised projected tokens (B, P, D), text (D, 2) or per image (B, D, 2) -> (B, P, 2) logits."""
    return LOGIT_SCALE * (projected @ text)


def to_grid(values: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Row-major patch values (B, P, *K) -> channel-first grids (B, *K, gh, gw)."""
    b, p = values.shape[:2]
    if p != grid[0] * grid[1]:
        raise ValueError(f"{p} patches do not fill a {grid[0]}x{grid[1]} grid")
    moved = values.movedim(1, -1)
    return moved.reshape(b, *moved.shape[1:-1], *grid)


def nearest_distance(queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """min over memory rows of (1 - cos). queries (B, P, C), L2-normalised memory (M, C) -> (B, P) in [0, 2]."""
    return 1.0 - (F.normalize(queries.float(), dim=-1) @ memory.T).amax(dim=-1)


def upsample_corners(grids: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, N, gh, gw) -> (B, N, H, W), bilinear with align_corners=True (as the reference)."""
    return F.interpolate(grids, size=size, mode="bilinear", align_corners=True)


def stage_probabilities(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Stage logit grids (B, S, 2, gh, gw) -> abnormal probability maps (B, S, H, W).

    Logits are upsampled first and softmaxed after (the reference's order; not interchangeable).
    """
    b, s = logits.shape[:2]
    up = upsample_corners(logits.flatten(1, 2), size)
    return up.view(b, s, 2, *size).softmax(dim=2)[:, :, 1]


def two_channel_probabilities(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Stage logit grids (B, S, 2, gh, gw) -> both channels' probabilities (B, S, 2, H, W), for the losses."""
    b, s = logits.shape[:2]
    return upsample_corners(logits.flatten(1, 2), size).view(b, s, 2, *size).softmax(dim=2)


def maps_at_resolution(logits: torch.Tensor, distances: torch.Tensor | None,
                       size: tuple[int, int]) -> torch.Tensor:
    """The one upsampling step: grids -> the anomaly map (B, H, W) at the model's input resolution.

    logits: (B, S, 2, gh, gw) stage logits; distances: (B, S, gh, gw) or None. Zero-shot map = sum
    of the stage probability maps; few-shot adds the sum of the upsampled stage distances.
    (Bilinear upsampling is linear, so the distances are summed on the grid first: same result.)
    """
    maps = stage_probabilities(logits, size).sum(dim=1)
    if distances is not None:
        maps = maps + upsample_corners(distances.sum(dim=1, keepdim=True), size)[:, 0]
    return maps


def map_ceiling(n_stages: int, few_shot: bool) -> float:
    """Largest possible map value: S probabilities, plus S distances of at most 2 in few-shot."""
    return float(n_stages * (3 if few_shot else 1))


def streaming_score(text_scores: torch.Tensor, map_max: torch.Tensor, ceiling: float) -> torch.Tensor:
    """Per-frame image score (B,) in [0, 1]: 0.5 * (text score + map max / ceiling)."""
    return 0.5 * (text_scores + (map_max / ceiling).clamp(0.0, 1.0))


def set_normalised_score(text_scores: torch.Tensor, map_max: torch.Tensor) -> torch.Tensor:
    """The reference's few-shot score over a whole test set of one class (parity only, not streaming).

    0.5 * (text score + (m - min m) / (max m - min m)), min and max over the set's map maxima (N,).
    """
    span = map_max.max() - map_max.min()
    if float(span) == 0.0:
        raise ValueError("set-normalised score is undefined when every map maximum is equal")
    return 0.5 * (text_scores + (map_max - map_max.min()) / span)


# -- projections -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Projections:
    """Per-stage linear maps: weight (S, D, C), bias (S, D), applied as x @ W.T + b; stages 1-based."""

    weight: torch.Tensor
    bias: torch.Tensor
    stages: tuple[int, ...]
    trained: bool
    source: str
    meta: dict[str, object] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Projections:
        return Projections(self.weight.to(device), self.bias.to(device), self.stages, self.trained,
                           self.source, self.meta)

    def state_dict(self) -> dict[str, object]:
        """The checkpoint: a plain dict of fp32 tensors (reference key names) plus metadata."""
        out: dict[str, object] = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                                  "stages": list(self.stages), **self.meta}
        for s in range(len(self.stages)):
            out[f"fc.{s}.weight"] = self.weight[s].detach().float().cpu().contiguous()
            out[f"fc.{s}.bias"] = self.bias[s].detach().float().cpu().contiguous()
        return out


def untrained_projections(backbone: ClipBackbone, stages: tuple[int, ...] | None = None) -> Projections:
    """Stand-in projections when none are configured: identity (width == embed dim), else the
    backbone's own visual projection. Zero-shot AprilGAN needs trained projections; announced loudly."""
    stages = stages or default_stages(backbone.n_layers)
    c, d = backbone.width, backbone.embed_dim
    if c == d:
        weight, kind = torch.eye(d), "identity"
    else:
        weight, kind = backbone.visual.proj.detach().float().T.cpu(), "visual.proj"
    log.warning("aprilgan_untrained_projections", kind=kind, stages=list(stages),
                detail="engine.projections is not set: zero-shot AprilGAN maps need projections trained with "
                       "`linewatch train aprilgan`; few-shot memory maps are unaffected")
    return Projections(weight.expand(len(stages), d, c).clone(), torch.zeros(len(stages), d), stages,
                       trained=False, source=kind)


def projections_from_state(state: dict[str, object], backbone: ClipBackbone, source: str) -> Projections:
    """A checkpoint dict (ours, the reference's flat ``fc.{s}.*`` or its ``trainable_linearlayer``) ->
    Projections checked against the backbone."""
    inner = state.get("trainable_linearlayer")
    if isinstance(inner, dict):
        state = inner
    count = sum(1 for k in state if k.startswith("fc.") and k.endswith(".weight"))
    if count == 0:
        raise ProjectionsError(f"{source}: no projection weights (expected keys fc.0.weight, fc.0.bias, ...)")
    stages_raw = state.get("stages")
    stages = tuple(int(s) for s in stages_raw) if isinstance(stages_raw, (list, tuple)) else default_stages(
        backbone.n_layers, count)
    if len(stages) != count:
        raise ProjectionsError(f"{source}: {count} projections but stages {list(stages)}")
    if any(not 1 <= s <= backbone.n_layers for s in stages):
        raise ProjectionsError(f"{source}: stages {list(stages)} outside 1..{backbone.n_layers} of {backbone.name}")
    d, c = backbone.embed_dim, backbone.width
    weights, biases = [], []
    for s in range(count):
        w, b = state.get(f"fc.{s}.weight"), state.get(f"fc.{s}.bias")
        if not isinstance(w, torch.Tensor) or not isinstance(b, torch.Tensor):
            raise ProjectionsError(f"{source}: fc.{s}.weight or fc.{s}.bias missing")
        if tuple(w.shape) != (d, c) or tuple(b.shape) != (d,):
            raise ProjectionsError(f"{source}: fc.{s} has shape {tuple(w.shape)}/{tuple(b.shape)}, but "
                                   f"{backbone.name} needs ({d}, {c})/({d},)")
        weights.append(w.float())
        biases.append(b.float())
    meta = {k: v for k, v in state.items() if not k.startswith("fc.") and k not in ("stages", "format",
                                                                                    "format_version")}
    trained_for = meta.get("backbone")
    if isinstance(trained_for, str) and trained_for != backbone.name:
        log.warning("aprilgan_projections_backbone_mismatch", file=source, trained_for=trained_for,
                    backbone=backbone.name)
    return Projections(torch.stack(weights), torch.stack(biases), stages, trained=True, source=source, meta=meta)


def load_projections(path: Path, backbone: ClipBackbone) -> Projections:
    """Read a projections checkpoint with ``torch.load(weights_only=True)`` (no pickled code)."""
    if not path.is_file():
        raise FileNotFoundError(f"projections file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise ProjectionsError(f"{path}: not a readable projections checkpoint ({exc})") from exc
    if not isinstance(state, dict):
        raise ProjectionsError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return projections_from_state(state, backbone, str(path))


# -- the method ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class AprilGanMemory:
    """Few-shot memory: per stage the L2-normalised raw patch tokens of k references, (S, k*P, C)."""

    tokens: torch.Tensor
    k_shot: int


@dataclass(frozen=True)
class AprilGanGrid:
    """Grid-level outputs: text scores (B,), stage logits (B, S, 2, gh, gw), distances (B, S, gh, gw)."""

    text_scores: torch.Tensor
    logits: torch.Tensor
    distances: torch.Tensor | None


class AprilGan:
    def __init__(self, backbone: ClipBackbone, projections: Projections,
                 image_backbone: ClipBackbone | None = None) -> None:
        self.backbone = backbone
        # Image forwards may run on a lower-precision copy of the image tower (``precision: bf16``).
        self.image_backbone = image_backbone or backbone
        self.projections = projections.to(backbone.device)
        self.stages = projections.stages

    def text_features(self, object_name: str) -> torch.Tensor:
        """(D, 2) ensemble text features of one class name (normal, abnormal), fp32."""
        normal, abnormal = ensemble_prompts(object_name)
        emb = self.backbone.encode_text(normal + abnormal)
        return ensemble_text_features(emb[: len(normal)], emb[len(normal) :])

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One forward: pooled (B, D) and raw stage tokens [(B, P, C)] * S, fp32."""
        bb = self.image_backbone
        pooled, stages = bb.stage_tokens(images.to(bb.dtype), self.stages)
        return pooled.float(), [t.float() for t in stages]

    def reference_memory(self, images: torch.Tensor) -> AprilGanMemory:
        """(k, 3, H, W) normal references -> per-stage memory of their raw patch tokens."""
        _, stages = self.encode(images)
        rows = [F.normalize(t.reshape(-1, t.shape[-1]), dim=-1) for t in stages]
        return AprilGanMemory(torch.stack(rows), k_shot=images.shape[0])

    def grid(self, images: torch.Tensor, text: torch.Tensor, memory: AprilGanMemory | None = None) -> AprilGanGrid:
        """Text scores and per-stage logits / memory distances on the patch grid."""
        pooled, stages = self.encode(images)
        p, g = self.projections, self.backbone.grid_size
        logits = torch.stack([to_grid(stage_logits(project_tokens(t, p.weight[s], p.bias[s]), text), g)
                              for s, t in enumerate(stages)], dim=1)
        distances = None
        if memory is not None:
            distances = torch.stack([to_grid(nearest_distance(t, memory.tokens[s]), g)
                                     for s, t in enumerate(stages)], dim=1)
        return AprilGanGrid(text_score(pooled, text), logits, distances)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, text: torch.Tensor,
                 memory: AprilGanMemory | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Streaming image scores (B,) and anomaly maps (B, H, W) at the input's resolution."""
        out = self.grid(images, text, memory)
        maps = maps_at_resolution(out.logits, out.distances, tuple(images.shape[-2:]))
        ceiling = map_ceiling(len(self.stages), memory is not None)
        return streaming_score(out.text_scores, maps.flatten(1).amax(dim=1), ceiling), maps
