"""Creating a CLIP backbone from configuration: an open_clip tag, a local file, or "random".

The engine never falls back to random weights by itself: a tag that cannot be downloaded or a
file that does not match the architecture is an error naming what was tried. "random" must be
asked for explicitly and is announced with a warning on every start.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import open_clip
import torch

from pipeline.engine.backbone import ClipBackbone
from pipeline.engine.synthetic_weights import synthetic_state_dict
from pipeline.errors import WeightsError
from pipeline.logging import get_logger

log = get_logger(__name__)

RANDOM = "random"


def file_digest(path: Path, limit: int = 1 << 62) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
            limit -= len(chunk)
            if limit <= 0:
                break
    return h.hexdigest()[:16]


def weights_fingerprint(backbone: str, pretrained: str, seed: int = 0) -> str:
    """Identifies the exact weights; part of every prompt-cache key and score message."""
    if pretrained == RANDOM:
        source = f"random-seed{seed}"
    elif os.path.isfile(pretrained):
        source = "file-" + file_digest(Path(pretrained))
    else:
        source = f"tag-{pretrained}"
    return hashlib.sha256(f"{backbone}|{source}|open_clip".encode()).hexdigest()[:12] + f":{backbone}:{source}"


def _check_model_name(backbone: str) -> None:
    if backbone not in open_clip.list_models():
        raise WeightsError(f"unknown backbone {backbone!r}; open_clip models include e.g. ViT-B-16-plus-240")


def create_random_model(backbone: str, seed: int = 0) -> torch.nn.Module:
    """Architecture with deterministic synthetic weights (identical across open_clip versions)."""
    _check_model_name(backbone)
    model = open_clip.create_model(backbone, pretrained=None)
    model.load_state_dict(synthetic_state_dict(model.state_dict(), seed=seed))
    return model


_HF_WEIGHTS = "open_clip_pytorch_model.bin"
_HF_SAFE = "open_clip_model.safetensors"


def cached_tag_file(backbone: str, tag: str, cache_dir: str | None = None) -> str | None:
    """Where open_clip's download of ``tag`` already lies on this machine, or None (no network use)."""
    cfg = open_clip.get_pretrained_cfg(backbone, tag) or {}
    if cfg.get("file"):
        return str(cfg["file"]) if os.path.isfile(cfg["file"]) else None
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub)
        names = [_HF_SAFE, filename or _HF_WEIGHTS] if not filename else [filename.replace(".bin", ".safetensors"),
                                                                          filename]
        for name in names:
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    url = cfg.get("url", "")
    if url:
        target = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        if os.path.isfile(target):
            return target
    return None


def offline_reason(probe_host: str = "huggingface.co", timeout_s: float = 3.0) -> str | None:
    """Why downloads cannot work here (HF_HUB_OFFLINE, no route to the hub), or None if they may."""
    if (os.environ.get("HF_HUB_OFFLINE") or "").strip().lower() in {"1", "true", "yes", "on"}:
        return "HF_HUB_OFFLINE is set"
    try:
        # One quick connection instead of a minute of download retries inside open_clip.
        socket.create_connection((probe_host, 443), timeout=timeout_s).close()
    except OSError as exc:
        return f"{probe_host} is unreachable ({exc.strerror or exc})"
    return None


def check_tag_available(backbone: str, tag: str, cache_dir: str | None = None) -> None:
    """Fail at once, with the fix, when a tag is unknown for the backbone, or neither cached nor downloadable."""
    if tag == RANDOM or os.path.isfile(tag):
        return
    _check_model_name(backbone)
    tags = open_clip.list_pretrained_tags_by_model(backbone)
    if tag not in tags:
        hint = "a file path that exists" if ("/" in tag or tag.endswith((".pt", ".bin"))) else "an existing file"
        raise WeightsError(f"pretrained {tag!r} for {backbone} is neither a known open_clip tag "
                           f"({', '.join(tags) or 'none for this backbone'}) nor {hint}")
    if cached_tag_file(backbone, tag, cache_dir) is not None:
        return
    reason = offline_reason()
    if reason:
        raise WeightsError(
            f"open_clip weights {tag!r} for {backbone} are not in the local cache and cannot be downloaded "
            f"({reason}); set engine.pretrained to a local checkpoint file (.pt/.bin/.safetensors), "
            f"or to 'random' for a plumbing demo whose scores mean nothing"
        )


def load_model(backbone: str, pretrained: str, cache_dir: str | None = None, seed: int = 0) -> torch.nn.Module:
    """The real loading path: tag (downloaded where a network exists) or local checkpoint file."""
    _check_model_name(backbone)
    if pretrained == RANDOM:
        log.warning("random_weights", backbone=backbone, seed=seed,
                    detail="pretrained=random: scores are meaningless; for tests, benchmarks and demos only")
        return create_random_model(backbone, seed)
    is_file = os.path.isfile(pretrained)
    check_tag_available(backbone, pretrained, cache_dir)
    try:
        model = open_clip.create_model(backbone, pretrained=pretrained, cache_dir=cache_dir,
                                       require_pretrained=True)
    except Exception as exc:  # open_clip raises RuntimeError, OSError, hub errors...
        what = f"file {pretrained}" if is_file else f"open_clip tag {pretrained!r} (download)"
        raise WeightsError(f"could not load weights for {backbone} from {what}: {exc}") from exc
    return model


def load_backbone(backbone: str, pretrained: str, device: str | torch.device = "cpu",
                  cache_dir: str | None = None, self_check: bool = True) -> tuple[ClipBackbone, str]:
    """Model + tokenizer wrapped in the adapter, moved to the device; returns (backbone, fingerprint)."""
    model = load_model(backbone, pretrained, cache_dir)
    adapter = ClipBackbone(model, open_clip.get_tokenizer(backbone), backbone).to(device)
    if self_check:
        diff = adapter.self_check()
        log.debug("backbone_self_check", backbone=backbone, max_abs_diff=diff)
    return adapter, weights_fingerprint(backbone, pretrained)
