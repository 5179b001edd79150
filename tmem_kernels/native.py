"""Native CPU backend: the pybind11 extension `tmem_kernels._native` behind the signatures of `reference`.

Matrix products go through torch (MKL/oneDNN sgemm); what runs in C++ is everything elementwise
around them, fused into single passes over memory (see `csrc/`):

- `lora_mlp`: the LoRA expand epilogue of gate/up, SwiGLU and the down LoRA shrink in one forward
  pass; in backward one pass recomputes gate/up (never stored), adds the down LoRA term to dh, runs
  the SwiGLU backward and accumulates dB_gate, dB_up, s * dgate @ B_gate (and dA_down) on the fly.
- `swiglu`, `swiglu_backward`: plain fused SwiGLU (sigmoid recomputed in backward).
- `adamw_step_`: one pass over the flat buffer (the torch composition makes eight).
- `sgd_step_`: native one pass with weight decay; without it torch's single `add_` (see its docstring).

Each piece is kept native only where it beat the torch composition in `benchmarks/test_bench_native.py`
(figures in benchmarks/RESULTS.md): all of the above do, except SGD without weight decay.

Every wrapper validates its tensors (float32, CPU, contiguous, shapes) before any kernel runs and
raises ValueError/TypeError with the offending argument's name. Kernels run on at most
`torch.get_num_threads()` OpenMP threads (torch's own libgomp once torch is imported), and on one
thread for small buffers (under 2^20 elements for the elementwise and optimizer kernels, 2^18 for the
fused LoRA kernels): an adapter-sized step is cheaper than waking a second core.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from tmem_kernels.segments import (
    SegmentedExpandFunction,
    SegmentedLoRAMLPFunction,
    check_b_stack,
    check_segment_tensors,
    check_segment_values,
    lora_mlp_segmented_shapes,
)

try:
    from tmem_kernels import _native
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "tmem_kernels._native (the native CPU extension) is not built: run "
        "`pip install -e . --no-build-isolation` (or `make install`) in the tmem checkout. "
        f"Original error: {exc}"
    ) from exc

MAX_RANK: int = _native.MAX_RANK

__all__ = [
    "MAX_RANK",
    "adamw_step_",
    "lora_expand_segmented",
    "lora_expand_segmented_backward",
    "lora_mlp",
    "lora_mlp_backward",
    "lora_mlp_forward",
    "lora_mlp_segmented",
    "lora_swiglu_backward",
    "lora_swiglu_forward",
    "sgd_step_",
    "swiglu",
    "swiglu_backward",
]


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _check(t: object, name: str, shape: Sequence[int] | None = None) -> torch.Tensor:
    """Raise unless `t` is a contiguous float32 CPU tensor (of `shape`, if given); return it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device}; the native backend runs on CPU tensors only")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} has dtype {t.dtype}; the native backend supports torch.float32 only")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    return t


def _check_same(ref: torch.Tensor, ref_name: str, **others: torch.Tensor) -> None:
    """Check every tensor in `others` like `ref` (same shape, float32, CPU, contiguous)."""
    for name, t in others.items():
        _check(t, name)
        if t.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {ref_name}'s {tuple(ref.shape)}")


def _threads() -> int:
    return torch.get_num_threads()


# --------------------------------------------------------------------------------------------------
# SwiGLU
# --------------------------------------------------------------------------------------------------


def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    h = torch.empty_like(gate)
    _native.swiglu_fwd(gate.data_ptr(), up.data_ptr(), h.data_ptr(), gate.numel(), _threads())
    return h


class _SwiGLU(torch.autograd.Function):
    """Autograd of `swiglu` (backward: the native `swiglu_backward`); inputs already validated."""

    @staticmethod
    def forward(ctx, gate, up):  # noqa: ANN001
        ctx.save_for_backward(gate, up)
        return _swiglu_fwd(gate, up)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dh):  # noqa: ANN001
        gate, up = ctx.saved_tensors
        return swiglu_backward(gate, up, dh.contiguous())


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """h = silu(gate) * up in one pass. gate, up: same shape (any), float32, contiguous -> h.
    Differentiable w.r.t. gate and up (the backward is `swiglu_backward`), as `reference.swiglu`."""
    _check(gate, "gate")
    _check_same(gate, "gate", up=up)
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLU.apply(gate, up)
    return _swiglu_fwd(gate, up)


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup) of h = silu(gate) * up given dh, in one pass (sigmoid recomputed); same shapes."""
    _check(gate, "gate")
    _check_same(gate, "gate", up=up, dh=dh)
    dg, du = torch.empty_like(gate), torch.empty_like(gate)
    _native.swiglu_bwd(
        gate.data_ptr(), up.data_ptr(), dh.data_ptr(), dg.data_ptr(), du.data_ptr(), gate.numel(), _threads()
    )
    return dg, du


# --------------------------------------------------------------------------------------------------
# LoRA epilogue + SwiGLU (the elementwise heart of lora_mlp), usable on its own
# --------------------------------------------------------------------------------------------------


def _check_rank(r: int) -> None:
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"LoRA rank must be in [1, {MAX_RANK}] for the native backend, got {r}")


def _check_lora_swiglu(
    gu: torch.Tensor, xa: torch.Tensor, b_gate: torch.Tensor, b_up: torch.Tensor, a_down: torch.Tensor
) -> tuple[int, int, int]:
    """Validate the arguments the fused forward and backward share; returns (N, I, r)."""
    _check(gu, "gu")
    if gu.dim() != 3 or gu.shape[0] != 2:
        raise ValueError(f"gu must have shape [2, N, I], got {tuple(gu.shape)}")
    _, n, i = gu.shape
    r = b_gate.shape[-1] if b_gate.dim() == 2 else -1
    _check_rank(r)
    _check(xa, "xa", (n, 2 * r))
    _check(b_gate, "b_gate", (i, r))
    _check(b_up, "b_up", (i, r))
    _check(a_down, "a_down", (r, i))
    return n, i, r


def lora_swiglu_forward(
    gu: torch.Tensor,
    xa: torch.Tensor,
    b_gate: torch.Tensor,
    b_up: torch.Tensor,
    a_down: torch.Tensor,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused LoRA epilogue + SwiGLU + down shrink.

    gu [2, N, I] = (x @ W_gate.T, x @ W_up.T); xa [N, 2r] = x @ [A_gate; A_up].T; b_gate, b_up [I, r];
    a_down [r, I]. Returns h = silu(gu[0] + s xa_g B_gate^T) * (gu[1] + s xa_u B_up^T) [N, I] and
    ha = h @ a_down.T [N, r].
    """
    _check_lora_swiglu(gu, xa, b_gate, b_up, a_down)
    return _lora_swiglu_fwd(gu, xa, b_gate, b_up, a_down, float(scaling))


def _lora_swiglu_fwd(gu, xa, b_gate, b_up, a_down, s, seg=None):  # noqa: ANN001
    """The kernel call behind `lora_swiglu_forward`, on already-validated tensors. b_gate, b_up: one [I, r]
    factor (seg None) or [S, I, r] stacks used per segment of `seg` (a `_HostSegments`)."""
    _, n, i = gu.shape
    r = a_down.shape[0]
    h, ha = gu.new_empty(n, i), gu.new_empty(n, r)
    _native.lora_swiglu_fwd(
        gu.data_ptr(), xa.data_ptr(), b_gate.data_ptr(), _slot_stride(b_gate), b_up.data_ptr(), _slot_stride(b_up),
        a_down.data_ptr(), h.data_ptr(), ha.data_ptr(), *_seg_args(seg), n, i, r, s, _threads(),
    )  # fmt: skip
    return h, ha


def lora_swiglu_backward(
    gu: torch.Tensor,
    xa: torch.Tensor,
    b_gate: torch.Tensor,
    b_up: torch.Tensor,
    a_down: torch.Tensor,
    dh_base: torch.Tensor,
    dha: torch.Tensor,
    scaling: float = 1.0,
    need_dgu: bool = True,
    need_da_down: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backward of `lora_swiglu_forward` (gate/up recomputed, never stored), in one pass.

    dh_base [N, I] = dy @ W_down, dha [N, r] = s * dy @ B_down; the other arguments as in the forward.
    Returns (dgu [2, N, I] or None, dB_gate [I, r], dB_up [I, r], dxa [N, 2r], dA_down [r, I] or None)
    where dh = dh_base + dha @ a_down, dgu = SwiGLU backward of dh, dB_* = s * dgu[.].T @ xa_*,
    dxa = s * [dgu[0] @ B_gate, dgu[1] @ B_up] and dA_down = dha.T @ h.
    """
    n, i, r = _check_lora_swiglu(gu, xa, b_gate, b_up, a_down)
    _check(dh_base, "dh_base", (n, i))
    _check(dha, "dha", (n, r))
    return _lora_swiglu_bwd(gu, xa, b_gate, b_up, a_down, dh_base, dha, float(scaling), need_dgu, need_da_down)


def _lora_swiglu_bwd(gu, xa, b_gate, b_up, a_down, dh_base, dha, s, need_dgu, need_da_down, seg=None):  # noqa: ANN001
    """The kernel call behind `lora_swiglu_backward`, on already-validated tensors (b_*, seg: as in
    `_lora_swiglu_fwd`; the dB's have the b_*'s shapes, contiguous)."""
    _, n, i = gu.shape
    r = a_down.shape[0]
    dgu = gu.new_empty(2, n, i) if need_dgu else None
    dbg, dbu = gu.new_zeros(b_gate.shape), gu.new_zeros(b_up.shape)  # the kernel accumulates per slot
    dxa = gu.new_empty(n, 2 * r)
    da_down = gu.new_empty(r, i) if need_da_down else None
    _native.lora_swiglu_bwd(
        gu.data_ptr(), xa.data_ptr(), b_gate.data_ptr(), _slot_stride(b_gate), b_up.data_ptr(), _slot_stride(b_up),
        a_down.data_ptr(), dh_base.data_ptr(), dha.data_ptr(), _ptr(dgu), dbg.data_ptr(), dbu.data_ptr(),
        dxa.data_ptr(), _ptr(da_down), *_seg_args(seg), n, i, r, s, _threads(),
    )  # fmt: skip
    return dgu, dbg, dbu, dxa, da_down


def _ptr(t: torch.Tensor | None) -> int:
    """t's data pointer, or 0 (the kernels' "no such output") for None."""
    return 0 if t is None else t.data_ptr()


def _slot_stride(b: torch.Tensor) -> int:
    """Floats between consecutive slots of a [S, M, r] stack (0 for a single [M, r] factor)."""
    return b.stride(0) if b.dim() == 3 else 0


# --------------------------------------------------------------------------------------------------
# The fused LoRA SwiGLU MLP
# --------------------------------------------------------------------------------------------------


def lora_mlp_forward(
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
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused forward on validated tensors, x [N, H]: (y [N, H], gu [2, N, I], xa [N, 2r], ha [N, r]),
    the last three being what `lora_mlp_backward` reads (gu = the gate/up base products)."""
    n, i = x.shape[0], w_gate.shape[0]
    xa = torch.mm(x, torch.cat([a_gate, a_up]).T)  # [N, 2r]: one shrink product for gate and up
    gu = x.new_empty(2, n, i)
    torch.mm(x, w_gate.T, out=gu[0])
    torch.mm(x, w_up.T, out=gu[1])
    h, ha = _lora_swiglu_fwd(gu, xa, b_gate, b_up, a_down, scaling)
    y = torch.mm(h, w_down.T)
    y.addmm_(ha, b_down.T, alpha=scaling)  # the down LoRA expand, on the base product's output
    return y, gu, xa, ha


def lora_mlp_backward(
    dy: torch.Tensor,
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
    gu: torch.Tensor,
    xa: torch.Tensor,
    ha: torch.Tensor,
    scaling: float,
    need_dx: bool = True,
    need_da: bool = False,
    need_db_down: bool = True,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients from `lora_mlp_forward`'s saved tensors given dy [N, H] (contiguous):
    (dx, da_gate, db_gate, da_up, db_up, da_down, db_down); dx is None unless `need_dx`, the da_* are None
    unless `need_da`, db_down is None unless `need_db_down` (db_gate and db_up come with the fused pass)."""
    s, r = scaling, a_down.shape[0]
    db_down = torch.mm(dy.T, ha).mul_(s) if need_db_down else None  # [H, r]
    dha = torch.mm(dy, b_down).mul_(s)  # [N, r]
    dh_base = torch.mm(dy, w_down)  # [N, I]
    dgu, db_gate, db_up, dxa, da_down = _lora_swiglu_bwd(
        gu, xa, b_gate, b_up, a_down, dh_base, dha, s, need_dx, need_da
    )
    del dh_base
    dx = da_gate = da_up = None
    if need_dx:
        dx = torch.mm(dgu[0], w_gate)
        dx.addmm_(dgu[1], w_up)
        dx.addmm_(dxa, torch.cat([a_gate, a_up]))
    if need_da:
        da_gu = torch.mm(dxa.T, x)  # [2r, H]
        da_gate, da_up = da_gu[:r], da_gu[r:]
    return dx, da_gate, db_gate, da_up, db_up, da_down, db_down


class _LoRAMLP(torch.autograd.Function):
    """Autograd of `lora_mlp`; inputs already validated, x flattened to [N, H]."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, scaling):  # noqa: ANN001
        y, gu, xa, ha = lora_mlp_forward(x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down,
                                         scaling)  # fmt: skip
        ctx.scaling = scaling
        ctx.save_for_backward(x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, gu, xa, ha)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):  # noqa: ANN001
        need = ctx.needs_input_grad
        grads = lora_mlp_backward(dy.contiguous(), *ctx.saved_tensors, ctx.scaling, need_dx=need[0],
                                  need_da=need[4] or need[6] or need[8], need_db_down=need[9])  # fmt: skip
        dx, *factors = (g if need[k] else None for g, k in zip(grads, (0, 4, 5, 6, 7, 8, 9)))
        return (dx, None, None, None, *factors, None)


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
    """SwiGLU MLP with LoRA on gate/up/down, as `reference.lora_mlp`; x [..., H] -> [..., H].

    Shapes: w_gate, w_up [I, H]; w_down [H, I]; a_gate, a_up [r, H]; a_down [r, I]; b_gate, b_up [I, r];
    b_down [H, r]; all float32, CPU, contiguous; 1 <= r <= MAX_RANK. Differentiable w.r.t. x, the b_*
    and the a_* (whichever require grad). The base weights are frozen: a w_* that requires grad while
    grad mode is on is an error (no gradient is computed for them).
    """
    _check(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., H]")
    _check(w_gate, "w_gate")
    if w_gate.dim() != 2:
        raise ValueError(f"w_gate must be [I, H], got shape {tuple(w_gate.shape)}")
    i, h = w_gate.shape
    if x.shape[-1] != h:
        raise ValueError(f"x has hidden size {x.shape[-1]}, w_gate expects {h}")
    _check(a_gate, "a_gate")
    if a_gate.dim() != 2:
        raise ValueError(f"a_gate must be [r, H], got shape {tuple(a_gate.shape)}")
    r = a_gate.shape[0]
    _check_rank(r)
    for name, t, shape in (
        ("w_up", w_up, (i, h)), ("w_down", w_down, (h, i)), ("a_gate", a_gate, (r, h)),
        ("b_gate", b_gate, (i, r)), ("a_up", a_up, (r, h)), ("b_up", b_up, (i, r)),
        ("a_down", a_down, (r, i)), ("b_down", b_down, (h, r)),
    ):  # fmt: skip
        _check(t, name, shape)
    if torch.is_grad_enabled():
        for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
            if w.requires_grad:
                raise ValueError(
                    f"{name} requires grad, but the native lora_mlp treats the base weights as frozen "
                    "(call .requires_grad_(False) on them)"
                )
    if isinstance(scaling, torch.Tensor) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a Python number, got {type(scaling).__name__}")
    lead = x.shape[:-1]
    y = _LoRAMLP.apply(
        x.reshape(-1, h), w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, float(scaling)
    )
    return y.reshape(*lead, h)


# --------------------------------------------------------------------------------------------------
# Optimizer steps over one flat buffer (in place)
# --------------------------------------------------------------------------------------------------


def sgd_step_(param: torch.Tensor, grad: torch.Tensor, lr: float, weight_decay: float = 0.0) -> None:
    """param -= lr * (grad + weight_decay * param), in place. param, grad: same shape.

    With weight decay this is the native one-pass kernel (the torch composition makes two passes and a
    temporary; native measured ~2x faster). Without weight decay the torch composition is already one
    pass (`param.add_(grad, alpha=-lr)`) and the native kernel did not beat it at equal thread counts
    (ratio ~0.93 single-threaded, benchmarks/RESULTS.md), so that case runs torch's `add_`.
    """
    _check(param, "param")
    _check_same(param, "param", grad=grad)
    if not weight_decay:
        param.add_(grad, alpha=-lr)
        return
    _native.sgd_step(param.data_ptr(), grad.data_ptr(), param.numel(), float(lr), float(weight_decay), _threads())
    torch.autograd.graph.increment_version(param)  # (written through its pointer: as an in-place torch op would)


def adamw_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> None:
    """One AdamW step in place (as torch.optim.AdamW), one pass. All four tensors: same shape.

    `step` counts from 1 (this step). The bias corrections are computed here in double precision,
    as torch does, and the fused kernel applies them.
    """
    _check(param, "param")
    _check_same(param, "param", grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    if int(step) < 1:
        raise ValueError(f"step counts from 1, got {step}")
    step_size = lr / (1 - beta1**step)
    sqrt_bc2 = math.sqrt(1 - beta2**step)
    _native.adamw_step(
        param.data_ptr(), grad.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr(), param.numel(),
        float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), step_size, sqrt_bc2,
        _threads(),
    )  # fmt: skip
    torch.autograd.graph.increment_version((param, exp_avg, exp_avg_sq))  # (written through their pointers)


# --------------------------------------------------------------------------------------------------
# Segmented: a different B per segment of rows (tmem_kernels.segments)
# --------------------------------------------------------------------------------------------------


class _HostSegments(NamedTuple):
    """Validated segments as the kernels take them: contiguous int64 CPU tensors and their count."""

    indptr: torch.Tensor
    slot: torch.Tensor
    count: int


def _seg_args(seg: _HostSegments | None) -> tuple[int, int, int]:
    """(indptr pointer, slot pointer, G) for the kernels; (0, 0, 0) means one segment using slot 0."""
    return (0, 0, 0) if seg is None else (seg.indptr.data_ptr(), seg.slot.data_ptr(), seg.count)


def _host_segments(seg_indptr: torch.Tensor, seg_slot: torch.Tensor, n: int, num_slots: int, op: str) -> _HostSegments:
    check_segment_tensors(seg_indptr, seg_slot, op)
    if seg_indptr.device.type != "cpu":
        raise ValueError(f"{op}: the segments are on {seg_indptr.device}; the native backend reads them on the CPU")
    slots = seg_slot.tolist()
    check_segment_values(seg_indptr.tolist(), slots, n, num_slots, op)
    return _HostSegments(seg_indptr.contiguous(), seg_slot.contiguous(), len(slots))


def _check_stack_storage(b: torch.Tensor, name: str) -> None:
    """The native backend's dtype and device for a B stack whose shape and layout are checked already."""
    if b.device.type != "cpu":
        raise ValueError(f"{name} is on {b.device}; the native backend runs on CPU tensors only")
    if b.dtype != torch.float32:
        raise TypeError(f"{name} has dtype {b.dtype}; the native backend supports torch.float32 only")


class _SegmentedKernels:
    """The native `segments.SegmentedKernels` (fp32, CPU; `seg` is a `_HostSegments`)."""

    def expand_(self, y, xa, b, seg, scaling):  # noqa: ANN001, ANN201
        n, m = y.shape
        _native.lora_expand_fwd(y.data_ptr(), xa.data_ptr(), b.data_ptr(), b.stride(0), *_seg_args(seg), n, m,
                                xa.shape[1], scaling, _threads())  # fmt: skip

    def expand_backward(self, dy, xa, b, seg, scaling, need_dxa, need_db):  # noqa: ANN001, ANN201
        n, m = dy.shape
        dxa = dy.new_empty(xa.shape) if need_dxa else None
        db = dy.new_zeros(b.shape) if need_db else None  # the kernel accumulates per slot
        if need_dxa or need_db:
            _native.lora_expand_bwd(dy.data_ptr(), xa.data_ptr(), b.data_ptr(), b.stride(0), *_seg_args(seg),
                                    _ptr(dxa), _ptr(db), n, m, xa.shape[1], scaling, _threads())  # fmt: skip
        return dxa, db

    def gate_up_forward(self, gu, xa, b_gate, b_up, a_down, seg, scaling):  # noqa: ANN001, ANN201
        return _lora_swiglu_fwd(gu, xa, b_gate, b_up, a_down, scaling, seg)

    def gate_up_backward(self, gu, xa, b_gate, b_up, a_down, dh_base, dha, seg, scaling, need_dgu):  # noqa: ANN001, ANN201
        dgu, dbg, dbu, dxa, _ = _lora_swiglu_bwd(gu, xa, b_gate, b_up, a_down, dh_base, dha, scaling, need_dgu,
                                                 False, seg)  # fmt: skip
        return dgu, dbg, dbu, dxa


_KERNELS = _SegmentedKernels()


def _check_scaling(scaling: object) -> float:
    if isinstance(scaling, torch.Tensor) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a Python number, got {type(scaling).__name__}")
    return float(scaling)


def _check_expand(y, xa, b, seg_indptr, seg_slot, op):  # noqa: ANN001, ANN202
    """Validate the expand's arguments (y: the base or dy); returns the `_HostSegments`."""
    _check(y, "dy" if op.endswith("backward") else "y")
    if y.dim() != 2:
        raise ValueError(f"{op}: y must be [N, M], got shape {tuple(y.shape)}")
    _check(xa, "xa")
    if xa.dim() != 2 or xa.shape[0] != y.shape[0]:
        raise ValueError(f"{op}: xa must be [N, r] with N = {y.shape[0]}, got shape {tuple(xa.shape)}")
    _check_rank(xa.shape[1])
    slots = check_b_stack(b, "b", y.shape[1], xa.shape[1], op)
    _check_stack_storage(b, "b")
    return _host_segments(seg_indptr, seg_slot, y.shape[0], slots, op)


def lora_expand_segmented(
    y: torch.Tensor,
    xa: torch.Tensor,
    b: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_slot: torch.Tensor,
    scaling: float = 1.0,
) -> torch.Tensor:
    """y + scaling * xa[rows] @ b[slot].T per segment, as `reference.lora_expand_segmented`: y [N, M],
    xa [N, r], b [S, M, r] (contiguous blocks, any slot stride); float32 CPU; segments on the CPU.
    Differentiable w.r.t. y, xa and b."""
    s = _check_scaling(scaling)
    seg = _check_expand(y, xa, b, seg_indptr, seg_slot, "lora_expand_segmented")
    return SegmentedExpandFunction.apply(_KERNELS, seg, y, xa, b, s)


def lora_expand_segmented_backward(
    dy: torch.Tensor,
    xa: torch.Tensor,
    b: torch.Tensor,
    seg_indptr: torch.Tensor,
    seg_slot: torch.Tensor,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dxa [N, r], db [S, M, r]) of `lora_expand_segmented` given dy [N, M], in one pass over dy."""
    s = _check_scaling(scaling)
    seg = _check_expand(dy, xa, b, seg_indptr, seg_slot, "lora_expand_segmented_backward")
    return _KERNELS.expand_backward(dy, xa, b, seg, s, True, True)


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
    """`lora_mlp` with a different B per segment of rows, as `reference.lora_mlp_segmented`. x [N, H] -> [N, H].

    w_gate, w_up [I, H]; w_down [H, I]; a_gate, a_up [r, H]; a_down [r, I]; b_gate, b_up [S, I, r];
    b_down [S, H, r] (contiguous [out, r] blocks, any slot stride); all float32 CPU, x/w/a contiguous;
    1 <= r <= MAX_RANK; seg_indptr, seg_slot int64 on the CPU. Differentiable w.r.t. x and the b_* stacks
    (the w_* and a_* are frozen). The base products and shrinks run once for all rows (torch sgemm);
    per segment only the expand epilogues and the dB reductions, in the fused kernels.
    """
    op = "lora_mlp_segmented"
    n, h, i, r, slots = lora_mlp_segmented_shapes(x, w_gate, w_up, w_down, a_gate, a_up, a_down, b_gate, b_up,
                                                  b_down, op)  # fmt: skip
    _check_rank(r)
    for name, t in dict(x=x, w_gate=w_gate, w_up=w_up, w_down=w_down, a_gate=a_gate, a_up=a_up, a_down=a_down).items():
        _check(t, name)
    for name, b in (("b_gate", b_gate), ("b_up", b_up), ("b_down", b_down)):
        _check_stack_storage(b, name)
    s = _check_scaling(scaling)
    seg = _host_segments(seg_indptr, seg_slot, n, slots, op)
    w_gate, w_up, w_down, a_down = (t.detach() for t in (w_gate, w_up, w_down, a_down))
    a_gu = torch.cat([a_gate.detach(), a_up.detach()])  # [2r, H]: one shrink product for gate and up
    return SegmentedLoRAMLPFunction.apply(_KERNELS, seg, x, w_gate, w_up, w_down, a_gu, a_down, b_gate, b_up,
                                          b_down, s)  # fmt: skip
