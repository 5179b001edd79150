"""Qwen3's per-head q/k RMSNorm and the rotary as one op (`tmem::qk_norm_rope`): checks, the torch composition,
its backward, the dispatch.

    q [B, T, Hq, D], k [B, T, Hk, D], q_weight / k_weight [D], eps_q, eps_k, cos / sin [B or 1, T, D]
        -> q_rot [B, Hq, T, D], k_rot [B, Hk, T, D], rstd_q [B, T, Hq], rstd_k [B, T, Hk] (float32)
    q_rot = rope(rms_norm(q, q_weight, eps_q).transpose(1, 2), ..., cos, sin)[0], k_rot likewise

That is Qwen3Attention's forward from the projections (viewed to heads) to the rotary: `rmsnorm`'s formula per
head (float32 statistics, the normalised row rounded to x's dtype, times the weight), then `rotary`'s
(`reference.qk_norm_rope` is the spec), every rounding as the two ops round. The outputs are laid out as the
two ops leave a projection's heads: [B, T, H, D] dense, seen as [B, H, T, D] (`heads_first`). The backward
(the gradients of q and k) is the rotary's transpose then the norm's, each rounded as autograd rounds it:

    g = rotate_back(dq_rot) (`rotary.backward_torch`, in the norm's output dtype), transposed to [B, T, H, D]
    dq = `rmsnorm.backward_torch`(g, q, q_weight, rstd_q)

On CUDA (q, k, the weights, cos, sin of one float32/float16/bfloat16 dtype) the forward and the backward are one
Triton launch each for q and k together (`qknorm_rope_triton`), where the two ops take two each; elsewhere the
two ops' torch compositions, the very ops HF runs forward.
"""

from __future__ import annotations

import math

import torch

from tmem_kernels import rmsnorm, rotary
from tmem_kernels.triton_dispatch import triton_runs

__all__ = ["backward", "backward_torch", "check_inputs", "forward", "forward_torch", "heads_first", "normed_grads",
           "use_triton"]  # fmt: skip


def check_inputs(
    q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps_q: float, eps_k: float,
    cos: torch.Tensor, sin: torch.Tensor,
) -> None:  # fmt: skip
    """Clear errors for what the op would get wrong: q [B, T, Hq, D] and k [B, T, Hk, D] with D even, weights [D],
    cos and sin [B or 1, T, D], float tensors on one device, eps_q and eps_k finite numbers >= 0."""
    names = ("q", "k", "q_weight", "k_weight", "cos", "sin")
    tensors = (q, k, q_weight, k_weight, cos, sin)
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"qk_norm_rope: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"qk_norm_rope: {name} must be a float tensor, got {t.dtype}")
    shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(names, tensors))
    expected = "qk_norm_rope: expected q [B, T, Hq, D], k [B, T, Hk, D], weights [D], cos and sin [B or 1, T, D], got"
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        raise ValueError(f"{expected} {shapes}")
    b, t, _, d = q.shape
    if k.shape[:2] != (b, t) or k.shape[3] != d or cos.shape[1:] != (t, d) or cos.shape[0] not in (1, b):
        raise ValueError(f"{expected} {shapes}")
    if q_weight.shape != (d,) or k_weight.shape != (d,):
        raise ValueError(f"{expected} {shapes}")
    if d % 2:
        raise ValueError(f"qk_norm_rope: the head dim D must be even (rotate_half), got {d}")
    if len({x.device for x in tensors}) != 1:
        raise ValueError("qk_norm_rope: q, k, the weights, cos and sin must be on one device, got "
                         + ", ".join(str(x.device) for x in tensors))  # fmt: skip
    for name, eps in (("eps_q", eps_q), ("eps_k", eps_k)):
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"qk_norm_rope: {name} must be a finite number >= 0, got {eps!r}")


def use_triton(
    q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor,
    sin: torch.Tensor,
) -> bool:  # fmt: skip
    """Whether the Triton kernels run: CUDA, all six of one float32/16-bit dtype, Triton installed."""
    return triton_runs("qknorm_rope_triton", q, k, q_weight, k_weight, cos, sin)


def heads_first(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty [B, H, T, D] in `dtype` for x [B, T, H, D], laid out [B, T, H, D] dense (a projection's heads,
    transposed: the layout the norm then the rotary leave)."""
    b, t, h, d = x.shape
    return torch.empty_strided((b, h, t, d), (t * h * d, d, h * d, 1), dtype=dtype, device=x.device)


def forward_torch(
    q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps_q: float, eps_k: float,
    cos: torch.Tensor, sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(q_rot, k_rot, rstd_q, rstd_k): `rmsnorm.forward_torch` on q and k, transposed, `rotary.forward_torch`."""
    qn, rstd_q = rmsnorm.forward_torch(q, q_weight, eps_q)
    kn, rstd_k = rmsnorm.forward_torch(k, k_weight, eps_k)
    q_rot, k_rot = rotary.forward_torch(qn.transpose(1, 2), kn.transpose(1, 2), cos, sin)
    return q_rot, k_rot, rstd_q, rstd_k


def normed_grads(
    dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_dtype: torch.dtype,
    k_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The gradients of the normed q and k [B, T, H, D] (in q_dtype, k_dtype: the norms' output dtypes) from
    those of q_rot and k_rot: the rotary's backward, as autograd rounds it, transposed back."""
    gq, gk = rotary.backward_torch(dq, dk, cos, sin, q_dtype, k_dtype)
    return gq.transpose(1, 2), gk.transpose(1, 2)


def backward_torch(
    dq: torch.Tensor, dk: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
    k_weight: torch.Tensor, rstd_q: torch.Tensor, rstd_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The gradients of q_rot, k_rot -> those of q [B, T, Hq, D] (q's dtype) and k, as autograd rounds them through
    the two ops."""
    q_dtype = torch.promote_types(q.dtype, q_weight.dtype)
    k_dtype = torch.promote_types(k.dtype, k_weight.dtype)
    gq, gk = normed_grads(dq, dk, cos, sin, q_dtype, k_dtype)
    return rmsnorm.backward_torch(gq, q, q_weight, rstd_q), rmsnorm.backward_torch(gk, k, k_weight, rstd_k)


def forward(
    q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps_q: float, eps_k: float,
    cos: torch.Tensor, sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(q_rot, k_rot, rstd_q, rstd_k): Triton on CUDA (`use_triton`), else `forward_torch`. Inputs checked."""
    check_inputs(q, k, q_weight, k_weight, eps_q, eps_k, cos, sin)
    if not use_triton(q, k, q_weight, k_weight, cos, sin):
        return forward_torch(q, k, q_weight, k_weight, eps_q, eps_k, cos, sin)
    from tmem_kernels import qknorm_rope_triton

    return qknorm_rope_triton.forward(q, k, q_weight, k_weight, eps_q, eps_k, cos, sin)


def backward(
    dq: torch.Tensor, dk: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
    k_weight: torch.Tensor, rstd_q: torch.Tensor, rstd_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The gradients of q and k: Triton on CUDA (`use_triton`, the gradients of q's dtype), else `backward_torch`."""
    if not (use_triton(q, k, q_weight, k_weight, cos, sin) and dq.dtype == dk.dtype == q.dtype):
        return backward_torch(dq, dk, q, k, q_weight, k_weight, rstd_q, rstd_k, cos, sin)
    from tmem_kernels import qknorm_rope_triton

    return qknorm_rope_triton.backward(dq, dk, q, k, q_weight, k_weight, rstd_q, rstd_k, cos, sin)
