"""One memory write, as data: the frozen trunk once per write, the adapted layers once per step.

    examples ──trunk (layers below the first adapted one), no grad, once──> TrunkCache
             (tokens every example shares — the chat template's preamble — run once, batch 1)
    per step: rows of the cache ──adapted layers (fast weights; the shared prefix again once, its MLP
             tokens joined to the rows' so each MLP runs once)──> final norm ──> lm_head at the
             loss positions only ──> cross-entropy (mean over non-ignored tokens, as HF computes it)

Each step is planned on the host before the first one runs (`plan_steps`), so the step loop never
reads a device value: on CUDA it replays as graphs (`cuda_graphs`).

The backward stops at the first adapted layer because the cached trunk output carries no grad.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    hidden [N, S, H]: each example's tokens after the prefix, right padded.
    lengths [N] (CPU): real tokens after the prefix. labels [N, P + S] (CPU): unshifted labels of the
    whole sequence, IGNORE_INDEX on padding. Both stay on the host: steps are planned from them
    without reading the device.
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


@dataclass
class StepBatch:
    """What one write step reads from a TrunkCache, planned on the host so the step never syncs.

    rows [b]: cache rows. width: suffix tokens the step runs (<= the cache's S). lengths [b]: real
    suffix tokens per row, None when no row is padded within `width` (plain causal attention
    when there is no prefix either). loss_index [K]: flat positions in [b, P + width] whose next token is a target;
    targets [K]: those tokens, IGNORE_INDEX on padding slots. All on the compute device.
    """

    rows: torch.Tensor
    width: int
    lengths: torch.Tensor | None
    loss_index: torch.Tensor
    targets: torch.Tensor

    @property
    def signature(self) -> tuple[int, int, bool, int]:
        """Steps with equal signatures run the same kernels on same-shaped tensors (one CUDA graph)."""
        return (self.rows.shape[0], self.width, self.lengths is None, self.targets.shape[0])

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.rows, self.lengths, self.loss_index, self.targets) if t is not None]

    def clone(self) -> StepBatch:
        lengths = None if self.lengths is None else self.lengths.clone()
        return StepBatch(self.rows.clone(), self.width, lengths, self.loss_index.clone(), self.targets.clone())

    def copy_(self, other: StepBatch) -> None:
        """Copy `other`'s tensors into this batch's (same signature), device to device."""
        if other.signature != self.signature:
            raise ValueError(f"step batch signature {other.signature} != {self.signature}")
        for dst, src in zip(self.tensors(), other.tensors()):
            dst.copy_(src, non_blocking=True)


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
    device: torch.device,
    rows_per_chunk: int = 16,
) -> TrunkCache:
    """Run the frozen layers [0, first_adapted) once on `device`.

    input_ids/labels [N, T] right padded, lengths [N]: host (CPU) tensors.
    """
    input_ids, lengths, labels = input_ids.cpu(), lengths.cpu(), labels.cpu()
    p = shared_prefix_len(input_ids, lengths)
    prefix_hidden, prefix_kv = None, None
    if p:
        prefix_kv = PrefixKV()
        prefix_ids = input_ids[:1, :p].to(device)
        prefix_hidden = decoder.run_layers(decoder.embed(prefix_ids), 0, first_adapted, prefix=prefix_kv)
        prefix_kv.recording = False
    suffix_lengths = lengths - p
    s = int(suffix_lengths.max())
    n = input_ids.shape[0]
    hidden = None
    for lo in range(0, n, rows_per_chunk):
        hi = min(n, lo + rows_per_chunk)
        chunk_len = suffix_lengths[lo:hi]
        width = int(chunk_len.max())
        ids = input_ids[lo:hi, p : p + width].to(device)
        padded = None if bool((chunk_len == width).all()) else chunk_len.to(device)
        h = decoder.run_layers(decoder.embed(ids), 0, first_adapted, lengths=padded, prefix=prefix_kv)
        if hidden is None:
            hidden = h.new_zeros(n, s, h.shape[-1])
        hidden[lo:hi, :width] = h
    labels = labels[:, : p + s].clone()
    valid = torch.arange(p + s)[None] < lengths[:, None]
    labels[~valid] = IGNORE_INDEX
    return TrunkCache(prefix_hidden, hidden, suffix_lengths, labels)


def plan_step(
    cache: TrunkCache,
    rows: Sequence[int] | torch.Tensor,
    device: torch.device,
    width: int | None = None,
    num_targets: int | None = None,
) -> StepBatch:
    """The StepBatch of cache rows `rows`, from the cache's host-side lengths and labels.

    By default the step runs exactly the tokens those rows need. `width` (>= their longest row) and
    `num_targets` (>= their target count) fix the shapes instead, so that every step of a write can
    replay one CUDA graph; padding targets are IGNORE_INDEX and change no loss.
    """
    rows = torch.as_tensor(rows, dtype=torch.long).cpu()
    lengths = cache.lengths[rows]
    longest = int(lengths.max())
    width = longest if width is None else width
    if width < longest:
        raise ValueError(f"width {width} is shorter than the longest row ({longest} tokens)")
    p = cache.prefix_len
    targets = cache.labels[rows, 1 : p + width]  # position t predicts token t + 1
    row_idx, pos_idx = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    loss_index, picked = row_idx * (p + width) + pos_idx, targets[row_idx, pos_idx]
    if num_targets is not None:
        if num_targets < len(picked):
            raise ValueError(f"num_targets {num_targets} < the {len(picked)} targets of these rows")
        pad = num_targets - len(picked)
        loss_index = torch.cat([loss_index, loss_index.new_zeros(pad)])
        picked = torch.cat([picked, picked.new_full((pad,), IGNORE_INDEX)])
    padded = num_targets is not None or not bool((lengths == width).all())
    return StepBatch(
        rows.to(device),
        width,
        lengths.to(device) if padded else None,
        loss_index.to(device),
        picked.to(device),
    )


def plan_steps(
    cache: TrunkCache, schedule: Sequence[Sequence[int]], device: torch.device, fixed_shapes: bool = False
) -> list[StepBatch]:
    """One StepBatch per entry of `schedule` (cache rows per step).

    fixed_shapes: every step runs the cache's full width with the schedule's largest target count,
    so steps differ at most in their row count (for CUDA graphs).
    """
    if not fixed_shapes:
        return [plan_step(cache, rows, device) for rows in schedule]
    width = cache.hidden.shape[1]
    counts = [int((cache.labels[list(rows), 1:] != IGNORE_INDEX).sum()) for rows in schedule]
    return [plan_step(cache, rows, device, width, max(counts)) for rows in schedule]


def adapted_loss(decoder: Decoder, first_adapted: int, cache: TrunkCache, batch: StepBatch) -> torch.Tensor:
    """Mean next-token cross-entropy of one planned step through layers [first_adapted, L).

    Logits are computed only at the step's target positions. Reads no device value on the host.
    """
    return adapted_losses(decoder, first_adapted, cache, batch)[0]


def adapted_losses(
    decoder: Decoder, first_adapted: int, cache: TrunkCache, batch: StepBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """`adapted_loss` and each row's own mean loss: (loss [], row_losses [b]). No host read."""
    p, stop = cache.prefix_len, len(decoder.layers)
    hidden = cache.hidden[:, : batch.width].index_select(0, batch.rows)
    if p:
        prefix, rows = decoder.run_layers_after_prefix(cache.prefix_hidden, hidden, first_adapted, stop, batch.lengths)
        full = torch.cat([prefix.expand(rows.shape[0], -1, -1), rows], dim=1)  # [b, P+width, H]
    else:
        full = decoder.run_layers(hidden, first_adapted, stop, lengths=batch.lengths)
    picked = full.reshape(-1, full.shape[-1]).index_select(0, batch.loss_index)
    token = F.cross_entropy(decoder.logits(picked), batch.targets, ignore_index=IGNORE_INDEX, reduction="none")
    row = torch.div(batch.loss_index, p + batch.width, rounding_mode="floor")
    return token_loss_means(token, batch.targets != IGNORE_INDEX, row, batch.rows.shape[0])


def token_loss_means(
    token_losses: torch.Tensor, valid: torch.Tensor, row: torch.Tensor, n_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of token losses [K] over the valid ones, and per row: (loss [], row_losses [n_rows]).

    valid [K] bool, row [K]: each token's row in [0, n_rows). A row without valid tokens gets 0.
    The mean is cross-entropy's own with ignore_index (sum over valid tokens / their count).
    """
    token_losses = token_losses * valid
    count = valid.to(token_losses.dtype)
    per_row = token_losses.new_zeros(n_rows).index_add_(0, row, token_losses)
    per_row_count = count.new_zeros(n_rows).index_add_(0, row, count)
    return token_losses.sum() / count.sum(), per_row / per_row_count.clamp_min(1)
