"""Backend name + device -> the kernel ops the runtime wires in.

"auto"    Triton on CUDA tensors, the native extension on CPU (torch if it is not built)
"triton"  Triton kernels; on CPU tensors they need TRITON_INTERPRET=1 (set before import)
"native"  the pybind11 CPU extension
"torch"   the pure-torch reference composition
"peft"    not a kernel backend: FastWeights builds the PEFT reference path instead
"""

from __future__ import annotations

import os

import torch

from tmem_kernels.ops import KernelOps, available, get_ops

RUNTIME_BACKENDS = ("auto", "triton", "native", "torch", "peft")


def resolve_backend(name: str, device: torch.device) -> str:
    """The concrete kernel backend for `name` on `device` (never "auto"; "peft" passes through)."""
    if name not in RUNTIME_BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {RUNTIME_BACKENDS}")
    if name != "auto":
        if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "backend='triton' on CPU tensors runs under the Triton interpreter: "
                "set TRITON_INTERPRET=1 before importing tmem"
            )
        return name
    if device.type == "cuda" and available("triton"):
        return "triton"
    if device.type == "cpu" and available("native"):
        return "native"
    return "torch"


def kernel_ops(name: str) -> KernelOps:
    """The op set of a concrete kernel backend, with a clear error when it is not installed."""
    try:
        return get_ops(name)
    except ImportError as exc:
        raise RuntimeError(f"backend {name!r} is not available here: {exc}") from exc
