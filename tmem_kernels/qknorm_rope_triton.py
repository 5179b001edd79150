"""Qwen3's per-head q/k RMSNorm and rotary (op `tmem::qk_norm_rope`) as two Triton kernels: q and k normed and
rotated in one launch forward, their gradients in one launch backward (CUDA).

Same contract as `qknorm_rope.forward_torch` / `backward_torch`, for q, k, the weights, cos, sin (and the
gradients) of one dtype: `rmsnorm_triton`'s arithmetic, then `rotary_triton`'s, every rounding in the same place
(h = D / 2, rot(v) = rotate_half(v) = cat(-v[h:], v[:h]), rot_T(v) = cat(v[h:], -v[:h])):

    forward   rstd = rsqrt(mean(x^2) + eps); n = (w * (x * rstd).to(dt)).to(dt)       (the norm's output)
              y = ((n * cos).to(dt) + (rot(n) * sin).to(dt)).to(dt)                    (each product rounded)
    backward  g = ((dy * cos).to(dt) + rot_T(dy * sin).to(dt)).to(dt)                  (the rotary's transpose)
              gw = (g * w).to(dt); dx = rstd * gw - x * rstd^3 * mean(gw * x)         (the norm's backward)

x is [B, T, H, D] with any strides but a unit last one (a projection viewed to heads); y is [B, H, T, D] laid out
[B, T, H, D] dense (`qknorm_rope.heads_first`); dy [B, H, T, D] any strides but a unit last one; dx [B, T, H, D]
contiguous. Each program takes BLOCK_R whole rows (one head of one token: [BLOCK_R, BLOCK_D], BLOCK_D the next
power of 2 of D) of one tensor, the first programs q's, the rest k's: a row's statistic is one reduction in
registers as in `rmsnorm_triton`, and the rotary's other half is a second load of the same row (its columns
c + h for c < h, c - h after: cached). The two ops are two launches each way; a write step runs them per layer.

Under TRITON_INTERPRET=1 (CPU tensors) the bf16 roundings are to nearest even by hand, as in `lora_mlp`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tmem_kernels.lora_mlp import _cast, _interpreting
from tmem_kernels.qknorm_rope import heads_first

__all__ = ["DTYPES", "backward", "forward"]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK_ELEMENTS = 2048  # rows per program: BLOCK_R x BLOCK_D about this many elements (at least one row)


@triton.jit
def _row_tile(tile, N, H, T, D, HALF, scb, sct, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):  # noqa: ANN001, ANN202
    """Rows [BLOCK_R * tile, +BLOCK_R) (row = (b * T + t) * H + h, N rows): their int64 indices and (b, t, h)
    [BLOCK_R], the columns [BLOCK_D], the rotary's partner columns (c + h before h, c - h after), whether a column
    is in the first half, the [BLOCK_R, BLOCK_D] mask and the cos / sin offsets there."""
    rows = tile.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    h = rows % H
    b = rows // H // T
    t = (rows // H) % T
    first = cols < HALF
    partner = tl.where(first, cols + HALF, cols - HALF)
    mask = (rows[:, None] < N) & (cols[None, :] < D)
    c_offs = (b * scb + t * sct)[:, None] + cols[None, :]
    return rows, b, t, h, cols, partner, first, mask, c_offs


@triton.jit
def _forward_tile(
    x_ptr, w_ptr, y_ptr, rstd_ptr, cos_ptr, sin_ptr, tile, N, H, T, D, HALF, eps, sxb, sxt, sxh, scb, sct,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Rows [BLOCK_R * tile, +BLOCK_R) of x [B, T, H, D]: rstd [N] and y (rows dense: row * D)."""
    rows, b, t, h, cols, partner, first, mask, c_offs = _row_tile(tile, N, H, T, D, HALF, scb, sct, BLOCK_R, BLOCK_D)
    x_row = (b * sxb + t * sxt + h * sxh)[:, None]
    x = tl.load(x_ptr + x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(x_ptr + x_row + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    wp = tl.load(w_ptr + partner, mask=cols < D, other=0.0).to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / D + eps)
    tl.store(rstd_ptr + rows, rstd, mask=rows < N)
    xt = x_ptr.dtype.element_ty
    dt = y_ptr.dtype.element_ty
    # the norm's output, rounded as `rmsnorm_triton` rounds it: (x * rstd).to(x.dtype), times w, .to(y.dtype)
    n = _cast(w[None, :] * _cast(x * rstd[:, None], xt, INTERPRET).to(tl.float32), dt, INTERPRET).to(tl.float32)
    n_p = _cast(wp[None, :] * _cast(xp * rstd[:, None], xt, INTERPRET).to(tl.float32), dt, INTERPRET).to(tl.float32)
    c = tl.load(cos_ptr + c_offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + c_offs, mask=mask, other=0.0).to(tl.float32)
    rot = tl.where(first[None, :], -n_p, n_p)  # rotate_half(n)
    # each product rounded to the dtype (as torch's mul), then the sum (torch's add), as `rotary_triton`
    y = _cast(n * c, dt, INTERPRET).to(tl.float32) + _cast(rot * s, dt, INTERPRET).to(tl.float32)
    tl.store(y_ptr + rows[:, None] * D + cols[None, :], _cast(y, dt, INTERPRET), mask=mask)


@triton.jit
def _backward_tile(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, cos_ptr, sin_ptr, tile, N, H, T, D, HALF,
    sdb, sdh, sdt, sxb, sxt, sxh, scb, sct,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Rows [BLOCK_R * tile, +BLOCK_R) of dx [B, T, H, D] (contiguous) from dy [B, H, T, D], x [B, T, H, D] and
    the forward's rstd [N]."""
    rows, b, t, h, cols, partner, first, mask, c_offs = _row_tile(tile, N, H, T, D, HALF, scb, sct, BLOCK_R, BLOCK_D)
    dy_row = (b * sdb + h * sdh + t * sdt)[:, None]
    dy = tl.load(dy_ptr + dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dyp = tl.load(dy_ptr + dy_row + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos_ptr + c_offs, mask=mask, other=0.0).to(tl.float32)
    sp = tl.load(sin_ptr + c_offs - cols[None, :] + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    dt = dy_ptr.dtype.element_ty
    # the rotary's transpose (`rotary_triton`'s): g[:h] = dy[:h] cos[:h] + dy[h:] sin[h:],
    # g[h:] = dy[h:] cos[h:] - dy[:h] sin[:h]; each product rounded, then the sum, rounded (autograd's dtype)
    sa = tl.where(first[None, :], sp, -sp)
    g = _cast(dy * c, dt, INTERPRET).to(tl.float32) + _cast(dyp * sa, dt, INTERPRET).to(tl.float32)
    g = _cast(g, dt, INTERPRET).to(tl.float32)
    # the norm's backward, as `rmsnorm_triton`'s
    x = tl.load(x_ptr + (b * sxb + t * sxt + h * sxh)[:, None] + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=rows < N, other=0.0)
    gw = _cast(g * w[None, :], x_ptr.dtype.element_ty, INTERPRET).to(tl.float32)
    dot = tl.sum(gw * x, axis=1) / D
    dx = rstd[:, None] * gw - x * (rstd * rstd * rstd * dot)[:, None]
    tl.store(dx_ptr + rows[:, None] * D + cols[None, :], _cast(dx, dx_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, qw_ptr, kw_ptr, qo_ptr, ko_ptr, rq_ptr, rk_ptr, cos_ptr, sin_ptr,
    NQ, NK, HQ, HK, T, D, HALF, PROGS_Q, eps_q, eps_k,
    sqb, sqt, sqh, skb, skt, skh, scb, sct,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Programs [0, PROGS_Q) norm and rotate q's rows into qo, the rest k's into ko."""
    pid = tl.program_id(0)
    if pid < PROGS_Q:
        _forward_tile(q_ptr, qw_ptr, qo_ptr, rq_ptr, cos_ptr, sin_ptr, pid, NQ, HQ, T, D, HALF, eps_q, sqb, sqt, sqh,
                      scb, sct, BLOCK_R, BLOCK_D, INTERPRET)  # fmt: skip
    else:
        _forward_tile(k_ptr, kw_ptr, ko_ptr, rk_ptr, cos_ptr, sin_ptr, pid - PROGS_Q, NK, HK, T, D, HALF, eps_k, skb,
                      skt, skh, scb, sct, BLOCK_R, BLOCK_D, INTERPRET)  # fmt: skip


@triton.jit
def _qk_norm_rope_backward_kernel(
    dq_ptr, dk_ptr, q_ptr, k_ptr, qw_ptr, kw_ptr, rq_ptr, rk_ptr, dqi_ptr, dki_ptr, cos_ptr, sin_ptr,
    NQ, NK, HQ, HK, T, D, HALF, PROGS_Q,
    sdqb, sdqh, sdqt, sdkb, sdkh, sdkt, sqb, sqt, sqh, skb, skt, skh, scb, sct,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """Programs [0, PROGS_Q) give q's gradient rows, the rest k's."""
    pid = tl.program_id(0)
    if pid < PROGS_Q:
        _backward_tile(dq_ptr, q_ptr, qw_ptr, rq_ptr, dqi_ptr, cos_ptr, sin_ptr, pid, NQ, HQ, T, D, HALF,
                       sdqb, sdqh, sdqt, sqb, sqt, sqh, scb, sct, BLOCK_R, BLOCK_D, INTERPRET)  # fmt: skip
    else:
        _backward_tile(dk_ptr, k_ptr, kw_ptr, rk_ptr, dki_ptr, cos_ptr, sin_ptr, pid - PROGS_Q, NK, HK, T, D, HALF,
                       sdkb, sdkh, sdkt, skb, skt, skh, scb, sct, BLOCK_R, BLOCK_D, INTERPRET)  # fmt: skip


def _blocks(d: int, rows: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D) for `rows` rows (the larger tensor's) of width D."""
    block_d = triton.next_power_of_2(max(1, d))
    return max(1, min(_BLOCK_ELEMENTS // block_d, triton.next_power_of_2(max(1, rows)))), block_d


def _warps(block_r: int, block_d: int) -> int:
    return min(8, max(1, block_r * block_d // 256))


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check(*tensors: torch.Tensor) -> None:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or tensors[0].dtype not in DTYPES:
        raise ValueError(f"qk_norm_rope (triton): q, k, the weights, cos, sin of one float32/16-bit dtype, got "
                         f"{sorted(map(str, dtypes))}")  # fmt: skip
    if tensors[0].device.type != "cuda" and not _interpreting():
        raise RuntimeError("qk_norm_rope (triton): CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")


def _geometry(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor) -> tuple[int, ...]:
    """(B, T, Hq, Hk, D, NQ, NK, BLOCK_R, BLOCK_D, PROGS_Q, PROGS_K, cos's batch stride)."""
    b, t, hq, d = q.shape
    hk = k.shape[2]
    nq, nk = b * t * hq, b * t * hk
    block_r, block_d = _blocks(d, max(nq, nk))
    scb = 0 if cos.shape[0] == 1 else cos.stride(0)
    return b, t, hq, hk, d, nq, nk, block_r, block_d, triton.cdiv(nq, block_r), triton.cdiv(nk, block_r), scb


def forward(
    q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps_q: float, eps_k: float,
    cos: torch.Tensor, sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """One launch. q [B, T, Hq, D], k [B, T, Hk, D] (unit last stride, else copied), weights [D], cos / sin
    [B or 1, T, D], all one float32/16-bit dtype -> (q_rot [B, Hq, T, D], k_rot [B, Hk, T, D], both laid out
    `heads_first`; rstd_q [B, T, Hq], rstd_k [B, T, Hk] float32)."""
    _check(q, k, q_weight, k_weight, cos, sin)
    q, k = _unit_last(q), _unit_last(k)
    cos, sin = cos.contiguous(), sin.contiguous()  # one layout for both: the same offsets
    qo, ko = heads_first(q, q.dtype), heads_first(k, k.dtype)
    rq = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    rk = torch.empty(k.shape[:3], dtype=torch.float32, device=k.device)
    _, t, hq, hk, d, nq, nk, block_r, block_d, progs_q, progs_k, scb = _geometry(q, k, cos)
    if nq + nk and d:
        _qk_norm_rope_kernel[(progs_q + progs_k,)](
            q, k, q_weight.contiguous(), k_weight.contiguous(), qo, ko, rq, rk, cos, sin,
            nq, nk, hq, hk, t, d, d // 2, progs_q, eps_q, eps_k,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), scb, cos.stride(1),
            BLOCK_R=block_r, BLOCK_D=block_d, INTERPRET=_interpreting(), num_warps=_warps(block_r, block_d),
        )  # fmt: skip
    return qo, ko, rq, rk


def backward(
    dq: torch.Tensor, dk: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
    k_weight: torch.Tensor, rstd_q: torch.Tensor, rstd_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One launch. The gradients of the forward's q_rot, k_rot ([B, H, T, D], any strides, q's dtype), q, k, the
    weights, the forward's rstd_q, rstd_k, cos, sin -> those of q and k ([B, T, H, D] contiguous, their dtype)."""
    _check(dq, dk, q, k, q_weight, k_weight, cos, sin)
    dq, dk, q, k = _unit_last(dq), _unit_last(dk), _unit_last(q), _unit_last(k)
    cos, sin = cos.contiguous(), sin.contiguous()
    dqi = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dki = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _, t, hq, hk, d, nq, nk, block_r, block_d, progs_q, progs_k, scb = _geometry(q, k, cos)
    if nq + nk and d:
        _qk_norm_rope_backward_kernel[(progs_q + progs_k,)](
            dq, dk, q, k, q_weight.contiguous(), k_weight.contiguous(), rstd_q.contiguous(), rstd_k.contiguous(),
            dqi, dki, cos, sin, nq, nk, hq, hk, t, d, d // 2, progs_q,
            *dq.stride()[:3], *dk.stride()[:3], *q.stride()[:3], *k.stride()[:3], scb, cos.stride(1),
            BLOCK_R=block_r, BLOCK_D=block_d, INTERPRET=_interpreting(), num_warps=_warps(block_r, block_d),
        )  # fmt: skip
    return dqi, dki
