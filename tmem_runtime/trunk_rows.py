"""Trunk outputs of examples written before, kept so that writing them again skips the frozen layers.

A write runs the frozen trunk (everything below the first adapted MLP) once over its examples
(`write.encode_trunk`). Writes that replay earlier flashcards (the agent's fast-weight channel,
`tmem serve`) would run it again over the same tokens every time. `TrunkRows` keeps each example's
trunk output, keyed by its tokens; the least recently used go first once `max_bytes` are held, and
everything goes when a trunk weight changes (in place, replaced, moved or cast).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import nn

from tmem_runtime.tensor_stamp import tensors_stamp


class TrunkRows:
    """Per example (its token ids), the trunk output of its tokens from position `start` on, [L - start, H].

    trunk: the modules whose weights the outputs depend on (the embedding, the frozen layers, the first
    adapted layer's input norm and attention).
    """

    def __init__(self, trunk: Iterable[nn.Module], max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
        self.trunk = list(trunk)
        self.max_bytes = max_bytes
        self.rows: OrderedDict[tuple[int, ...], tuple[int, torch.Tensor]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self._stamp = self._weights_stamp()

    def _weights_stamp(self) -> tuple:
        """What the trunk's weights are now (parameters read afresh: a replaced one is seen)."""
        return tensors_stamp(p for module in self.trunk for p in module.parameters())

    def validate(self) -> None:
        """Forget every row if a trunk weight changed since the rows were computed (call before a write)."""
        stamp = self._weights_stamp()
        if stamp != self._stamp:
            self.clear()
            self._stamp = stamp

    def clear(self) -> None:
        self.rows.clear()
        self.bytes = 0

    def get(self, ids: tuple[int, ...], start: int) -> torch.Tensor | None:
        """The trunk output of example `ids` at positions [start, len(ids)), or None if not kept."""
        entry = self.rows.get(ids)
        if entry is None or entry[0] > start:
            self.misses += 1
            return None
        self.rows.move_to_end(ids)
        self.hits += 1
        return entry[1][start - entry[0] :]

    def put(self, ids: tuple[int, ...], start: int, hidden: torch.Tensor) -> None:
        """Keep `hidden` [len(ids) - start, H], the trunk output of example `ids` from position `start` on."""
        size = hidden.numel() * hidden.element_size()
        if size > self.max_bytes:
            return
        old = self.rows.pop(ids, None)
        if old is not None:
            self.bytes -= old[1].numel() * old[1].element_size()
        self.rows[ids] = (start, hidden.clone())  # a row of its own, not a view keeping a whole chunk alive
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self.rows.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()
