"""WinCLIP compositional prompt ensemble: data only.

The state words and templates follow anomalib's reference list exactly (21 templates, with its
duplicated "jpeg corrupted ... the" entry) because parity with it is how correctness is proven.
"""

from __future__ import annotations

NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)

ANOMALOUS_STATES: tuple[str, ...] = (
    "damaged {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)

TEMPLATES: tuple[str, ...] = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)


def object_name(product_class: str) -> str:
    """Product class id -> words CLIP reads ("metal_nut" -> "metal nut")."""
    return product_class.replace("_", " ").replace("-", " ").strip()


def compositional_prompts(name: str) -> tuple[list[str], list[str]]:
    """All (template x state) prompts for one object name: (normal, anomalous)."""
    normal = [t.format(s.format(name)) for s in NORMAL_STATES for t in TEMPLATES]
    anomalous = [t.format(s.format(name)) for s in ANOMALOUS_STATES for t in TEMPLATES]
    return normal, anomalous
