"""Deterministic synthetic weights for CLIP-style models (open_clip ViT + text transformer).

No pretrained weights can be downloaded where linewatch is built and tested, yet linewatch's WinCLIP must
be checked for numerical parity against anomalib's reference implementation, which only works with an
older open_clip (< 2.26). Both sides therefore load *identical* synthetic weights produced by this module.

Every floating tensor gets its own ``torch.Generator`` seeded from ``(seed, crc32(key))``, so the values of
a key depend only on its name, shape and the seed: not on the order of the state dict, nor on the
open_clip/torch version that built the model. This module is pure torch on purpose (no linewatch or
open_clip imports) so that the reference venv can load it by file path.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping

import torch

__all__ = ["LOGIT_SCALE_INIT", "synthetic_state_dict"]

#: CLIP's initial temperature, ``log(1 / 0.07)``.
LOGIT_SCALE_INIT: float = math.log(1.0 / 0.07)

# Small, fixed scales. Kept tiny relative to the unit-variance residual stream so a deep random transformer
# stays well-conditioned (no exploding activations, no collapse to a constant).
_BIAS_STD = 0.02
_NORM_WEIGHT_NOISE = 0.02
_EMBED_STD = 0.02
_TOKEN_EMBED_STD = 0.02


def _generator(seed: int, key: str) -> torch.Generator:
    """Return a CPU generator seeded from ``seed`` and the key name only (order- and version-independent)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed((int(seed) * 0x9E3779B1 + zlib.crc32(key.encode("utf-8"))) % (2**63 - 1))
    return gen


def _normal(shape: torch.Size, std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _is_norm(key: str) -> bool:
    # open_clip names its LayerNorms ln_1/ln_2/ln_pre/ln_post/ln_final (and `norm*` in some towers).
    parts = key.split(".")
    return any(p.startswith("ln_") or p.startswith("norm") or p == "ln" for p in parts[:-1])


def _synthesize(key: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """Values for one floating tensor, chosen by its name and shape."""
    leaf = _leaf(key)
    numel = math.prod(shape)

    if leaf == "logit_scale":
        return torch.full(shape, LOGIT_SCALE_INIT, dtype=torch.float32)
    if leaf == "logit_bias":
        return torch.zeros(shape, dtype=torch.float32)

    if _is_norm(key):
        if leaf == "weight":
            # ~1 so the norm is close to plain standardisation; small noise so it is not trivially identity.
            return 1.0 + _normal(shape, _NORM_WEIGHT_NOISE, gen)
        return _normal(shape, _BIAS_STD, gen)

    if leaf in ("proj", "text_projection") and len(shape) == 2:
        # open_clip applies these as x @ W with W of shape (in, out): fan_in is shape[0].
        return _normal(shape, 1.0 / math.sqrt(shape[0]), gen)

    if leaf in ("class_embedding", "positional_embedding"):
        return _normal(shape, _EMBED_STD, gen)
    if key.endswith("token_embedding.weight"):
        return _normal(shape, _TOKEN_EMBED_STD, gen)

    if leaf == "bias" or leaf.endswith("_bias"):
        return _normal(shape, _BIAS_STD, gen)

    if len(shape) >= 2:
        # nn.Linear / conv / in_proj weights are (out, in, *kernel): fan_in is the product of the rest.
        fan_in = numel // shape[0]
        return _normal(shape, 1.0 / math.sqrt(max(fan_in, 1)), gen)

    # Any other vector/scalar parameter (e.g. layer-scale gammas): small values, like a bias.
    return _normal(shape, _BIAS_STD, gen)


def synthetic_state_dict(template: Mapping[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Return deterministic synthetic values for every entry of ``template``.

    ``template`` (typically ``model.state_dict()``) is only used for key names, shapes and dtypes. Floating
    tensors are regenerated on CPU as float32 (load_state_dict casts them to the model's dtype); all other
    tensors (e.g. integer buffers such as ``attn_mask`` indices) are copied unchanged.

    The same ``(key, shape, seed)`` always yields the same values, so two different open_clip versions that
    share a key layout load identical weights: that is what makes cross-version parity tests possible.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in template.items():
        if not torch.is_floating_point(tensor):
            out[key] = tensor.detach().clone()
            continue
        if key.endswith("attn_mask"):
            # A causal mask buffer is not a weight: keep the model's own (it encodes -inf above the diagonal).
            out[key] = tensor.detach().to(device="cpu", dtype=torch.float32).clone()
            continue
        out[key] = _synthesize(key, tensor.shape, _generator(seed, key))
    return out
