"""Walking a dataset in the MVTec AD folder layout."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.engine.engine import list_images


@dataclass(frozen=True)
class Item:
    path: Path
    label: int  # 0 normal, 1 anomalous
    mask: Path | None
    defect: str


@dataclass(frozen=True)
class Category:
    name: str
    root: Path
    test: list[Item]
    train_good: list[Path]


def category_root(root: Path, category: str) -> Path:
    """Accept DATASET/<category>/ or the category folder itself."""
    for candidate in (root / category, root):
        if (candidate / "test").is_dir():
            return candidate
    raise FileNotFoundError(f"no MVTec-style category {category!r} under {root} (expected {root / category}/test)")


def load_category(root: Path, category: str) -> Category:
    base = category_root(Path(root), category)
    items: list[Item] = []
    for defect_dir in sorted(p for p in (base / "test").iterdir() if p.is_dir()):
        defect = defect_dir.name
        for image in list_images(defect_dir):
            if defect == "good":
                items.append(Item(image, 0, None, defect))
                continue
            mask = base / "ground_truth" / defect / f"{image.stem}_mask.png"
            if not mask.is_file():
                raise FileNotFoundError(f"missing ground-truth mask {mask} for {image}")
            items.append(Item(image, 1, mask, defect))
    if not items:
        raise FileNotFoundError(f"no test images under {base / 'test'}")
    train = base / "train" / "good"
    return Category(category, base, items, list_images(train) if train.is_dir() else [])
