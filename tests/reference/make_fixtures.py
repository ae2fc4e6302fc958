"""Generate the anomalib parity fixtures (run with the reference venv, from the repository root).

    bash tests/reference/build_venv.sh
    /tmp/linewatch-refvenv/bin/python tests/reference/make_fixtures.py [--data ../shared/data/ball_screw]

anomalib's WinClipModel is correct only with open_clip < 2.26, so it runs here beside
open_clip 2.24.0 while linewatch uses the current open_clip. Both load identical synthetic weights
from pipeline/engine/synthetic_weights.py (loaded by file path: this environment has no linewatch).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

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
    img = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1)
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


def make_parity(model: object, data: Path) -> None:
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
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        OUT / "winclip_parity.npz",
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


def make_aupro() -> None:
    """Synthetic maps/masks and anomalib's AUPRO on them, to check linewatch's metric."""
    from anomalib.metrics.aupro import _AUPRO as AUPRO

    rng = np.random.default_rng(0)
    n, size = 6, 64
    masks = np.zeros((n, size, size), dtype=np.int64)
    maps = rng.normal(0.0, 1.0, (n, size, size)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        for _ in range(i % 3):  # images 0 and 3 have no defect; others one or two blobs
            cy, cx, r = rng.integers(10, 54), rng.integers(10, 54), rng.integers(3, 9)
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            masks[i][blob] = 1
            maps[i][blob] += rng.uniform(0.5, 2.5)
    metric = AUPRO(fpr_limit=0.3)
    metric.update(torch.from_numpy(maps), torch.from_numpy(masks))
    value = float(metric.compute())
    np.savez_compressed(OUT / "aupro.npz", maps=maps, masks=masks.astype(np.uint8), aupro=np.array(value),
                        fpr_limit=np.array(0.3))
    print(f"aupro.npz: anomalib AUPRO = {value:.6f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "ball_screw")
    parser.add_argument("--aupro-only", action="store_true", help="only regenerate aupro.npz")
    args = parser.parse_args()
    if OPEN_CLIP_VERSION != "2.24.0":
        sys.exit(f"reference needs open_clip_torch==2.24.0, found {OPEN_CLIP_VERSION}")
    if (OUT / "winclip_parity.npz").is_file() and "--aupro-only" in sys.argv:
        make_aupro()
        return
    model = build_model(load_synthetic())
    diff = check_full_grid_window(model)
    print(f"full-grid window vs image embedding (anomalib, open_clip {OPEN_CLIP_VERSION}): max abs diff {diff:.2e}")
    if diff > 1e-4:
        sys.exit("anomalib's window path is wrong in this environment; fixtures not written")
    make_parity(model, args.data)
    make_aupro()
    for f in sorted(OUT.glob("*.npz")):
        print(f"wrote {f.relative_to(ROOT)} ({f.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
