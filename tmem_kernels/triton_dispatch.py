"""Where an op's Triton kernels run: the rule every op module's `use_triton` asks."""

from __future__ import annotations

import importlib

import torch

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_runs(kernels: str, *tensors: torch.Tensor) -> bool:
    """Whether `tmem_kernels.<kernels>` (a Triton kernel module) runs for `tensors`: the first on CUDA, all of one
    float32/16-bit dtype, and the module importable (Triton installed)."""
    first = tensors[0]
    if first.device.type != "cuda" or first.dtype not in TRITON_DTYPES:
        return False
    if any(t.dtype != first.dtype for t in tensors[1:]):
        return False
    try:
        importlib.import_module(f"tmem_kernels.{kernels}")
    except ImportError:  # pragma: no cover - depends on the install
        return False
    return True
