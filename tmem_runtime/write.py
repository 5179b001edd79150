"""One memory write, as data: the frozen trunk once per write, the adapted layers once per step.

    examples ──trunk (layers below the first adapted one), no grad, once──> TrunkCache
             (tokens every example shares — the chat template's preamble — run once, batch 1)
    per step: rows of the cache ──adapted layers (fast weights)──> final norm ──> lm_head at the
             loss positions only ──> cross-entropy (mean over non-ignored tokens, as HF computes it)

The backward stops at the first adapted layer because the cached trunk output carries no grad.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tmem_runtime.decoder import Decoder, PrefixKV

IGNORE_INDEX = -100
MIN_SHARED_PREFIX = 4


@dataclass
class TrunkCache:
    """Trunk outputs (hidden states entering the first adapted layer) of N right-padded examples.

    prefix_hidden [1, P, H] (None when P == 0): the shared prefix, computed once.
    hidden [N, S, H]: each example's tokens after the prefix, right padded; lengths [N] real tokens.
    labels [N, P + S]: unshifted labels of the whole sequence, IGNORE_INDEX on padding.
    """

    prefix_hidden: torch.Tensor | None
    hidden: torch.Tensor
    lengths: torch.Tensor
    labels: torch.Tensor

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix_hidden is None else self.prefix_hidden.shape[1]

    def __len__(self) -> int:
        return self.hidden.shape[0]


def right_padded_lengths(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Per-row lengths [B] when `attention_mask` [B, T] is right padding (1...1 0...0), else None."""
    lengths = attention_mask.sum(dim=1)
    expected = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None] < lengths[:, None]
    return lengths if torch.equal(attention_mask.bool(), expected) else None


def shared_prefix_len(input_ids: torch.Tensor, lengths: torch.Tensor) -> int:
    """Tokens all rows share at the start, leaving every row at least one token of its own.

    input_ids [N, T], lengths [N]. 0 when there is one row or the prefix is too short to pay off.
    """
    if input_ids.shape[0] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(dim=0)
    differs = (~same).nonzero()
    p = int(differs[0]) if len(differs) else input_ids.shape[1]
    p = min(p, int(lengths.min()) - 1)
    return p if p >= MIN_SHARED_PREFIX else 0


@torch.no_grad()
def encode_trunk(
    decoder: Decoder,
    first_adapted: int,
    input_ids: torch.Tensor,
    lengths: torch.Tensor,
    labels: torch.Tensor,
    rows_per_chunk: int = 16,
) -> TrunkCache:
    """Run the frozen layers [0, first_adapted) once. input_ids/labels [N, T] right padded, lengths [N]."""
    p = shared_prefix_len(input_ids, lengths)
    prefix_hidden, prefix_kv = None, None
    if p:
        prefix_kv = PrefixKV()
        prefix_hidden = decoder.run_layers(decoder.embed(input_ids[:1, :p]), 0, first_adapted, prefix=prefix_kv)
        prefix_kv.recording = False
    suffix_lengths = lengths - p
    s = int(suffix_lengths.max())
    n = input_ids.shape[0]
    hidden = None
    for lo in range(0, n, rows_per_chunk):
        hi = min(n, lo + rows_per_chunk)
        chunk_len = suffix_lengths[lo:hi]
        width = int(chunk_len.max())
        ids = input_ids[lo:hi, p : p + width]
        padded = None if bool((chunk_len == width).all()) else chunk_len
        h = decoder.run_layers(decoder.embed(ids), 0, first_adapted, lengths=padded, prefix=prefix_kv)
        if hidden is None:
            hidden = h.new_zeros(n, s, h.shape[-1])
        hidden[lo:hi, :width] = h
    labels = labels[:, : p + s].clone()
    valid = torch.arange(p + s, device=labels.device)[None] < lengths[:, None]
    labels[~valid] = IGNORE_INDEX
    return TrunkCache(prefix_hidden, hidden, suffix_lengths, labels)


def adapted_loss(decoder: Decoder, first_adapted: int, cache: TrunkCache, rows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of cache rows `rows` [b] through layers [first_adapted, L).

    Logits are computed only at positions whose (shifted) label is not IGNORE_INDEX.
    """
    lengths = cache.lengths[rows]
    s = int(lengths.max())
    p = cache.prefix_len
    hidden = cache.hidden[rows, :s]
    prefix_kv = None
    parts = []
    if p:
        prefix_kv = PrefixKV()
        ph = decoder.run_layers(cache.prefix_hidden, first_adapted, len(decoder.layers), prefix=prefix_kv)
        prefix_kv.recording = False
        parts.append(ph.expand(len(rows), -1, -1))
    padded = None if bool((lengths == s).all()) else lengths
    parts.append(decoder.run_layers(hidden, first_adapted, len(decoder.layers), lengths=padded, prefix=prefix_kv))
    full = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # [b, P+S, H]
    targets = cache.labels[rows, 1 : p + s]  # position t predicts token t+1
    row_idx, pos_idx = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    logits = decoder.logits(full[row_idx, pos_idx])
    return F.cross_entropy(logits, targets[row_idx, pos_idx])
