"""Residual add + RMSNorm in one op (`tmem::add_rms_norm`): the torch composition, its backward, the dispatch.

    x [..., H], residual [..., H] (x's dtype), weight [H], eps -> y [..., H] (promote(x, weight)),
    s [..., H] (x's dtype), rstd [...] float32
    s = x + residual                         (rounded to x's dtype, as torch's add rounds it)
    y, rstd = rms_norm(s, weight, eps)       (`rmsnorm`: HF's LlamaRMSNorm to the rounding)

What a pre-norm decoder runs between two halves of its layers (`hidden + attn_out`, then the next norm): vLLM's
and Liger's `fused_add_rms_norm`. The backward, from the saved s and rstd, gives the one gradient that flows to
x and to residual alike, as autograd through the composition rounds it:

    d = (rmsnorm.backward(dy, s, weight, rstd) + ds).to(x.dtype)   (the norm's dx in x's dtype, then the sum)
    dweight = rmsnorm.weight_grad(dy, s, rstd)                       (only when weight requires grad)

On CUDA (float32/float16/bfloat16) the forward and d are one Triton launch each (`addrmsnorm_triton`);
elsewhere (the CPU, float64, no Triton) the torch composition below, the very ops a decoder runs unfused.
"""

from __future__ import annotations

import torch

from tmem_kernels import rmsnorm

__all__ = ["backward", "backward_torch", "check_inputs", "forward", "forward_torch", "use_triton"]


def check_inputs(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """Clear errors for what the op would get wrong: `rmsnorm.check_inputs`' (x [..., H], weight [H], eps), and
    residual a tensor of x's shape, dtype and device."""
    rmsnorm.check_inputs(x, weight, eps)
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"add_rms_norm: residual must be a torch.Tensor, got {type(residual).__name__}")
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"add_rms_norm: residual must match x (shape, dtype, device): x {tuple(x.shape)} "
                         f"{x.dtype} {x.device}, residual {tuple(residual.shape)} {residual.dtype} "
                         f"{residual.device}")  # fmt: skip


def use_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernels run for x: where `rmsnorm.use_triton` runs the norm's (CUDA, fp32/16-bit)."""
    return rmsnorm.use_triton(x)


def forward_torch(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y [..., H], s [..., H], rstd [...] float32): the add, then `rmsnorm.forward_torch` on s."""
    s = x + residual
    y, rstd = rmsnorm.forward_torch(s, weight, eps)
    return y, s, rstd


def backward_torch(
    dy: torch.Tensor | None, ds: torch.Tensor | None, s: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor:
    """The gradient w.r.t. x (and residual) [..., H] in s's dtype from dy (y's dtype) and ds (s's), either None
    (that output took no part), not both."""
    if dy is None:
        return ds
    d = rmsnorm.backward_torch(dy, s, weight, rstd)
    return d if ds is None else d + ds


def forward(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, s, rstd): Triton on CUDA (`use_triton`), else `forward_torch`. Inputs checked."""
    check_inputs(x, residual, weight, eps)
    if not use_triton(x):
        return forward_torch(x, residual, weight, eps)
    from tmem_kernels import addrmsnorm_triton

    h = x.shape[-1]
    y, s, rstd = addrmsnorm_triton.forward(
        x.reshape(-1, h).contiguous(), residual.reshape(-1, h).contiguous(), weight, eps
    )
    return y.view(x.shape), s.view(x.shape), rstd.view(x.shape[:-1])


def backward(
    dy: torch.Tensor | None, ds: torch.Tensor | None, s: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor:
    """The gradient w.r.t. x (and residual) in s's dtype: Triton on CUDA (`use_triton`), else `backward_torch`."""
    if dy is None or not use_triton(s):
        return backward_torch(dy, ds, s, weight, rstd)
    from tmem_kernels import addrmsnorm_triton

    h = s.shape[-1]
    flat_ds = None if ds is None else ds.reshape(-1, h)
    d = addrmsnorm_triton.backward(dy.reshape(-1, h), flat_ds, s.reshape(-1, h).contiguous(), weight, rstd.reshape(-1))
    return d.view(s.shape)
