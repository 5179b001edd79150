"""Name -> op set. Every backend implements the same signatures as `tmem_kernels.reference`.

    "torch"   the reference composition (autograd through torch ops)
    "triton"  Triton kernels (compiled on CUDA; under TRITON_INTERPRET=1 on CPU tensors)
    "native"  the pybind11 C++ extension (CPU), matrix products through torch

Each op set calls the backend's torch custom ops (`tmem_kernels.library`, `torch.ops.tmem.*`), so a model
that uses them compiles without graph breaks and exports. (`lora_mlp_segmented`, the per-session op of
the session pool, is the backend module's function: tmem_kernels.segments.)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from tmem_kernels import library

BACKENDS = ("torch", "triton", "native")


@dataclass(frozen=True)
class KernelOps:
    """The ops one backend provides (see `tmem_kernels.reference` for shapes)."""

    name: str
    lora_mlp: Callable
    sgd_step_: Callable
    adamw_step_: Callable
    lora_mlp_segmented: Callable  # a different B per segment of rows (tmem_kernels.segments)
    max_rank: int | None  # the largest LoRA rank the kernels take (None: any)


_OPS = {
    "torch": (library.lora_mlp_torch, library.sgd_step_torch, library.adamw_step_torch),
    "triton": (library.lora_mlp_triton, library.sgd_step_triton, library.adamw_step_triton),
    "native": (library.lora_mlp_native, library.sgd_step_native, library.adamw_step_native),
}
_SEGMENTED = {  # module of each backend's lora_mlp_segmented
    "torch": "tmem_kernels.reference",
    "triton": "tmem_kernels.lora_segmented",
    "native": "tmem_kernels.native",
}


def get_ops(name: str) -> KernelOps:
    """The op set of backend `name` ("torch", "triton" or "native"); ImportError if unavailable."""
    if name not in _OPS:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of {BACKENDS}")
    library.require_backend(name)
    module = importlib.import_module(_SEGMENTED[name])
    return KernelOps(name, *_OPS[name], module.lora_mlp_segmented, getattr(module, "MAX_RANK", None))


def available(name: str) -> bool:
    """Whether backend `name` can be used here."""
    try:
        get_ops(name)
    except ImportError:
        return False
    return True
