"""`linewatch score`, `eval` and `calibrate` as real subprocesses on the shared ball-screw images.

A random-weight ViT-S-32 keeps each run to seconds: scores mean nothing, so these tests check
behaviour, shapes, files and errors, not accuracy.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import RedisSettings
from pipeline.evaluation.mvtec import load_category
from pipeline.imaging import read_image
from pipeline.redis_store import ThresholdStore, connect

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--backbone", "ViT-S-32", "--pretrained", "random", "--precision", "fp32", "--device", "cpu"]
METRIC_KEYS = ("image_auroc", "f1_max", "pixel_auroc", "pixel_f1_max", "aupro")


def clean_env(**extra: str) -> dict[str, str]:
    """The test runner's environment without linewatch settings that could leak in, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEWATCH_")}
    return {**env, **extra}


def linewatch(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "--log-level", "warning", *args], cwd=REPO_ROOT,
                          env=env or clean_env(), capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def first(folder: Path, n: int) -> list[Path]:
    return sorted(folder.glob("*.jpg"))[:n]


@pytest.fixture
def mini_mvtec(shared_data: Path, tmp_path: Path) -> Path:
    """DATASET/ball_screw with 3 good + 3 pitting test images (masks included) and 2 train/good."""
    cat = tmp_path / "dataset" / "ball_screw"
    for sub in ("train/good", "test/good", "test/pitting", "ground_truth/pitting"):
        (cat / sub).mkdir(parents=True)
    for p in first(shared_data / "train" / "good", 2):
        shutil.copy(p, cat / "train" / "good")
    for p in first(shared_data / "test" / "good", 3):
        shutil.copy(p, cat / "test" / "good")
    for p in first(shared_data / "test" / "pitting", 3):
        shutil.copy(p, cat / "test" / "pitting")
        shutil.copy(shared_data / "ground_truth" / "pitting" / f"{p.stem}_mask.png", cat / "ground_truth" / "pitting")
    return cat


def test_load_category_accepts_dataset_or_category_folder(shared_data: Path) -> None:
    direct = load_category(shared_data, "ball_screw")
    parent = load_category(shared_data.parent, "ball_screw")
    assert direct.test == parent.test and direct.train_good == parent.train_good
    labels = [it.label for it in direct.test]
    assert 0 < sum(labels) < len(labels)
    assert all((it.mask is None) == (it.label == 0) for it in direct.test)
    assert all(it.mask is not None and it.mask.is_file() for it in direct.test if it.label)
    assert direct.train_good == sorted(direct.train_good) and direct.train_good


def test_load_category_errors(mini_mvtec: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_category(tmp_path / "nowhere", "ball_screw")
    empty = tmp_path / "empty" / "ball_screw"
    (empty / "test" / "good").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no test images"):
        load_category(empty.parent, "ball_screw")
    mask = sorted((mini_mvtec / "ground_truth" / "pitting").iterdir())[0]
    mask.unlink()
    with pytest.raises(FileNotFoundError, match=mask.name):
        load_category(mini_mvtec.parent, "ball_screw")


def test_overlay_sample_spreads_over_both_labels() -> None:
    from pipeline.evaluation.runner import overlay_sample

    labels = [0] * 20 + [1] * 20
    picked = overlay_sample(labels, 8)
    assert sorted(picked) == [0, 6, 13, 19, 20, 26, 33, 39]
    assert sorted(overlay_sample([0] * 30 + [1] * 2, 8)) == [0, 6, 12, 17, 23, 29, 30, 31]  # short label's share moves
    assert overlay_sample([0, 1, 1], 8) == {0, 1, 2}


def test_score_writes_one_map_per_image_at_its_size(shared_data: Path, tmp_path: Path) -> None:
    good = first(shared_data / "test" / "good", 1)[0]
    pitted = first(shared_data / "test" / "pitting", 1)[0]
    small = tmp_path / "small.png"  # a second size: maps must follow each image, not the first
    cv2.imwrite(str(small), cv2.resize(cv2.imread(str(pitted)), (301, 157)))
    out = tmp_path / "out" / "scores.npz"
    proc = ok(linewatch("score", str(good), str(small), "--class", "ball_screw", "--out", str(out), *SMALL))
    with np.load(out, allow_pickle=False) as z:
        assert sorted(z.files) == ["map_0", "map_1", "paths", "scores"]
        assert z["scores"].shape == (2,) and z["scores"].dtype == np.float32
        assert list(z["paths"]) == [str(good), str(small)]
        for i, path in enumerate((good, small)):
            amap = z[f"map_{i}"]
            assert amap.dtype == np.float32 and amap.shape == read_image(str(path)).shape[:2]
            assert np.isfinite(amap).all()
        table = proc.stdout.splitlines()
        for path, score in zip((good, small), z["scores"], strict=True):
            assert any(line.startswith(str(path)) and f"{score:.4f}" in line for line in table)


def test_eval_on_a_small_mvtec_copy(mini_mvtec: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    proc = ok(linewatch("eval", str(mini_mvtec.parent), "--category", "ball_screw", "--k-shot", "1",
                        "--batch-size", "4", "--out", str(out), *SMALL))
    metrics = json.loads((out / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert 0.0 <= metrics[key] <= 1.0, key
        assert key in proc.stdout
    assert metrics["n_images"] == 6 and metrics["k_shot"] == 1 and metrics["pixel_eval_size"] == 256
    assert metrics["method"] == "winclip" and metrics["backbone"] == "ViT-S-32"
    assert metrics["pretrained"] == "random" and metrics["precision"] == "fp32"
    assert metrics["seconds_per_image"] > 0
    tests = sorted((mini_mvtec / "test").glob("*/*.jpg"))
    overlays = sorted((out / "overlays").glob("*.png"))
    assert [p.stem for p in overlays] == sorted(p.stem for p in tests)  # 6 items <= 8: every one drawn
    for p in tests:
        assert cv2.imread(str(out / "overlays" / f"{p.stem}.png")).shape == cv2.imread(str(p)).shape
    # The ground-truth outline is drawn in white over the heat map.
    pitted = sorted((mini_mvtec / "test" / "pitting").glob("*.jpg"))[0]
    mask = cv2.imread(str(mini_mvtec / "ground_truth" / "pitting" / f"{pitted.stem}_mask.png"), cv2.IMREAD_GRAYSCALE)
    contours, _ = cv2.findContours((mask > 127).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    outline = np.concatenate(contours)[:, 0]  # (k, 2) x, y
    drawn = cv2.imread(str(out / "overlays" / f"{pitted.stem}.png"))[outline[:, 1], outline[:, 0]]
    assert (drawn == 255).all()


def test_calibrate_stores_threshold_in_redis(shared_data: Path, tmp_path: Path,
                                             redis_settings: RedisSettings) -> None:
    normal = tmp_path / "normal"
    normal.mkdir()
    for p in first(shared_data / "train" / "good", 2):
        shutil.copy(p, normal)
    env = clean_env(LINEWATCH_REDIS__URL=str(redis_settings.url),
                    LINEWATCH_REDIS__KEY_PREFIX=redis_settings.key_prefix)
    proc = ok(linewatch("calibrate", "--class", "ball_screw", "--images", str(normal), "--quantile", "1.0",
                        "--margin", "0.25", *SMALL, env=env))
    store = ThresholdStore(connect(redis_settings), redis_settings.key_prefix)
    value = store.get("ball_screw")
    assert value is not None and f"threshold {value:.6f}" in proc.stdout
    meta = store.meta("ball_screw")
    assert meta is not None and meta["n_images"] == 2 and meta["margin"] == 0.25 and meta["method"] == "winclip"
    assert store.get("other_class") is None


def test_user_errors_are_one_line(shared_data: Path, mini_mvtec: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty"
    empty.mkdir()
    image = str(first(shared_data / "test" / "good", 1)[0])
    mask = sorted((mini_mvtec / "ground_truth" / "pitting").iterdir())[-1]
    mask.unlink()
    redis_env = clean_env(LINEWATCH_REDIS__URL="redis://127.0.0.1:9")  # never reached: input is checked first
    out = str(tmp_path / "x.npz")
    cases = {
        "garbage image": (["score", str(garbage), "--class", "c", "--out", out, *SMALL], None, "garbage.jpg"),
        "unknown method": (["score", image, "--class", "c", "--out", out, "--method", "padim"], None, "padim"),
        "worker without kafka": (["score"], None, "Kafka"),
        "empty folder": (["calibrate", "--class", "c", "--images", str(empty), *SMALL], redis_env, "no images"),
        "missing mask": (["eval", str(mini_mvtec), "--category", "ball_screw", "--out", str(tmp_path / "e"), *SMALL],
                         None, mask.name),
    }
    # All at once: each run is mostly interpreter and torch import time.
    running = {name: subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO_ROOT,
                                      env=env or clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
               for name, (args, env, _) in cases.items()}
    for name, proc in running.items():
        _, stderr = proc.communicate(timeout=240)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert proc.returncode != 0, name
        assert "Traceback" not in stderr, f"{name}: {stderr}"
        assert len(lines) == 1, f"{name}: {stderr}"
        assert cases[name][2] in lines[0], f"{name}: {lines[0]}"
