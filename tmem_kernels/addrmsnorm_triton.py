"""Residual add + RMSNorm (op `tmem::add_rms_norm`) as two Triton kernels: one forward launch, one backward (CUDA).

Same contract as `addrmsnorm.forward_torch` / `backward_torch`:

    forward   x [N, H], residual [N, H] (x's dtype), weight [H] -> y [N, H], s [N, H] (x's dtype), rstd [N] fp32
              s = (x + residual).to(x.dtype); then `rmsnorm_triton`'s forward on s, line for line
    backward  dy [N, H] (y's dtype), ds [N, H] (s's dtype) or None, s, weight, rstd -> d [N, H] (s's dtype)
              d = (rmsnorm_triton's dx, rounded to s's dtype, + ds).to(s's dtype): the gradient of x and of residual

The row tiles, block sizes and warps are `rmsnorm_triton`'s, and so are the norm's lines (`_normalize`,
`_normalized_grad`): y (and d without ds) are what `rmsnorm_triton` gives for s (bit for bit under the
interpreter). A pre-norm decoder's residual add and the next norm are then one launch forward instead of two, and
the norm's backward takes in the residual branch's gradient instead of a separate add.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tmem_kernels.lora_mlp import _cast, _interpreting
from tmem_kernels.rmsnorm_triton import _blocks, _normalize, _normalized_grad, _row_tile, _warps

__all__ = ["DTYPES", "backward", "forward"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _forward_kernel(
    x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, rstd_ptr, N, H, eps,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Rows [BLOCK_M * pid, +BLOCK_M): s [N, H], rstd [N] and y [N, H]; x, residual, y, s contiguous."""
    rows, offs, mask, x, w = _row_tile(x_ptr, w_ptr, N, H, BLOCK_M, BLOCK_H)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = _cast(x + r, s_ptr.dtype.element_ty, INTERPRET)
    tl.store(s_ptr + offs, s, mask=mask)
    _normalize(s.to(tl.float32), w, s_ptr, y_ptr, rstd_ptr, rows, offs, mask, N, H, eps, INTERPRET)


@triton.jit
def _backward_kernel(
    dy_ptr, ds_ptr, s_ptr, w_ptr, rstd_ptr, d_ptr, N, H,
    HAS_DS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Rows [BLOCK_M * pid, +BLOCK_M) of d [N, H]; dy, ds (read only when HAS_DS), s, d contiguous."""
    rows, offs, mask, s, w = _row_tile(s_ptr, w_ptr, N, H, BLOCK_M, BLOCK_H)
    d = _normalized_grad(dy_ptr, rstd_ptr, s, w, s_ptr, rows, offs, mask, N, H, INTERPRET)
    if HAS_DS:  # autograd's sum of the two branches' gradients, each in s's dtype
        d = _cast(d, s_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
        d = d + tl.load(ds_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(d_ptr + offs, _cast(d, d_ptr.dtype.element_ty, INTERPRET), mask=mask)


def _check(x: torch.Tensor, residual: torch.Tensor) -> None:
    if x.dtype not in DTYPES or x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"add_rms_norm (triton): x must be a contiguous [N, H] float32/16-bit tensor, got "
                         f"{x.dtype} {tuple(x.shape)}")  # fmt: skip
    if residual.shape != x.shape or residual.dtype != x.dtype or not residual.is_contiguous():
        raise ValueError(f"add_rms_norm (triton): residual must be contiguous and match x, got {residual.dtype} "
                         f"{tuple(residual.shape)}")  # fmt: skip
    if x.device.type != "cuda" and not _interpreting():
        raise RuntimeError("add_rms_norm (triton): CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")


def forward(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch. x, residual [N, H] contiguous (one of float32/float16/bfloat16), weight [H] (any float dtype)
    -> (y [N, H] in promote(x, weight) dtype, s [N, H] in x's dtype, rstd [N] float32)."""
    _check(x, residual)
    n, h = x.shape
    y = torch.empty(n, h, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    s = torch.empty_like(x)
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    if n and h:
        block_m, block_h, grid = _blocks(n, h)
        _forward_kernel[(grid,)](
            x, residual, weight.contiguous(), y, s, rstd, n, h, eps,
            BLOCK_M=block_m, BLOCK_H=block_h, INTERPRET=_interpreting(), num_warps=_warps(block_m, block_h),
        )  # fmt: skip
    return y, s, rstd


def backward(
    dy: torch.Tensor, ds: torch.Tensor | None, s: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor:
    """One launch. dy [N, H] (y's dtype), ds [N, H] (s's dtype) or None, s [N, H] contiguous, weight [H], rstd
    [N] float32 (the forward's) -> d [N, H] in s's dtype: the gradient w.r.t. x and w.r.t. residual."""
    _check(s, s)
    n, h = s.shape
    d = torch.empty_like(s)
    if n and h:
        block_m, block_h, grid = _blocks(n, h)
        ds = None if ds is None else ds.contiguous()
        _backward_kernel[(grid,)](
            dy.contiguous(), s if ds is None else ds, s, weight.contiguous(), rstd, d, n, h,
            HAS_DS=ds is not None, BLOCK_M=block_m, BLOCK_H=block_h, INTERPRET=_interpreting(),
            num_warps=_warps(block_m, block_h),
        )  # fmt: skip
    return d
