"""SwiGLU's gated activation (op `tmem::swiglu`) as two Triton kernels: one forward launch, one backward (CUDA).

Same contract as `swiglu_act.forward_torch` / `backward_torch` (`reference.swiglu` / `swiglu_backward`), every
input read as float32 and each output rounded once, on its store:

    forward   gate [N, I], up [N, I] (one dtype; rows may be strided, unit stride along I) -> h [N, I] contiguous
              h = gate * sigmoid(gate) * up
    backward  dh [N, I] (gate's dtype), gate, up -> dgate, dup [N, I] contiguous (gate's dtype), in one launch
              sig = sigmoid(gate) (recomputed: nothing but gate and up is saved)
              dgate = dh * up * sig * (1 + gate * (1 - sig)); dup = dh * gate * sig

Each program takes a [BLOCK_M, BLOCK_N] tile (BLOCK_N up to 1024 columns, about _BLOCK_ELEMENTS elements), the
programs laid out row tile by row tile. The arithmetic is `lora_mlp`'s epilogue's (its forward h, its backward
dgate / dup). Under TRITON_INTERPRET=1 (CPU tensors) the bf16 stores are rounded to nearest even by hand, as there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tmem_kernels.lora_mlp import _cast, _interpreting

__all__ = ["DTYPES", "backward", "forward"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK_ELEMENTS = 4096  # elements per program (BLOCK_M x BLOCK_N)
_MAX_BLOCK_N = 1024


@triton.jit
def _tile(N, I_DIM, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # noqa: ANN001, ANN202
    """This program's rows [BLOCK_M] (int64), columns [BLOCK_N] and mask [BLOCK_M, BLOCK_N]."""
    pid = tl.program_id(0)
    col_tiles = tl.cdiv(I_DIM, BLOCK_N)
    rows = (pid // col_tiles).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < N) & (cols[None, :] < I_DIM)
    return rows, cols, mask


@triton.jit
def _forward_kernel(
    g_ptr, u_ptr, h_ptr, N, I_DIM, stride_g, stride_u,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """One tile of h [N, I] (contiguous) from gate, up (row strides stride_g, stride_u)."""
    rows, cols, mask = _tile(N, I_DIM, BLOCK_M, BLOCK_N)
    g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(h_ptr + rows[:, None] * I_DIM + cols[None, :], _cast(h, h_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _backward_kernel(
    dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, N, I_DIM, stride_dh, stride_g, stride_u,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """One tile of dgate and dup [N, I] (contiguous) from dh, gate, up (row strides given)."""
    rows, cols, mask = _tile(N, I_DIM, BLOCK_M, BLOCK_N)
    dh = tl.load(dh_ptr + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    dup = dh * (g * sig)
    dgate = dh * u * sig * (1.0 + g * (1.0 - sig))
    offs = rows[:, None] * I_DIM + cols[None, :]
    tl.store(dg_ptr + offs, _cast(dgate, dg_ptr.dtype.element_ty, INTERPRET), mask=mask)
    tl.store(du_ptr + offs, _cast(dup, du_ptr.dtype.element_ty, INTERPRET), mask=mask)


def blocks(n: int, i: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, programs, warps) for N rows of width I."""
    block_n = min(triton.next_power_of_2(i), _MAX_BLOCK_N)
    block_m = max(1, min(_BLOCK_ELEMENTS // block_n, triton.next_power_of_2(n)))
    warps = min(8, max(1, block_m * block_n // 512))  # about 16 elements per thread (sm_90: no spills)
    return block_m, block_n, triton.cdiv(n, block_m) * triton.cdiv(i, block_n), warps


def _check(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.dtype not in DTYPES or t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
        raise ValueError(f"swiglu (triton): {name} must be an [N, I] float32/16-bit tensor with unit stride along I, "
                         f"got {t.dtype} {tuple(t.shape)} strides {t.stride()}")  # fmt: skip
    if t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(f"swiglu (triton): {name} must match gate, got {t.dtype} {tuple(t.shape)}")
    if t.device.type != "cuda" and not _interpreting():
        raise RuntimeError("swiglu (triton): CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")


def forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """One launch. gate, up [N, I] (one of float32/float16/bfloat16; unit stride along I, rows may be strided)
    -> h = silu(gate) * up [N, I] contiguous, in their dtype."""
    _check("gate", gate, gate)
    _check("up", up, gate)
    n, i = gate.shape
    h = torch.empty(n, i, dtype=gate.dtype, device=gate.device)
    if n and i:
        block_m, block_n, grid, warps = blocks(n, i)
        _forward_kernel[(grid,)](
            gate, up, h, n, i, gate.stride(0), up.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, INTERPRET=_interpreting(), num_warps=warps,
        )  # fmt: skip
    return h


def backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch. dh, gate, up [N, I] (one dtype; unit stride along I) -> (dgate, dup) [N, I] contiguous, in
    that dtype."""
    _check("gate", gate, gate)
    _check("up", up, gate)
    _check("dh", dh, gate)
    n, i = gate.shape
    dgate = torch.empty(n, i, dtype=gate.dtype, device=gate.device)
    dup = torch.empty_like(dgate)
    if n and i:
        block_m, block_n, grid, warps = blocks(n, i)
        _backward_kernel[(grid,)](
            dh, gate, up, dgate, dup, n, i, dh.stride(0), gate.stride(0), up.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, INTERPRET=_interpreting(), num_warps=warps,
        )  # fmt: skip
    return dgate, dup
