"""Precision modes, chosen per stage by measurement (see bench/README.md).

On this class of CPU, bf16 autocast runs the many short window sequences ~1.9x faster than
fp32 but full-image forwards several times slower, so the CPU fast mode ("mixed") keeps the full
forward in fp32 and runs only the window stage in bf16. On CUDA, half precision wins everywhere.
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

    def model_autocast(self, device: torch.device) -> object:
        if self.model_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.model_dtype)


FP32 = Precision("fp32", None, None)
MIXED_BF16 = Precision("mixed-bf16", None, torch.bfloat16)


@cache
def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str, device: torch.device, method: str) -> Precision:
    """fp32 | bf16 | fp16 | auto -> a concrete mode.

    auto: CUDA -> fp16 autocast; CPU with native bf16 -> bf16 windows only (WinCLIP); else fp32.
    ALFA has no window stage, so on CPU auto keeps it in fp32 (bf16 full forwards are slower there).
    """
    if requested == "fp32":
        return FP32
    if requested in ("bf16", "fp16"):
        dtype = torch.bfloat16 if requested == "bf16" else torch.float16
        if device.type == "cpu":
            # On CPU only the window stage benefits; the full forward stays fp32 (measured).
            return Precision(f"mixed-{requested}", None, dtype)
        return Precision(requested, dtype, None)
    if requested != "auto":
        raise ValueError(f"unknown precision {requested!r}; choose fp32, bf16, fp16 or auto")
    if device.type == "cuda":
        return Precision("fp16", torch.float16, None)
    if method == "winclip" and cpu_has_bf16():
        return MIXED_BF16
    return FP32
