"""Trunk outputs of examples written before, kept so that writing them again skips the frozen layers.

A write runs the frozen trunk (everything below the first adapted MLP) once over its examples
(`write.encode_trunk`). Writes that replay earlier flashcards (the agent's fast-weight channel,
`tmem serve`) would run it again over the same tokens every time, and every write runs it over the
chat template's preamble that all its cards share. `TrunkRows` keeps each example's trunk output, keyed
by its tokens, and the last few shared prefixes' outputs with their keys and values; the least recently
used rows go first once `max_bytes` are held (then the prefixes), and everything goes when a trunk
weight changes (in place, replaced, moved or cast).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import nn

from tmem_runtime.decoder import PrefixKV
from tmem_runtime.tensor_stamp import tensors_stamp

MAX_PREFIXES = 4  # shared prefixes kept (a server's preambles: one per chat template and card format)


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
        self.prefixes: OrderedDict[tuple[int, ...], tuple[torch.Tensor, PrefixKV, int]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0  # examples
        self.prefix_hits = self.prefix_misses = 0
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

    COUNTERS = ("rows_bytes", "rows_hits", "rows_misses", "prefix_hits", "prefix_misses")

    def counters(self) -> dict[str, int]:
        """Bytes kept, and examples / shared prefixes whose trunk a write read back (hits) or ran (misses)."""
        values = (self.bytes, self.hits, self.misses, self.prefix_hits, self.prefix_misses)
        return dict(zip(self.COUNTERS, values))

    def clear(self) -> None:
        self.rows.clear()
        self.prefixes.clear()
        self.bytes = 0

    def get_prefix(self, ids: tuple[int, ...]) -> tuple[torch.Tensor, PrefixKV] | None:
        """The trunk output [1, P, H] of shared prefix `ids` (P tokens) and its keys/values (a PrefixKV that
        extends rows, never to be recorded into), or None if not kept. Both are read-only."""
        entry = self.prefixes.get(ids)
        if entry is None:
            self.prefix_misses += 1
            return None
        self.prefixes.move_to_end(ids)
        self.prefix_hits += 1
        return entry[0], entry[1]

    def put_prefix(self, ids: tuple[int, ...], hidden: torch.Tensor, kv: PrefixKV) -> None:
        """Keep prefix `ids`'s trunk output `hidden` [1, P, H] and `kv` (recorded over it by the trunk)."""
        layers = {layer: (k.clone(), v.clone()) for layer, (k, v) in kv.kv.items()}
        tensors = [hidden, *(t for pair in layers.values() for t in pair)]
        size = sum(t.numel() * t.element_size() for t in tensors)
        if size > self.max_bytes:
            return
        kept = PrefixKV()
        kept.kv, kept.recording = layers, False
        old = self.prefixes.pop(ids, None)
        if old is not None:
            self.bytes -= old[2]
        self.prefixes[ids] = (hidden.clone(), kept, size)
        self.bytes += size
        if len(self.prefixes) > MAX_PREFIXES:
            self.bytes -= self.prefixes.popitem(last=False)[1][2]
        self._shrink()

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
        self._shrink()

    def _shrink(self) -> None:
        """Drop the least recently used rows, then prefixes, until at most `max_bytes` are held."""
        while self.bytes > self.max_bytes and self.rows:
            _, (_, dropped) = self.rows.popitem(last=False)
            self.bytes -= dropped.numel() * dropped.element_size()
        while self.bytes > self.max_bytes and self.prefixes:
            self.bytes -= self.prefixes.popitem(last=False)[1][2]
