"""Generate the anomalib parity fixtures (run with the reference venv, from the repository root).

    bash tests/reference/build_venv.sh
    /tmp/linewatch-refvenv/bin/python tests/reference/make_fixtures.py [--data ../shared/data/ball_screw]

(--data defaults to $LINEWATCH_BALL_SCREW, else ../shared/data/ball_screw; --out to tests/reference/fixtures.)

anomalib's WinClipModel is correct only with open_clip < 2.26, so it runs here beside
open_clip 2.24.0 while linewatch uses the current open_clip. Both load identical synthetic weights
from pipeline/engine/synthetic_weights.py (loaded by file path: this environment has no linewatch).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import torch
from open_clip.version import __version__ as OPEN_CLIP_VERSION
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "reference" / "fixtures"
SEED = 0
CLASS_NAME = "ball screw"
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def load_synthetic() -> object:
    spec = importlib.util.spec_from_file_location("synthetic_weights", ROOT / "pipeline/engine/synthetic_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def preprocess(path: Path) -> torch.Tensor:
    img = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    img = TF.resize(img, [240, 240], interpolation=InterpolationMode.BICUBIC, antialias=True)
    return TF.normalize(img.float() / 255.0, list(MEAN), list(STD))


def build_model(synthetic: object) -> object:
    from anomalib.models.image.winclip import torch_model

    original = open_clip.create_model_and_transforms

    def offline(name: str, pretrained: str | None = None, **kw: object) -> object:
        return original(name, pretrained=None, **kw)

    torch_model.open_clip.create_model_and_transforms = offline
    try:
        model = torch_model.WinClipModel()
    finally:
        torch_model.open_clip.create_model_and_transforms = original
    model.clip.load_state_dict(synthetic.synthetic_state_dict(model.clip.state_dict(), seed=SEED))
    return model.eval()


def check_full_grid_window(model: object) -> float:
    """The known pitfall: with open_clip >= 2.26 anomalib's windows are silently wrong."""
    image = torch.randn(1, 3, 240, 240, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pooled, _ = model.clip.encode_image(image)
        outputs: dict = {}
        hook = model.clip.visual.patch_dropout.register_forward_hook(
            lambda _m, inp, _o: outputs.__setitem__("fm", inp[0]))
        model.clip.encode_image(image)
        hook.remove()
        full = torch.arange(225).unsqueeze(1)
        window = model._get_window_embeddings(outputs["fm"], full)[:, 0]
    return float((window - pooled).abs().max())


def make_parity(model: object, data: Path, out: Path) -> None:
    queries = [sorted((data / "test" / "pitting").glob("*.jpg"))[0], sorted((data / "test" / "good").glob("*.jpg"))[0]]
    refs = sorted((data / "train" / "good").glob("*.jpg"))[:2]
    images = torch.stack([preprocess(p) for p in queries])
    ref_images = torch.stack([preprocess(p) for p in refs])
    with torch.no_grad():
        model.setup(CLASS_NAME)
        zs = model(images)
        image_emb, window_emb, patch_emb = model.encode_image(images)
        text = model.text_embeddings.clone()
        model.setup(CLASS_NAME, ref_images)
        fs = model(images)
    out.mkdir(parents=True, exist_ok=True)
    # The large intermediates are float16 (the file would be ~7 MB in float32); scores, maps, pooled image
    # and text embeddings, and the inputs stay float32.
    np.savez_compressed(
        out / "winclip_parity.npz",
        images=images.numpy(), ref_images=ref_images.numpy(),
        zs_scores=zs.pred_score.numpy(), zs_maps=zs.anomaly_map.numpy(),
        fs_scores=fs.pred_score.numpy(), fs_maps=fs.anomaly_map.numpy(),
        text_embeddings=text.numpy(), image_embeddings=image_emb.numpy(),
        window_embeddings_2=window_emb[0].numpy().astype(np.float16),
        window_embeddings_3=window_emb[1].numpy().astype(np.float16),
        patch_embeddings=patch_emb.numpy().astype(np.float16),
        seed=np.array(SEED), backbone=np.array("ViT-B-16-plus-240"), class_name=np.array(CLASS_NAME),
        open_clip_version=np.array(OPEN_CLIP_VERSION), anomalib_version=np.array(__import__("anomalib").__version__),
        query_files=np.array([str(p.relative_to(data)) for p in queries]),
        reference_files=np.array([str(p.relative_to(data)) for p in refs]),
    )


def _bump(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, sigma: float) -> np.ndarray:
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2.0 * sigma**2))


def synthetic_aupro_data(seed: int = 0, n: int = 6, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Seeded anomaly maps (float32) and binary masks (uint8) with several connected components.

    Images 1 and 4 have no defect (one of them with a false-positive hot spot). Image 2 holds two squares that
    touch only at a corner: one region under 8-connectivity (anomalib's cv2 default), two under 4-connectivity.
    Image 5 holds a 1-pixel-wide diagonal line (also one region only if 8-connected). Score blobs sit near,
    not exactly on, the masks, with different strengths, so per-region overlap varies.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    masks = np.zeros((n, size, size), dtype=np.uint8)

    def disc(cy: float, cx: float, r: float) -> np.ndarray:
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r

    masks[0][disc(16, 16, 6)] = 1
    masks[0, 40:50, 30:34] = 1
    masks[2][disc(12, 50, 3)] = 1
    masks[2, 30:33, 8:24] = 1
    masks[2, 33:44, 21:24] = 1  # L-shape
    masks[2, 44:50, 40:46] = 1
    masks[2, 50:56, 46:52] = 1  # corner-touching square
    masks[3][((yy - 34) / 14) ** 2 + ((xx - 28) / 7) ** 2 <= 1] = 1
    idx = np.arange(8, 30)
    masks[5, idx, idx + 20] = 1  # diagonal line
    masks[5][disc(52, 6, 5)] = 1  # clipped at the border

    # Smooth background texture plus pixel noise: no ties among the scores.
    maps = 0.25 * rng.normal(size=(n, size, size))
    for i in range(n):
        for _ in range(5):
            cy, cx = rng.uniform(0, size, 2)
            maps[i] += rng.uniform(-0.4, 0.4) * _bump(yy, xx, cy, cx, rng.uniform(6, 14))
        for cy, cx, spread in _components(masks[i]):
            oy, ox = rng.uniform(-2.0, 2.0, 2)
            maps[i] += rng.uniform(0.4, 2.0) * _bump(yy, xx, cy + oy, cx + ox, max(spread, 1.5))
    maps[4] += 1.2 * _bump(yy, xx, 20, 44, 4)  # false positive on a good image
    return maps.astype(np.float32), masks


def _components(mask: np.ndarray) -> list[tuple[float, float, float]]:
    """(centre y, centre x, spread) of each 8-connected component (tiny flood fill: no scipy needed)."""
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        stack, pixels = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        pts = np.array(pixels, dtype=np.float64)
        out.append((*pts.mean(axis=0), float(np.sqrt(len(pixels)) / 2)))
    return out


def anomalib_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
    from anomalib.metrics import AUPRO

    # AnomalibMetric.update reads the named fields off a batch object.
    metric = AUPRO(fields=("anomaly_map", "gt_mask"), fpr_limit=fpr_limit)
    metric.update(SimpleNamespace(anomaly_map=torch.from_numpy(maps), gt_mask=torch.from_numpy(masks).int()))
    return float(metric.compute())


def make_aupro(out: Path, fpr_limit: float = 0.3) -> None:
    """Synthetic maps/masks and anomalib's AUPRO on them, to check linewatch's metric.

    ``maps_quantized`` (scores rounded to 1/8) adds many ties, which anomalib resolves by keeping only the last
    point of each run of equal scores.
    """
    maps, masks = synthetic_aupro_data()
    maps_q = (np.round(maps * 8) / 8).astype(np.float32)
    value = anomalib_aupro(maps, masks, fpr_limit)
    value_q = anomalib_aupro(maps_q, masks, fpr_limit)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "aupro.npz", maps=maps, masks=masks, aupro=np.array(value),
                        maps_quantized=maps_q, aupro_quantized=np.array(value_q), fpr_limit=np.array(fpr_limit))
    print(f"aupro.npz: anomalib AUPRO(fpr_limit={fpr_limit}) = {value:.6f} (quantized maps: {value_q:.6f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path,
                        default=Path(os.environ.get("LINEWATCH_BALL_SCREW", ROOT.parent / "shared/data/ball_screw")))
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--aupro-only", action="store_true", help="only regenerate aupro.npz")
    args = parser.parse_args()
    if OPEN_CLIP_VERSION != "2.24.0":
        sys.exit(f"reference needs open_clip_torch==2.24.0, found {OPEN_CLIP_VERSION}")
    if not args.aupro_only:
        model = build_model(load_synthetic())
        diff = check_full_grid_window(model)
        print(f"full-grid window vs image embedding (anomalib, open_clip {OPEN_CLIP_VERSION}): max abs diff {diff:.2e}")
        if diff > 1e-4:
            sys.exit("anomalib's window path is wrong in this environment; fixtures not written")
        make_parity(model, args.data, args.out)
    make_aupro(args.out)
    for f in sorted(args.out.glob("*.npz")):
        with np.load(f, allow_pickle=False) as data:
            keys = ", ".join(f"{k}{list(data[k].shape)}:{data[k].dtype}" for k in data.files)
        print(f"wrote {f} ({f.stat().st_size / 1e6:.2f} MB): {keys}")


if __name__ == "__main__":
    main()
