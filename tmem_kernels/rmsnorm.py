"""RMSNorm with HF Llama semantics (op `tmem::rms_norm`): the torch composition, its backward, the dispatch.

    x [..., H], weight [H], eps -> y [..., H] (dtype promote(x, weight)), rstd [...] float32
    xf = x.float(); rstd = rsqrt(mean(xf * xf, -1) + eps); y = weight * (xf * rstd).to(x.dtype)

That is LlamaRMSNorm's (and Qwen2/Qwen3/Mistral's) forward to the rounding: the statistics in float32
whatever x's dtype (float64 too), the normalised row rounded to x's dtype, then one product with the weight
(`reference.rms_norm` is the spec). The backward (d x, from the saved rstd):

    g = (dy * weight).to(x.dtype).float()       (autograd rounds the product's gradient to x's dtype)
    dx = (rstd * g - xf * rstd^3 * mean(g * xf, -1)).to(x.dtype)
    dweight = sum over rows of dy * (xf * rstd).to(x.dtype)   (only when weight requires grad)

On CUDA (float32/float16/bfloat16 x) the forward and dx are one Triton launch each (`rmsnorm_triton`);
elsewhere (the CPU, float64, no Triton) the torch composition below, the very ops HF runs forward.
"""

from __future__ import annotations

import math

import torch

from tmem_kernels.triton_dispatch import triton_runs

__all__ = ["backward", "backward_torch", "check_inputs", "forward", "forward_torch", "use_triton", "weight_grad"]


def check_inputs(x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """Clear errors for what the op would get wrong: x [..., H] and weight [H] float tensors on one device,
    eps a finite number >= 0."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"rms_norm: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"rms_norm: {name} must be a float tensor, got {t.dtype}")
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: expected x [..., H] and weight [H], got x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}")  # fmt: skip
    if x.device != weight.device:
        raise ValueError(f"rms_norm: x is on {x.device}, weight on {weight.device} (one device)")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"rms_norm: eps must be a finite number >= 0, got {eps!r}")


def use_triton(x: torch.Tensor) -> bool:
    """Whether the Triton kernels run for x: CUDA, a float32/16-bit dtype, Triton installed."""
    return triton_runs("rmsnorm_triton", x)


def forward_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., H], weight [H] -> (y [..., H], rstd [...] float32): HF's forward, op for op."""
    xf = x.to(torch.float32)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * rstd).to(x.dtype), rstd.squeeze(-1)


def backward_torch(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """dy [..., H] (y's dtype), x [..., H], weight [H], rstd [...] float32 -> dx [..., H] in x's dtype."""
    xf = x.to(torch.float32)
    r = rstd.unsqueeze(-1)
    g = (dy * weight).to(x.dtype).to(torch.float32)
    dot = (g * xf).mean(-1, keepdim=True)
    return (r * g - xf * (r * r * r * dot)).to(x.dtype)


def forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [..., H], rstd [...] float32): Triton on CUDA (`use_triton`), else `forward_torch`. Inputs checked."""
    check_inputs(x, weight, eps)
    if not use_triton(x):
        return forward_torch(x, weight, eps)
    from tmem_kernels import rmsnorm_triton

    y, rstd = rmsnorm_triton.forward(x.reshape(-1, x.shape[-1]).contiguous(), weight, eps)
    return y.view(x.shape), rstd.view(x.shape[:-1])


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """dx [..., H] in x's dtype: Triton on CUDA (`use_triton`), else `backward_torch`."""
    if not use_triton(x):
        return backward_torch(dy, x, weight, rstd)
    from tmem_kernels import rmsnorm_triton

    h = x.shape[-1]
    dx = rmsnorm_triton.backward(dy.reshape(-1, h), x.reshape(-1, h).contiguous(), weight, rstd.reshape(-1))
    return dx.view(x.shape)


def weight_grad(dy: torch.Tensor, x: torch.Tensor, rstd: torch.Tensor, weight_dtype: torch.dtype) -> torch.Tensor:
    """d weight [H] (weight's dtype): dy * (xf * rstd).to(x.dtype) summed over every row, in float32 (float64
    for float64)."""
    acc = torch.promote_types(dy.dtype, torch.float32)
    normed = (x.to(torch.float32) * rstd.unsqueeze(-1)).to(x.dtype)
    return (dy.to(acc) * normed.to(acc)).reshape(-1, x.shape[-1]).sum(0).to(weight_dtype)
