"""Weights loading: the real path (tag or file), explicit random, and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from structlog.testing import capture_logs

from pipeline.engine.weights import WeightsError, create_random_model, load_backbone, load_model, weights_fingerprint
from tests.engine_helpers import SMALL


def test_checkpoint_file_loads_through_the_real_path(tmp_path: Path) -> None:
    """A test-made checkpoint goes through open_clip's file loading exactly like a downloaded one."""
    model = create_random_model(SMALL, seed=7)
    ckpt = tmp_path / "small.pt"
    torch.save(model.state_dict(), ckpt)
    loaded = load_model(SMALL, str(ckpt))
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    _, fingerprint = load_backbone(SMALL, str(ckpt))
    assert "file-" in fingerprint
    assert fingerprint != weights_fingerprint(SMALL, "random")


def test_random_differs_from_a_different_seed_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "seed3.pt"
    torch.save(create_random_model(SMALL, seed=3).state_dict(), ckpt)
    a = load_model(SMALL, str(ckpt)).state_dict()
    b = load_model(SMALL, "random").state_dict()
    assert not torch.equal(a["visual.proj"], b["visual.proj"])


def test_mismatching_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    ckpt = tmp_path / "other.pt"
    torch.save(create_random_model("ViT-M-32").state_dict(), ckpt)
    with pytest.raises(WeightsError, match=r"other\.pt"):
        load_model(SMALL, str(ckpt))


def test_unknown_tag_lists_known_tags() -> None:
    with pytest.raises(WeightsError, match="laion400m_e31"):
        load_model("ViT-B-16-plus-240", "no-such-tag")


def test_missing_file_is_named() -> None:
    with pytest.raises(WeightsError, match=r"/nope/weights\.pt"):
        load_model(SMALL, "/nope/weights.pt")


def test_unknown_backbone() -> None:
    with pytest.raises(WeightsError, match="unknown backbone"):
        load_model("ViT-Nope", "random")


def test_tag_without_network_fails_loudly(tmp_path: Path) -> None:
    """No silent random fallback: an unreachable download is an error naming the tag.

    Runs in a subprocess because the hub library reads HF_HUB_OFFLINE when it is imported.
    """
    code = (
        "from pipeline.engine.weights import WeightsError, load_model\n"
        "try:\n"
        f"    load_model('ViT-B-16-plus-240', 'laion400m_e31', cache_dir={str(tmp_path)!r})\n"
        "except WeightsError as exc:\n"
        "    print('WeightsError:', exc)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "WeightsError:" in proc.stdout, proc.stderr[-2000:]
    assert "laion400m_e31" in proc.stdout and "download" in proc.stdout


def test_random_weights_warn_every_time() -> None:
    with capture_logs() as logs:
        load_model(SMALL, "random")
        load_model(SMALL, "random")
    warnings = [e for e in logs if e["event"] == "random_weights"]
    assert len(warnings) == 2 and all(e["log_level"] == "warning" for e in warnings)
