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

import cv2
import numpy as np
import torch

from pipeline.config import EngineSettings, LLMSettings
from pipeline.engine.alfa import Alfa, PromptPools
from pipeline.engine.alfa_prompts import build_prompt_set
from pipeline.engine.aprilgan import PROMPT_DATA as APRILGAN_PROMPT_DATA
from pipeline.engine.aprilgan import AprilGan, AprilGanMemory, load_projections, untrained_projections
from pipeline.engine.backbone import ClipBackbone
from pipeline.engine.precision import Precision, resolve_precision
from pipeline.engine.preprocess import Frame, preprocess
from pipeline.engine.prompt_cache import NullCache, PromptCache, cache_key
from pipeline.engine.prompting import ANOMALOUS_STATES, NORMAL_STATES, TEMPLATES, object_name
from pipeline.engine.scoring import upsample_maps, upsample_smooth
from pipeline.engine.threads import one_intra_op_thread
from pipeline.engine.tiling import UNTILED, TileGrid, TilePlan, plan_tiles, smoothing_sigma, stitch
from pipeline.engine.weights import load_backbone
from pipeline.engine.winclip import ReferenceMemory, WinClip
from pipeline.imaging import read_image
from pipeline.logging import get_logger
from pipeline.paths import contained

log = get_logger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
WINCLIP_PROMPT_VERSION = hashlib.sha256(repr((NORMAL_STATES, ANOMALOUS_STATES, TEMPLATES)).encode()).hexdigest()[:12]
APRILGAN_PROMPT_VERSION = hashlib.sha256(repr(APRILGAN_PROMPT_DATA).encode()).hexdigest()[:12]
ALFA_SIGMA_PX = 4.0  # Gaussian smoothing at the model's input scale (240 px)


@dataclass(frozen=True)
class FrameScore:
    """One frame's result.

    ``anomaly_map`` is (h, w) float32 at *model* resolution, not the frame's: the patch grid
    upsampled (bilinear) to the model input size, smoothed there (ALFA), covering the whole frame
    squashed the way the frame was squashed into the model. A tiled frame's map is its tiles' maps
    stitched on the canvas (pipeline.engine.tiling), each tile at model input size. ``frame_size``
    is the (height, width) of the frame scored. A full-resolution map exists only where it is drawn
    (an event's mask, a report, the CLI's output): ``frame_map()``.
    """

    image_score: float
    anomaly_map: np.ndarray
    frame_size: tuple[int, int]

    def frame_map(self, size: tuple[int, int] | None = None) -> np.ndarray:
        """The map resampled (bilinear) to (height, width), by default the frame's own size."""
        h, w = size or self.frame_size
        if self.anomaly_map.shape == (h, w):
            return self.anomaly_map
        return cv2.resize(self.anomaly_map, (w, h), interpolation=cv2.INTER_LINEAR)


class UnknownMethodError(ValueError):
    pass


def frame_size(frame: Frame) -> tuple[int, int]:
    """(height, width) of a numpy (H, W[, C]) or torch (C, H, W) frame."""
    if isinstance(frame, torch.Tensor):
        return int(frame.shape[-2]), int(frame.shape[-1])
    return int(frame.shape[0]), int(frame.shape[1])


def _crop(frame: Frame, box: tuple[int, int, int, int], size: tuple[int, int]) -> Frame:
    y0, y1, x0, x1 = box
    if (y0, x0) == (0, 0) and (y1, x1) == size:
        return frame
    return frame[..., y0:y1, x0:x1] if isinstance(frame, torch.Tensor) else frame[y0:y1, x0:x1]


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
        self._prompt_versions: dict[str, str] = {}
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
            self._prompt_versions[product_class] = WINCLIP_PROMPT_VERSION
        elif self.aprilgan is not None:
            aprilgan = self.aprilgan
            key = cache_key(product_class, "aprilgan", APRILGAN_PROMPT_VERSION, self.fingerprint)
            bundle = self.cache.get_or_compute(key, lambda: {"text": aprilgan.text_features(name).cpu().numpy()})
            value = torch.from_numpy(bundle["text"].copy()).to(self.device)
            self._prompt_versions[product_class] = APRILGAN_PROMPT_VERSION
        else:
            prompts = build_prompt_set(name, self.llm, self.settings.cache_dir)
            key = cache_key(product_class, "alfa", prompts.version, self.fingerprint)
            self._prompt_versions[product_class] = prompts.version

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
        # The class name comes from frame headers: its folder must stay inside the references root.
        sub = contained(folder, product_class)
        source = sub if sub.is_dir() else folder
        if not source.is_dir():
            raise FileNotFoundError(f"reference folder not found: {source}")
        paths = list_images(source)
        if not paths:
            raise FileNotFoundError(f"no images in reference folder {source}")
        paths = paths[:k_shot] if k_shot else paths
        self.set_references(product_class, [read_image(str(p)) for p in paths])
        return len(paths)

    def forget_class(self, product_class: str) -> None:
        """Drop a class's text embeddings and references (the caller bounds how many classes stay)."""
        self._text.pop(product_class, None)
        self._references.pop(product_class, None)

    # -- reference sets as plain arrays (versioned in Redis by pipeline.references) ----------
    def reference_features(self, frames: Sequence[np.ndarray], chunk: int = 8) -> dict[str, np.ndarray]:
        """Memory features of normal frames as float32 arrays: ``patches`` (n*P, C), and for WinCLIP
        ``windows_<i>`` per window scale (n*W_i, D). Chunked so N frames never make one huge forward."""
        parts: list[dict[str, np.ndarray]] = []
        for start in range(0, len(frames), chunk):
            batch = self._prepare(frames[start:start + chunk])
            with self._lock, self._autocast(), torch.inference_mode():
                if self.method == "winclip":
                    mem = self.winclip.reference_memory(batch)
                    arrays = {"patches": mem.patches}
                    arrays.update({f"windows_{i}": w for i, w in enumerate(mem.windows)})
                elif self.aprilgan is not None:
                    # One row per patch position with every stage's token side by side (N, S*C), so
                    # a coreset keeps or drops a position in all stages at once.
                    tokens = self.aprilgan.reference_memory(batch).tokens  # (S, N, C)
                    arrays = {"patches": tokens.permute(1, 0, 2).reshape(tokens.shape[1], -1)}
                else:
                    arrays = {"patches": self.alfa.reference_memory(batch)}
            parts.append({k: v.float().cpu().numpy() for k, v in arrays.items()})
        if not parts:
            raise ValueError("no frames to compute reference features from")
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def set_reference_features(self, product_class: str, arrays: dict[str, np.ndarray], k_shot: int) -> None:
        """Install a memory made by ``reference_features`` (possibly coreset-subsampled)."""
        patches = torch.from_numpy(np.ascontiguousarray(arrays["patches"])).to(self.device)
        if self.method == "winclip":
            n_scales = len(self.winclip.scales)
            windows = [torch.from_numpy(np.ascontiguousarray(arrays[f"windows_{i}"])).to(self.device)
                       for i in range(n_scales)]
            memory: ReferenceMemory | AprilGanMemory | torch.Tensor = ReferenceMemory(
                patches=patches, windows=windows, k_shot=k_shot)
        elif self.aprilgan is not None:
            n_stages = len(self.aprilgan.stages)
            rows = patches.float().reshape(patches.shape[0], n_stages, -1)  # (N, S, C)
            memory = AprilGanMemory(tokens=rows.permute(1, 0, 2).contiguous(), k_shot=k_shot)
        else:
            memory = patches.float()
        with self._lock:
            self._references[product_class] = memory
        log.info("references_set", product_class=product_class, k_shot=k_shot, patches=int(patches.shape[0]))

    def clear_references(self, product_class: str) -> None:
        """Back to zero-shot for the class."""
        with self._lock:
            self._references.pop(product_class, None)

    def prompt_version(self, product_class: str) -> str | None:
        """Version of the prompt set the class's text embeddings were made from (None before first use)."""
        return self._prompt_versions.get(product_class)

    def k_shot(self, product_class: str) -> int:
        mem = self._references.get(product_class)
        if mem is None:
            return 0
        if isinstance(mem, (ReferenceMemory, AprilGanMemory)):
            return mem.k_shot
        return mem.shape[0] // self.backbone.n_patches

    # -- scoring -----------------------------------------------------------------------------
    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the model input."""
        return self.backbone.image_size

    def pixels_needed(self, tiles: TileGrid = UNTILED) -> tuple[int, int]:
        """(width, height) a frame needs so that each tile reaches the model at no less than its input size."""
        (h, w), (span_y, span_x) = self.input_size, tiles.span()
        return int(np.ceil(w * span_x)), int(np.ceil(h * span_y))

    def _prepare(self, frames: Sequence[Frame]) -> torch.Tensor:
        bb = self.backbone
        with one_intra_op_thread():  # small per-frame ops (see pipeline.engine.threads)
            return preprocess(frames, bb.image_size, bb.mean, bb.std, device=self.device)

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

    def score(self, frames: Sequence[Frame], product_class: str,
              tiles: TileGrid | Sequence[TileGrid] | None = None) -> list[FrameScore]:
        """Score a batch of frames of any sizes (numpy RGB/gray uint8, or (3, H, W) uint8 tensors
        already on the engine's device); maps come back at model resolution (see FrameScore).

        ``tiles`` (one grid for all frames, or one per frame): each frame is cut into overlapping
        tiles, the tiles of all frames go through the model as one batch, and each frame's tile maps
        are stitched back (max where tiles overlap); its image score is the highest tile's.
        """
        if not frames:
            return []
        one = tiles is None or isinstance(tiles, TileGrid)
        grids = [tiles if isinstance(tiles, TileGrid) else UNTILED] * len(frames) if one else list(tiles)
        if len(grids) != len(frames):
            raise ValueError(f"{len(grids)} tile grids for {len(frames)} frames")
        sizes = [frame_size(f) for f in frames]
        plans = [plan_tiles(size, self.input_size, g) for size, g in zip(sizes, grids, strict=True)]
        crops = [_crop(f, box, size) for f, size, p in zip(frames, sizes, plans, strict=True) for box in p.crops]
        scores, grid = self._forward(self._prepare(crops), product_class)
        maps, frame_scores = self._postprocess(grid, scores, plans)
        return [FrameScore(s, m, p.frame_size) for s, m, p in zip(frame_scores, maps, plans, strict=True)]

    def _postprocess(self, grid: torch.Tensor, scores: torch.Tensor, plans: Sequence[TilePlan],
                     ) -> tuple[list[np.ndarray], list[float]]:
        """Patch grids of every tile -> one smoothed map per frame at model resolution, on the host.

        Upsampling and smoothing are two small matrix products per map (scoring.upsample_smooth),
        on the engine's device; untiled frames sharing a blur go as one batch; only the
        model-resolution maps are copied to the host. One intra-op thread (pipeline.engine.threads).
        """
        with one_intra_op_thread():
            return self._postprocess_maps(grid, scores, plans)

    def _postprocess_maps(self, grid: torch.Tensor, scores: torch.Tensor, plans: Sequence[TilePlan],
                          ) -> tuple[list[np.ndarray], list[float]]:
        def sigma_of(plan: TilePlan) -> tuple[float, float]:
            if self.method != "alfa":
                return 0.0, 0.0
            return smoothing_sigma(plan.frame_size, plan.canvas_size, ALFA_SIGMA_PX)

        out: list[np.ndarray] = [np.empty(0, np.float32)] * len(plans)
        frame_scores: list[float] = []
        host_scores = scores.float().cpu()
        untiled: dict[tuple[float, float], list[tuple[int, int]]] = {}  # sharing a blur: one batch
        start = 0
        for i, plan in enumerate(plans):
            n = len(plan.crops)
            frame_scores.append(float(host_scores[start : start + n].max()))
            if n == 1:
                untiled.setdefault(sigma_of(plan), []).append((i, start))
            else:
                tiles = upsample_smooth(grid[start : start + n], self.input_size)
                canvas = stitch(tiles, plan)
                out[i] = upsample_smooth(canvas[None], plan.canvas_size, sigma_of(plan))[0].cpu().numpy()
            start += n
        for sigma, members in untiled.items():
            host = upsample_smooth(grid[[s for _, s in members]], self.input_size, sigma).cpu().numpy()
            for j, (i, _) in enumerate(members):
                out[i] = host[j]
        return out, frame_scores
