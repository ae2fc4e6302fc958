"""Training AprilGAN's per-stage linear projections on labelled defects (backbone frozen).

Data: MVTec-layout folders, one class (DIR/test/...) or several (DIR/<class>/test/...): every
image under test/ (good ones with an all-zero mask, defects with ground_truth/<defect>/<stem>_mask.png),
as the reference trains on the auxiliary set's test split (../shared/papers/aprilgan.md section 8).
Losses on each stage's two-channel map at the model's resolution: focal (gamma 2) plus dice on
the abnormal channel, summed over stages. Adam with betas (0.5, 0.999), the reference's defaults.
Not reproduced: the reference's 2x2 mosaic augmentation (MVTec, rate 0.2) and its fp16 autocast.

Checkpoint (read by ``engine.projections``, ``torch.load(weights_only=True)``): a plain dict with
``fc.{s}.weight`` (D, C) and ``fc.{s}.bias`` (D,) fp32 per stage s (the reference's key names),
``stages`` (1-based blocks), ``format``/``format_version``, and metadata (backbone, pretrained,
classes, steps, seed, lr, batch_size, n_images, final_loss).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import torch
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from pipeline.engine.aprilgan import (
    Projections,
    default_stages,
    ensemble_text_features,
    project_tokens,
    stage_logits,
    to_grid,
    two_channel_probabilities,
)
from pipeline.engine.aprilgan_prompts import ensemble_prompts
from pipeline.engine.backbone import ClipBackbone
from pipeline.engine.preprocess import preprocess
from pipeline.engine.prompting import object_name
from pipeline.evaluation.mvtec import category_root, load_category
from pipeline.imaging import read_image
from pipeline.logging import get_logger

log = get_logger(__name__)

ADAM_BETAS = (0.5, 0.999)


@dataclass(frozen=True)
class TrainItem:
    path: Path
    mask: Path | None  # None: a good image (all-zero mask)
    product_class: str


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    steps: int | None = None  # overrides epochs when given
    lr: float = 1e-3
    batch_size: int = 8
    seed: int = 111
    progress: bool = True


@dataclass(frozen=True)
class TrainResult:
    projections: Projections
    losses: list[float]  # one per step


# -- losses (pure) -----------------------------------------------------------------------------

def focal_loss(probs: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Two-channel probabilities (B, 2, H, W), binary mask (B, H, W) -> mean focal loss (scalar).

    One-hot target clamped to [1e-5, 1 - 1e-5]; pt = sum_c target_c * p_c + 1e-5; no class weights.
    """
    target = torch.stack((1.0 - mask, mask), dim=1).clamp(1e-5, 1.0 - 1e-5)
    pt = (target * probs).sum(dim=1) + 1e-5
    return (-((1.0 - pt) ** gamma) * pt.log()).mean()


def dice_loss(prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Abnormal probability (B, H, W), mask (B, H, W) -> 1 - mean over images of (2|PG| + 1) / (|P| + |G| + 1)."""
    inter = (prob * mask).flatten(1).sum(1)
    dice = (2.0 * inter + 1.0) / (prob.flatten(1).sum(1) + mask.flatten(1).sum(1) + 1.0)
    return 1.0 - dice.mean()


def aprilgan_loss(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Stage probabilities (B, S, 2, H, W), mask (B, H, W) -> sum over stages of focal + dice."""
    return sum((focal_loss(probs[:, s], mask) + dice_loss(probs[:, s, 1], mask) for s in range(probs.shape[1])),
               start=torch.zeros((), device=probs.device))


# -- data ----------------------------------------------------------------------------------------

def collect_items(root: Path) -> list[TrainItem]:
    """Every test image of one class folder (DIR/test/) or of each class under DIR (DIR/<class>/test/)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"training data folder not found: {root}")
    if (root / "test").is_dir():
        bases = [root]
    else:
        bases = sorted(p for p in root.iterdir() if p.is_dir() and (p / "test").is_dir())
    if not bases:
        raise FileNotFoundError(f"{root} holds no MVTec-style class folder (expected {root}/test/ or "
                                f"{root}/<class>/test/)")
    items = []
    for base in bases:
        category = load_category(category_root(base))
        items += [TrainItem(it.path, it.mask, base.name) for it in category.test]
    return items


def load_mask(path: Path | None, size: tuple[int, int]) -> torch.Tensor:
    """Ground truth at the model's size (H, W) float {0, 1}: bilinear resize of the 0/255 mask, > 0.5."""
    if path is None:
        return torch.zeros(size)
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise FileNotFoundError(f"unreadable ground-truth mask {path}")
    t = TF.resize(torch.from_numpy(mask)[None].float() / 255.0, list(size),
                  interpolation=InterpolationMode.BILINEAR, antialias=True)
    return (t[0] > 0.5).float()


def load_batch(items: list[TrainItem], backbone: ClipBackbone) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) normalised at the model's size and masks (B, H, W)."""
    size = backbone.image_size
    images = preprocess([read_image(str(it.path)) for it in items], size, backbone.mean, backbone.std)
    return images, torch.stack([load_mask(it.mask, size) for it in items])


# -- training ------------------------------------------------------------------------------------

def class_text_features(backbone: ClipBackbone, classes: list[str]) -> dict[str, torch.Tensor]:
    """(D, 2) text features per class, as ordinary tensors (usable as constants under autograd)."""
    out = {}
    for c in classes:
        normal, abnormal = ensemble_prompts(object_name(c))
        emb = backbone.encode_text(normal + abnormal)
        out[c] = ensemble_text_features(emb[: len(normal)], emb[len(normal) :]).clone()
    return out


def initial_layers(backbone: ClipBackbone, n_stages: int, seed: int) -> nn.ModuleList:
    """Linear(C -> D) per stage with PyTorch's default init, seeded without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = nn.ModuleList(nn.Linear(backbone.width, backbone.embed_dim) for _ in range(n_stages))
    return layers.to(backbone.device)


def batches(n: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One shuffled epoch; the last incomplete batch is dropped unless it is the only one."""
    order = torch.randperm(n, generator=generator).tolist()
    size = min(batch_size, n)
    return [order[i : i + size] for i in range(0, n - size + 1, size)]


def train_projections(backbone: ClipBackbone, items: list[TrainItem], config: TrainConfig,
                      stages: tuple[int, ...] | None = None,
                      on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Fit the per-stage projections with the backbone frozen; returns them and the loss per step."""
    if not items:
        raise ValueError("no training images")
    stages = stages or default_stages(backbone.n_layers)
    classes = sorted({it.product_class for it in items})
    text = class_text_features(backbone, classes)
    layers = initial_layers(backbone, len(stages), config.seed)
    optimiser = torch.optim.Adam(layers.parameters(), lr=config.lr, betas=ADAM_BETAS)
    generator = torch.Generator().manual_seed(config.seed)
    per_epoch = max(1, len(items) // min(config.batch_size, len(items)))
    total = config.steps or config.epochs * per_epoch
    size, grid, device = backbone.image_size, backbone.grid_size, backbone.device
    losses: list[float] = []
    log.info("aprilgan_training", images=len(items), classes=classes, steps=total, stages=list(stages),
             batch_size=config.batch_size, lr=config.lr, device=str(device))
    with tqdm(total=total, desc="train aprilgan", unit="step", disable=not config.progress, file=sys.stderr) as bar:
        while len(losses) < total:
            for index in batches(len(items), config.batch_size, generator):
                if len(losses) >= total:
                    break
                chosen = [items[i] for i in index]
                images, masks = load_batch(chosen, backbone)
                images, masks = images.to(device), masks.to(device)
                with torch.no_grad():  # frozen backbone: no graph through it
                    _, tokens = backbone.stage_tokens(images.to(backbone.dtype), stages)
                    tokens = [t.float() for t in tokens]
                t = torch.stack([text[it.product_class] for it in chosen])  # (B, D, 2)
                logits = torch.stack([to_grid(stage_logits(project_tokens(tok, lin.weight, lin.bias), t), grid)
                                      for tok, lin in zip(tokens, layers, strict=True)], dim=1)
                loss = aprilgan_loss(two_channel_probabilities(logits, size), masks)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise ValueError(f"training diverged at step {len(losses) + 1} (loss {value}); lower --lr")
                losses.append(value)
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}")
                if on_step is not None:
                    on_step(len(losses), value)
    meta: dict[str, object] = {
        "backbone": backbone.name, "classes": classes, "steps": total, "seed": config.seed, "lr": config.lr,
        "batch_size": config.batch_size, "n_images": len(items), "final_loss": losses[-1],
    }
    projections = Projections(
        weight=torch.stack([lin.weight.detach().float() for lin in layers]),
        bias=torch.stack([lin.bias.detach().float() for lin in layers]),
        stages=tuple(stages), trained=True, source="training", meta=meta,
    )
    log.info("aprilgan_trained", steps=total, first_loss=losses[0], final_loss=losses[-1])
    return TrainResult(projections, losses)


def save_projections(projections: Projections, path: Path, **meta: object) -> Path:
    """Write the checkpoint dict (see the module docstring); parents are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = projections.state_dict()
    state.update({k: v for k, v in meta.items() if v is not None})
    torch.save(state, path)
    return path

