"""Segmented LoRA (many adapters in one batch, Punica's SGMV): Triton kernels and the ops built on them.

Rows are grouped by adapter slot (`tmem_kernels.segments`): rows seg_indptr[g]:seg_indptr[g+1] use
B[seg_slot[g]] from [S, M, r] stacks, or no adapter (-1). The shrink x @ A.T is shared by every slot and
runs once as a plain matrix product, as do the base products x @ W.T (torch.mm: cuBLAS on a GPU); the
kernels here do what differs per segment:

    _expand_kernel          y[rows] += s * xa[rows] @ B[slot].T                      (the down expand)
    _expand_bwd_kernel      dxa[rows] = s * dy[rows] @ B[slot];  dB[slot] += s * dy[rows].T @ xa[rows]
    _gate_up_fwd_kernel     h = silu(gb + s xa_g B_g[slot].T) * (ub + s xa_u B_u[slot].T);  ha = h @ A_d.T
    _gate_up_bwd_kernel     gate/up recomputed, dh = dh_base + dha @ A_d, SwiGLU backward -> dgate, dup;
                            dB_g[slot], dB_u[slot] reduced per segment; dxa = s * [dgate @ B_g, dup @ B_u]

Grid: (column tiles, G, SPLIT). Program (n, g, p) loads segment g's B slice for column tile n once and
walks row blocks p, p + SPLIT, ... of the segment (a loop whose bounds it reads from seg_indptr on the
device), so a segment of any length is covered and B is read once per segment and column tile. The grid
depends only on host-known sizes (column count, G and SPLIT, itself a function of N and G), and no
kernel reads a device value on the host: the ops are CUDA-graph safe when the segment tensors live on
the device (their values are then trusted, not validated: the caller builds them from host lists).

Reductions across programs (dB across row blocks and segments sharing a slot, dxa and ha across column
tiles) use fp32 atomics into zeroed workspaces, so results are not bit-deterministic run to run. Every
tl.dot dimension is >= 16: the rank is padded to R_PAD = max(16, next_pow2(r)), row blocks are >= 16.
Under TRITON_INTERPRET=1 (CPU tensors) dots are upcast to fp32 as in `tmem_kernels.lora_mlp`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from tmem_kernels.lora_mlp import MIN_DOT, _cast, _interpreting, _mma
from tmem_kernels.segments import (
    SegmentedExpandFunction,
    SegmentedLoRAMLPFunction,
    check_b_stack,
    check_segment_tensors,
    host_segments,
    lora_mlp_segmented_shapes,
)

__all__ = [
    "MAX_RANK",
    "SegmentedConfig",
    "launch_configs",
    "lora_expand_segmented",
    "lora_expand_segmented_backward",
    "lora_mlp_segmented",
]

MAX_RANK = 16  # one padded rank block
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _segment(indptr_ptr, slot_ptr):
    """(start, end, slot) of this program's segment (program_id(1))."""
    g = tl.program_id(1)
    return tl.load(indptr_ptr + g), tl.load(indptr_ptr + g + 1), tl.load(slot_ptr + g)


@triton.jit
def _expand_kernel(
    y_ptr, xa_ptr, b_ptr, indptr_ptr, slot_ptr,
    M, R, b_stride, scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, SPLIT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """y [N, M] += s * xa [N, R] @ B[slot].T on one column tile of one segment's rows (nothing for -1)."""
    start, end, slot = _segment(indptr_ptr, slot_ptr)
    if slot >= 0:
        dt = y_ptr.dtype.element_ty
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, R_PAD)
        mask_n = offs_n < M
        mask_r = offs_r < R
        b_t = tl.load(  # [R_PAD, BLOCK_N] = B[slot].T slice
            b_ptr + slot.to(tl.int64) * b_stride + offs_n[None, :] * R + offs_r[:, None],
            mask=mask_r[:, None] & mask_n[None, :],
            other=0.0,
        )
        for m0 in range(start + tl.program_id(2) * BLOCK_M, end, BLOCK_M * SPLIT):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < end
            rows = offs_m.to(tl.int64)
            xa = tl.load(xa_ptr + rows[:, None] * R + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :],
                         other=0.0)  # fmt: skip
            ptrs = y_ptr + rows[:, None] * M + offs_n[None, :]
            mask = mask_m[:, None] & mask_n[None, :]
            lora = _mma(xa, b_t, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), INPUT_PRECISION, INTERPRET)
            y = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) + scaling * lora
            tl.store(ptrs, _cast(y, dt, INTERPRET), mask=mask)


@triton.jit
def _expand_bwd_kernel(
    dy_ptr, xa_ptr, b_ptr, indptr_ptr, slot_ptr,
    dxa_ptr, db_ptr,  # fp32 workspaces [N, R] and [S, M, R]
    M, R, b_stride, scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, SPLIT: tl.constexpr,
    NEED_DXA: tl.constexpr, NEED_DB: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """One column tile of one segment: dxa[rows] += s * dy[rows, tile] @ B[slot][tile] (summed over column
    tiles) and dB[slot][tile] += s * xa[rows].T @ dy[rows, tile] (summed over row blocks and segments)."""
    start, end, slot = _segment(indptr_ptr, slot_ptr)
    if slot >= 0:
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, R_PAD)
        mask_n = offs_n < M
        mask_r = offs_r < R
        b = tl.load(  # [BLOCK_N, R_PAD] = B[slot] slice
            b_ptr + slot.to(tl.int64) * b_stride + offs_n[:, None] * R + offs_r[None, :],
            mask=mask_n[:, None] & mask_r[None, :],
            other=0.0,
        )
        db = tl.zeros((R_PAD, BLOCK_N), dtype=tl.float32)
        for m0 in range(start + tl.program_id(2) * BLOCK_M, end, BLOCK_M * SPLIT):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < end
            rows = offs_m.to(tl.int64)
            dy = tl.load(dy_ptr + rows[:, None] * M + offs_n[None, :], mask=mask_m[:, None] & mask_n[None, :],
                         other=0.0)  # fmt: skip
            if NEED_DB:
                xa_t = tl.load(xa_ptr + rows[None, :] * R + offs_r[:, None], mask=mask_r[:, None] & mask_m[None, :],
                               other=0.0)  # fmt: skip
                db = _mma(xa_t, dy, db, INPUT_PRECISION, INTERPRET)
            if NEED_DXA:
                dxa = _mma(dy, b, tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32), INPUT_PRECISION, INTERPRET)
                tl.atomic_add(dxa_ptr + rows[:, None] * R + offs_r[None, :], scaling * dxa,
                              mask=mask_m[:, None] & mask_r[None, :], sem="relaxed")  # fmt: skip
        if NEED_DB:
            tl.atomic_add(db_ptr + slot.to(tl.int64) * M * R + offs_n[None, :] * R + offs_r[:, None], scaling * db,
                          mask=mask_r[:, None] & mask_n[None, :], sem="relaxed")  # fmt: skip


@triton.jit
def _load_b_pair(bg_ptr, bu_ptr, slot, bg_stride, bu_stride, offs_n, offs_r, mask_n, R):
    """[R_PAD, BLOCK_N] slices of B_gate[slot].T and B_up[slot].T; zero for slot -1 (no adapter)."""
    sl = tl.maximum(slot, 0).to(tl.int64)
    r_used = tl.where(slot >= 0, R, 0)  # no adapter: rank 0, every factor element masked to zero
    mask = (offs_r[:, None] < r_used) & mask_n[None, :]
    tile = offs_n[None, :] * R + offs_r[:, None]
    bg_t = tl.load(bg_ptr + sl * bg_stride + tile, mask=mask, other=0.0)
    bu_t = tl.load(bu_ptr + sl * bu_stride + tile, mask=mask, other=0.0)
    return bg_t, bu_t


@triton.jit
def _gate_up_rows(g_ptr, u_ptr, xa_ptr, bg_t, bu_t, rows, mask_m, offs_n, offs_r, mask, mask_r, I_DIM, R, scaling,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    """(gate, up) [BLOCK_M, BLOCK_N] in fp32 and the shrinks xa_g, xa_u [BLOCK_M, R_PAD] of a row block."""
    tile = rows[:, None] * I_DIM + offs_n[None, :]
    gb = tl.load(g_ptr + tile, mask=mask, other=0.0).to(tl.float32)
    ub = tl.load(u_ptr + tile, mask=mask, other=0.0).to(tl.float32)
    xa_rows = xa_ptr + rows[:, None] * (2 * R) + offs_r[None, :]
    xa_mask = mask_m[:, None] & mask_r[None, :]
    xa_g = tl.load(xa_rows, mask=xa_mask, other=0.0)
    xa_u = tl.load(xa_rows + R, mask=xa_mask, other=0.0)
    zero = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gate = gb + scaling * _mma(xa_g, bg_t, zero, INPUT_PRECISION, INTERPRET)
    up = ub + scaling * _mma(xa_u, bu_t, zero, INPUT_PRECISION, INTERPRET)
    return gate, up, xa_g, xa_u


@triton.jit
def _gate_up_fwd_kernel(
    g_ptr, u_ptr, xa_ptr, bg_ptr, bu_ptr, ad_ptr, indptr_ptr, slot_ptr,  # g, u: the base products [N, I]
    h_ptr, ha_ptr,  # ha: fp32 workspace [N, R]
    I_DIM, R, bg_stride, bu_stride, scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, SPLIT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """One column tile of one segment's rows: h = silu(gate) * up with the expand added to the base
    products g = x @ W_gate.T, u = x @ W_up.T; ha += h[:, tile] @ A_down[:, tile].T (summed over column tiles)."""
    start, end, slot = _segment(indptr_ptr, slot_ptr)
    dt = g_ptr.dtype.element_ty
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    mask_n = offs_n < I_DIM
    mask_r = offs_r < R
    bg_t, bu_t = _load_b_pair(bg_ptr, bu_ptr, slot, bg_stride, bu_stride, offs_n, offs_r, mask_n, R)
    ad = tl.load(ad_ptr + offs_r[None, :] * I_DIM + offs_n[:, None], mask=mask_n[:, None] & mask_r[None, :],
                 other=0.0)  # [BLOCK_N, R_PAD] = A_down.T slice  # fmt: skip
    for m0 in range(start + tl.program_id(2) * BLOCK_M, end, BLOCK_M * SPLIT):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        rows = offs_m.to(tl.int64)
        mask = mask_m[:, None] & mask_n[None, :]
        gate, up, _, _ = _gate_up_rows(g_ptr, u_ptr, xa_ptr, bg_t, bu_t, rows, mask_m, offs_n, offs_r, mask, mask_r,
                                       I_DIM, R, scaling, BLOCK_M, BLOCK_N, R_PAD, INPUT_PRECISION,
                                       INTERPRET)  # fmt: skip
        h = _cast(gate * tl.sigmoid(gate) * up, dt, INTERPRET)
        tl.store(h_ptr + rows[:, None] * I_DIM + offs_n[None, :], h, mask=mask)
        ha = _mma(h, ad, tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32), INPUT_PRECISION, INTERPRET)
        tl.atomic_add(ha_ptr + rows[:, None] * R + offs_r[None, :], ha, mask=mask_m[:, None] & mask_r[None, :],
                      sem="relaxed")  # fmt: skip


@triton.jit
def _gate_up_bwd_kernel(
    g_ptr, u_ptr, xa_ptr, bg_ptr, bu_ptr, ad_ptr, dh_ptr, dha_ptr, indptr_ptr, slot_ptr,
    dg_ptr, du_ptr, dbg_ptr, dbu_ptr, dxa_ptr,  # dbg, dbu, dxa: fp32 workspaces [S, I, R] x 2, [N, 2R]
    I_DIM, R, bg_stride, bu_stride, scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, SPLIT: tl.constexpr,
    STORE_DGU: tl.constexpr, INPUT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """One column tile of one segment's rows: gate/up recomputed, dh = dh_base + dha @ A_down, SwiGLU
    backward -> dgate, dup (stored when STORE_DGU); dB_gate/up[slot][tile] += s * xa_*.T @ d* and
    dxa[rows] += s * [dgate @ B_gate[slot], dup @ B_up[slot]] over the tile (not for slot -1)."""
    start, end, slot = _segment(indptr_ptr, slot_ptr)
    dt = g_ptr.dtype.element_ty
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    mask_n = offs_n < I_DIM
    mask_r = offs_r < R
    bg_t, bu_t = _load_b_pair(bg_ptr, bu_ptr, slot, bg_stride, bu_stride, offs_n, offs_r, mask_n, R)
    ad = tl.load(ad_ptr + offs_r[:, None] * I_DIM + offs_n[None, :], mask=mask_r[:, None] & mask_n[None, :],
                 other=0.0)  # [R_PAD, BLOCK_N]  # fmt: skip
    acc_g = tl.zeros((R_PAD, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((R_PAD, BLOCK_N), dtype=tl.float32)
    for m0 in range(start + tl.program_id(2) * BLOCK_M, end, BLOCK_M * SPLIT):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        rows = offs_m.to(tl.int64)
        mask = mask_m[:, None] & mask_n[None, :]
        gate, up, xa_g, xa_u = _gate_up_rows(g_ptr, u_ptr, xa_ptr, bg_t, bu_t, rows, mask_m, offs_n, offs_r, mask,
                                             mask_r, I_DIM, R, scaling, BLOCK_M, BLOCK_N, R_PAD,
                                             INPUT_PRECISION, INTERPRET)  # fmt: skip
        tile = rows[:, None] * I_DIM + offs_n[None, :]
        dha = tl.load(dha_ptr + rows[:, None] * R + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :],
                      other=0.0)  # fmt: skip
        dh = _mma(dha, ad, tl.load(dh_ptr + tile, mask=mask, other=0.0).to(tl.float32), INPUT_PRECISION, INTERPRET)
        sig = tl.sigmoid(gate)
        dgate = _cast(dh * up * sig * (1.0 + gate * (1.0 - sig)), dt, INTERPRET)
        dup = _cast(dh * gate * sig, dt, INTERPRET)
        if STORE_DGU:
            tl.store(dg_ptr + tile, dgate, mask=mask)
            tl.store(du_ptr + tile, dup, mask=mask)
        if slot >= 0:
            acc_g = _mma(tl.trans(xa_g), dgate, acc_g, INPUT_PRECISION, INTERPRET)
            acc_u = _mma(tl.trans(xa_u), dup, acc_u, INPUT_PRECISION, INTERPRET)
            zero = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
            dxa_g = _mma(dgate, tl.trans(bg_t), zero, INPUT_PRECISION, INTERPRET)
            dxa_u = _mma(dup, tl.trans(bu_t), zero, INPUT_PRECISION, INTERPRET)
            dxa_rows = dxa_ptr + rows[:, None] * (2 * R) + offs_r[None, :]
            dxa_mask = mask_m[:, None] & mask_r[None, :]
            tl.atomic_add(dxa_rows, scaling * dxa_g, mask=dxa_mask, sem="relaxed")
            tl.atomic_add(dxa_rows + R, scaling * dxa_u, mask=dxa_mask, sem="relaxed")
    if slot >= 0:
        db_tile = slot.to(tl.int64) * I_DIM * R + offs_n[None, :] * R + offs_r[:, None]
        db_mask = mask_r[:, None] & mask_n[None, :]
        tl.atomic_add(dbg_ptr + db_tile, scaling * acc_g, mask=db_mask, sem="relaxed")
        tl.atomic_add(dbu_ptr + db_tile, scaling * acc_u, mask=db_mask, sem="relaxed")


# ------------------------------------------------------------------------------------------------
# Launch plan (inspectable: tests check every tl.dot would compile on a GPU)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentedConfig:
    """Tiles of the segmented kernels: BLOCK_M in [16, block_m] (sized to the mean segment length),
    BLOCK_N = block_n, SPLIT <= max_split row-block programs per segment and column tile."""

    block_m: int = 64
    block_n: int = 64
    max_split: int = 16
    num_warps: int = 4
    num_stages: int = 2


class _Plan(NamedTuple):
    block_m: int
    block_n: int
    r_pad: int
    split: int


def _plan(n: int, g: int, r: int, cfg: SegmentedConfig) -> _Plan:
    """Tiles from host-known sizes only (N, G, r): the same plan for every batch of that shape."""
    mean = triton.cdiv(max(n, 1), max(g, 1))
    bm = max(MIN_DOT, min(triton.next_power_of_2(cfg.block_m), triton.next_power_of_2(mean)))
    split = max(1, min(cfg.max_split, triton.cdiv(mean, bm)))
    return _Plan(bm, max(MIN_DOT, triton.next_power_of_2(cfg.block_n)), max(MIN_DOT, triton.next_power_of_2(r)),
                 split)  # fmt: skip


def launch_configs(n: int, cols: int, r: int, g: int, config: SegmentedConfig | None = None) -> dict[str, dict]:
    """Every launch the segmented ops make for N rows in G segments, `cols` output columns (M for the
    expand, I for gate/up) and rank r: {kernel: {"grid", "constexprs", "num_warps", "dots"}}, "dots"
    listing the (M, N, K) of every tl.dot."""
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"LoRA rank {r} is outside 1..{MAX_RANK} (the padded rank block is {MAX_RANK})")
    cfg = config or SegmentedConfig()
    bm, bn, rp, split = _plan(n, g, r, cfg)
    dots = {
        "expand": [(bm, bn, rp)],  # xa @ B.T
        "expand_bwd": [(rp, bn, bm), (bm, rp, bn)],  # xa.T @ dy; dy @ B
        "gate_up_fwd": [(bm, bn, rp)] * 2 + [(bm, rp, bn)],  # xa_g @ Bg.T, xa_u @ Bu.T; h @ Ad.T
        "gate_up_bwd": [(bm, bn, rp)] * 3 + [(rp, bn, bm)] * 2 + [(bm, rp, bn)] * 2,  # + dha @ Ad; dB; dxa
    }
    return {
        name: {
            "grid": (triton.cdiv(cols, bn), g, split),
            "constexprs": {"BLOCK_M": bm, "BLOCK_N": bn, "R_PAD": rp, "SPLIT": split},
            "num_warps": cfg.num_warps,
            "num_stages": cfg.num_stages,
            "dots": d,
        }
        for name, d in dots.items()
    }


# ------------------------------------------------------------------------------------------------
# Kernel set (segments.SegmentedKernels)
# ------------------------------------------------------------------------------------------------


class _DeviceSegments(NamedTuple):
    """Segment tensors on the compute device and their count G (host-known)."""

    indptr: torch.Tensor
    slot: torch.Tensor
    count: int


class _TritonKernels:
    """The Triton `segments.SegmentedKernels`; `seg` is a `_DeviceSegments`."""

    def __init__(self, config: SegmentedConfig) -> None:
        self.config = config

    def _launch(self, kernel, n: int, cols: int, r: int, seg: _DeviceSegments, *args, **flags) -> None:  # noqa: ANN001
        if n == 0 or seg.count == 0:
            return
        bm, bn, rp, split = _plan(n, seg.count, r, self.config)
        dtype = args[0].dtype
        kernel[(triton.cdiv(cols, bn), seg.count, split)](
            *args, BLOCK_M=bm, BLOCK_N=bn, R_PAD=rp, SPLIT=split,
            INPUT_PRECISION="ieee" if dtype == torch.float32 else "tf32", INTERPRET=_interpreting(),
            num_warps=self.config.num_warps, num_stages=self.config.num_stages, **flags,
        )  # fmt: skip

    def expand_(self, y, xa, b, seg, scaling):  # noqa: ANN001, ANN201
        n, m = y.shape
        r = xa.shape[1]
        self._launch(_expand_kernel, n, m, r, seg, y, xa, b, seg.indptr, seg.slot, m, r, b.stride(0), scaling)

    def expand_backward(self, dy, xa, b, seg, scaling, need_dxa, need_db):  # noqa: ANN001, ANN201
        n, m = dy.shape
        r = xa.shape[1]
        dxa = torch.zeros(n, r, device=dy.device, dtype=torch.float32)
        db = torch.zeros(b.shape, device=dy.device, dtype=torch.float32) if need_db else dxa
        if need_dxa or need_db:
            self._launch(_expand_bwd_kernel, n, m, r, seg, dy, xa, b, seg.indptr, seg.slot, dxa, db, m, r,
                         b.stride(0), scaling, NEED_DXA=need_dxa, NEED_DB=need_db)  # fmt: skip
        return (dxa.to(xa.dtype) if need_dxa else None), (db.to(b.dtype) if need_db else None)

    def gate_up_forward(self, gu, xa, b_gate, b_up, a_down, seg, scaling):  # noqa: ANN001, ANN201
        _, n, i = gu.shape
        r = a_down.shape[0]
        h = torch.empty(n, i, device=gu.device, dtype=gu.dtype)
        ha = torch.zeros(n, r, device=gu.device, dtype=torch.float32)
        self._launch(_gate_up_fwd_kernel, n, i, r, seg, gu[0], gu[1], xa, b_gate, b_up, a_down, seg.indptr,
                     seg.slot, h, ha, i, r, b_gate.stride(0), b_up.stride(0), scaling)  # fmt: skip
        return h, ha.to(gu.dtype)

    def gate_up_backward(self, gu, xa, b_gate, b_up, a_down, dh_base, dha, seg, scaling, need_dgu):  # noqa: ANN001, ANN201
        _, n, i = gu.shape
        r = a_down.shape[0]
        dgu = torch.empty_like(gu) if need_dgu else gu
        dbg = torch.zeros(b_gate.shape, device=gu.device, dtype=torch.float32)
        dbu = torch.zeros(b_up.shape, device=gu.device, dtype=torch.float32)
        dxa = torch.zeros(n, 2 * r, device=gu.device, dtype=torch.float32)
        self._launch(_gate_up_bwd_kernel, n, i, r, seg, gu[0], gu[1], xa, b_gate, b_up, a_down, dh_base, dha,
                     seg.indptr, seg.slot, dgu[0], dgu[1], dbg, dbu, dxa, i, r, b_gate.stride(0), b_up.stride(0),
                     scaling, STORE_DGU=need_dgu)  # fmt: skip
        return (dgu if need_dgu else None), dbg.to(b_gate.dtype), dbu.to(b_up.dtype), dxa.to(gu.dtype)


# ------------------------------------------------------------------------------------------------
# Validation and the public ops
# ------------------------------------------------------------------------------------------------


def _check_tensors(op: str, stacks: dict[str, torch.Tensor], **tensors: torch.Tensor) -> None:
    """One dtype (fp32/fp16/bf16) and device for all; plain tensors contiguous; CUDA or the interpreter."""
    first = next(iter(tensors.values()))
    dtype, device = first.dtype, first.device
    if dtype not in _DTYPES:
        raise TypeError(f"{op}: dtype {dtype} not supported (float32, float16 or bfloat16)")
    for name, t in {**tensors, **stacks}.items():
        if t.dtype != dtype:
            raise TypeError(f"{op}: mixed dtypes: {next(iter(tensors))} is {dtype} but {name} is {t.dtype}")
        if t.device != device:
            raise ValueError(f"{op}: mixed devices: {next(iter(tensors))} is on {device} but {name} on {t.device}")
    for name, t in tensors.items():
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous (strides {t.stride()}); call .contiguous() first")
    if device.type != "cuda" and not _interpreting():
        raise RuntimeError(f"{op} (triton): tensors are on {device}; Triton needs CUDA tensors, or "
                           "TRITON_INTERPRET=1 set before importing tmem_kernels for CPU tensors")  # fmt: skip


def _device_segments(seg_indptr, seg_slot, n: int, num_slots: int, device: torch.device, op: str) -> _DeviceSegments:  # noqa: ANN001
    """Segments on the compute device. CPU tensors are validated on the host (and copied to a CUDA
    device: not CUDA-graph safe); device tensors are trusted (reading them here would sync)."""
    g = check_segment_tensors(seg_indptr, seg_slot, op)
    if seg_indptr.device.type == "cpu":
        host_segments(seg_indptr, seg_slot, n, num_slots, op)
    elif seg_indptr.device != device:
        raise ValueError(f"{op}: the segment tensors are on {seg_indptr.device} but the data on {device}")
    return _DeviceSegments(seg_indptr.to(device).contiguous(), seg_slot.to(device).contiguous(), g)


def _check_rank(r: int, op: str) -> None:
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"{op}: LoRA rank {r} is outside 1..{MAX_RANK} (the padded rank block is {MAX_RANK})")


def _check_expand(y, xa, b, seg_indptr, seg_slot, op):  # noqa: ANN001, ANN202
    for name, t in (("y", y), ("xa", xa)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{op}: {name} must be a 2-D tensor")
    n, m = y.shape
    if xa.shape[0] != n:
        raise ValueError(f"{op}: xa must be [N, r] with N = {n}, got shape {tuple(xa.shape)}")
    _check_rank(xa.shape[1], op)
    slots = check_b_stack(b, "b", m, xa.shape[1], op)
    _check_tensors(op, {"b": b}, y=y, xa=xa)
    return _device_segments(seg_indptr, seg_slot, n, slots, y.device, op)


def lora_expand_segmented(
    y: torch.Tensor,
    xa: torch.Tensor,
    b: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_slot: torch.Tensor,
    scaling: float = 1.0,
    *,
    config: SegmentedConfig | None = None,
) -> torch.Tensor:
    """y + scaling * xa[rows] @ b[slot].T per segment, as `reference.lora_expand_segmented`: y [N, M],
    xa [N, r], b [S, M, r] (contiguous blocks, any slot stride); one dtype and device. Differentiable
    w.r.t. y, xa and b."""
    seg = _check_expand(y, xa, b, seg_indptr, seg_slot, "lora_expand_segmented")
    return SegmentedExpandFunction.apply(_TritonKernels(config or SegmentedConfig()), seg, y, xa, b, float(scaling))


def lora_expand_segmented_backward(
    dy: torch.Tensor,
    xa: torch.Tensor,
    b: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_slot: torch.Tensor,
    scaling: float = 1.0,
    *,
    config: SegmentedConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dxa [N, r], db [S, M, r]) of `lora_expand_segmented` given dy [N, M], dy read once."""
    seg = _check_expand(dy, xa, b, seg_indptr, seg_slot, "lora_expand_segmented_backward")
    kernels = _TritonKernels(config or SegmentedConfig())
    return kernels.expand_backward(dy, xa, b, seg, float(scaling), True, True)


def lora_mlp_segmented(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    a_gate: torch.Tensor,
    a_up: torch.Tensor,
    a_down: torch.Tensor,
    b_gate: torch.Tensor,
    b_up: torch.Tensor,
    b_down: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_slot: torch.Tensor,
    scaling: float = 1.0,
    *,
    config: SegmentedConfig | None = None,
) -> torch.Tensor:
    """`lora_mlp` with a different B per segment of rows, as `reference.lora_mlp_segmented`. x [N, H] -> [N, H].

    w_gate, w_up [I, H]; w_down [H, I]; a_gate, a_up [r, H]; a_down [r, I]; b_gate, b_up [S, I, r];
    b_down [S, H, r] (contiguous [out, r] blocks, any slot stride); one dtype (fp32/fp16/bf16) and device;
    r <= MAX_RANK. seg_indptr, seg_slot: int64, on the device (trusted; CUDA-graph safe) or on the CPU
    (validated). Differentiable w.r.t. x and the b_* stacks (the w_* and a_* are frozen).
    """
    op = "lora_mlp_segmented"
    n, h, i, r, slots = lora_mlp_segmented_shapes(x, w_gate, w_up, w_down, a_gate, a_up, a_down, b_gate, b_up,
                                                  b_down, op)  # fmt: skip
    _check_rank(r, op)
    _check_tensors(op, dict(b_gate=b_gate, b_up=b_up, b_down=b_down), x=x, w_gate=w_gate, w_up=w_up,
                   w_down=w_down, a_gate=a_gate, a_up=a_up, a_down=a_down)  # fmt: skip
    seg = _device_segments(seg_indptr, seg_slot, n, slots, x.device, op)
    w_gate, w_up, w_down, a_down = (t.detach() for t in (w_gate, w_up, w_down, a_down))
    a_gu = torch.cat([a_gate.detach(), a_up.detach()])  # [2r, H]: one shrink product for gate and up
    kernels = _TritonKernels(config or SegmentedConfig())
    return SegmentedLoRAMLPFunction.apply(kernels, seg, x, w_gate, w_up, w_down, a_gu, a_down, b_gate, b_up, b_down,
                                          float(scaling))  # fmt: skip
