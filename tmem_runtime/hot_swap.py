"""Hot swap: check a session state dict against the engine, as cheaply as copying its B.

A state dict names every slot's lora_A and lora_B. With a shared A0 only B differs between sessions,
so a swap should cost about one copy of B's bytes. Two cases are cheap by construction:

- A: a state dict made by `state_dict()` carries the pool's one snapshot of A (the same tensor
  objects every time, version counters unmoved), which needs no check; any other A is compared with
  the engine's: it must be equal up to A_TOLERANCE (A is shared; the SVD that made it may have run on
  another machine, with other rounding), and the engine keeps its own.
- B: when the B tensors are the views of one flat row at the layout's offsets (what `state_dict()`
  makes), that row is validated in one pass (a sum into a preallocated scalar is finite iff every
  entry is, barring overflow, which is refused too) and copied in one `copy_`.

Anything else (B tensors from elsewhere, another dtype) takes the general path: each tensor's shape,
dtype and finiteness checked and gathered into one row. Nothing is written to the engine until every
check passed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from tmem_runtime.engine import FastWeightEngine

A_TOLERANCE = 1e-4  # relative Frobenius error accepted between a state's A and the shared A


class SwapChecker:
    """Validates session state dicts for one engine; allocates its scratch once."""

    def __init__(self, engine: FastWeightEngine) -> None:
        self.engine = engine
        lay = engine.layout
        self.a_names = [lay.a_name(i) for i in range(len(lay.slots))]
        self.b_names = [lay.b_name(i) for i in range(len(lay.slots))]
        self.names = frozenset(self.a_names + self.b_names)
        self.b_shapes = [(s.out_features, lay.rank) for s in lay.slots]
        self.b_expected = [(n, torch.Size(sh), o * 4) for n, sh, o in zip(self.b_names, self.b_shapes, lay.b_offsets)]
        with torch.inference_mode(False):  # (attached inside inference mode: still written outside it)
            self.scratch_row = torch.empty(lay.b_numel, dtype=torch.float32, device=engine.device)
            self.total = torch.empty((), dtype=torch.float32, device=engine.device)
        self.a_snapshot: dict[str, torch.Tensor] | None = None
        self.a_versions: list[int] = []

    def remember_a(self, snapshot: dict[str, torch.Tensor]) -> None:
        """`snapshot` (the A tensors handed out by state_dict) needs no check while unchanged."""
        self.a_snapshot, self.a_versions = snapshot, [t._version for t in snapshot.values()]

    def b_row(self, state: Mapping[str, torch.Tensor], check_a: bool = True) -> torch.Tensor:
        """The validated B row [b_numel] of `state` (a view of its memory, or the scratch row).

        Raises ValueError naming what does not match (check_a: an A other than the shared one too); reads,
        never writes, the engine. Tensors that require grad (an adapter being trained elsewhere) are read as
        values: no graph reaches the scratch.
        """
        with torch.no_grad():
            return self._b_row(state, check_a)

    def a_row(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """None where `state`'s A is the shared A (to A_TOLERANCE, as `b_row` checks it); else the state's own A
        as one new float32 row [a_numel] (e.g. trained by a `train_a` write), validated: ValueError for an A of
        another shape or not finite, or a state that does not name every tensor. Reads, never writes, the engine."""
        with torch.no_grad():
            self._check_names(state)
            if self._a_mismatch(state) is None:
                return None
            lay = self.engine.layout
            row = torch.empty(lay.a_numel, dtype=torch.float32, device=self.engine.device)
            for i, name in enumerate(self.a_names):
                lay.a_view(row, i).copy_(state[name])
            if not bool(torch.isfinite(row).all()):
                raise ValueError("lora_A: not a finite floating-point tensor (NaN or inf)")
            return row

    def _check_names(self, state: Mapping[str, torch.Tensor]) -> None:
        if state.keys() != self.names:
            missing, extra = self.names - set(state), set(state) - self.names
            raise ValueError(
                f"adapter state does not match: missing {sorted(missing)[:4]}, unexpected {sorted(extra)[:4]}"
            )

    def _b_row(self, state: Mapping[str, torch.Tensor], check_a: bool) -> torch.Tensor:
        self._check_names(state)
        if check_a:
            self._check_a(state)
        row = self._flat_b(state)
        if row is None:
            row = self._gathered_b(state)
        torch.sum(row, dim=0, out=self.total)
        if not math.isfinite(self.total.item()):
            raise ValueError("lora_B: not a finite floating-point tensor (NaN, inf or overflow)")
        return row

    def _check_a(self, state: Mapping[str, torch.Tensor]) -> None:
        why = self._a_mismatch(state)
        if why is not None:
            raise ValueError(why)

    def _a_mismatch(self, state: Mapping[str, torch.Tensor]) -> str | None:
        """Why the state's A is not the shared A (None: it is); ValueError for an A of another shape or type."""
        snap = self.a_snapshot
        if snap is not None and all(state[n] is snap[n] for n in self.a_names):  # (the snapshot is never
            # an inference tensor: it is made outside inference mode, so its version counter exists)
            if [t._version for t in snap.values()] == self.a_versions:
                return None
        lay = self.engine.layout
        for i, name in enumerate(self.a_names):
            want = lay.a_view(self.engine.a, i)
            got = state[name]
            if not _is_float_tensor(got):
                raise ValueError(f"{name}: not a floating-point tensor")
            if tuple(got.shape) != tuple(want.shape):
                raise ValueError(f"{name}: shape {tuple(got.shape)} != expected {tuple(want.shape)}")
            # equal up to the rounding of an SVD recomputed on another machine (A0 is recomputed there)
            err = (got.to(want.device, torch.float32) - want).norm() / want.norm().clamp_min(1e-30)
            if not bool(err <= A_TOLERANCE):
                return (
                    f"{name} differs from this pool's A, which every session shares (relative error "
                    f"{float(err):.1e}): the state is for another model, init or seed, or for this model in "
                    "another dtype (A0 is the SVD of the weights as loaded: bf16 weights give another A0), or "
                    "its A was trained (train_a: FastWeights loads its own A)"
                )
        return None

    def _flat_b(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """The one float32 row all B tensors are views of, at the layout's offsets; else None."""
        first = state[self.b_names[0]]
        if not isinstance(first, torch.Tensor) or first.dtype != torch.float32 or first.device != self.engine.device:
            return None
        base = first.data_ptr()
        for name, shape, off in self.b_expected:
            t = state[name]
            if not isinstance(t, torch.Tensor) or t.data_ptr() - base != off or t.shape != shape:
                return None
            if t.dtype != first.dtype or not t.is_contiguous():
                return None
        storage = first.untyped_storage()
        if storage.nbytes() < (first.storage_offset() + self.scratch_row.numel()) * 4:
            return None
        return first.new_empty(0).set_(storage, first.storage_offset(), (self.scratch_row.numel(),))

    def _gathered_b(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        lay = self.engine.layout
        for i, name in enumerate(self.b_names):
            t = state[name]
            if not _is_float_tensor(t):
                raise ValueError(f"{name}: not a floating-point tensor")
            if tuple(t.shape) != self.b_shapes[i]:
                raise ValueError(f"{name}: shape {tuple(t.shape)} != expected {self.b_shapes[i]}")
            lay.b_view(self.scratch_row, i).copy_(t)
        return self.scratch_row


def _is_float_tensor(t: object) -> bool:
    return isinstance(t, torch.Tensor) and torch.is_floating_point(t)
