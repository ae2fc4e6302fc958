"""`linewatch score | eval | calibrate` as real subprocesses on a small random backbone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import RedisSettings
from pipeline.redis_store import ThresholdStore, connect

ENGINE = ["--backbone", "ViT-S-32", "--pretrained", "random", "--precision", "fp32"]


def linewatch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LINEWATCH_")}
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          env={**clean, **(env or {})}, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-2000:]


@pytest.fixture(scope="module")
def small_dataset(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mvtec") / "ball_screw"
    for sub, n in (("test/good", 3), ("test/pitting", 3), ("train/good", 2)):
        (root / sub).mkdir(parents=True)
        for p in sorted((shared_data / sub).glob("*.jpg"))[:n]:
            shutil.copy(p, root / sub / p.name)
            if sub == "test/pitting":
                (root / "ground_truth/pitting").mkdir(parents=True, exist_ok=True)
                mask = shared_data / "ground_truth/pitting" / f"{p.stem}_mask.png"
                shutil.copy(mask, root / "ground_truth/pitting" / mask.name)
    return root


def test_score_writes_maps_at_image_size(shared_data: Path, tmp_path: Path) -> None:
    from pipeline.imaging import read_image

    images = sorted((shared_data / "test/pitting").glob("*.jpg"))[:2]
    out = tmp_path / "scores.npz"
    proc = linewatch("score", *map(str, images), "--class", "ball_screw", *ENGINE, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    with np.load(out, allow_pickle=False) as data:
        assert data["scores"].shape == (2,) and data["scores"].dtype == np.float32
        assert list(data["paths"]) == [str(p) for p in images]
        for i, p in enumerate(images):
            assert data[f"map_{i}"].shape == read_image(str(p)).shape[:2]
            assert data[f"map_{i}"].dtype == np.float32
    assert "score" in proc.stdout and images[0].name in proc.stdout


def test_eval_writes_metrics_and_overlays(small_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    proc = linewatch("eval", str(small_dataset.parent), "--category", "ball_screw", "--k-shot", "1", *ENGINE,
                     "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["n_images"] == 6 and metrics["k_shot"] == 1 and metrics["seconds_per_image"] > 0
    overlays = list((out / "overlays").glob("*.png"))
    assert {p.name.split("_")[0] for p in overlays} == {"good", "pitting"}
    assert "image_auroc" in proc.stdout


def test_bad_input_is_a_one_line_error(small_dataset: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all")
    assert_one_line_error(linewatch("score", str(garbage), "--class", "x", *ENGINE, "--out", str(tmp_path / "o.npz")),
                          "garbage.jpg")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(linewatch("eval", str(empty), "--category", "nothing", *ENGINE, "--out", str(tmp_path)),
                          "nothing")
    broken = tmp_path / "broken" / "ball_screw"
    shutil.copytree(small_dataset, broken)
    shutil.rmtree(broken / "ground_truth")
    assert_one_line_error(linewatch("eval", str(broken.parent), "--category", "ball_screw", *ENGINE,
                                    "--out", str(tmp_path / "e")), "mask")
    proc = linewatch("score", "x.jpg", "--class", "x", "--method", "patchcore", "--out", "o.npz")
    assert proc.returncode != 0 and "invalid choice" in proc.stderr and "Traceback" not in proc.stderr
    assert_one_line_error(linewatch("score", str(garbage), "--out", str(tmp_path / "o.npz")), "--class")


def test_calibrate_stores_the_threshold(shared_data: Path, redis_settings: RedisSettings, tmp_path: Path) -> None:
    normal = tmp_path / "normal"
    normal.mkdir()
    for p in sorted((shared_data / "train/good").glob("*.jpg"))[:4]:
        shutil.copy(p, normal / p.name)
    env = {"LINEWATCH_REDIS__URL": redis_settings.url or "", "LINEWATCH_REDIS__KEY_PREFIX": redis_settings.key_prefix}
    proc = linewatch("calibrate", "--class", "ball_screw", "--images", str(normal), "--quantile", "0.5", *ENGINE,
                     env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    store = ThresholdStore(connect(redis_settings), redis_settings.key_prefix)
    value = store.get("ball_screw")
    assert value is not None and f"{value:.6f}" in proc.stdout
    assert store.meta("ball_screw")["n_images"] == 4
    assert_one_line_error(linewatch("calibrate", "--class", "b", "--images", str(normal), *ENGINE), "Redis URL")
