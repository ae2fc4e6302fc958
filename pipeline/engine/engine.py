"""`AnomalyEngine`: frames + product class in, image scores and pixel maps out.

This is the engine's only public entry point for the rest of linewatch. It owns the backbone,
the chosen method, precision, per-class text embeddings (through a `PromptCache`) and few-shot
reference memories. It knows nothing of Kafka or Redis.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.config import EngineSettings, LLMSettings
from pipeline.engine.alfa import Alfa, PromptPools
from pipeline.engine.alfa_prompts import build_prompt_set
from pipeline.engine.aprilgan import PROMPT_DATA as APRILGAN_PROMPT_DATA
from pipeline.engine.aprilgan import AprilGan, AprilGanMemory, load_projections, untrained_projections
from pipeline.engine.backbone import ClipBackbone
from pipeline.engine.precision import Precision, resolve_precision
from pipeline.engine.preprocess import preprocess
from pipeline.engine.prompt_cache import NullCache, PromptCache, cache_key
from pipeline.engine.prompting import ANOMALOUS_STATES, NORMAL_STATES, TEMPLATES, object_name
from pipeline.engine.scoring import gaussian_blur, upsample_maps
from pipeline.engine.weights import load_backbone
from pipeline.engine.winclip import ReferenceMemory, WinClip
from pipeline.imaging import read_image
from pipeline.logging import get_logger

log = get_logger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
WINCLIP_PROMPT_VERSION = hashlib.sha256(repr((NORMAL_STATES, ANOMALOUS_STATES, TEMPLATES)).encode()).hexdigest()[:12]
APRILGAN_PROMPT_VERSION = hashlib.sha256(repr(APRILGAN_PROMPT_DATA).encode()).hexdigest()[:12]
ALFA_SIGMA_PX = 4.0  # Gaussian smoothing at the model's input scale (240 px)


@dataclass(frozen=True)
class FrameScore:
    image_score: float
    anomaly_map: np.ndarray  # (H, W) float32 at the frame's own resolution


class UnknownMethodError(ValueError):
    pass


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class AnomalyEngine:
    def __init__(self, settings: EngineSettings, llm: LLMSettings | None = None,
                 cache: PromptCache | None = None, backbone: ClipBackbone | None = None,
                 fingerprint: str | None = None) -> None:
        if settings.method not in ("winclip", "alfa", "aprilgan"):
            raise UnknownMethodError(f"unknown method {settings.method!r}; choose winclip, alfa or aprilgan")
        self.settings = settings
        self.llm = llm or LLMSettings()
        self.cache: PromptCache = cache or NullCache()
        self.device = resolve_device(settings.device)
        if backbone is None:
            backbone, fingerprint = load_backbone(settings.backbone, settings.pretrained, self.device,
                                                  str(settings.cache_dir) if settings.cache_dir else None)
        self.backbone = backbone.to(self.device)
        self.fingerprint = fingerprint or f"custom:{settings.backbone}"
        self.method = settings.method
        self.precision: Precision = resolve_precision(settings.precision, self.device, self.method)
        image_dtype = self.precision.image_dtype
        image_backbone = self.backbone.image_tower_copy(image_dtype) if image_dtype is not None else None
        self.winclip = WinClip(backbone, window_dtype=self.precision.window_dtype, image_backbone=image_backbone)
        self.alfa = Alfa(backbone, image_backbone=image_backbone)
        self.aprilgan: AprilGan | None = None
        if self.method == "aprilgan":
            projections = (load_projections(settings.projections, backbone) if settings.projections
                           else untrained_projections(backbone))
            self.aprilgan = AprilGan(backbone, projections, image_backbone=image_backbone)
        self._references: dict[str, ReferenceMemory | AprilGanMemory | torch.Tensor] = {}
        self._text: dict[str, torch.Tensor | PromptPools] = {}
        self._lock = threading.Lock()
        log.info("engine_ready", method=self.method, backbone=settings.backbone, device=str(self.device),
                 precision=self.precision.name, fingerprint=self.fingerprint)

    # -- text embeddings ---------------------------------------------------------------------
    def _text_for(self, product_class: str) -> torch.Tensor | PromptPools:
        found = self._text.get(product_class)
        if found is not None:
            return found
        name = object_name(product_class)
        if self.method == "winclip":
            key = cache_key(product_class, "winclip", WINCLIP_PROMPT_VERSION, self.fingerprint)
            bundle = self.cache.get_or_compute(
                key, lambda: {"prototypes": self.winclip.text_prototypes(name).cpu().numpy()})
            value: torch.Tensor | PromptPools = torch.from_numpy(bundle["prototypes"].copy()).to(self.device)
        elif self.aprilgan is not None:
            aprilgan = self.aprilgan
            key = cache_key(product_class, "aprilgan", APRILGAN_PROMPT_VERSION, self.fingerprint)
            bundle = self.cache.get_or_compute(key, lambda: {"text": aprilgan.text_features(name).cpu().numpy()})
            value = torch.from_numpy(bundle["text"].copy()).to(self.device)
        else:
            prompts = build_prompt_set(name, self.llm, self.settings.cache_dir)
            key = cache_key(product_class, "alfa", prompts.version, self.fingerprint)

            def compute() -> dict[str, np.ndarray]:
                pools = self.alfa.text_pools(prompts)
                return {f: getattr(pools, f).cpu().numpy() for f in PromptPools.__dataclass_fields__}

            bundle = self.cache.get_or_compute(key, compute)
            value = PromptPools(**{k: torch.from_numpy(v.copy()).to(self.device) for k, v in bundle.items()})
        self._text[product_class] = value
        return value

    def prepare(self, product_class: str) -> None:
        """Warm the text embeddings of a class (e.g. at worker start)."""
        self._text_for(product_class)

    # -- few-shot references -----------------------------------------------------------------
    def set_references(self, product_class: str, images: Sequence[np.ndarray]) -> None:
        """Register k normal reference frames for a class (WinCLIP+ / ALFA patch memory)."""
        if not images:
            raise ValueError(f"no reference images for class {product_class!r}")
        self.set_reference_batch(product_class, self._prepare(images))

    def set_reference_batch(self, product_class: str, batch: torch.Tensor) -> None:
        """Register already-normalised reference images (k, 3, h, w)."""
        batch = batch.to(self.device)
        with self._autocast(), torch.inference_mode():
            if self.method == "winclip":
                memory: ReferenceMemory | AprilGanMemory | torch.Tensor = self.winclip.reference_memory(batch)
            elif self.aprilgan is not None:
                memory = self.aprilgan.reference_memory(batch)
            else:
                memory = self.alfa.reference_memory(batch).float()
        self._references[product_class] = memory
        log.info("references_set", product_class=product_class, k_shot=batch.shape[0])

    def load_references(self, product_class: str, folder: Path, k_shot: int = 0) -> int:
        """Reference images from folder/<class>/ if present, else folder itself; k_shot=0 takes all."""
        sub = folder / product_class
        source = sub if sub.is_dir() else folder
        if not source.is_dir():
            raise FileNotFoundError(f"reference folder not found: {source}")
        paths = list_images(source)
        if not paths:
            raise FileNotFoundError(f"no images in reference folder {source}")
        paths = paths[:k_shot] if k_shot else paths
        self.set_references(product_class, [read_image(str(p)) for p in paths])
        return len(paths)

    def k_shot(self, product_class: str) -> int:
        mem = self._references.get(product_class)
        if mem is None:
            return 0
        if isinstance(mem, (ReferenceMemory, AprilGanMemory)):
            return mem.k_shot
        return mem.shape[0] // self.backbone.n_patches

    # -- scoring -----------------------------------------------------------------------------
    def _prepare(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        bb = self.backbone
        return preprocess(frames, bb.image_size, bb.mean, bb.std).to(self.device)

    def _autocast(self) -> object:
        return self.precision.model_autocast(self.device)

    def score_tensor(self, batch: torch.Tensor, product_class: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (B, 3, h, w) input -> image scores (B,) and maps (B, h, w), as the reference does."""
        scores, grid = self._forward(batch.to(self.device), product_class)
        return scores, upsample_maps(grid, tuple(batch.shape[-2:]))

    def _forward(self, batch: torch.Tensor, product_class: str) -> tuple[torch.Tensor, torch.Tensor]:
        text = self._text_for(product_class)
        memory = self._references.get(product_class)
        with self._lock, self._autocast(), torch.inference_mode():
            if self.method == "winclip":
                assert isinstance(text, torch.Tensor)
                scores, grid = self.winclip(batch, text, memory if isinstance(memory, ReferenceMemory) else None)
            elif self.aprilgan is not None:
                # Maps come back at the model's input resolution (the reference upsamples logits
                # before its softmax); the engine's later upsampling to that size is the identity.
                assert isinstance(text, torch.Tensor)
                scores, grid = self.aprilgan(batch, text, memory if isinstance(memory, AprilGanMemory) else None)
            else:
                assert isinstance(text, PromptPools)
                scores, grid = self.alfa(batch, text, memory if isinstance(memory, torch.Tensor) else None)
        return scores.float(), grid.float()

    def score(self, frames: Sequence[np.ndarray], product_class: str) -> list[FrameScore]:
        """Score a batch of RGB/gray uint8 frames of any sizes; maps come back at each frame's size."""
        if not frames:
            return []
        scores, grid = self._forward(self._prepare(frames), product_class)
        results = []
        in_h, in_w = self.backbone.image_size
        for i, frame in enumerate(frames):
            h, w = frame.shape[:2]
            m = upsample_maps(grid[i : i + 1], (h, w))
            if self.method == "alfa":
                m = gaussian_blur(m, ALFA_SIGMA_PX * max(h / in_h, w / in_w))
            results.append(FrameScore(float(scores[i]), m[0].cpu().numpy().astype(np.float32)))
        return results
