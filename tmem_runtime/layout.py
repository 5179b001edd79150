"""Where every adapter tensor lives: one shared A buffer, one contiguous B row per session.

    A  [a_numel]             A(l0,gate) A(l0,up) A(l0,down) A(l1,gate) ...      A(l, t): [r, in_features]
    B  [sessions, b_numel]   one row per session:  B(l0,gate) B(l0,up) ...        B(l, t): [out_features, r]

With the SVD init every session shares A0 = S_r V_r^T (it depends on the model alone) and differs only
in B, so a session is one contiguous row of B: a swap, a reset, a save or an eviction is one copy.
Gradients and optimizer state of a write live in buffers of the same row layout. `b_stack` views one
projection's B across all sessions ([sessions, out, r], strided), which is what the per-row kernels read.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AdapterSlot:
    """One adapted projection: decoder layer `layer`, module `target` (e.g. "gate_proj")."""

    layer: int
    target: str
    out_features: int
    in_features: int

    @property
    def prefix(self) -> str:
        return f"layers.{self.layer}.mlp.{self.target}"


class AdapterLayout:
    """Offsets of every slot's A in the shared A buffer and of its B in one session's B row."""

    def __init__(self, slots: list[AdapterSlot], rank: int) -> None:
        if isinstance(rank, bool) or not hasattr(rank, "__index__"):  # (6.0 or "6" failed deep inside, unexplained)
            raise TypeError(f"rank must be an int, got {rank!r}")
        rank = operator.index(rank)  # (a numpy integer: a plain int)
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        for s in slots:
            if rank > min(s.out_features, s.in_features):
                raise ValueError(f"rank {rank} exceeds {s.prefix}'s smaller side ({s.out_features} x {s.in_features})")
        self.slots = list(slots)
        self.rank = rank
        self.b_offsets = _offsets([s.out_features * rank for s in self.slots])
        self.a_offsets = _offsets([rank * s.in_features for s in self.slots])
        self.b_numel = self.b_offsets[-1]
        self.a_numel = self.a_offsets[-1]

    @property
    def numel(self) -> int:
        """Numbers in one session's whole adapter (its B row plus A)."""
        return self.a_numel + self.b_numel

    def b_view(self, row: torch.Tensor, i: int) -> torch.Tensor:
        """Slot i's B [out_features, r] as a view of one session's B row [b_numel]."""
        s, o = self.slots[i], self.b_offsets[i]
        return row[o : o + s.out_features * self.rank].view(s.out_features, self.rank)

    def b_stack(self, rows: torch.Tensor, i: int) -> torch.Tensor:
        """Slot i's B of every session as one strided view [S, out_features, r] of rows [S, b_numel]."""
        s, o = self.slots[i], self.b_offsets[i]
        return rows[:, o : o + s.out_features * self.rank].unflatten(1, (s.out_features, self.rank))

    def a_view(self, a: torch.Tensor, i: int) -> torch.Tensor:
        """Slot i's A [r, in_features] as a view of an A buffer [a_numel]."""
        s, o = self.slots[i], self.a_offsets[i]
        return a[o : o + self.rank * s.in_features].view(self.rank, s.in_features)

    def a_name(self, i: int) -> str:
        return f"{self.slots[i].prefix}.lora_A"

    def b_name(self, i: int) -> str:
        return f"{self.slots[i].prefix}.lora_B"

    def named_views(self, a: torch.Tensor, b_row: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"layers.L.mlp.T.lora_A": [r, in], "...lora_B": [out, r]} over an A buffer and one B row."""
        out = {}
        for i in range(len(self.slots)):
            out[self.a_name(i)] = self.a_view(a, i)
            out[self.b_name(i)] = self.b_view(b_row, i)
        return out

    def describe(self) -> dict[str, str]:
        """String metadata identifying this layout (for file headers)."""
        return {
            "rank": str(self.rank),
            "layers": ",".join(str(x) for x in sorted({s.layer for s in self.slots})),
            "targets": ",".join(dict.fromkeys(s.target for s in self.slots)),
            "shapes": ";".join(f"{s.prefix}={s.out_features}x{s.in_features}" for s in self.slots),
        }


def _offsets(sizes: list[int]) -> list[int]:
    """[0, s0, s0 + s1, ...]: start offsets of consecutive blocks, then the total."""
    out = [0]
    for n in sizes:
        out.append(out[-1] + n)
    return out
