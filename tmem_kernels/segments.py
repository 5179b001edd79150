"""Rows grouped by adapter slot (Punica's SGMV layout) and the autograd shared by the segmented backends.

A batch of N rows is cut into G contiguous segments: rows seg_indptr[g]:seg_indptr[g+1] use adapter slot
seg_slot[g], an index into dim 0 of the stacked B's, or -1 for no adapter (those rows get the bare base
MLP). seg_indptr is int64 [G+1] from 0 to N (non-decreasing; empty segments are allowed), seg_slot int64
[G]. A slot may appear in several segments; slots absent from the batch get a zero gradient.

A stack of B's is [S, out, r] with any stride along dim 0 (a view of a [capacity, numel] slab holding one
session per row) but each [out, r] block contiguous.

`SegmentedLoRAMLPFunction` and `SegmentedExpandFunction` hold the composition every fast backend shares:
the base products x W^T and the shrinks x A^T run once for all N rows as plain matrix products; only the
expand and the dB reduction are per segment, and those run in the backend's `SegmentedKernels`
(`tmem_kernels.native`, `tmem_kernels.lora_segmented`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

Tensor = torch.Tensor

__all__ = [
    "SegmentedExpandFunction",
    "SegmentedKernels",
    "SegmentedLoRAMLPFunction",
    "check_b_stack",
    "check_segment_tensors",
    "check_segment_values",
    "host_segments",
    "lora_mlp_segmented_shapes",
    "row_segments",
]


def row_segments(row_slots: Sequence[int], tokens_per_row: int = 1) -> tuple[Tensor, Tensor]:
    """(seg_indptr, seg_slot), int64 on the CPU, for a batch [B, T, H] flattened to [B * T, H] whose row b
    uses slot row_slots[b] (-1: no adapter), T = tokens_per_row; neighbouring rows of one slot share a
    segment. E.g. row_slots [3, 3, -1, 0], T 2 -> seg_indptr [0, 4, 6, 8], seg_slot [3, -1, 0]."""
    if tokens_per_row < 0:
        raise ValueError(f"tokens_per_row must be >= 0, got {tokens_per_row}")
    starts, slots = [], []
    for b, slot in enumerate(row_slots):
        if not slots or slot != slots[-1]:
            starts.append(b * tokens_per_row)
            slots.append(int(slot))
    indptr = torch.tensor([*starts, len(row_slots) * tokens_per_row], dtype=torch.int64)
    return indptr, torch.tensor(slots, dtype=torch.int64)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def check_segment_tensors(seg_indptr: object, seg_slot: object, op: str) -> int:
    """Raise unless seg_indptr is int64 [G+1] and seg_slot int64 [G] on one device; returns G."""
    for name, t in (("seg_indptr", seg_indptr), ("seg_slot", seg_slot)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int64 or t.dim() != 1:
            raise ValueError(f"{op}: {name} must be a 1-D int64 tensor, got {t.dtype} of shape {tuple(t.shape)}")
    g = seg_slot.shape[0]
    if seg_indptr.shape[0] != g + 1:
        raise ValueError(f"{op}: seg_indptr has {seg_indptr.shape[0]} entries, expected G + 1 = {g + 1}")
    if seg_indptr.device != seg_slot.device:
        raise ValueError(f"{op}: seg_indptr is on {seg_indptr.device} but seg_slot on {seg_slot.device}")
    return g


def check_segment_values(indptr: list[int], slots: list[int], n: int, num_slots: int, op: str) -> None:
    """Raise unless the segments cover rows 0..n in order and every slot is -1 or in [0, num_slots)."""
    if indptr[0] != 0 or indptr[-1] != n:
        raise ValueError(f"{op}: seg_indptr must run from 0 to N = {n}, got {indptr[0]} .. {indptr[-1]}")
    if any(b < a for a, b in zip(indptr, indptr[1:])):
        raise ValueError(f"{op}: seg_indptr must be non-decreasing, got {indptr}")
    bad = [s for s in slots if not -1 <= s < num_slots]
    if bad:
        raise ValueError(f"{op}: seg_slot {bad[0]} is outside [-1, {num_slots}) (the B stacks hold {num_slots})")


def host_segments(seg_indptr: Tensor, seg_slot: Tensor, n: int, num_slots: int, op: str) -> list[tuple[int, int, int]]:
    """Validated (start, end, slot) per segment, read on the host (a device tensor is copied: a sync)."""
    check_segment_tensors(seg_indptr, seg_slot, op)
    indptr, slots = seg_indptr.tolist(), seg_slot.tolist()
    check_segment_values(indptr, slots, n, num_slots, op)
    return list(zip(indptr[:-1], indptr[1:], slots))


def check_b_stack(b: object, name: str, out: int, r: int, op: str) -> int:
    """Raise unless b is a [S, out, r] stack with contiguous [out, r] blocks; returns S."""
    if not isinstance(b, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(b).__name__}")
    if b.dim() != 3 or tuple(b.shape[1:]) != (out, r):
        raise ValueError(f"{op}: {name} has shape {tuple(b.shape)}, expected [S, {out}, {r}]")
    if (out > 1 and b.stride(1) != r) or (r > 1 and b.stride(2) != 1):
        raise ValueError(
            f"{op}: {name} must hold contiguous [{out}, {r}] blocks (any stride along dim 0), got strides "
            f"{b.stride()}"
        )
    return b.shape[0]


def lora_mlp_segmented_shapes(
    x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, a_gate: Tensor, a_up: Tensor, a_down: Tensor,
    b_gate: Tensor, b_up: Tensor, b_down: Tensor, op: str = "lora_mlp_segmented",
) -> tuple[int, int, int, int, int]:  # fmt: skip
    """Check the shapes `lora_mlp_segmented` takes; returns (N, H, I, r, S). dtype/device: the backend's."""
    named = dict(x=x, w_gate=w_gate, w_up=w_up, w_down=w_down, a_gate=a_gate, a_up=a_up, a_down=a_down)
    for name, t in {**named, "b_gate": b_gate, "b_up": b_up, "b_down": b_down}.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in named.items():
        if t.dim() != 2:
            raise ValueError(f"{op}: {name} must be 2-D, got shape {tuple(t.shape)} (x is [N, H])")
    n, h = x.shape
    i, r = w_gate.shape[0], a_gate.shape[0]
    expected = dict(w_gate=(i, h), w_up=(i, h), w_down=(h, i), a_gate=(r, h), a_up=(r, h), a_down=(r, i))
    for name, shape in expected.items():
        if tuple(named[name].shape) != shape:
            raise ValueError(
                f"{op}: {name} has shape {tuple(named[name].shape)}, expected {shape} for x [{n}, {h}], "
                f"intermediate size {i} and rank {r}"
            )
    if r < 1:
        raise ValueError(f"{op}: LoRA rank must be >= 1, got {r}")
    stacks = {name: check_b_stack(b, name, out, r, op)
              for name, b, out in (("b_gate", b_gate, i), ("b_up", b_up, i), ("b_down", b_down, h))}  # fmt: skip
    if len(set(stacks.values())) != 1:
        raise ValueError(f"{op}: the B stacks hold different numbers of slots: {stacks}")
    return n, h, i, r, stacks["b_gate"]


# --------------------------------------------------------------------------------------------------
# What a backend provides
# --------------------------------------------------------------------------------------------------


class SegmentedKernels(Protocol):
    """A backend's per-segment kernels, on validated tensors. `seg` is the backend's own segment handle
    (host lists for the native kernels, device tensors and a launch plan for Triton). B stacks: [S, M, r]
    views; factor gradients come back as new contiguous [S, M, r] tensors in the B's dtype."""

    def expand_(self, y: Tensor, xa: Tensor, b: Tensor, seg: Any, scaling: float) -> None:
        """y [N, M] += scaling * xa[rows] @ b[slot].T per segment, in place (xa [N, r])."""

    def expand_backward(
        self, dy: Tensor, xa: Tensor, b: Tensor, seg: Any, scaling: float, need_dxa: bool, need_db: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        """(dxa [N, r] = scaling * dy[rows] @ b[slot], db [S, M, r] = scaling * dy[rows].T @ xa[rows] summed
        per slot); either None when not needed."""

    def gate_up_forward(
        self, gu: Tensor, xa: Tensor, b_gate: Tensor, b_up: Tensor, a_down: Tensor, seg: Any, scaling: float
    ) -> tuple[Tensor, Tensor]:
        """(h [N, I], ha [N, r]): h = silu(gu[0] + s xa_g B_gate[slot]^T) * (gu[1] + s xa_u B_up[slot]^T),
        ha = h @ a_down.T. gu [2, N, I]; xa [N, 2r] (gate's shrink in [:, :r], up's in [:, r:])."""

    def gate_up_backward(
        self, gu: Tensor, xa: Tensor, b_gate: Tensor, b_up: Tensor, a_down: Tensor, dh_base: Tensor, dha: Tensor,
        seg: Any, scaling: float, need_dgu: bool,
    ) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:  # fmt: skip
        """(dgu [2, N, I] | None, db_gate, db_up [S, I, r], dxa [N, 2r]) with gate/up recomputed, dh = dh_base
        + dha @ a_down, the SwiGLU backward, db_* = s * d*[rows].T @ xa_*[rows] per slot, dxa = s * [dgate @
        B_gate[slot], dup @ B_up[slot]]."""


# --------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------


class SegmentedExpandFunction(torch.autograd.Function):
    """y + scaling * xa[rows] @ b[slot].T per segment. Inputs: kernels, seg, y, xa, b, scaling."""

    @staticmethod
    def forward(ctx, kernels, seg, y, xa, b, scaling):  # noqa: ANN001
        out = y.clone(memory_format=torch.contiguous_format)
        kernels.expand_(out, xa, b, seg, scaling)
        ctx.kernels, ctx.seg, ctx.scaling = kernels, seg, scaling
        ctx.save_for_backward(xa, b)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):  # noqa: ANN001
        xa, b = ctx.saved_tensors
        need = ctx.needs_input_grad
        dxa = db = None
        if need[3] or need[4]:
            dxa, db = ctx.kernels.expand_backward(dout.contiguous(), xa, b, ctx.seg, ctx.scaling, need[3], need[4])
        return None, None, dout if need[2] else None, dxa, db, None


class SegmentedLoRAMLPFunction(torch.autograd.Function):
    """Autograd of `lora_mlp_segmented` over a backend's kernels. Inputs: kernels, seg, x, w_gate, w_up,
    w_down, a_gu ([A_gate; A_up], [2r, H]), a_down, b_gate, b_up, b_down, scaling. Gradients for x and the
    B stacks only (the W's and A's are frozen)."""

    @staticmethod
    def forward(ctx, kernels, seg, x, w_gate, w_up, w_down, a_gu, a_down, b_gate, b_up, b_down, scaling):  # noqa: ANN001
        n, i = x.shape[0], w_gate.shape[0]
        xa = torch.mm(x, a_gu.T)  # [N, 2r]: the shared shrink of gate and up, once for every row
        gu = x.new_empty(2, n, i)
        torch.mm(x, w_gate.T, out=gu[0])
        torch.mm(x, w_up.T, out=gu[1])
        h, ha = kernels.gate_up_forward(gu, xa, b_gate, b_up, a_down, seg, scaling)
        y = torch.mm(h, w_down.T)
        kernels.expand_(y, ha, b_down, seg, scaling)  # the down expand, on the base product's output
        ctx.kernels, ctx.seg, ctx.scaling = kernels, seg, scaling
        ctx.save_for_backward(w_gate, w_up, w_down, a_gu, a_down, b_gate, b_up, b_down, gu, xa, ha)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):  # noqa: ANN001
        w_gate, w_up, w_down, a_gu, a_down, b_gate, b_up, b_down, gu, xa, ha = ctx.saved_tensors
        kernels, seg, s = ctx.kernels, ctx.seg, ctx.scaling
        need = ctx.needs_input_grad
        need_x = need[2]
        dy = dy.contiguous()
        dha, db_down = kernels.expand_backward(dy, ha, b_down, seg, s, True, need[10])
        dh_base = torch.mm(dy, w_down)
        dgu, db_gate, db_up, dxa = kernels.gate_up_backward(gu, xa, b_gate, b_up, a_down, dh_base, dha, seg, s,
                                                            need_x)  # fmt: skip
        del dh_base
        dx = None
        if need_x:
            dx = torch.mm(dgu[0], w_gate)
            dx.addmm_(dgu[1], w_up)
            dx.addmm_(dxa, a_gu)
        return (None, None, dx, None, None, None, None, None,
                db_gate if need[8] else None, db_up if need[9] else None, db_down, None)  # fmt: skip
