"""Rotary embedding (op `tmem::rope`) as two Triton kernels: q and k rotated in one launch forward, their
gradients in one launch backward (CUDA).

Same contract as `rotary.forward_torch` / `backward_torch` (HF's `apply_rotary_pos_emb`, rotate_half, see `rope`),
for q, k, cos, sin (and dy) of one dtype, each product rounded to it before the sum as torch's ops round:

    forward   y[:h] = x[:h] * cos[:h] - x[h:] * sin[:h]     y[h:] = x[h:] * cos[h:] + x[:h] * sin[h:]
    backward  dx[:h] = dy[:h] * cos[:h] + dy[h:] * sin[h:]  dx[h:] = dy[h:] * cos[h:] - dy[:h] * sin[:h]
              (h = D / 2; the backward is the transpose of the forward's rotation, exact for any cos / sin)

x is [B, H, T, D] with any strides but a unit last one (q and k as HF's attention leaves them: a projection
viewed to heads and transposed), cos / sin [B or 1, T, D] (broadcast over heads). Each program rotates
BLOCK_R rows of one tensor ([BLOCK_R, BLOCK_D2] for each half, BLOCK_D2 the next power of 2 of D / 2): the
first programs q's rows, the rest k's. HF's composition is about fifteen kernels forward and twenty backward
for q and k (mul, neg, slice, cat, add, and the slice/cat/neg backwards); a write step runs it per layer.

Under TRITON_INTERPRET=1 (CPU tensors) the bf16 roundings are to nearest even by hand, as in `lora_mlp`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tmem_kernels.lora_mlp import _cast, _interpreting

__all__ = ["DTYPES", "backward", "forward"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK_ELEMENTS = 2048  # rows per program: BLOCK_R x BLOCK_D2 about this many elements (at least one row)


@triton.jit
def _rotate_tile(
    x_ptr, y_ptr, cos_ptr, sin_ptr, tile, N, H, T, HALF,
    sxb, sxh, sxt, syb, syh, syt, scb, sct,
    BLOCK_R: tl.constexpr, BLOCK_D2: tl.constexpr, BACKWARD: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Rows [BLOCK_R * tile, +BLOCK_R) of x [B, H, T, D] (N = B * H * T rows) rotated into y."""
    rows = tile.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D2)
    t = rows % T
    bh = rows // T
    b = bh // H
    h = bh % H
    mask = (rows[:, None] < N) & (cols[None, :] < HALF)
    x_offs = (b * sxb + h * sxh + t * sxt)[:, None] + cols[None, :]
    y_offs = (b * syb + h * syh + t * syt)[:, None] + cols[None, :]
    c_offs = (b * scb + t * sct)[:, None] + cols[None, :]
    x1 = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_offs + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + c_offs, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + c_offs + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + c_offs, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + c_offs + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # the transpose: dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1
        sa = s2
        sb = -s1
    else:  # y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2
        sa = -s1
        sb = s2
    dt = y_ptr.dtype.element_ty
    # each product rounded to the dtype (as torch's mul), then the sum (torch's add)
    y1 = _cast(x1 * c1, dt, INTERPRET).to(tl.float32) + _cast(x2 * sa, dt, INTERPRET).to(tl.float32)
    y2 = _cast(x2 * c2, dt, INTERPRET).to(tl.float32) + _cast(x1 * sb, dt, INTERPRET).to(tl.float32)
    tl.store(y_ptr + y_offs, _cast(y1, dt, INTERPRET), mask=mask)
    tl.store(y_ptr + y_offs + HALF, _cast(y2, dt, INTERPRET), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
    NQ, NK, HQ, HK, T, HALF, PROGS_Q,
    sqb, sqh, sqt, skb, skh, skt, sqob, sqoh, sqot, skob, skoh, skot, scb, sct,
    BLOCK_R: tl.constexpr, BLOCK_D2: tl.constexpr, BACKWARD: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Programs [0, PROGS_Q) rotate q's rows into qo, the rest k's into ko."""
    pid = tl.program_id(0)
    if pid < PROGS_Q:
        _rotate_tile(q_ptr, qo_ptr, cos_ptr, sin_ptr, pid, NQ, HQ, T, HALF, sqb, sqh, sqt, sqob, sqoh, sqot,
                     scb, sct, BLOCK_R, BLOCK_D2, BACKWARD, INTERPRET)  # fmt: skip
    else:
        _rotate_tile(k_ptr, ko_ptr, cos_ptr, sin_ptr, pid - PROGS_Q, NK, HK, T, HALF, skb, skh, skt, skob, skoh,
                     skot, scb, sct, BLOCK_R, BLOCK_D2, BACKWARD, INTERPRET)  # fmt: skip


def _blocks(d: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D2) for rows of width D."""
    block_d2 = triton.next_power_of_2(max(1, d // 2))
    return max(1, _BLOCK_ELEMENTS // block_d2), block_d2


def _warps(block_r: int, block_d2: int) -> int:
    return min(8, max(1, block_r * block_d2 // 256))


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    dtypes = {t.dtype for t in (q, k, cos, sin)}
    if len(dtypes) != 1 or q.dtype not in DTYPES:
        raise ValueError(f"rope (triton): q, k, cos, sin of one float32/16-bit dtype, got {sorted(map(str, dtypes))}")
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError("rope (triton): CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")


def _launch(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q, k, cos, sin)
    q, k = _unit_last(q), _unit_last(k)
    cos, sin = cos.contiguous(), sin.contiguous()  # one layout for both: the same offsets
    qo, ko = torch.empty_like(q), torch.empty_like(k)  # (q's strides where q is dense: HF's products keep them)
    qo, ko = _unit_last(qo), _unit_last(ko)
    b, hq, t, d = q.shape
    hk = k.shape[1]
    nq, nk = b * hq * t, b * hk * t
    if (nq + nk) == 0 or d == 0:
        return qo, ko
    block_r, block_d2 = _blocks(d)
    progs_q, progs_k = triton.cdiv(nq, block_r), triton.cdiv(nk, block_r)
    scb = 0 if cos.shape[0] == 1 else cos.stride(0)
    _rope_kernel[(progs_q + progs_k,)](
        q, k, qo, ko, cos, sin, nq, nk, hq, hk, t, d // 2, progs_q,
        *q.stride()[:3], *k.stride()[:3], *qo.stride()[:3], *ko.stride()[:3], scb, cos.stride(1),
        BLOCK_R=block_r, BLOCK_D2=block_d2, BACKWARD=backward, INTERPRET=_interpreting(),
        num_warps=_warps(block_r, block_d2),
    )  # fmt: skip
    return qo, ko


def forward(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch. q [B, Hq, T, D], k [B, Hk, T, D] (unit last stride, else copied), cos / sin [B or 1, T, D],
    all one float32/16-bit dtype -> (q rotated, k rotated), shaped (and, where dense, strided) as q and k."""
    return _launch(q, k, cos, sin, backward=False)


def backward(
    dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch. The gradients of the forward's outputs (shapes and dtype as there) -> those of q and k."""
    return _launch(dq, dk, cos, sin, backward=True)
