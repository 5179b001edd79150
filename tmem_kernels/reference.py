"""Pure-torch reference of every tmem op: the spec the Triton and native kernels are proven against.

Shapes, for one decoder layer's MLP with fast weights on gate, up and down (rank r):

    x        [N, H]      tokens (any leading dims flattened by the caller)
    w_gate   [I, H]      w_up [I, H]      w_down [H, I]       frozen base weights (nn.Linear layout)
    a_gate   [r, H]      a_up [r, H]      a_down [r, I]       LoRA shrink (A; frozen unless train_a)
    b_gate   [I, r]      b_up [I, r]      b_down [H, r]       LoRA expand (B; trained)

    gate = x @ w_gate.T + scaling * (x @ a_gate.T) @ b_gate.T
    up   = x @ w_up.T   + scaling * (x @ a_up.T)   @ b_up.T
    h    = silu(gate) * up
    y    = h @ w_down.T + scaling * (h @ a_down.T) @ b_down.T          -> [N, H]

Many sessions in one batch (`lora_mlp_segmented`, `lora_expand_segmented`): the A's are shared and each
contiguous segment of rows uses its own B from [S, out, r] stacks (see `tmem_kernels.segments`).

Everything here is differentiable torch; nothing here is fast.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tmem_kernels.segments import host_segments, lora_mlp_segmented_shapes


class LoRAMLPGrads(NamedTuple):
    """Gradients of `lora_mlp` w.r.t. x and the LoRA factors (A's are None unless requested)."""

    dx: torch.Tensor
    db_gate: torch.Tensor
    db_up: torch.Tensor
    db_down: torch.Tensor
    da_gate: torch.Tensor | None = None
    da_up: torch.Tensor | None = None
    da_down: torch.Tensor | None = None


def lora_linear(
    x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float = 1.0
) -> torch.Tensor:
    """y = x @ w.T + scaling * (x @ a.T) @ b.T.  x [..., K], w [M, K], a [r, K], b [M, r] -> [..., M].

    The expand and the add are one addmm (the sum accumulated before its one rounding, as a fused kernel's
    epilogue does): three kernels forward instead of five, and at scaling 1 no product by it either way."""
    rows = x.reshape(-1, x.shape[-1])
    return torch.addmm(rows @ w.T, rows @ a.T, b.T, alpha=scaling).view(*x.shape[:-1], w.shape[0])


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
) -> torch.Tensor:
    """SwiGLU MLP with LoRA on gate/up/down. x [N, H] -> [N, H]; see the module docstring for shapes."""
    gate = lora_linear(x, w_gate, a_gate, b_gate, scaling)
    up = lora_linear(x, w_up, a_up, b_up, scaling)
    h = F.silu(gate) * up
    return lora_linear(h, w_down, a_down, b_down, scaling)


def lora_mlp_backward(
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
    dy: torch.Tensor,
    scaling: float = 1.0,
    train_a: bool = False,
) -> LoRAMLPGrads:
    """Gradients of `lora_mlp` given dy [N, H], by autograd on the reference forward (the spec)."""
    with torch.enable_grad():
        x_ = x.detach().requires_grad_(True)
        bs = [t.detach().requires_grad_(True) for t in (b_gate, b_up, b_down)]
        as_ = [t.detach().requires_grad_(train_a) for t in (a_gate, a_up, a_down)]
        y = lora_mlp(x_, w_gate, w_up, w_down, as_[0], bs[0], as_[1], bs[1], as_[2], bs[2], scaling)
        inputs = [x_, *bs] + (as_ if train_a else [])
        grads = torch.autograd.grad(y, inputs, dy)
    return LoRAMLPGrads(*grads)


# --------------------------------------------------------------------------------------------------
# Segmented: many adapters in one batch (Punica's SGMV). Rows seg_indptr[g]:seg_indptr[g+1] use slot
# seg_slot[g] of the stacked B's [S, out, r] (-1: no adapter); see `tmem_kernels.segments`. The A's are
# shared by every slot (the SVD init's A0), so the shrink x @ A.T is one product for the whole batch.
# --------------------------------------------------------------------------------------------------


def lora_expand_segmented(
    y: torch.Tensor,
    xa: torch.Tensor,
    b: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_slot: torch.Tensor,
    scaling: float = 1.0,
) -> torch.Tensor:
    """y + scaling * xa[rows] @ b[slot].T for each segment's rows (rows of slot -1: y's). y [N, M],
    xa [N, r], b [S, M, r] -> [N, M]; y is not modified. Differentiable w.r.t. y, xa and b. Each segment's
    expand and add one addmm, as `lora_linear`'s: a segment rounds as its session alone would."""
    segments = host_segments(seg_indptr, seg_slot, y.shape[0], b.shape[0], "lora_expand_segmented")
    pieces = [
        y[start:end] if slot < 0 else torch.addmm(y[start:end], xa[start:end], b[slot].T, alpha=scaling)
        for start, end, slot in segments
    ]
    return torch.cat(pieces) if pieces else y.clone()


def lora_expand_segmented_backward(
    dy: torch.Tensor,
    xa: torch.Tensor,
    b: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_slot: torch.Tensor,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dxa [N, r], db [S, M, r]) of `lora_expand_segmented` given dy [N, M], by autograd (the spec).
    dxa rows of slot -1 and db of slots no segment uses are zero; a slot used twice sums."""
    with torch.enable_grad():
        xa_ = xa.detach().requires_grad_(True)
        b_ = b.detach().requires_grad_(True)
        out = lora_expand_segmented(torch.zeros_like(dy), xa_, b_, seg_indptr, seg_slot, scaling)
        dxa, db = torch.autograd.grad(out, (xa_, b_), dy, allow_unused=True, materialize_grads=True)
    return dxa, db


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
) -> torch.Tensor:
    """`lora_mlp` with a different B per segment of rows. x [N, H] -> y [N, H].

    w_gate, w_up [I, H]; w_down [H, I]; a_gate, a_up [r, H]; a_down [r, I] (shared by every slot);
    b_gate, b_up [S, I, r]; b_down [S, H, r] (any stride along dim 0); seg_indptr int64 [G+1], seg_slot
    int64 [G] (see `tmem_kernels.segments`). Segment g's rows compute `lora_mlp` with b_*[seg_slot[g]],
    or the bare SwiGLU MLP for slot -1. Differentiable w.r.t. x and the b_* stacks; the w_* and a_* are
    frozen (no gradient, whatever their requires_grad).
    """
    lora_mlp_segmented_shapes(x, w_gate, w_up, w_down, a_gate, a_up, a_down, b_gate, b_up, b_down)
    w_gate, w_up, w_down, a_gate, a_up, a_down = (t.detach() for t in (w_gate, w_up, w_down, a_gate, a_up, a_down))
    seg = (seg_indptr, seg_slot)
    gate = lora_expand_segmented(x @ w_gate.T, x @ a_gate.T, b_gate, *seg, scaling)
    up = lora_expand_segmented(x @ w_up.T, x @ a_up.T, b_up, *seg, scaling)
    h = F.silu(gate) * up
    return lora_expand_segmented(h @ w_down.T, h @ a_down.T, b_down, *seg, scaling)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """h = silu(gate) * up, elementwise; any shape."""
    return F.silu(gate) * up


def swiglu_backward(
    gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup) of h = silu(gate) * up given dh; all the same shape."""
    sig = torch.sigmoid(gate)
    silu = gate * sig
    dup = dh * silu
    dgate = dh * up * sig * (1 + gate * (1 - sig))
    return dgate, dup


# --------------------------------------------------------------------------------------------------
# Optimizer steps over one flat buffer (in place). Semantics match torch.optim.SGD / torch.optim.AdamW
# (no momentum, no nesterov, no amsgrad, maximize=False) exactly, so a fused step can be checked
# bit-for-bit-ish against the torch optimizers the PEFT reference path uses.
# --------------------------------------------------------------------------------------------------


def sgd_step_(param: torch.Tensor, grad: torch.Tensor, lr: float, weight_decay: float = 0.0) -> None:
    """param -= lr * (grad + weight_decay * param), in place. param, grad: same shape (flat)."""
    if weight_decay:
        grad = grad.add(param, alpha=weight_decay)
    param.add_(grad, alpha=-lr)


def adamw_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int | torch.Tensor,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> None:
    """One AdamW step in place, as torch.optim.AdamW computes it. `step` counts from 1 (this step).

    `step` may be a 0-d tensor on param's device (read there, no host sync; as torch's capturable AdamW).
    Such a step below 1 is taken as 1 (torch.optim.AdamW's steps count from 1; at 0 the bias correction
    1 - beta**0 = 0 made the update inf, and refusing it would need the host sync the tensor avoids).
    """
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if isinstance(step, torch.Tensor):
        step = step.clamp(min=1)
        neg_step_size = -lr / (1 - beta1**step)
        denom = (exp_avg_sq.sqrt() / (1 - beta2**step).sqrt()).add_(eps).div_(neg_step_size)
        param.addcdiv_(exp_avg, denom)
        return
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


# --------------------------------------------------------------------------------------------------
# SVD init
# --------------------------------------------------------------------------------------------------


def svd_top_r(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact top-r singular triplets of a stack of matrices.

    w [L, M, K] -> U [L, M, r], S [L, r] (descending), Vh [L, r, K], computed in float32 (float64 for
    float64 input) with torch.linalg.svd; signs as `canonical_signs` makes them (LAPACK builds differ).
    """
    work = w if w.dtype == torch.float64 else w.float()
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    ut, vh = canonical_signs(u[..., :r].mT, vh[..., :r, :])
    return ut.mT, s[..., :r], vh


def canonical_signs(ut: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The singular vectors with the sign every machine agrees on. ut [L, r, M], vh [L, r, K]: the left and
    right vectors as rows. Each pair (ut[i], vh[i]) is flipped so that the largest-|.| entry of its vector on
    the shorter side (vh's if K <= M, else ut's) is positive; U S V^T is unchanged."""
    side = vh if vh.shape[-1] <= ut.shape[-1] else ut
    idx = side.abs().argmax(dim=-1, keepdim=True)
    sign = torch.sign(torch.gather(side, -1, idx))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return ut * sign, vh * sign


def svd_lora_init(w: torch.Tensor, r: int) -> torch.Tensor:
    """TMEM's A0 = S_r V_r^T for a stack of weights. w [L, M, K] -> A0 [L, r, K] (float32)."""
    _, s, vh = svd_top_r(w, r)
    return s.unsqueeze(-1) * vh


# --------------------------------------------------------------------------------------------------
# Loss of the frozen head
# --------------------------------------------------------------------------------------------------


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross-entropy of the logits hidden @ weight.T (in float32, float64 for float64 input) against
    targets, as F.cross_entropy.

    hidden [K, H], weight [V, H] (the head), targets [K] int64 (`ignore_index` rows not scored) -> 0-d float32
    (float64) loss, NaN when every row is ignored. Materialises the full [K, V] logits.
    """
    logits = hidden @ weight.T
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets,
                           ignore_index=ignore_index)  # fmt: skip


def linear_cross_entropy_rows(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, row_weight: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:  # fmt: skip
    """row_weight x each row's cross-entropy of the logits hidden @ weight.T (in float32, float64 for float64
    input) against its target, 0 where the target is `ignore_index`.

    hidden [K, H], weight [V, H], targets [K] int64, row_weight [K] -> [K] float32 (float64). Materialises
    the full [K, V] logits.
    """
    logits = hidden @ weight.T
    acc = torch.promote_types(logits.dtype, torch.float32)
    ce = F.cross_entropy(logits.to(acc), targets, ignore_index=ignore_index, reduction="none")
    return ce * torch.where(targets != ignore_index, row_weight.to(acc), 0.0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's LlamaRMSNorm (Qwen2/Qwen3/Mistral's too), to the rounding: the statistics in float32 whatever
    x's dtype, the normalised row rounded to x's dtype, then one product with the weight.

    x [..., H], weight [H] -> [..., H] in promote(x.dtype, weight.dtype).
    """
    xf = x.to(torch.float32)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * rstd).to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A pre-norm decoder's residual add, then the next RMSNorm (`rms_norm`) on the sum.

    x [..., H], residual [..., H] (x's dtype), weight [H] -> (y = rms_norm(s, weight, eps) [..., H] in
    promote(x.dtype, weight.dtype), s = x + residual [..., H] in x's dtype).
    """
    s = x + residual
    return rms_norm(s, weight, eps), s


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's `apply_rotary_pos_emb` (Llama/Qwen2/Qwen3/Mistral: rotate_half, full-head rotary, unsqueeze_dim 1).

    q [B, Hq, T, D], k [B, Hk, T, D], cos / sin [B or 1, T, D] -> (q * cos + rotate_half(q) * sin, the same for
    k), rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2]); dtypes promoted as torch's products promote them.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def qk_norm_rope(
    q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, eps_q: float, eps_k: float,
    cos: torch.Tensor, sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Qwen3's attention from the projections to the rotary: the per-head RMSNorms of q and k (`rms_norm`),
    the transpose to heads first, then the rotary (`rope`), each rounded as those round.

    q [B, T, Hq, D], k [B, T, Hk, D], q_weight / k_weight [D], cos / sin [B or 1, T, D] ->
    (q_rot [B, Hq, T, D], k_rot [B, Hk, T, D]) = rope(rms_norm(q).transpose(1, 2), rms_norm(k).transpose(1, 2)).
    """
    qn, kn = rms_norm(q, q_weight, eps_q).transpose(1, 2), rms_norm(k, k_weight, eps_k).transpose(1, 2)
    return rope(qn, kn, cos, sin)
