"""Fused LoRA SwiGLU MLP: Triton forward/backward kernels and the autograd.Function around them.

Same semantics as `tmem_kernels.reference.lora_mlp` (see its docstring for the shapes):

    gate = x @ w_gate.T + s * (x @ a_gate.T) @ b_gate.T
    up   = x @ w_up.T   + s * (x @ a_up.T)   @ b_up.T
    h    = silu(gate) * up
    y    = h @ w_down.T + s * (h @ a_down.T) @ b_down.T

Four kernels (grid = output tiles, K loop over the reduction dim):

    _fwd_gate_up   x tile -> gate and up base products AND the stacked shrink x @ [A_gate; A_up].T
                   (one [BLOCK_K, RS_PAD] tile per K step), so x is read once for all three; the expand
                   (xa @ B.T) accumulates into the base products in the epilogue, then SwiGLU.
                   Writes h (and gate, up, xa when a backward will follow).
    _fwd_down      h @ w_down.T and its shrink h @ a_down.T in the same K loop, the expand in the epilogue.
                   Writes y (and ha = h @ a_down.T when a backward will follow).
    _bwd_dh        dh = dy @ w_down + s * (dy @ b_down) @ a_down, dy read in one K loop for both; SwiGLU
                   backward in the epilogue (h recomputed from the saved gate/up, never stored) -> dgate,
                   dup; dB_gate, dB_up (and dA_down) reduced from the epilogue's tiles. One extra column of
                   programs computes dB_down = s * dy.T @ ha.
    _bwd_dx        dx = dgate @ w_gate + dup @ w_up + s * (dgate @ b_gate | dup @ b_up) @ [A_gate; A_up]
                   (stacked), and dA_gate / dA_up from the epilogue when A trains. Skipped entirely when
                   neither x nor A needs a gradient (the first adapted layer of a write).

The LoRA rank r (1..MAX_RANK) is padded inside the kernels to a power-of-2 block >= 16 (`tl.dot` needs
every dimension >= 16 on a GPU): R_PAD for one projection, RS_PAD for the stacked gate/up pair (the two
factors share one block when 2r <= 16). The factor gradients are reduced across row tiles with fp32
atomics into a small workspace the size of the B's (and A's), so they are not bit-deterministic run to
run. With `sgd_lr`, that workspace is applied in place (`B -= sgd_lr * dB`) by one last launch after
every kernel that reads B has run; autograd never sees a dB and no optimizer step runs.

Tiles depend on the shape (`tmem_kernels.tiles.select_config`: decode tiles for <= 16 rows, smaller tiles
and split-K where a grid would under-fill the card). _fwd_down and _bwd_dx may split their reduction over I:
each split stores fp32 partials and `_split_k_reduce_kernel` sums them in split order and applies the
epilogue, so the forward stays bitwise deterministic (no atomics outside the factor gradients).
`launch_configs` lists every launch (grid, constexprs, the shape of every tl.dot) for tests; every tile it
can pick is compiled for sm_90 by `tools/compile_sm90.py` (no register spills, no serialised wgmma, shared
memory within an H100's), not yet timed on a GPU. An inference call of <= 16 rows on CUDA runs the torch
composition (cuBLAS) instead (`forward_path`, the one place that choice is made: `lora_mlp` and the op
`tmem::lora_mlp_triton` both ask it). fp32 dots use TF32 when torch's float32 matmul precision is not
"highest".

Under TRITON_INTERPRET=1 (CPU tensors) the interpreter computes 16-bit `tl.dot` wrongly and truncates
fp32 -> bf16, so there (`INTERPRET`) dot operands are upcast to fp32 and bf16 rounding is done by hand
(round to nearest even); on a GPU the dots run natively on tensor cores.
"""

from __future__ import annotations

import os
from collections import Counter

import torch
import triton
import triton.language as tl

from tmem_kernels import reference
from tmem_kernels.tiles import (
    APPLY_BLOCK,
    DECODE_ROWS,
    MAX_RANK,
    MIN_DOT,
    KernelConfig,
    LoRAMLPConfig,
    decode_path,
    default_config,
    dot_precision,
    launch_configs,
    num_sms,
    select_config,
)

__all__ = [
    "DECODE_ROWS",
    "MAX_RANK",
    "MIN_DOT",
    "KernelConfig",
    "LoRAMLPConfig",
    "LoRAMLPFunction",
    "decode_path",
    "default_config",
    "forward_path",
    "launch_configs",
    "lora_mlp",
    "select_config",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc, INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b with fp32 accumulation (operands upcast to fp32 under the interpreter)."""
    if INTERPRET:  # the interpreter computes 16-bit tl.dot wrongly
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _cast(v, dt: tl.constexpr, INTERPRET: tl.constexpr):
    """v.to(dt), rounding to nearest even (the interpreter truncates fp32 -> bf16: emulate RTNE there)."""
    if INTERPRET and dt == tl.bfloat16:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dt)


@triton.jit
def _fwd_gate_up_kernel(
    x_ptr, wg_ptr, wu_ptr, ag_ptr, au_ptr, bg_ptr, bu_ptr,  # inputs
    h_ptr, g_ptr, u_ptr, xa_ptr,  # outputs
    N, H, I_DIM, R, scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, RS_PAD: tl.constexpr,
    SAVE: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Tile [BLOCK_M, BLOCK_N] of gate/up/h; K loop over H. xa = x @ [A_gate; A_up].T is [N, 2R]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    dt = x_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, RS_PAD)
    mask_m = offs_m < N
    mask_n = offs_n < I_DIM
    rows_m = offs_m.to(tl.int64)
    rows_n = offs_n.to(tl.int64)
    is_g = offs_r < R
    is_u = (offs_r >= R) & (offs_r < 2 * R)

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xa = tl.zeros((BLOCK_M, RS_PAD), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < H
        x = tl.load(
            x_ptr + rows_m[:, None] * H + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0
        )
        w_mask = mask_k[:, None] & mask_n[None, :]
        wg = tl.load(wg_ptr + rows_n[None, :] * H + offs_k[:, None], mask=w_mask, other=0.0)
        wu = tl.load(wu_ptr + rows_n[None, :] * H + offs_k[:, None], mask=w_mask, other=0.0)
        # stacked shrink factor [BLOCK_K, RS_PAD]: columns [0, R) = A_gate.T, [R, 2R) = A_up.T
        a = tl.load(
            ag_ptr + offs_r[None, :] * H + offs_k[:, None], mask=mask_k[:, None] & is_g[None, :], other=0.0
        )
        a += tl.load(
            au_ptr + (offs_r[None, :] - R) * H + offs_k[:, None],
            mask=mask_k[:, None] & is_u[None, :],
            other=0.0,
        )
        acc_g = _mma(x, wg, acc_g, INPUT_PRECISION, INTERPRET)
        acc_u = _mma(x, wu, acc_u, INPUT_PRECISION, INTERPRET)
        xa = _mma(x, a, xa, INPUT_PRECISION, INTERPRET)

    # expand in the epilogue: rows [0, R) of the [RS_PAD, BLOCK_N] tile are B_gate.T, [R, 2R) B_up.T
    bg = tl.load(
        bg_ptr + rows_n[None, :] * R + offs_r[:, None], mask=is_g[:, None] & mask_n[None, :], other=0.0
    )
    bu = tl.load(
        bu_ptr + rows_n[None, :] * R + (offs_r[:, None] - R), mask=is_u[:, None] & mask_n[None, :], other=0.0
    )
    xa_s = _cast(xa * scaling, dt, INTERPRET)  # the expand accumulates straight into the base product
    gate = _cast(_mma(xa_s, bg, acc_g, INPUT_PRECISION, INTERPRET), dt, INTERPRET)
    up = _cast(_mma(xa_s, bu, acc_u, INPUT_PRECISION, INTERPRET), dt, INTERPRET)
    gf = gate.to(tl.float32)
    h = gf * tl.sigmoid(gf) * up.to(tl.float32)

    out = rows_m[:, None] * I_DIM + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    tl.store(h_ptr + out, _cast(h, dt, INTERPRET), mask=mask)
    if SAVE:
        tl.store(g_ptr + out, gate, mask=mask)
        tl.store(u_ptr + out, up, mask=mask)
        if pid_n == 0:
            tl.store(
                xa_ptr + rows_m[:, None] * (2 * R) + offs_r[None, :],
                _cast(xa, dt, INTERPRET),
                mask=mask_m[:, None] & (offs_r[None, :] < 2 * R),
            )


@triton.jit
def _fwd_down_kernel(
    h_ptr, wd_ptr, ad_ptr, bd_ptr,  # inputs
    y_ptr, ha_ptr, part_ptr, part_r_ptr,  # outputs (part*: fp32 split-K partials [SPLIT_K, N, H], [SPLIT_K, N, R])
    N, H, I_DIM, R, scaling, K_SPLIT,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
    SPLIT_K: tl.constexpr, SAVE: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Tile [BLOCK_M, BLOCK_N] of y = h @ w_down.T + s * (h @ a_down.T) @ b_down.T; K loop over I_DIM.

    SPLIT_K > 1: program (m, n, k) reduces only I_DIM[k * K_SPLIT, (k + 1) * K_SPLIT) and stores its fp32
    partials; `_split_k_reduce_kernel` sums them in split order (deterministic) and applies the epilogue.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    dt = h_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < N
    mask_n = offs_n < H
    mask_r = offs_r < R
    rows_m = offs_m.to(tl.int64)
    rows_n = offs_n.to(tl.int64)
    if SPLIT_K == 1:
        k_lo = 0
        k_hi = I_DIM
    else:
        k_lo = tl.program_id(2) * K_SPLIT
        k_hi = tl.minimum(k_lo + K_SPLIT, I_DIM)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ha = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        h = tl.load(
            h_ptr + rows_m[:, None] * I_DIM + offs_k[None, :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        wd = tl.load(
            wd_ptr + rows_n[None, :] * I_DIM + offs_k[:, None],
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        )
        ad = tl.load(
            ad_ptr + offs_r[None, :] * I_DIM + offs_k[:, None],
            mask=mask_k[:, None] & mask_r[None, :],
            other=0.0,
        )
        acc = _mma(h, wd, acc, INPUT_PRECISION, INTERPRET)
        ha = _mma(h, ad, ha, INPUT_PRECISION, INTERPRET)

    if SPLIT_K == 1:
        bd = tl.load(
            bd_ptr + rows_n[None, :] * R + offs_r[:, None], mask=mask_r[:, None] & mask_n[None, :], other=0.0
        )
        y = _mma(_cast(ha * scaling, dt, INTERPRET), bd, acc, INPUT_PRECISION, INTERPRET)
        tl.store(
            y_ptr + rows_m[:, None] * H + offs_n[None, :],
            _cast(y, dt, INTERPRET),
            mask=mask_m[:, None] & mask_n[None, :],
        )
        if SAVE:
            if pid_n == 0:
                tl.store(
                    ha_ptr + rows_m[:, None] * R + offs_r[None, :],
                    _cast(ha, dt, INTERPRET),
                    mask=mask_m[:, None] & mask_r[None, :],
                )
    else:
        _store_split_k_partials(part_ptr, part_r_ptr, acc, ha, rows_m, offs_n, offs_r, mask_m, mask_n, mask_r,
                                N, H, R, pid_n)  # fmt: skip


@triton.jit
def _store_split_k_partials(part_ptr, part_r_ptr, acc, rk, rows_m, offs_n, offs_r, mask_m, mask_n, mask_r,
                            N, C, R_TOT, pid_n):  # fmt: skip
    """This program's fp32 partials: acc -> part[k, rows, cols] ([SPLIT_K, N, C]); the rank-sized term rk ->
    part_r[k, rows, :R_TOT] ([SPLIT_K, N, R_TOT], from the first column of programs only)."""
    rows = tl.program_id(2).to(tl.int64) * N + rows_m
    tl.store(part_ptr + rows[:, None] * C + offs_n[None, :], acc, mask=mask_m[:, None] & mask_n[None, :])
    if pid_n == 0:
        tl.store(part_r_ptr + rows[:, None] * R_TOT + offs_r[None, :], rk, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _split_k_reduce_kernel(
    part_ptr, part_r_ptr, f1_ptr, f2_ptr,  # inputs: fp32 partials; the two halves of the expand factor F
    out_ptr, r_out_ptr,  # outputs: out [N, C]; r_out [N, R_TOT] (the summed rank term, when SAVE_R)
    N, C, R1, R_TOT, scaling, stride_fr, stride_fc,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, SPLIT_K: tl.constexpr,
    SAVE_R: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Epilogue of a split-K kernel: out = sum_k part[k] + (s * sum_k part_r[k]) @ F, summed in split order.

    F [R_TOT, C]: rows [0, R1) read from f1, rows [R1, R_TOT) from f2, F[r, c] = f[r * stride_fr + c * stride_fc]
    (fwd_down: F = B_down.T; bwd_dx: F = [A_gate; A_up]). Tile [BLOCK_M, BLOCK_N] of out.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    dt = out_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < N
    mask_n = offs_n < C
    mask_r = offs_r < R_TOT
    rows_m = offs_m.to(tl.int64)
    rows_n = offs_n.to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rk = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k in range(SPLIT_K):  # a loop, not unrolled: one partial tile live at a time
        rows = k * N + rows_m
        acc += tl.load(part_ptr + rows[:, None] * C + offs_n[None, :], mask=mask_m[:, None] & mask_n[None, :])
        rk += tl.load(part_r_ptr + rows[:, None] * R_TOT + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :])
    f = tl.load(
        f1_ptr + offs_r[:, None] * stride_fr + rows_n[None, :] * stride_fc,
        mask=(offs_r < R1)[:, None] & mask_n[None, :],
        other=0.0,
    )
    f += tl.load(
        f2_ptr + (offs_r[:, None] - R1) * stride_fr + rows_n[None, :] * stride_fc,
        mask=((offs_r >= R1) & mask_r)[:, None] & mask_n[None, :],
        other=0.0,
    )
    out = _mma(_cast(rk * scaling, dt, INTERPRET), f, acc, INPUT_PRECISION, INTERPRET)
    tl.store(out_ptr + rows_m[:, None] * C + offs_n[None, :], _cast(out, dt, INTERPRET),
             mask=mask_m[:, None] & mask_n[None, :])  # fmt: skip
    if SAVE_R:
        if pid_n == 0:
            tl.store(r_out_ptr + rows_m[:, None] * R_TOT + offs_r[None, :], _cast(rk, dt, INTERPRET),
                     mask=mask_m[:, None] & mask_r[None, :])  # fmt: skip


@triton.jit
def _bwd_dbd_rows(
    dy_ptr, ha_ptr, dbd_ptr, pid_m, N, H, R, scaling,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """dB_down += s * (ha.T @ dy).T for one row tile: [R_PAD, BLOCK_M] @ [BLOCK_M, BLOCK_K] per K step."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < N
    mask_r = offs_r < R
    rows_m = offs_m.to(tl.int64)
    ha_t = tl.load(
        ha_ptr + rows_m[None, :] * R + offs_r[:, None], mask=mask_r[:, None] & mask_m[None, :], other=0.0
    )
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < H
        dy = tl.load(
            dy_ptr + rows_m[:, None] * H + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0
        )
        part = _mma(ha_t, dy, tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32), INPUT_PRECISION, INTERPRET)
        tl.atomic_add(
            dbd_ptr + offs_k[None, :].to(tl.int64) * R + offs_r[:, None],
            scaling * part,
            mask=mask_r[:, None] & mask_k[None, :],
            sem="relaxed",
        )


@triton.jit
def _bwd_dh_kernel(
    dy_ptr, wd_ptr, ad_ptr, bd_ptr, g_ptr, u_ptr, xa_ptr, ha_ptr,  # inputs
    dg_ptr, du_ptr, dbg_ptr, dbu_ptr, dbd_ptr, dad_ptr,  # outputs (db*/dad: fp32 workspaces)
    N, H, I_DIM, R, scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
    NEED_DB: tl.constexpr, NEED_DA: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Tile [BLOCK_M, BLOCK_N] of dgate/dup; K loop over H.

    dh = dy @ w_down + s * (dy @ b_down) @ a_down, then the SwiGLU backward on the recomputed h.
    Reductions over N (atomics into fp32 workspaces), from the epilogue's tiles: dB_gate = s * dgate.T @
    xa_gate, dB_up = s * dup.T @ xa_up, dA_down = s * (dy @ b_down).T @ h. With NEED_DB the grid has one
    extra column of programs (pid_n == cdiv(I, BLOCK_N)) that compute dB_down = s * dy.T @ ha instead.
    The small factor is always the transposed operand ([R_PAD, BLOCK_M] @ [BLOCK_M, *]), so no big tile
    is ever transposed.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if NEED_DB and pid_n == tl.cdiv(I_DIM, BLOCK_N):
        _bwd_dbd_rows(dy_ptr, ha_ptr, dbd_ptr, pid_m, N, H, R, scaling, BLOCK_M, BLOCK_K, R_PAD,
                      INPUT_PRECISION, INTERPRET)  # fmt: skip
    else:
        dt = dy_ptr.dtype.element_ty
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, R_PAD)
        mask_m = offs_m < N
        mask_n = offs_n < I_DIM
        mask_r = offs_r < R
        rows_m = offs_m.to(tl.int64)
        rows_n = offs_n.to(tl.int64)

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        dyb = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < H
            rows_k = offs_k.to(tl.int64)
            dy = tl.load(
                dy_ptr + rows_m[:, None] * H + offs_k[None, :],
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )
            wd = tl.load(
                wd_ptr + rows_k[:, None] * I_DIM + offs_n[None, :],
                mask=mask_k[:, None] & mask_n[None, :],
                other=0.0,
            )
            bd = tl.load(
                bd_ptr + rows_k[:, None] * R + offs_r[None, :],
                mask=mask_k[:, None] & mask_r[None, :],
                other=0.0,
            )
            acc = _mma(dy, wd, acc, INPUT_PRECISION, INTERPRET)
            dyb = _mma(dy, bd, dyb, INPUT_PRECISION, INTERPRET)

        ad = tl.load(
            ad_ptr + offs_r[:, None] * I_DIM + offs_n[None, :],
            mask=mask_r[:, None] & mask_n[None, :],
            other=0.0,
        )
        dh = _mma(_cast(dyb * scaling, dt, INTERPRET), ad, acc, INPUT_PRECISION, INTERPRET)
        dh = _cast(dh, dt, INTERPRET).to(tl.float32)

        tile = rows_m[:, None] * I_DIM + offs_n[None, :]
        mask = mask_m[:, None] & mask_n[None, :]
        gate = tl.load(g_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(u_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        dgate = _cast(dh * up * sig * (1.0 + gate * (1.0 - sig)), dt, INTERPRET)
        dup = _cast(dh * silu, dt, INTERPRET)
        tl.store(dg_ptr + tile, dgate, mask=mask)
        tl.store(du_ptr + tile, dup, mask=mask)

        if NEED_DB:
            # [R_PAD, BLOCK_M] slices of xa.T: rows [0, R) of xa are gate's shrink, [R, 2R) up's
            xa_t = xa_ptr + rows_m[None, :] * (2 * R) + offs_r[:, None]
            xa_mask = mask_r[:, None] & mask_m[None, :]
            zero = tl.zeros((R_PAD, BLOCK_N), dtype=tl.float32)
            db_off = rows_n[None, :] * R + offs_r[:, None]
            db_mask = mask_r[:, None] & mask_n[None, :]
            xag_t = tl.load(xa_t, mask=xa_mask, other=0.0)
            dbg = _mma(xag_t, dgate, zero, INPUT_PRECISION, INTERPRET)
            tl.atomic_add(dbg_ptr + db_off, scaling * dbg, mask=db_mask, sem="relaxed")
            xau_t = tl.load(xa_t + R, mask=xa_mask, other=0.0)
            dbu = _mma(xau_t, dup, zero, INPUT_PRECISION, INTERPRET)
            tl.atomic_add(dbu_ptr + db_off, scaling * dbu, mask=db_mask, sem="relaxed")
        if NEED_DA:
            h = _cast(silu * up, dt, INTERPRET)
            dad = _mma(
                tl.trans(_cast(dyb, dt, INTERPRET)),
                h,
                tl.zeros((R_PAD, BLOCK_N), dtype=tl.float32),
                INPUT_PRECISION,
                INTERPRET,
            )
            tl.atomic_add(
                dad_ptr + offs_r[:, None] * I_DIM + offs_n[None, :],
                scaling * dad,
                mask=mask_r[:, None] & mask_n[None, :],
                sem="relaxed",
            )


@triton.jit
def _bwd_dx_kernel(
    dg_ptr, du_ptr, wg_ptr, wu_ptr, ag_ptr, au_ptr, bg_ptr, bu_ptr, x_ptr,  # inputs
    dx_ptr, da_ptr, part_ptr, part_r_ptr,  # outputs (da: fp32 workspace [2R, H], stacked; part*: split-K partials)
    N, H, I_DIM, R, scaling, K_SPLIT,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, RS_PAD: tl.constexpr,
    SPLIT_K: tl.constexpr, NEED_DX: tl.constexpr, NEED_DA: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    INTERPRET: tl.constexpr,
):  # fmt: skip
    """Tile [BLOCK_M, BLOCK_N] of dx; K loop over I_DIM reading dgate/dup once.

    dx = dgate @ w_gate + dup @ w_up + s * (dgate @ b_gate | dup @ b_up) @ [A_gate; A_up] (stacked), and
    [dA_gate; dA_up] = s * (dgate @ b_gate | dup @ b_up).T @ x reduced over N (atomics).
    SPLIT_K > 1 (only with NEED_DX and not NEED_DA): as in `_fwd_down_kernel`, fp32 partials of the K range
    [k * K_SPLIT, (k + 1) * K_SPLIT), summed and expanded by `_split_k_reduce_kernel`.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    dt = dg_ptr.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, RS_PAD)
    mask_m = offs_m < N
    mask_n = offs_n < H
    rows_m = offs_m.to(tl.int64)
    is_g = offs_r < R
    is_u = (offs_r >= R) & (offs_r < 2 * R)
    if SPLIT_K == 1:
        k_lo = 0
        k_hi = I_DIM
    else:
        k_lo = tl.program_id(2) * K_SPLIT
        k_hi = tl.minimum(k_lo + K_SPLIT, I_DIM)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dgb = tl.zeros((BLOCK_M, RS_PAD), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dgb2 = tl.zeros((BLOCK_M, RS_PAD), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        rows_k = offs_k.to(tl.int64)
        in_mask = mask_m[:, None] & mask_k[None, :]
        dg = tl.load(dg_ptr + rows_m[:, None] * I_DIM + offs_k[None, :], mask=in_mask, other=0.0)
        du = tl.load(du_ptr + rows_m[:, None] * I_DIM + offs_k[None, :], mask=in_mask, other=0.0)
        # [BLOCK_K, RS_PAD]: columns [0, R) = B_gate, [R, 2R) = B_up (the other half zero)
        bg = tl.load(
            bg_ptr + rows_k[:, None] * R + offs_r[None, :], mask=mask_k[:, None] & is_g[None, :], other=0.0
        )
        bu = tl.load(
            bu_ptr + rows_k[:, None] * R + (offs_r[None, :] - R),
            mask=mask_k[:, None] & is_u[None, :],
            other=0.0,
        )
        if NEED_DX:
            w_mask = mask_k[:, None] & mask_n[None, :]
            wg = tl.load(wg_ptr + rows_k[:, None] * H + offs_n[None, :], mask=w_mask, other=0.0)
            wu = tl.load(wu_ptr + rows_k[:, None] * H + offs_n[None, :], mask=w_mask, other=0.0)
            acc = _mma(dg, wg, acc, INPUT_PRECISION, INTERPRET)
            acc2 = _mma(du, wu, acc2, INPUT_PRECISION, INTERPRET)
        dgb = _mma(dg, bg, dgb, INPUT_PRECISION, INTERPRET)
        dgb2 = _mma(du, bu, dgb2, INPUT_PRECISION, INTERPRET)

    dgb += dgb2
    acc += acc2
    if SPLIT_K > 1:
        _store_split_k_partials(part_ptr, part_r_ptr, acc, dgb, rows_m, offs_n, offs_r, mask_m, mask_n,
                                offs_r < 2 * R, N, H, 2 * R, pid_n)  # fmt: skip
    else:
        if NEED_DX:
            a = tl.load(
                ag_ptr + offs_r[:, None] * H + offs_n[None, :], mask=is_g[:, None] & mask_n[None, :], other=0.0
            )
            a += tl.load(
                au_ptr + (offs_r[:, None] - R) * H + offs_n[None, :],
                mask=is_u[:, None] & mask_n[None, :],
                other=0.0,
            )
            dx = _mma(_cast(dgb * scaling, dt, INTERPRET), a, acc, INPUT_PRECISION, INTERPRET)
            tl.store(
                dx_ptr + rows_m[:, None] * H + offs_n[None, :],
                _cast(dx, dt, INTERPRET),
                mask=mask_m[:, None] & mask_n[None, :],
            )
        if NEED_DA:
            x = tl.load(
                x_ptr + rows_m[:, None] * H + offs_n[None, :], mask=mask_m[:, None] & mask_n[None, :], other=0.0
            )
            da = _mma(
                tl.trans(_cast(dgb, dt, INTERPRET)),
                x,
                tl.zeros((RS_PAD, BLOCK_N), dtype=tl.float32),
                INPUT_PRECISION,
                INTERPRET,
            )
            tl.atomic_add(
                da_ptr + offs_r[:, None] * H + offs_n[None, :],
                scaling * da,
                mask=(offs_r[:, None] < 2 * R) & mask_n[None, :],
                sem="relaxed",
            )


@triton.jit
def _sgd_apply_one(b_ptr, ws_ptr, numel, lr, offs, INTERPRET: tl.constexpr):
    mask = offs < numel
    b = tl.load(b_ptr + offs, mask=mask, other=0.0)
    g = tl.load(ws_ptr + offs, mask=mask, other=0.0)
    tl.store(b_ptr + offs, _cast(b.to(tl.float32) - lr * g, b_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _sgd_apply_kernel(b0_ptr, w0_ptr, n0, b1_ptr, w1_ptr, n1, b2_ptr, w2_ptr, n2, lr,
                      BLOCK: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    """B_i -= lr * dB_i for the three B's (axis 1 picks which); dB_i from the fp32 workspace."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    which = tl.program_id(1)
    if which == 0:
        _sgd_apply_one(b0_ptr, w0_ptr, n0, lr, offs, INTERPRET)
    elif which == 1:
        _sgd_apply_one(b1_ptr, w1_ptr, n1, lr, offs, INTERPRET)
    else:
        _sgd_apply_one(b2_ptr, w2_ptr, n2, lr, offs, INTERPRET)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def _check_inputs(x: torch.Tensor, w: dict[str, torch.Tensor]) -> tuple[int, int, int, int]:
    """Raise a clear error for anything the kernels would get wrong; returns (N, H, I, r)."""
    tensors = {"x": x, **w}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lora_mlp: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(
                f"lora_mlp: {name} must be 2-D, got shape {tuple(t.shape)} (flatten x to [N, H])"
            )
    dtype, device = x.dtype, x.device
    if dtype not in _DTYPES:
        raise TypeError(f"lora_mlp: dtype {dtype} not supported (float32, float16 or bfloat16)")
    for name, t in tensors.items():
        if t.dtype != dtype:
            raise TypeError(f"lora_mlp: mixed dtypes: x is {dtype} but {name} is {t.dtype}")
        if t.device != device:
            raise ValueError(f"lora_mlp: mixed devices: x is on {device} but {name} is on {t.device}")
        if not t.is_contiguous():
            raise ValueError(
                f"lora_mlp: {name} must be contiguous (shape {tuple(t.shape)}, "
                f"strides {t.stride()}); call .contiguous() first"
            )
    if device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"lora_mlp (triton): tensors are on {device}; Triton needs CUDA tensors, "
            "or TRITON_INTERPRET=1 set before importing tmem_kernels for CPU tensors"
        )
    n, h = x.shape
    # I and r by majority, so that the error names the odd tensor out
    i = Counter([w["w_gate"].shape[0], w["w_up"].shape[0], w["w_down"].shape[1], w["a_down"].shape[1],
                 w["b_gate"].shape[0], w["b_up"].shape[0]]).most_common(1)[0][0]  # fmt: skip
    r = Counter([w[k].shape[0] for k in ("a_gate", "a_up", "a_down")]
                + [w[k].shape[1] for k in ("b_gate", "b_up", "b_down")]).most_common(1)[0][0]  # fmt: skip
    if not 1 <= r <= MAX_RANK:
        raise ValueError(
            f"lora_mlp: LoRA rank {r} is larger than the padded rank block ({MAX_RANK})"
            if r > MAX_RANK
            else f"lora_mlp: LoRA rank must be >= 1, got {r}"
        )
    expected = {
        "w_gate": (i, h), "w_up": (i, h), "w_down": (h, i),
        "a_gate": (r, h), "a_up": (r, h), "a_down": (r, i),
        "b_gate": (i, r), "b_up": (i, r), "b_down": (h, r),
    }  # fmt: skip
    for name, shape in expected.items():
        if tuple(w[name].shape) != shape:
            raise ValueError(
                f"lora_mlp: {name} has shape {tuple(w[name].shape)}, expected {shape} "
                f"for x [{n}, {h}], intermediate size {i} and rank {r}"
            )
    return n, h, i, r


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


Tensor = torch.Tensor


def _forward(
    x: Tensor,
    wg: Tensor,
    wu: Tensor,
    wd: Tensor,
    ag: Tensor,
    bg: Tensor,
    au: Tensor,
    bu: Tensor,
    ad: Tensor,
    bd: Tensor,
    scaling: float,
    save: bool,
    cfg: LoRAMLPConfig,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Launch the two forward kernels: (y [N, H], gate, up [N, I], xa [N, 2r], ha [N, r]); the last four
    are placeholders (not written) unless `save`."""
    n, h = x.shape
    i, r = wg.shape[0], ag.shape[0]
    lc = launch_configs(n, h, i, r, x.dtype, cfg)
    prec, upcast = dot_precision(x.dtype, cfg), _interpreting()
    hid = torch.empty((n, i), device=x.device, dtype=x.dtype)
    y = torch.empty((n, h), device=x.device, dtype=x.dtype)
    gate = torch.empty_like(hid) if save else hid
    up = torch.empty_like(hid) if save else hid
    xa = torch.empty((n, 2 * r), device=x.device, dtype=x.dtype) if save else hid
    ha = torch.empty((n, r), device=x.device, dtype=x.dtype) if save else hid
    if n == 0:
        return y, gate, up, xa, ha
    c = lc["fwd_gate_up"]
    _fwd_gate_up_kernel[c["grid"]](
        x, wg, wu, ag, au, bg, bu, hid, gate, up, xa, n, h, i, r, float(scaling),
        **c["constexprs"], SAVE=save, INPUT_PRECISION=prec, INTERPRET=upcast,
        num_warps=c["num_warps"], num_stages=c["num_stages"],
    )  # fmt: skip
    c = lc["fwd_down"]
    part, part_r = _split_k_partials(c, n, h, r, x.device, y)
    _fwd_down_kernel[c["grid"]](
        hid, wd, ad, bd, y, ha, part, part_r, n, h, i, r, float(scaling), c.get("k_split", i),
        **c["constexprs"], SAVE=save, INPUT_PRECISION=prec, INTERPRET=upcast,
        num_warps=c["num_warps"], num_stages=c["num_stages"],
    )  # fmt: skip
    if "fwd_down_reduce" in lc:  # y = sum of the partials + (s * ha) @ B_down.T; ha saved
        _split_k_reduce(lc["fwd_down_reduce"], part, part_r, bd, bd, y, ha, n, h, r, r, scaling, 1, r, save, prec)
    return y, gate, up, xa, ha


def _split_k_partials(c: dict, n: int, cols: int, rank_cols: int, device: torch.device, placeholder: Tensor
                      ) -> tuple[Tensor, Tensor]:  # fmt: skip
    """fp32 partials [SPLIT_K, n, cols] and [SPLIT_K, n, rank_cols] for a split launch (else placeholders)."""
    split = c["constexprs"]["SPLIT_K"]
    if split == 1:
        return placeholder, placeholder
    f32 = torch.float32
    return torch.empty((split, n, cols), device=device, dtype=f32), torch.empty((split, n, rank_cols), device=device,
                                                                                  dtype=f32)  # fmt: skip


def _split_k_reduce(c: dict, part: Tensor, part_r: Tensor, f1: Tensor, f2: Tensor, out: Tensor, r_out: Tensor,
                    n: int, cols: int, r1: int, r_tot: int, scaling: float, stride_fr: int, stride_fc: int,
                    save_r: bool, prec: str) -> None:  # fmt: skip
    """out = sum of the split partials + (s * summed rank term) @ F (see `_split_k_reduce_kernel`)."""
    _split_k_reduce_kernel[c["grid"]](
        part, part_r, f1, f2, out, r_out, n, cols, r1, r_tot, float(scaling), stride_fr, stride_fc,
        **c["constexprs"], SAVE_R=save_r, INPUT_PRECISION=prec, INTERPRET=_interpreting(),
        num_warps=c["num_warps"], num_stages=c["num_stages"],
    )  # fmt: skip


def _backward(
    dy: Tensor,
    x: Tensor,
    wg: Tensor,
    wu: Tensor,
    wd: Tensor,
    ag: Tensor,
    bg: Tensor,
    au: Tensor,
    bu: Tensor,
    ad: Tensor,
    bd: Tensor,
    gate: Tensor,
    up: Tensor,
    xa: Tensor,
    ha: Tensor,
    scaling: float,
    need_dx: bool,
    need_db: bool,
    need_da: bool,
    cfg: LoRAMLPConfig,
) -> tuple[Tensor | None, list[Tensor] | None, list[Tensor] | None]:
    """Launch the backward kernels: (dx | None, [dB_gate, dB_up, dB_down] | None, [dA_gate, dA_up, dA_down] |
    None); the factor gradients are fp32 views into one zero-initialised workspace."""
    n, h = x.shape
    i, r = wg.shape[0], ag.shape[0]
    lc = launch_configs(n, h, i, r, x.dtype, cfg, train_a=need_da)
    prec, upcast = dot_precision(x.dtype, cfg), _interpreting()
    sizes = [i * r, i * r, h * r] + ([r * h, r * h, r * i] if need_da else [])
    ws = torch.zeros(sum(sizes), device=x.device, dtype=torch.float32)
    parts = list(torch.split(ws, sizes))
    dbg, dbu, dbd = parts[0].view(i, r), parts[1].view(i, r), parts[2].view(h, r)
    if need_da:
        da_gu, dad = ws[sum(sizes[:3]) : sum(sizes[:5])].view(2 * r, h), parts[5].view(r, i)
    else:
        da_gu = dad = ws
    dgate = torch.empty_like(gate)
    dup = torch.empty_like(up)
    dx = torch.empty_like(x) if need_dx else None
    if n > 0:
        c = lc["bwd_dh"]
        grid = (c["grid"][0], c["grid"][1] - (not need_db))
        _bwd_dh_kernel[grid](
            dy, wd, ad, bd, gate, up, xa, ha, dgate, dup, dbg, dbu, dbd, dad, n, h, i, r, float(scaling),
            **c["constexprs"], NEED_DB=need_db, NEED_DA=need_da, INPUT_PRECISION=prec, INTERPRET=upcast,
            num_warps=c["num_warps"], num_stages=c["num_stages"],
        )  # fmt: skip
        if need_dx or need_da:
            c = lc["bwd_dx"]
            part, part_r = _split_k_partials(c, n, h, 2 * r, x.device, dgate)
            _bwd_dx_kernel[c["grid"]](
                dgate, dup, wg, wu, ag, au, bg, bu, x, dx if need_dx else dgate, da_gu, part, part_r, n, h, i, r,
                float(scaling), c.get("k_split", i), **c["constexprs"], NEED_DX=need_dx, NEED_DA=need_da,
                INPUT_PRECISION=prec, INTERPRET=upcast, num_warps=c["num_warps"], num_stages=c["num_stages"],
            )  # fmt: skip
            if "bwd_dx_reduce" in lc:  # dx = sum of the partials + (s * dgb) @ [A_gate; A_up]
                _split_k_reduce(lc["bwd_dx_reduce"], part, part_r, ag, au, dx, dx, n, h, r, 2 * r, scaling, h, 1,
                                False, prec)  # fmt: skip
    db = [dbg, dbu, dbd] if need_db else None
    da = [da_gu[:r], da_gu[r:], dad] if need_da else None
    return dx, db, da


def _sgd_apply_(bs: list[torch.Tensor], dbs: list[torch.Tensor], lr: float) -> None:
    """B -= lr * dB for the three B's in one launch (dB: fp32 workspaces of the same shapes)."""
    numel = max(b.numel() for b in bs)
    if numel == 0:
        return
    grid = (triton.cdiv(numel, APPLY_BLOCK), 3)
    _sgd_apply_kernel[grid](
        bs[0], dbs[0], bs[0].numel(), bs[1], dbs[1], bs[1].numel(), bs[2], dbs[2], bs[2].numel(), float(lr),
        BLOCK=APPLY_BLOCK, INTERPRET=_interpreting(),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Autograd
# ------------------------------------------------------------------------------------------------


class LoRAMLPFunction(torch.autograd.Function):
    """Autograd wrapper of the fused kernels. Inputs in `lora_mlp`'s order, then scaling, sgd_lr, config."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, scaling, sgd_lr,
                config):  # fmt: skip
        save = any(ctx.needs_input_grad[i] for i in (0, 4, 5, 6, 7, 8, 9))
        y, gate, up, xa, ha = _forward(x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down,
                                       scaling, save, config)  # fmt: skip
        if save:
            ctx.save_for_backward(x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down,
                                  gate, up, xa, ha)  # fmt: skip
        ctx.scaling, ctx.sgd_lr, ctx.config = scaling, sgd_lr, config
        return y

    @staticmethod
    def backward(ctx, dy):
        x, wg, wu, wd, ag, bg, au, bu, ad, bd, gate, up, xa, ha = ctx.saved_tensors
        nig = ctx.needs_input_grad
        need_dx = nig[0]
        need_db = any(nig[i] for i in (5, 7, 9))
        need_da = any(nig[i] for i in (4, 6, 8))
        dy = dy.contiguous()
        if dy.dtype != x.dtype:
            dy = dy.to(x.dtype)
        dx, db, da = _backward(dy, x, wg, wu, wd, ag, bg, au, bu, ad, bd, gate, up, xa, ha, ctx.scaling,
                               need_dx, need_db, need_da, ctx.config)  # fmt: skip
        grads_b: list[torch.Tensor | None] = [None, None, None]
        if db is not None:
            bs = [bg, bu, bd]
            if ctx.sgd_lr is not None:
                # every kernel that reads B has run: update in place, hand autograd no gradient
                _sgd_apply_(bs, [g if nig[k] else torch.zeros_like(g) for g, k in zip(db, (5, 7, 9))],
                            ctx.sgd_lr)  # fmt: skip
                torch.autograd.graph.increment_version([b for b, k in zip(bs, (5, 7, 9)) if nig[k]])
            else:
                grads_b = [g.to(b.dtype) if nig[k] else None for g, b, k in zip(db, bs, (5, 7, 9))]
        grads_a: list[torch.Tensor | None] = [None, None, None]
        if da is not None:
            grads_a = [g.to(a.dtype) if nig[k] else None for g, a, k in zip(da, (ag, au, ad), (4, 6, 8))]
        return (dx, None, None, None, grads_a[0], grads_b[0], grads_a[1], grads_b[1], grads_a[2], grads_b[2],
                None, None, None)  # fmt: skip


def forward_path(x: torch.Tensor, config: LoRAMLPConfig, save: bool) -> str:
    """How a call on x [N, H] with tiles `config` runs its forward: "cublas" (the torch composition: cuBLAS
    base products + the small LoRA terms) for an inference call (`save` False: no backward will follow) that
    `tiles.decode_path` sends there, else "fused" (the Triton kernels). The one place this choice is made:
    `lora_mlp` and the op `tmem::lora_mlp_triton` (library.py) both ask it, so they never disagree."""
    return "cublas" if not save and decode_path(x.shape[0], x.device, config) == "cublas" else "fused"


def lora_mlp(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    a_gate: torch.Tensor,
    b_gate: torch.Tensor,
    a_up: torch.Tensor,
    b_up: torch.Tensor,
    a_down: torch.Tensor,
    b_down: torch.Tensor,
    scaling: float = 1.0,
    sgd_lr: float | None = None,
    *,
    config: LoRAMLPConfig | None = None,
) -> torch.Tensor:
    """Fused LoRA SwiGLU MLP, x [N, H] -> y [N, H] (shapes as in `reference.lora_mlp`; all contiguous, one
    dtype and device; rank r <= MAX_RANK).

    w_gate, w_up [I, H]; w_down [H, I]; a_gate, a_up [r, H]; a_down [r, I]; b_gate, b_up [I, r];
    b_down [H, r]. Differentiable w.r.t. x, the b_* and the a_* (whichever require grad); the w_* are frozen.
    `sgd_lr`: if given, the backward updates every b_* that requires grad in place, `B -= sgd_lr * dB`
    (after dx was computed with the old B), and returns no gradient for it. `config` overrides the tiles.
    """
    weights = dict(w_gate=w_gate, w_up=w_up, w_down=w_down, a_gate=a_gate, b_gate=b_gate, a_up=a_up,
                   b_up=b_up, a_down=a_down, b_down=b_down)  # fmt: skip
    n, h, i, _ = _check_inputs(x, weights)
    if sgd_lr is not None and not isinstance(sgd_lr, (int, float)):
        raise TypeError(f"lora_mlp: sgd_lr must be a float or None, got {type(sgd_lr).__name__}")
    for name, t in weights.items():
        if name.startswith("w_") and t.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"lora_mlp: {name} requires grad, but the base weights are frozen here "
                "(no kernel computes their gradient); detach them or set requires_grad=False"
            )
    if config is None:
        config = select_config(n, h, i, x.dtype, num_sms(x.device))
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x, a_gate, b_gate, a_up, b_up, a_down, b_down))
    if forward_path(x, config, save) == "cublas":
        return reference.lora_mlp(x, **weights, scaling=scaling)
    lr = None if sgd_lr is None else float(sgd_lr)
    return LoRAMLPFunction.apply(
        x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, float(scaling), lr, config
    )
