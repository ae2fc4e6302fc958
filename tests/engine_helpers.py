"""Shared engine builders for tests: small random backbones load in a second or two."""

from __future__ import annotations

from functools import cache

from pipeline.engine.backbone import ClipBackbone
from pipeline.engine.weights import load_backbone

SMALL = "ViT-S-32"
DEFAULT = "ViT-B-16-plus-240"


@cache
def backbone(name: str = SMALL) -> tuple[ClipBackbone, str]:
    """One random-weight backbone per name per test session (loading the default takes ~8 s)."""
    return load_backbone(name, "random")
