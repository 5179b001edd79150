"""Rotary position embedding with HF Llama semantics (op `tmem::rope`): checks, the torch composition, its
backward, the dispatch.

    q [B, Hq, T, D], k [B, Hk, T, D], cos / sin [B or 1, T, D] -> (q_rot, k_rot)
    x_rot = x * cos + rotate_half(x) * sin,  rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])

That is `apply_rotary_pos_emb` of Llama / Qwen2 / Qwen3 / Mistral (full-head rotary, cos / sin broadcast over
heads), rounding included: each product in the promoted dtype, then the sum (`reference.rope` is the spec).
The backward (the gradients of q and k; cos / sin take none) is the transpose of the rotation, as autograd
rounds it (each path's gradient cast to x's dtype, then summed):

    dx = (dy * cos).to(x.dtype) + rotate_half_T((dy * sin).to(x.dtype)),  rotate_half_T(g) = cat(g[h:], -g[:h])

On CUDA (q, k, cos, sin of one float32/float16/bfloat16 dtype) the forward and the backward are one Triton
launch each for q and k together (`rotary_triton`); elsewhere the torch composition, HF's very ops forward.
"""

from __future__ import annotations

import torch

from tmem_kernels import reference
from tmem_kernels.triton_dispatch import triton_runs

__all__ = ["backward", "backward_torch", "check_inputs", "forward", "forward_torch", "use_triton"]


def check_inputs(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Clear errors for what the op would get wrong: q [B, Hq, T, D] and k [B, Hk, T, D] with D even, cos and
    sin [B or 1, T, D], float tensors on one device."""
    names = ("q", "k", "cos", "sin")
    for name, t in zip(names, (q, k, cos, sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"rope: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"rope: {name} must be a float tensor, got {t.dtype}")
    shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(names, (q, k, cos, sin)))
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        raise ValueError(f"rope: expected q [B, Hq, T, D], k [B, Hk, T, D], cos and sin [B or 1, T, D], got {shapes}")
    b, _, t, d = q.shape
    if k.shape[0] != b or k.shape[2:] != (t, d) or cos.shape[1:] != (t, d) or cos.shape[0] not in (1, b):
        raise ValueError(f"rope: expected q [B, Hq, T, D], k [B, Hk, T, D], cos and sin [B or 1, T, D], got {shapes}")
    if d % 2:
        raise ValueError(f"rope: the head dim D must be even (rotate_half), got {d}")
    if len({t.device for t in (q, k, cos, sin)}) != 1:
        raise ValueError(f"rope: q, k, cos, sin must be on one device, got {q.device}, {k.device}, {cos.device}, "
                         f"{sin.device}")  # fmt: skip


def use_triton(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether the Triton kernels run: CUDA, q, k, cos, sin of one float32/16-bit dtype, Triton installed."""
    return triton_runs("rotary_triton", q, k, cos, sin)


def forward_torch(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_rot, k_rot): HF's apply_rotary_pos_emb, op for op (`reference.rope`)."""
    return reference.rope(q, k, cos, sin)


def _rotate_half_t(g: torch.Tensor) -> torch.Tensor:
    """The transpose of rotate_half: cat(g[..., D/2:], -g[..., :D/2])."""
    half = g.shape[-1] // 2
    return torch.cat((g[..., half:], -g[..., :half]), dim=-1)


def backward_torch(
    dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_dtype: torch.dtype,
    k_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The gradients of q_rot, k_rot -> those of q (in q_dtype) and k (in k_dtype), as autograd rounds them."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def grad(dy: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (dy * cos).to(dtype) + _rotate_half_t((dy * sin).to(dtype))

    return grad(dq, q_dtype), grad(dk, k_dtype)


def forward(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_rot, k_rot): Triton on CUDA (`use_triton`), else `forward_torch`. Inputs checked."""
    check_inputs(q, k, cos, sin)
    if not use_triton(q, k, cos, sin):
        return forward_torch(q, k, cos, sin)
    from tmem_kernels import rotary_triton

    return rotary_triton.forward(q, k, cos, sin)


def backward(
    dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_dtype: torch.dtype,
    k_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The gradients of q and k: Triton on CUDA (`use_triton` on the gradients), else `backward_torch`."""
    if not (use_triton(dq, dk, cos, sin) and dq.dtype == q_dtype and dk.dtype == k_dtype):
        return backward_torch(dq, dk, cos, sin, q_dtype, k_dtype)
    from tmem_kernels import rotary_triton

    return rotary_triton.backward(dq, dk, cos, sin)
