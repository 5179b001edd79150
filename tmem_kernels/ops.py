"""Name -> op set. Every backend implements the same signatures as `tmem_kernels.reference`.

    "torch"   the reference composition (autograd through torch ops)
    "triton"  Triton kernels (compiled on CUDA; under TRITON_INTERPRET=1 on CPU tensors)
    "native"  the pybind11 C++ extension (CPU), matrix products through torch
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

BACKENDS = ("torch", "triton", "native")


@dataclass(frozen=True)
class KernelOps:
    """The ops one backend provides (see `tmem_kernels.reference` for shapes)."""

    name: str
    lora_mlp: Callable
    sgd_step_: Callable
    adamw_step_: Callable
    lora_mlp_segmented: Callable  # a different B per segment of rows (tmem_kernels.segments)


_MODULES = {  # (lora_mlp, optimizer steps, lora_mlp_segmented)
    "torch": ("tmem_kernels.reference", "tmem_kernels.reference", "tmem_kernels.reference"),
    "triton": ("tmem_kernels.lora_mlp", "tmem_kernels.update", "tmem_kernels.lora_segmented"),
    "native": ("tmem_kernels.native", "tmem_kernels.native", "tmem_kernels.native"),
}


def get_ops(name: str) -> KernelOps:
    """The op set of backend `name` ("torch", "triton" or "native"); ImportError if unavailable."""
    if name not in _MODULES:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {BACKENDS}")
    mlp_mod, update_mod, seg_mod = (importlib.import_module(m) for m in _MODULES[name])
    return KernelOps(name, mlp_mod.lora_mlp, update_mod.sgd_step_, update_mod.adamw_step_, seg_mod.lora_mlp_segmented)


def available(name: str) -> bool:
    """Whether backend `name` can be imported here."""
    try:
        get_ops(name)
    except ImportError:
        return False
    return True
