"""Backend name + device -> the kernel ops the runtime wires in.

"auto"    on CUDA: Triton for an engine of several sessions (a pool: its segments stay on the device, its
          writes replay CUDA graphs), the torch composition (cuBLAS GEMMs + the small LoRA terms) for
          one session, measured faster than Triton at every write shape on an H200, twice
          (benchmarks/RESULTS-gpu.md); on CPU the native extension for float32 models (torch if it is
          not built, and for other dtypes: the extension is float32-only); torch for a rank above the
          kernels' limit (Triton 16, native 64)
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


def resolve_backend(
    name: str, device: torch.device, dtype: torch.dtype = torch.float32, rank: int = 6, sessions: int = 1
) -> str:
    """The concrete kernel backend for `name` on `device`, `dtype`, LoRA `rank` and an engine of `sessions`
    B rows (never "auto"; "peft" passes through).

    An explicit backend that cannot run this model is refused here, before anything is attached.
    """
    if name not in RUNTIME_BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {RUNTIME_BACKENDS}")
    if name == "auto":
        if device.type == "cuda" and sessions > 1 and available("triton") and _runs_rank("triton", rank):
            return "triton"
        if device.type == "cpu" and dtype == torch.float32 and available("native") and _runs_rank("native", rank):
            return "native"
        return "torch"
    if name in ("triton", "native") and available(name) and not _runs_rank(name, rank):
        raise ValueError(
            f"backend={name!r} runs rank <= {get_ops(name).max_rank}, not {rank} (use backend='auto' or 'torch')"
        )
    if name == "native" and (device.type != "cpu" or dtype != torch.float32):
        raise ValueError(
            f"backend='native' runs float32 models on the CPU; this model is {dtype} on {device.type} "
            "(use backend='auto' or 'torch')"
        )
    if name == "triton":
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"backend='triton' supports float32, float16 and bfloat16 models, not {dtype}")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "backend='triton' on CPU tensors runs under the Triton interpreter: "
                "set TRITON_INTERPRET=1 before importing tmem"
            )
    return name


def kernel_ops(name: str) -> KernelOps:
    """The op set of a concrete kernel backend, with a clear error when it is not installed."""
    try:
        return get_ops(name)
    except ImportError as exc:
        raise RuntimeError(f"backend {name!r} is not available here: {exc}") from exc


def _runs_rank(name: str, rank: int) -> bool:
    limit = get_ops(name).max_rank
    return limit is None or rank <= limit
