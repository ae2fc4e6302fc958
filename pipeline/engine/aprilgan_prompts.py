"""AprilGAN's compositional prompt ensemble: data only.

The authors' lists (ByChelsea/VAND-APRIL-GAN, ``prompt_ensemble.py``; see
../shared/papers/aprilgan.md section 4), in the order they encode them: 7 normal and 5 abnormal
state phrases, each in 35 sentence templates (CLIP ImageNet-style templates plus "in the scene"
variants, not WinCLIP's). The order is part of the parity fixture (``prompts.json``).
"""

from __future__ import annotations

from pipeline.engine.prompting import NORMAL_STATES as WINCLIP_NORMAL_STATES

# The same normal states as WinCLIP's compositional ensemble; the abnormal states and templates differ.
NORMAL_STATES: tuple[str, ...] = WINCLIP_NORMAL_STATES

ABNORMAL_STATES: tuple[str, ...] = (
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)

TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a low resolution photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a photo of my {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a photo of one {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of a large {}.",
    "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "a dark photo of a {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)


def ensemble_prompts(name: str) -> tuple[list[str], list[str]]:
    """All (state x template) sentences for one object name, state-major: (normal 245, abnormal 175)."""
    normal = [t.format(s.format(name)) for s in NORMAL_STATES for t in TEMPLATES]
    abnormal = [t.format(s.format(name)) for s in ABNORMAL_STATES for t in TEMPLATES]
    return normal, abnormal
