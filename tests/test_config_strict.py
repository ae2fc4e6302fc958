"""Configuration is strict and early: unknown keys everywhere, one-line errors naming file and key,
paths next to the config file, and weights that cannot arrive offline refused at once."""

from __future__ import annotations

import os
from pathlib import Path

import open_clip
import pytest

from pipeline.capture.sources import check_sources
from pipeline.config import ConfigError, Section, Settings, load_settings
from pipeline.engine.weights import cached_tag_file, check_tag_available
from pipeline.errors import WeightsError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_every_section_refuses_unknown_keys() -> None:
    sections = [f.annotation for f in Settings.model_fields.values()
                if isinstance(f.annotation, type) and issubclass(f.annotation, Section)]
    assert len(sections) >= 10
    for model in sections:
        assert model.model_config.get("extra") == "forbid", model.__name__


@pytest.mark.parametrize(("yaml_text", "expected"), [
    ("alert: {defualt_threshold: 0.63}\n", "alert.defualt_threshold: unknown key (did you mean default_threshold?)"),
    ("scoring: {stalenes_s: 3}\n", "scoring.stalenes_s: unknown key (did you mean staleness_s?)"),
    ("enigne: {method: alfa}\n", "enigne: unknown key (did you mean engine?)"),
    ("cameras:\n  - {id: a, product_class: b, source: c}\n  - {id: d, product_class: e, sorce: f}\n",
     "cameras[1].sorce: unknown key (did you mean source?)"),
    ("api: {zzz: 1}\n",
     "api.zzz: unknown key (known keys: camera_ttl_s, group_id, host, max_cameras, max_events, port, token)"),
    ("alert: {k: many}\n", "alert.k: Input should be a valid integer"),
])
def test_errors_are_one_line_naming_file_and_key(tmp_path: Path, yaml_text: str, expected: str) -> None:
    cfg = write(tmp_path / "x.yaml", yaml_text)
    with pytest.raises(ConfigError) as info:
        load_settings(cfg)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{cfg}: {expected}"), message


def test_an_environment_variable_is_named_as_such(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINEWATCH_ALERT__QUIET", "2")
    expected = r"^LINEWATCH_ALERT__QUIET: alert\.quiet: unknown key \(did you mean quiet_s\?\)"
    with pytest.raises(ConfigError, match=expected):
        load_settings()


def test_broken_yaml_names_the_line(tmp_path: Path) -> None:
    cfg = write(tmp_path / "x.yaml", "alert:\n  k: 2\n   n: 3\n")
    with pytest.raises(ConfigError, match=rf"^{cfg}:3: not valid YAML"):
        load_settings(cfg)


def test_relative_paths_are_read_next_to_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "site" / "stream").mkdir(parents=True)
    (tmp_path / "site" / "stream" / "f0.jpg").write_bytes(b"x")
    write(tmp_path / "site" / "lw.yaml",
          "engine: {shots_dir: refs}\ncameras:\n"
          "  - {id: a, product_class: b, source: stream}\n"
          "  - {id: c, product_class: b, source: 'rtsp://cam/1'}\n"
          "  - {id: d, product_class: b, source: '0'}\n")
    monkeypatch.chdir(tmp_path)
    settings = load_settings("site/lw.yaml")
    assert [c.source for c in settings.cameras] == ["site/stream", "rtsp://cam/1", "0"]
    assert settings.engine.shots_dir == Path("site/refs")
    check_sources(settings.cameras)  # the folder exists; URLs and devices are not probed

    settings.cameras[0].source = "site/nope"
    with pytest.raises(ConfigError, match=r"camera a: source site/nope does not exist"):
        check_sources(settings.cameras)


def _fake_hub_cache(root: Path, backbone: str, tag: str) -> None:
    repo_id, _ = os.path.split(open_clip.get_pretrained_cfg(backbone, tag)["hf_hub"])
    repo = root / f"models--{repo_id.replace('/', '--')}"
    write(repo / "refs" / "main", "abc123")
    write(repo / "snapshots" / "abc123" / "open_clip_model.safetensors", "weights")


def test_offline_tag_check_uses_the_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    with pytest.raises(WeightsError, match=r"not in the local cache.*HF_HUB_OFFLINE.*local checkpoint file.*'random'"):
        check_tag_available("ViT-B-32", "laion400m_e31", str(cache))
    _fake_hub_cache(cache, "ViT-B-32", "laion400m_e31")
    assert cached_tag_file("ViT-B-32", "laion400m_e31", str(cache))
    check_tag_available("ViT-B-32", "laion400m_e31", str(cache))  # cached: nothing to download
    with pytest.raises(WeightsError, match="neither a known open_clip tag"):
        check_tag_available("ViT-B-32", "no-such-tag", str(cache))
