"""One memory write, as data: the frozen trunk once per write, the adapted layers once per step.

    examples ──trunk (everything below the first adapted MLP: the layers under it and its own layer's
             attention), no grad, once──> TrunkCache
             (tokens every example shares — the chat template's preamble — run once, batch 1)
    per step: rows of the cache ──adapted layers (fast weights; the shared prefix again once, its MLP
             tokens joined to the rows' real tokens, never their padding, so each MLP runs once)──>
             final norm ──> lm_head at the loss positions only ──> cross-entropy (mean over
             non-ignored tokens, as HF computes it)

Each step is planned on the host before the first one runs (`plan_steps`), so the step loop never
reads a device value: on CUDA it replays as graphs (`cuda_graphs`).

The backward stops at the first adapted MLP because the cached trunk output carries no grad. A
pool keeps its examples' trunk outputs (`trunk_rows.TrunkRows`), so a later write that trains them
again (replayed flashcards) runs the trunk over its new examples only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from tmem_kernels import linear_cross_entropy_rows
from tmem_runtime.attention_precision import write_step_attention
from tmem_runtime.decoder import Decoder, PrefixKV
from tmem_runtime.trunk_rows import TrunkRows
from tmem_runtime.uploads import upload, upload_one

IGNORE_INDEX = -100
CHUNKED_HEAD_LOGITS = 1 << 27  # K x V from which a step's head loss runs in chunks off the CPU (512 MB of fp32 logits)
MIN_SHARED_PREFIX = 4
TARGET_BUCKET = 64  # fixed-shape steps pad their target count to a multiple of this (CUDA graphs, see plan_steps)
TOKEN_BUCKET = 64  # ... and their adapted MLPs' token count


@dataclass
class TrunkCache:
    """Trunk outputs (the residual stream entering the first adapted MLP) of N right-padded examples.

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

    A step trains one or more sessions (groups): the rows of group g are `groups[g]` consecutive
    entries of `rows` and train workspace session `slots[g]`.

    rows [b]: cache rows. width: suffix tokens the step runs (<= the cache's S). lengths [b]: real
    suffix tokens per row, None when no row is padded within `width` (plain causal attention
    when there is no prefix either). loss_index [K]: flat positions in [b, P + width] whose next
    token is a target; targets [K]: those tokens, IGNORE_INDEX on padding slots. target_weight [K]:
    1 / (targets of its group), so each group's loss is its own mean, as if written alone;
    target_group [K]: each target's group. row_prefix [b]: each row's group, when there are several
    groups and a shared prefix (each group then runs its own copy of the prefix). token_index [T]:
    the rows' real tokens as flat positions in [b, width], the only row tokens the adapted MLPs run
    (fixed shapes: followed by one padding position repeated up to a fixed count); None: every position
    (no row padded). seg_indptr / seg_slot: the adapted MLP's token segments (`mlp_token_segments`) as
    int64 tensors. Tensors on the compute device; groups and slots on the host. host_segments: the same
    segments on the host (kernels that read them on the host take these: no read back from the device).
    device_segments: the step's kernels read the segments from seg_indptr / seg_slot on the device (the
    engine's `device_segments`, which the step's binding follows: the Triton backend): the group sizes are
    then values of the step's tensors, not host decisions, and its signature keeps only their count.
    """

    rows: torch.Tensor
    width: int
    lengths: torch.Tensor | None
    loss_index: torch.Tensor
    targets: torch.Tensor
    target_weight: torch.Tensor
    target_group: torch.Tensor
    row_prefix: torch.Tensor | None = None
    groups: tuple[int, ...] = ()
    slots: tuple[int, ...] = ()
    seg_indptr: torch.Tensor | None = None
    seg_slot: torch.Tensor | None = None
    token_index: torch.Tensor | None = None
    host_segments: tuple[torch.Tensor, torch.Tensor] | None = None
    device_segments: bool = False

    TENSORS = ("rows", "lengths", "loss_index", "targets", "target_weight", "target_group", "row_prefix",
               "seg_indptr", "seg_slot", "token_index")  # fmt: skip

    def tensors_or_none(self) -> list[torch.Tensor | None]:
        """The batch's tensor fields in TENSORS order (None where absent)."""
        return [getattr(self, name) for name in self.TENSORS]

    def with_tensors(self, tensors: Sequence[torch.Tensor | None], **changes: object) -> StepBatch:
        """This batch with its tensor fields (TENSORS order) replaced by `tensors`."""
        return replace(self, **dict(zip(self.TENSORS, tensors)), **changes)

    @property
    def signature(self) -> tuple:
        """Steps with equal signatures run the same kernels on same-shaped tensors (one CUDA graph).

        The group sizes enter in full where kernels take the segments on the host (which split their work
        there); with `device_segments` only the group count does: a step uses the sizes on the host only
        through their count (the prefix copies, the per-group losses [G], the sessions updated, the segments'
        count G, which sets the kernels' grids), and how its rows and tokens split among the groups lives in
        its tensors (rows, row_prefix, target_group, target_weight, seg_indptr), which a replay copies in.
        So steps of a batched write whose rows split differently among its sessions share one graph."""
        groups = len(self.groups) if self.device_segments else self.groups
        shape = (self.rows.shape[0], self.width, self.lengths is None, self.targets.shape[0], groups, self.slots)
        return shape + (None if self.token_index is None else self.token_index.shape[0],)

    def tensors(self) -> list[torch.Tensor]:
        optional = (self.lengths, self.row_prefix, self.token_index)
        fixed = [self.rows, self.loss_index, self.targets, self.target_weight, self.target_group, self.seg_indptr,
                 self.seg_slot]  # fmt: skip
        return fixed + [t for t in optional if t is not None]

    def clone(self) -> StepBatch:
        def c(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.clone()

        return self.with_tensors([c(t) for t in self.tensors_or_none()])

    def copy_(self, other: StepBatch) -> None:
        """Copy `other`'s tensors into this batch's (same signature), device to device, and take its host
        fields that the signature may leave out (its group sizes, its host segments)."""
        if other.signature != self.signature:
            raise ValueError(f"step batch signature {other.signature} != {self.signature}")
        for dst, src in zip(self.tensors(), other.tensors()):
            dst.copy_(src, non_blocking=True)
        self.groups, self.host_segments = other.groups, other.host_segments


def mlp_token_segments(prefix_len: int, group_tokens: Sequence[int], slots: Sequence[int]) -> tuple[list, list]:
    """(indptr, slots) over an adapted MLP's tokens as `Decoder.run_adapted_layers` lays them out: each
    group's prefix copy (prefix_len tokens each), then each group's row tokens (group_tokens[g])."""
    sizes = ([prefix_len] * len(slots) if prefix_len else []) + list(group_tokens)
    owners = (list(slots) if prefix_len else []) + list(slots)
    indptr = [0]
    for n in sizes:
        indptr.append(indptr[-1] + n)
    return indptr, owners


def right_padded_lengths(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Per-row lengths [B] when `attention_mask` [B, T] is right padding (1...1 0...0), else None.
    Read on the host: a device mask is copied there first (one wait for the device)."""
    attention_mask = attention_mask.cpu()
    lengths = attention_mask.sum(dim=1)
    expected = torch.arange(attention_mask.shape[1])[None] < lengths[:, None]
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
    chunk_tokens: int = 4096,
    kept: TrunkRows | None = None,
) -> TrunkCache:
    """Run the frozen trunk (`Decoder.run_trunk`: layers [0, first_adapted) and that layer's attention) once
    on `device`.

    input_ids/labels [N, T] right padded, lengths [N]: host (CPU) tensors. The rows run in chunks of about
    `chunk_tokens` padded tokens (at least one row), which bounds the trunk's activations. kept: trunk
    outputs of examples and shared prefixes seen before (reused unless a trunk weight changed since, and
    this call's added), or None.
    """
    input_ids, lengths, labels = input_ids.cpu(), lengths.cpu(), labels.cpu()
    if kept is not None:
        kept.validate()
    p = shared_prefix_len(input_ids, lengths)
    prefix_hidden, prefix_kv = None, None
    if p:
        key = tuple(input_ids[0, :p].tolist())
        found = None if kept is None else kept.get_prefix(key)
        if found is None:
            prefix_kv = PrefixKV()
            prefix_ids = upload_one(input_ids[:1, :p], device)
            prefix_hidden = decoder.run_trunk(decoder.embed(prefix_ids), first_adapted, prefix=prefix_kv)
            prefix_kv.recording = False
            if kept is not None:
                kept.put_prefix(key, prefix_hidden, prefix_kv)
        else:
            prefix_hidden, prefix_kv = found
    suffix_lengths = lengths - p
    n, s = input_ids.shape[0], int(suffix_lengths.max())
    keys = [tuple(input_ids[i, : lengths[i]].tolist()) for i in range(n)] if kept is not None else []
    known = {i: row for i in range(len(keys)) if (row := kept.get(keys[i], p)) is not None}
    todo = [i for i in range(n) if i not in known]
    hidden = None
    widest = int(suffix_lengths[todo].max()) if todo else 1  # (every row has a token past the prefix)
    rows_per_chunk = max(1, chunk_tokens // widest)
    for lo in range(0, len(todo), rows_per_chunk):
        rows = todo[lo : lo + rows_per_chunk]
        chunk_len = suffix_lengths[rows]
        width = int(chunk_len.max())
        ragged = not bool((chunk_len == width).all())  # (host tensors: no device read)
        ids, padded, at = upload([input_ids[rows, p : p + width], chunk_len if ragged else None,
                                  torch.tensor(rows)], device)  # fmt: skip
        h = decoder.run_trunk(decoder.embed(ids), first_adapted, lengths=padded, prefix=prefix_kv)
        if hidden is None:
            hidden = h.new_zeros(n, s, h.shape[-1])
        hidden[at, :width] = h
        for j, i in enumerate(rows if kept is not None else ()):
            kept.put(keys[i], p, h[j, : int(chunk_len[j])])
    for i, row in known.items():
        if hidden is None:
            hidden = row.new_zeros(n, s, row.shape[-1])
        hidden[i, : row.shape[0]] = row
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
    num_tokens: int | None = None,
) -> StepBatch:
    """The StepBatch of cache rows `rows` training one session (workspace slot 0)."""
    return plan_group_step(cache, [(0, rows)], device, width, num_targets, num_tokens)


def plan_group_step(
    cache: TrunkCache,
    groups: Sequence[tuple[int, Sequence[int] | torch.Tensor]],
    device: torch.device | None,
    width: int | None = None,
    num_targets: int | None = None,
    num_tokens: int | None = None,
    device_segments: bool = False,
) -> StepBatch:
    """The StepBatch of `groups` [(workspace slot, cache rows), ...], from the cache's host-side data.

    By default the step runs exactly the tokens those rows need. `width` (>= their longest row),
    `num_targets` (>= their target count) and `num_tokens` (>= their real tokens) fix the shapes
    instead, so that every step of a write can replay one CUDA graph: padding targets are IGNORE_INDEX
    with weight 0, and the adapted MLPs run the real tokens then, up to num_tokens (at most rows x
    width), one padding position again and again (its value reaches no real token, so its gradient is
    exactly 0); none of it changes a loss or a gradient.
    device None: the StepBatch on the host (`upload_steps` moves it). device_segments: as in StepBatch.
    """
    rows = torch.cat([torch.as_tensor(r, dtype=torch.long).cpu().reshape(-1) for _, r in groups])
    sizes = [len(torch.as_tensor(r).reshape(-1)) for _, r in groups]
    lengths = cache.lengths[rows]
    longest = int(lengths.max())
    width = longest if width is None else width
    if width < longest:
        raise ValueError(f"width {width} is shorter than the longest row ({longest} tokens)")
    p = cache.prefix_len
    targets = cache.labels[rows, 1 : p + width]  # position t predicts token t + 1
    row_idx, pos_idx = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    loss_index, picked = row_idx * (p + width) + pos_idx, targets[row_idx, pos_idx]
    row_group = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor(sizes))
    target_group = row_group[row_idx]
    counts = torch.bincount(target_group, minlength=len(groups))
    if bool((counts == 0).any()):
        raise ValueError("a write step has a session with no trainable token")
    weight = 1.0 / counts.double()[target_group]
    if num_targets is not None:
        if num_targets < len(picked):
            raise ValueError(f"num_targets {num_targets} < the {len(picked)} targets of these rows")
        pad = num_targets - len(picked)
        loss_index = torch.cat([loss_index, loss_index.new_zeros(pad)])
        picked = torch.cat([picked, picked.new_full((pad,), IGNORE_INDEX)])
        weight = torch.cat([weight, weight.new_zeros(pad)])
        target_group = torch.cat([target_group, target_group.new_zeros(pad)])
    fixed = num_targets is not None
    padded = fixed or not bool((lengths == width).all())
    token_index, row_tokens = None, torch.full_like(lengths, width)
    if padded:  # the MLPs skip the padding
        real = (torch.arange(width)[None] < lengths[:, None]).reshape(-1)
        token_index, row_tokens = real.nonzero().squeeze(1), lengths
    group_tokens = torch.zeros(len(groups), dtype=torch.long).index_add_(0, row_group, row_tokens)
    if num_tokens is not None and token_index is not None:  # a fixed token count (see the docstring)
        if num_tokens < len(token_index):
            raise ValueError(f"num_tokens {num_tokens} < the {len(token_index)} real tokens of these rows")
        pad = min(num_tokens, real.numel()) - len(token_index)
        if pad > 0:  # (then some position is padding)
            token_index = torch.cat([token_index, (~real).nonzero()[0].expand(pad)])
            group_tokens[-1] += pad  # the last group's segment runs them: B gets their zero gradient
    indptr, slots = mlp_token_segments(p, group_tokens.tolist(), [slot for slot, _ in groups])
    host = StepBatch(
        rows,
        width,
        lengths if padded else None,
        loss_index,
        picked,
        weight.float(),
        target_group,
        row_group if p and len(groups) > 1 else None,
        tuple(sizes),
        tuple(slot for slot, _ in groups),
        torch.tensor(indptr, dtype=torch.long),
        torch.tensor(slots, dtype=torch.long),
        token_index,
        device_segments=device_segments,
    )
    return host if device is None else upload_steps([host], device)[0]


def upload_steps(steps: Sequence[StepBatch], device: torch.device) -> list[StepBatch]:
    """Host-planned steps on `device`, all their tensors in one copy that does not wait for the device
    (`uploads.upload`); each keeps its host segments (`host_segments`)."""
    fields = [s.tensors_or_none() for s in steps]
    flat = upload([t for f in fields for t in f], device)
    out, k = [], 0
    for s, f in zip(steps, fields):
        moved = flat[k : k + len(f)]
        k += len(f)
        out.append(s.with_tensors(moved, host_segments=(s.seg_indptr, s.seg_slot)))
    return out


def plan_steps(
    cache: TrunkCache,
    schedule: Sequence[Sequence[int]] | Sequence[Sequence[tuple[int, Sequence[int]]]],
    device: torch.device,
    fixed_shapes: bool = False,
    device_segments: bool = False,
) -> list[StepBatch]:
    """One StepBatch per entry of `schedule`: cache rows of one session, or [(slot, rows), ...].

    fixed_shapes: every step runs the cache's full width, with the schedule's largest target count
    rounded up to TARGET_BUCKET and its largest real token count rounded up to TOKEN_BUCKET (the adapted
    MLPs' rows), so steps differ at most in their row counts and groups, and writes of similar cards in
    their shapes not at all (for CUDA graphs). device_segments: the kernels read the segments on the
    device (as in StepBatch: then steps that differ only in how their rows split among the sessions have
    one signature).
    """
    steps = [list(s) if s and isinstance(s[0], tuple) else [(0, s)] for s in schedule]
    if not fixed_shapes:
        plans = [plan_group_step(cache, groups, None, device_segments=device_segments) for groups in steps]
        return upload_steps(plans, device)
    width = cache.hidden.shape[1]
    step_rows = [[r for _, rows in g for r in rows] for g in steps]
    targets = round_up(max(int((cache.labels[r, 1:] != IGNORE_INDEX).sum()) for r in step_rows), TARGET_BUCKET)
    tokens = round_up(max(int(cache.lengths[r].sum()) for r in step_rows), TOKEN_BUCKET)
    plans = [plan_group_step(cache, groups, None, width, targets, tokens, device_segments) for groups in steps]
    return upload_steps(plans, device)


def round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def adapted_loss(
    decoder: Decoder, first_adapted: int, cache: TrunkCache, batch: StepBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the groups' mean next-token cross-entropies [], each group's [G]) of one planned step
    through the first adapted MLP and the layers after it. Logits are computed only at the step's target
    positions.
    Reads no device value on the host."""
    p, stop, g = cache.prefix_len, len(decoder.layers), len(batch.groups)
    hidden = cache.hidden[:, : batch.width].index_select(0, batch.rows)
    prefix = None
    if p:
        prefix = cache.prefix_hidden if g == 1 else cache.prefix_hidden.expand(g, -1, -1)
    with write_step_attention(hidden):  # (bf16 on the CPU: the attention in fp32, 3x faster backward)
        prefix, rows = decoder.run_adapted_layers(hidden, first_adapted, stop, batch.lengths, prefix,
                                                  batch.row_prefix, batch.token_index)  # fmt: skip
    if p:
        prefix = prefix.expand(rows.shape[0], -1, -1) if g == 1 else prefix.index_select(0, batch.row_prefix)
        full = torch.cat([prefix, rows], dim=1)  # [b, P+width, H]
    else:
        full = rows
    picked = full.reshape(-1, full.shape[-1]).index_select(0, batch.loss_index)
    return head_loss(decoder, picked, batch)


def chunked_head(device: torch.device, k: int, v: int) -> bool:
    """Whether a step's head loss over K positions of a V-word vocabulary runs in chunks (see `head_loss`)."""
    return device.type == "cpu" or k * v >= CHUNKED_HEAD_LOGITS


def head_loss(decoder: Decoder, picked: torch.Tensor, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(total, per group) cross-entropy of the final norm + head at the picked positions [K, H], each target
    weighted by 1 / (its group's targets): each group's loss its own mean.

    A plain linear head goes through `tmem_kernels.linear_cross_entropy_rows` (chunks of rows, never the
    whole [K, V] logits, the softmax and its gradient in one pass) on the CPU, where that is faster at every
    size (SmolLM2's 49k vocabulary: a 16-card write 9% faster), and elsewhere from K x V >= CHUNKED_HEAD_LOGITS
    (a 150k vocabulary, long writes). Otherwise the logits [K, V] are formed (float32).
    """
    head, g = decoder.model.lm_head, len(batch.groups)
    if decoder.linear_head and chunked_head(picked.device, picked.shape[0], head.out_features):
        weighted = linear_cross_entropy_rows(
            decoder.final_norm(picked), head.weight.detach(), batch.targets, batch.target_weight, IGNORE_INDEX
        )
    else:
        ce = F.cross_entropy(decoder.logits(picked), batch.targets, ignore_index=IGNORE_INDEX, reduction="none")
        weighted = ce * batch.target_weight
    if g == 1:
        total = weighted.sum()
        return total, total.reshape(1)
    per_group = torch.zeros(g, dtype=weighted.dtype, device=weighted.device).index_add_(
        0, batch.target_group, weighted
    )
    return per_group.sum(), per_group
