"""Precision modes, chosen per stage by measurement (see bench/README.md).

On CPUs with native bf16, autocast recasts every weight on every call: it ran window batches
~1.9x faster than fp32 but full-image forwards ~3x slower. An image tower whose weights are
cast to bf16 once runs both ~2.2x faster, so the CPU fast mode ("bf16-image") uses such a copy
for every image forward while text stays fp32. fp16 on CPU has no fast kernels for full
forwards, so it stays an autocast of the window stage. On CUDA, half precision wins everywhere.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch


@dataclass(frozen=True)
class Precision:
    name: str
    model_dtype: torch.dtype | None  # autocast for the whole forward
    window_dtype: torch.dtype | None  # autocast for the WinCLIP window stage only
    image_dtype: torch.dtype | None = None  # image tower weights cast once to this dtype

    def model_autocast(self, device: torch.device) -> object:
        if self.model_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.model_dtype)


FP32 = Precision("fp32", None, None)
BF16_IMAGE = Precision("bf16-image", None, None, torch.bfloat16)


@cache
def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str, device: torch.device, method: str) -> Precision:
    """fp32 | bf16 | fp16 | auto -> a concrete mode.

    auto: CUDA -> fp16 autocast; CPU with native bf16 -> a bf16 image tower for WinCLIP (whose
    deviation from exact is measured in bench/engine.py); else fp32. ALFA is within 1.2x of one
    bare forward already, so on CPU auto keeps it exact; ``bf16`` asks for the bf16 tower for it too.
    """
    if requested == "fp32":
        return FP32
    if requested in ("bf16", "fp16"):
        dtype = torch.bfloat16 if requested == "bf16" else torch.float16
        if device.type == "cpu":
            if dtype == torch.bfloat16:
                return BF16_IMAGE
            # No fast fp16 kernels for full forwards on CPU: only the window stage (measured).
            return Precision("mixed-fp16", None, dtype)
        return Precision(requested, dtype, None)
    if requested != "auto":
        raise ValueError(f"unknown precision {requested!r}; choose fp32, bf16, fp16 or auto")
    if device.type == "cuda":
        return Precision("fp16", torch.float16, None)
    if method == "winclip" and cpu_has_bf16():
        return BF16_IMAGE
    return FP32
