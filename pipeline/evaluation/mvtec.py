"""Walking one category of a dataset in the MVTec AD folder layout.

    <root>/<category>/train/good/*.png
    <root>/<category>/test/{good,<defect>...}/*.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.engine.engine import list_images


@dataclass(frozen=True)
class EvalItem:
    path: Path
    label: int  # 0 normal, 1 anomalous
    mask: Path | None  # None for normal images
    defect: str  # "good" or the defect folder's name


@dataclass(frozen=True)
class Category:
    name: str
    root: Path  # the category folder itself
    test: list[EvalItem]
    train_good: list[Path]  # sorted


def category_root(root: Path, category: str | None = None) -> Path:
    """root/<category> when it exists, else root itself when it already is the category folder."""
    candidates = (root / category, root) if category else (root,)
    for candidate in candidates:
        if (candidate / "test").is_dir():
            return candidate
    if not category:
        raise FileNotFoundError(f"{root} is not an MVTec-style category folder (no {root / 'test'})")
    raise FileNotFoundError(f"no MVTec-style category {category!r} under {root} "
                            f"(expected {root / category / 'test'} or {root / 'test'})")


def load_category(root: Path | str, category: str | None = None) -> Category:
    """Test items (sorted by defect folder, then file name) and the sorted train/good paths.

    root is the dataset (holding <category>/) or the category folder itself; without a category
    it must be the latter and the folder's name is the category. Every anomalous image must have
    its mask; a missing one is a FileNotFoundError naming it.
    """
    base = category_root(Path(root), category)
    items: list[EvalItem] = []
    for defect_dir in sorted(p for p in (base / "test").iterdir() if p.is_dir()):
        defect = defect_dir.name
        for image in list_images(defect_dir):
            if defect == "good":
                items.append(EvalItem(image, 0, None, defect))
                continue
            mask = base / "ground_truth" / defect / f"{image.stem}_mask.png"
            if not mask.is_file():
                raise FileNotFoundError(f"missing ground-truth mask {mask} for {image}")
            items.append(EvalItem(image, 1, mask, defect))
    if not items:
        raise FileNotFoundError(f"no test images under {base / 'test'}")
    train = base / "train" / "good"
    return Category(category or base.name, base, items, list_images(train) if train.is_dir() else [])
