"""Where every adapter tensor lives in the one flat buffer.

All B matrices come first (the trainable region of the default write), then all A matrices:

    [ B(l0,gate) B(l0,up) B(l0,down) B(l1,gate) ... | A(l0,gate) A(l0,up) A(l0,down) ... ]

    B(l, t): [out_features, r]        A(l, t): [r, in_features]

The buffer is allocated once at attach; every module's A and B are views into it, and optimizer state
and gradients live in buffers of the same layout. Reset, swap and save are single flat operations.
"""

from __future__ import annotations

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
    """Offsets of every (layer, target)'s A and B inside one flat buffer of `numel` elements."""

    def __init__(self, slots: list[AdapterSlot], rank: int) -> None:
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        for s in slots:
            if rank > min(s.out_features, s.in_features):
                raise ValueError(f"rank {rank} exceeds {s.prefix}'s smaller side ({s.out_features} x {s.in_features})")
        self.slots = list(slots)
        self.rank = rank
        offset = 0
        self.b_offsets: list[int] = []
        for s in self.slots:
            self.b_offsets.append(offset)
            offset += s.out_features * rank
        self.b_numel = offset
        self.a_offsets: list[int] = []
        for s in self.slots:
            self.a_offsets.append(offset)
            offset += rank * s.in_features
        self.numel = offset

    def allocate(self, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """A zeroed flat buffer of this layout."""
        return torch.zeros(self.numel, dtype=dtype, device=device)

    def b_view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        """Slot i's B [out_features, r] as a view of `flat` (a full buffer, or its B region)."""
        s, o = self.slots[i], self.b_offsets[i]
        return flat[o : o + s.out_features * self.rank].view(s.out_features, self.rank)

    def a_view(self, flat: torch.Tensor, i: int, base: int = 0) -> torch.Tensor:
        """Slot i's A [r, in_features] as a view of `flat`; `base` is flat's offset in the buffer."""
        s, o = self.slots[i], self.a_offsets[i] - base
        return flat[o : o + self.rank * s.in_features].view(self.rank, s.in_features)

    def named_views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"layers.L.mlp.T.lora_A": view, "...lora_B": view} over a full flat buffer."""
        out = {}
        for i, s in enumerate(self.slots):
            out[f"{s.prefix}.lora_A"] = self.a_view(flat, i)
            out[f"{s.prefix}.lora_B"] = self.b_view(flat, i)
        return out

    def describe(self) -> dict[str, str]:
        """String metadata identifying this layout (for file headers)."""
        return {
            "rank": str(self.rank),
            "layers": ",".join(str(x) for x in sorted({s.layer for s in self.slots})),
            "targets": ",".join(dict.fromkeys(s.target for s in self.slots)),
            "shapes": ";".join(f"{s.prefix}={s.out_features}x{s.in_features}" for s in self.slots),
        }
