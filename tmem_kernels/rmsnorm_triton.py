"""RMSNorm (op `tmem::rms_norm`) as two Triton kernels: one forward launch, one backward launch (CUDA).

Same contract as `rmsnorm.forward_torch` / `backward_torch` (HF's LlamaRMSNorm rounding, see `rmsnorm`):

    forward   x [N, H], weight [H] -> y [N, H], rstd [N] float32
              rstd = rsqrt(mean(x.float()^2) + eps); y = weight * (x.float() * rstd).to(x.dtype)
    backward  dy [N, H], x, weight, rstd -> dx [N, H] (x's dtype)
              g = (dy * weight).to(x.dtype).float()       (autograd's rounding of the product's gradient)
              dx = rstd * g - x.float() * rstd^3 * mean(g * x.float())

Each program takes BLOCK_M whole rows ([BLOCK_M, BLOCK_H], BLOCK_H the next power of 2 of H): a row's sum of
squares is one reduction in registers, so x is read once per kernel. HF's composition is about eight
launches forward and a dozen backward per norm; a write step runs tens of norms, and on a GPU a step of
small kernels is launch-bound.

Under TRITON_INTERPRET=1 (CPU tensors) the bf16 stores are rounded to nearest even by hand, as in `lora_mlp`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tmem_kernels.lora_mlp import _cast, _interpreting

__all__ = ["DTYPES", "backward", "forward"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK_ELEMENTS = 4096  # rows per program: BLOCK_M x BLOCK_H about this many elements (at least one row)


@triton.jit
def _row_tile(x_ptr, w_ptr, N, H, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):  # noqa: ANN001, ANN202
    """This program's rows [BLOCK_M] (int64), their flat offsets and mask [BLOCK_M, BLOCK_H], x there and the
    weight [BLOCK_H], both as float32 (0 outside the mask)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows[:, None] < N) & (cols[None, :] < H)
    offs = rows[:, None] * H + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < H, other=0.0).to(tl.float32)
    return rows, offs, mask, x, w


@triton.jit
def _normalize(x, w, x_ptr, y_ptr, rstd_ptr, rows, offs, mask, N, H, eps, INTERPRET: tl.constexpr):  # noqa: ANN001, ANN202
    """Store rstd [rows] and y = w * (x * rstd).to(x's dtype) [rows, H] for a tile x (float32 values of x_ptr's
    dtype; `_row_tile`'s rows, offsets and mask): HF's LlamaRMSNorm rounding."""
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / H + eps)
    tl.store(rstd_ptr + rows, rstd, mask=rows < N)
    normed = _cast(x * rstd[:, None], x_ptr.dtype.element_ty, INTERPRET).to(tl.float32)  # .to(x.dtype)
    tl.store(y_ptr + offs, _cast(w[None, :] * normed, y_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _normalized_grad(dy_ptr, rstd_ptr, x, w, x_ptr, rows, offs, mask, N, H, INTERPRET: tl.constexpr):  # noqa: ANN001, ANN202
    """dx of a tile (float32, not rounded): g = (dy * w).to(x's dtype); dx = rstd g - x rstd^3 mean(g x), with dy
    and the forward's rstd loaded at the tile's offsets."""
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=rows < N, other=0.0)
    g = _cast(dy * w[None, :], x_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
    dot = tl.sum(g * x, axis=1) / H
    return rstd[:, None] * g - x * (rstd * rstd * rstd * dot)[:, None]


@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, N, H, eps,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Rows [BLOCK_M * pid, +BLOCK_M): rstd [N] and y [N, H], x and y contiguous."""
    rows, offs, mask, x, w = _row_tile(x_ptr, w_ptr, N, H, BLOCK_M, BLOCK_H)
    _normalize(x, w, x_ptr, y_ptr, rstd_ptr, rows, offs, mask, N, H, eps, INTERPRET)


@triton.jit
def _backward_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, N, H,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Rows [BLOCK_M * pid, +BLOCK_M) of dx [N, H]; dy, x, dx contiguous."""
    rows, offs, mask, x, w = _row_tile(x_ptr, w_ptr, N, H, BLOCK_M, BLOCK_H)
    dx = _normalized_grad(dy_ptr, rstd_ptr, x, w, x_ptr, rows, offs, mask, N, H, INTERPRET)
    tl.store(dx_ptr + offs, _cast(dx, dx_ptr.dtype.element_ty, INTERPRET), mask=mask)


def _blocks(n: int, h: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_H, programs) for N rows of width H."""
    block_h = triton.next_power_of_2(h)
    block_m = max(1, min(_BLOCK_ELEMENTS // block_h, triton.next_power_of_2(n)))
    return block_m, block_h, triton.cdiv(n, block_m)


def _warps(block_m: int, block_h: int) -> int:
    return min(16, max(1, block_m * block_h // 256))  # about 8 elements per thread: no spills (sm_90)


def _check(x: torch.Tensor) -> None:
    if x.dtype not in DTYPES or x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"rms_norm (triton): x must be a contiguous [N, H] float32/16-bit tensor, got {x.dtype} "
                         f"{tuple(x.shape)}")  # fmt: skip
    if x.device.type != "cuda" and not _interpreting():
        raise RuntimeError("rms_norm (triton): CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")


def forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch. x [N, H] contiguous (float32/float16/bfloat16), weight [H] (any float dtype) ->
    (y [N, H] in promote(x, weight) dtype, rstd [N] float32)."""
    _check(x)
    n, h = x.shape
    y = torch.empty(n, h, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    if n and h:
        block_m, block_h, grid = _blocks(n, h)
        _forward_kernel[(grid,)](
            x, weight.contiguous(), y, rstd, n, h, eps,
            BLOCK_M=block_m, BLOCK_H=block_h, INTERPRET=_interpreting(), num_warps=_warps(block_m, block_h),
        )  # fmt: skip
    return y, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """One launch. dy [N, H] (y's dtype), x [N, H] contiguous, weight [H], rstd [N] float32 (the forward's)
    -> dx [N, H] in x's dtype."""
    _check(x)
    n, h = x.shape
    dx = torch.empty_like(x)
    if n and h:
        block_m, block_h, grid = _blocks(n, h)
        _backward_kernel[(grid,)](
            dy.contiguous(), x, weight.contiguous(), rstd, dx, n, h,
            BLOCK_M=block_m, BLOCK_H=block_h, INTERPRET=_interpreting(), num_warps=_warps(block_m, block_h),
        )  # fmt: skip
    return dx
