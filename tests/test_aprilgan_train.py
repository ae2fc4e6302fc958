"""Training AprilGAN's projections for real on a tiny synthetic MVTec-layout set (random ViT-S-32),
and `linewatch train aprilgan` / `linewatch eval --method aprilgan` as subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline.config import EngineSettings
from pipeline.engine.aprilgan import load_projections
from pipeline.engine.aprilgan_train import (
    TrainConfig,
    collect_items,
    dice_loss,
    focal_loss,
    save_projections,
    train_projections,
)
from pipeline.engine.engine import AnomalyEngine
from tests.engine_helpers import SMALL, backbone

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL_FLAGS = ["--backbone", SMALL, "--pretrained", "random", "--device", "cpu"]
CLASSES = ("widget", "gizmo")


def write_image(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def make_dataset(root: Path, seed: int = 0) -> Path:
    """DATA/<class>/{train/good, test/good, test/scratch, ground_truth/scratch}: textured 128x96 parts,
    defects are bright rectangles whose masks are stored beside them."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        base_colour = np.array([60 + 80 * c, 120, 180 - 80 * c], dtype=np.float32)

        def part(colour: np.ndarray = base_colour) -> np.ndarray:
            noise = rng.normal(0, 12, size=(96, 128, 3))
            return np.clip(colour + noise, 0, 255).astype(np.uint8)

        for i in range(2):
            write_image(root / name / "train" / "good" / f"{i:03d}.png", part())
            write_image(root / name / "test" / "good" / f"{i:03d}.png", part())
        for i in range(4):
            image, mask = part(), np.zeros((96, 128), np.uint8)
            y, x = rng.integers(8, 50), rng.integers(8, 70)
            h, w = rng.integers(24, 40), rng.integers(30, 50)
            image[y : y + h, x : x + w] = (250, 250, 250)
            mask[y : y + h, x : x + w] = 255
            write_image(root / name / "test" / "scratch" / f"{i:03d}.png", image)
            write_image(root / name / "ground_truth" / "scratch" / f"{i:03d}_mask.png", mask)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("aprilgan") / "data")


def linewatch(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEWATCH_")}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "--log-level", "warning", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_losses_reward_the_right_map() -> None:
    mask = torch.zeros(1, 8, 8)
    mask[:, 2:5, 2:5] = 1
    right = torch.stack((1 - mask, mask), dim=1) * 0.98 + 0.01
    wrong = right.flip(1)
    assert float(focal_loss(right, mask)) < 1e-3 < float(focal_loss(wrong, mask))
    assert float(dice_loss(right[:, 1], mask)) < 0.05 and float(dice_loss(wrong[:, 1], mask)) > 0.9


def test_collect_items_one_or_several_classes(dataset: Path) -> None:
    items = collect_items(dataset)
    assert {it.product_class for it in items} == set(CLASSES)
    assert len(items) == 12 and sum(it.mask is not None for it in items) == 8
    single = collect_items(dataset / "widget")
    assert len(single) == 6 and {it.product_class for it in single} == {"widget"}
    with pytest.raises(FileNotFoundError, match="MVTec-style"):
        collect_items(dataset / "widget" / "train")


def test_training_lowers_the_loss_and_the_checkpoint_round_trips(dataset: Path, tmp_path: Path) -> None:
    bb, fp = backbone(SMALL)
    before = [p.detach().clone() for p in bb.model.parameters()]
    items = collect_items(dataset)
    result = train_projections(bb, items, TrainConfig(steps=10, batch_size=4, lr=1e-2, seed=5, progress=False))
    losses = result.losses
    assert len(losses) == 10 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.9 * np.mean(losses[:3]), losses
    # The backbone stayed frozen.
    assert all(torch.equal(a, b) for a, b in zip(before, bb.model.parameters(), strict=True))

    path = save_projections(result.projections, tmp_path / "ckpt" / "aprilgan.pt", pretrained="random")
    state = torch.load(path, weights_only=True)
    assert state["format"] == "linewatch-aprilgan-projections" and state["stages"] == [3, 6, 9, 12]
    assert state["classes"] == sorted(CLASSES) and state["steps"] == 10 and state["seed"] == 5
    loaded = load_projections(path, bb)
    assert loaded.trained and loaded.stages == result.projections.stages
    assert torch.equal(loaded.weight, result.projections.weight) and torch.equal(loaded.bias, result.projections.bias)

    settings = EngineSettings(method="aprilgan", backbone=SMALL, pretrained="random", precision="fp32",
                              device="cpu", projections=path)
    engine = AnomalyEngine(settings, backbone=bb, fingerprint=fp)
    assert engine.aprilgan is not None and engine.aprilgan.projections.trained
    image = cv2.cvtColor(cv2.imread(str(items[-1].path)), cv2.COLOR_BGR2RGB)
    result_frame = engine.score([image], "widget")[0]
    assert result_frame.frame_map().shape == image.shape[:2] and 0.0 <= result_frame.image_score <= 1.0


def test_cli_train_then_eval_with_and_without_projections_and_shots(dataset: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "proj.pt"
    proc = ok(linewatch("train", "aprilgan", "--data", str(dataset), "--out", str(ckpt), "--steps", "2",
                        "--batch-size", "4", "--seed", "3", *SMALL_FLAGS))
    assert ckpt.is_file() and "wrote" in proc.stdout and "2 steps" in proc.stdout
    assert "train aprilgan" in proc.stderr  # the progress bar
    runs = {
        "untrained": [],
        "projections": ["--projections", str(ckpt)],
        "fewshot": ["--projections", str(ckpt), "--k-shot", "2"],
    }
    for label, extra in runs.items():
        out = tmp_path / label
        proc = ok(linewatch("eval", str(dataset), "--category", "gizmo", "--method", "aprilgan", "--out", str(out),
                            "--batch-size", "4", "--precision", "fp32", *SMALL_FLAGS, *extra))
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["method"] == "aprilgan" and metrics["n_images"] == 6
        assert metrics["k_shot"] == (2 if label == "fewshot" else 0)
        assert 0.0 <= metrics["image_auroc"] <= 1.0 and 0.0 <= metrics["pixel_auroc"] <= 1.0
        assert ("aprilgan_untrained_projections" in proc.stderr) == (label == "untrained")


def test_cli_errors_are_one_line(dataset: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    torch.save({"fc.0.weight": torch.zeros(3, 3), "fc.0.bias": torch.zeros(3)}, bad)
    proc = linewatch("eval", str(dataset), "--category", "gizmo", "--method", "aprilgan", "--out",
                     str(tmp_path / "e"), "--projections", str(bad), *SMALL_FLAGS)
    assert proc.returncode == 2 and "fc.0 has shape (3, 3)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("linewatch eval: error:")
    proc = linewatch("train", "aprilgan", "--data", str(dataset / "widget" / "train"), "--out",
                     str(tmp_path / "x.pt"), *SMALL_FLAGS)
    assert proc.returncode == 2 and "MVTec-style" in proc.stderr
    assert not (tmp_path / "x.pt").exists()
