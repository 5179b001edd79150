"""Batched greedy decoding with shared prefixes: a prefix is prefilled once and reused by every row.

A `Prefix` is a token prefix run once at batch 1 (its keys/values kept per layer). `greedy_generate`
decodes many prompts that continue prefixes: each batch gets one key/value buffer whose columns are

    [ prefix (right-aligned per row) | suffix (right-aligned, left-padded) | generated tokens ]

The prefix's keys/values are copied in (a broadcast when the rows share one prefix), so only the
suffixes are prefilled; pads are skipped by an additive mask and per-row position ids, so every row
sees exactly its own prefix + suffix at positions 0..n-1, as it would alone. Logits are computed at
the last position only; finished rows are dropped from the batch once they are half of it.
Rows may carry different prefixes (one per row), the layout a session pool with a different memory
context per row needs; `bind` runs every forward inside a context chosen by the rows it holds (e.g.
`SessionPool.rows`: a different memory per row), batches and dropped rows included; `choose` picks
each row's next token from its logits instead of the argmax (a sampler: told which prompt each row
is, it can draw every row from that prompt's own generator, whatever the batch).

`reference_generate` is the spec: the plain transformers `generate`, one prompt at a time (batch 1, no
padding). Greedy outputs of the two are equal token for token (tests/test_decoding.py). Models the
piecewise `Decoder` cannot drive fall back to the reference (with `choose`: `reference_choose`, plain
forwards one prompt at a time).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from tmem_runtime.decoder import Decoder, _cache_kwarg, supports_piecewise

StopFn = Callable[[list[int]], bool]
# Given the indices (into `prompts`) of the rows a forward runs, the context it runs in.
RowBinding = Callable[[Sequence[int]], AbstractContextManager]
# (logits [b, V] of a decode step's rows, the index into `prompts` of each row, -1 for a finished row) -> tokens [b]
ChooseFn = Callable[[torch.Tensor, list[int]], torch.Tensor]
PREFILL_ROWS = 8  # suffixes prefilled together (sorted by length, so each group pads little)


@dataclass
class DecodeStats:
    """Where decoding time goes: tokens and seconds in prefill (prompt tokens run) and decode steps."""

    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens

    def add(self, other: DecodeStats) -> DecodeStats:
        """Sum with `other`, in place; returns self."""
        self.prefill_tokens += other.prefill_tokens
        self.prefill_s += other.prefill_s
        self.decode_tokens += other.decode_tokens
        self.decode_s += other.decode_s
        return self

    def since(self, earlier: DecodeStats) -> DecodeStats:
        """What was counted after `earlier` (a copy taken then) — a new object."""
        return DecodeStats(self.prefill_tokens - earlier.prefill_tokens, self.prefill_s - earlier.prefill_s,
                           self.decode_tokens - earlier.decode_tokens, self.decode_s - earlier.decode_s)

    def copy(self) -> DecodeStats:
        return DecodeStats(self.prefill_tokens, self.prefill_s, self.decode_tokens, self.decode_s)

    def scaled(self, share: float) -> DecodeStats:
        """`share` of these counts (tokens rounded): one party's part of a joint decode — a new object."""
        return DecodeStats(round(self.prefill_tokens * share), self.prefill_s * share,
                           round(self.decode_tokens * share), self.decode_s * share)


@dataclass
class Prefix:
    """A token prefix prefilled at batch 1: ids and each layer's keys/values [1, H_kv, P, D]."""

    ids: tuple[int, ...]
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


class _Recorder:
    """Cache object for HF attention modules that keeps each layer's keys/values (prefix prefill)."""

    def __init__(self, past: Prefix | None) -> None:
        self.past = past
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.past is not None and len(self.past):
            key = torch.cat([self.past.keys[layer_idx], key], dim=2)
            value = torch.cat([self.past.values[layer_idx], value], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = key, value
        return key, value


class KVBuffer:
    """One batch's keys/values, preallocated: [B, H_kv, capacity, D] per layer, filled left to right.

    HF attention modules call `update(key, value, layer_idx)` with the step's new keys/values; they
    are written at columns [length, length + T) and the filled part is returned. `advance(T)` moves
    `length` once every layer has run. Unwritten columns are zeros (masked keys must be finite).
    """

    def __init__(self, n_layers: int, batch: int, heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (batch, heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.length = 0

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.write(layer_idx, slice(None), self.length, key, value)

    def write(self, layer_idx: int, rows: slice, column: int, key: torch.Tensor, value: torch.Tensor):
        """Write `rows`' new keys/values [b, H_kv, T, D] at columns [column, column + T); returns those
        rows' keys and values up to there."""
        end = column + key.shape[2]
        k, v = self.keys[layer_idx][rows], self.values[layer_idx][rows]
        k[:, :, column:end] = key
        v[:, :, column:end] = value
        return k[:, :, :end], v[:, :, :end]

    def advance(self, t: int) -> None:
        self.length += t

    def rows(self, start_row: int, stop_row: int, column: int) -> _RowSlice:
        """A cache for rows [start_row, stop_row) whose new keys/values go at `column` onwards."""
        return _RowSlice(self, start_row, stop_row, column)

    def fill_prefix(self, prefix: Prefix, rows: torch.Tensor, stop: int) -> None:
        """Copy `prefix` into `rows`, ending at column `stop` (right-aligned)."""
        start = stop - len(prefix)
        for k, v, pk, pv in zip(self.keys, self.values, prefix.keys, prefix.values):
            k[rows, :, start:stop] = pk
            v[rows, :, start:stop] = pv

    def select(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (dropping finished ones)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]


class _RowSlice:
    """Some rows of a KVBuffer, written at a fixed column: a group of suffixes prefilled on its own."""

    def __init__(self, buffer: KVBuffer, start_row: int, stop_row: int, column: int) -> None:
        self.buffer, self.start_row, self.stop_row, self.column = buffer, start_row, stop_row, column

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        return self.buffer.write(layer_idx, slice(self.start_row, self.stop_row), self.column, key, value)


def _kv_shape(model: nn.Module) -> tuple[int, int]:
    cfg = model.config.get_text_config()
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return heads, head_dim


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def prefill(model: nn.Module, ids: Sequence[int], past: Prefix | None = None,
            stats: DecodeStats | None = None) -> Prefix:
    """Run `ids` at batch 1 and keep every layer's keys/values; `past`: a Prefix these ids continue.

    Returns a Prefix of past.ids + ids (no logits: a prompt always extends its prefix by a token).
    """
    if not supports_piecewise(model):
        raise ValueError(f"{type(model).__name__} cannot be driven piecewise; use reference_generate")
    ids = list(ids)
    if not ids:
        return past if past is not None else Prefix(())
    t0 = time.perf_counter()
    start = len(past) if past is not None else 0
    decoder = Decoder(model)
    recorder = _Recorder(past)
    x = torch.tensor([ids], dtype=torch.long, device=_device(model))
    positions = torch.arange(start, start + len(ids), device=x.device)[None]
    mask = None
    if start:  # the new tokens see all of `past` and themselves causally
        allowed = torch.ones(len(ids), start + len(ids), dtype=torch.bool, device=x.device).tril(start)
        mask = _additive(allowed[None], decoder.dtype)
    decoder.run_layers_at(decoder.embed(x), positions, mask, recorder)
    if stats is not None:
        stats.prefill_tokens += len(ids)
        stats.prefill_s += time.perf_counter() - t0
    n = len(decoder.layers)
    full = (tuple(past.ids) if past is not None else ()) + tuple(ids)
    return Prefix(full, [recorder.keys[i] for i in range(n)], [recorder.values[i] for i in range(n)])


def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix all prompts share, at most min(len) - 1 (each keeps a suffix)."""
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


@torch.no_grad()
def reference_generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    pad_id: int,
    eos_ids: Sequence[int] | None = None,
) -> list[list[int]]:
    """The spec: transformers' greedy `generate`, one prompt at a time. New tokens per prompt (EOS kept)."""
    device = _device(model)
    stop = {} if eos_ids is None else {"eos_token_id": list(eos_ids)}
    outputs = []
    for p in prompts:
        ids = torch.tensor([list(p)], dtype=torch.long, device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad_id, **stop)
        outputs.append(out[0, ids.shape[1] :].tolist())
    return outputs


@torch.no_grad()
def reference_choose(model: nn.Module, prompt: Sequence[int], index: int, max_new_tokens: int, eos: set[int],
                     stop_ids: set[int], stop: StopFn | None, choose: ChooseFn) -> list[int]:
    """`greedy_generate`'s `choose` for a model the piecewise Decoder cannot drive: one prompt (its index
    `index` among the prompts) by plain forwards with the model's own KV cache, batch 1, each next token
    choose(logits [1, V], [index]); the new tokens, ended as greedy_generate ends a row (the ending token kept)."""
    device = _device(model)
    ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    past, new = None, []
    cache_kw = _cache_kwarg(model.forward)  # ("cache" since transformers 5.2x, "past_key_values" before)
    while len(new) < max_new_tokens:
        out = model(input_ids=ids, use_cache=True, **{cache_kw: past})
        past = out.get("cache", out.get("past_key_values"))
        tok = int(choose(out.logits[:, -1], [index])[0])
        new.append(tok)
        if tok in eos or tok in stop_ids or (stop is not None and stop(new)):
            break
        ids = torch.tensor([[tok]], dtype=torch.long, device=device)
    return new


def _eos_of(model: nn.Module, eos_ids: Sequence[int] | None) -> set[int]:
    if eos_ids is not None:
        return set(eos_ids)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return set(eos) if isinstance(eos, (list, tuple)) else {eos} if eos is not None else set()


@torch.no_grad()
def _fast_weights_unchanged(model: nn.Module) -> AbstractContextManager:
    """The `reading()` block of the fast weights attached to `model` (FastWeights or SessionPool), if any."""
    store = getattr(model, "_tmem_fast_weights", None)
    return store.reading() if hasattr(store, "reading") else nullcontext()


def greedy_generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_ids: Sequence[int] | None = None,
    prefix: Prefix | Sequence[Prefix | None] | None = None,
    batch_size: int = 32,
    stop_ids: Sequence[int] = (),
    stop: StopFn | Sequence[StopFn | None] | None = None,
    stats: DecodeStats | None = None,
    max_batch_tokens: int = 1 << 15,
    pad_id: int = 0,
    bind: RowBinding | None = None,
    choose: ChooseFn | None = None,
) -> list[list[int]]:
    """Greedy continuations of token-id prompts; the new tokens of each (the ending token kept).

    prompts: full token ids (they start with their prefix's ids). prefix: one Prefix for all rows, one
    per row (None: no prefix for that row), or None: the longest common prefix of two or more prompts
    is found and prefilled here (without `bind`). A row ends at an EOS (`eos_ids`, default the
    model's), at a token in `stop_ids`, when `stop(new_tokens)` is true, or after `max_new_tokens` (0:
    nothing is run; a prompt + max_new_tokens past the model's `max_position_embeddings`: ValueError);
    `stop` is one function for every row or one per prompt (None: none for that row), called with
    the row's new tokens after each new token that did not end it otherwise (a caller may stream
    from it).
    Up to `batch_size` rows per batch (fewer when rows x (prefix + suffix + new) would pass
    `max_batch_tokens`), rows of similar length together. stats: accumulates prefill/decode tokens
    and seconds. pad_id fills padded slots only.
    bind: each forward runs inside bind(indices of its rows in `prompts`); the rows' prefixes are the
    caller's then (prefilled under whatever binding their rows need): none is searched for here.
    choose: picks the next token of every row at every decode step instead of the argmax (`ChooseFn`).
    Fast weights attached to the model are not changed by another thread's write, swap or reset while
    it runs (without `bind`: the model's own; with it, open the pool's `reading` block around the call).
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    window = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    longest = max(len(p) for p in prompts)
    if window is not None and longest + max_new_tokens > window:
        raise ValueError(f"a prompt of {longest} tokens + {max_new_tokens} new ones passes the model's window of "
                         f"{window} positions")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    eos = _eos_of(model, eos_ids)
    stops = list(stop) if isinstance(stop, (list, tuple)) else [stop] * len(prompts)
    if len(stops) != len(prompts):
        raise ValueError(f"{len(stops)} stop functions for {len(prompts)} prompts")
    # without `bind`, every forward reads the model's default fast weights: they stay unchanged throughout
    with _fast_weights_unchanged(model) if bind is None else nullcontext():
        binding = bind or (lambda rows: nullcontext())
        if not supports_piecewise(model):  # the spec itself: same outputs, no prefix sharing
            if choose is not None:
                out = []
                for i, p in enumerate(prompts):
                    with binding([i]):
                        out.append(reference_choose(model, p, i, max_new_tokens, eos, set(stop_ids), stops[i], choose))
                return out
            out = []
            for i, p in enumerate(prompts):
                with binding([i]):
                    # the EOS set resolved above, empty included (None would mean the model's own again)
                    out += reference_generate(model, [p], max_new_tokens, pad_id, sorted(eos))
            return [_cut(row, eos, set(stop_ids), row_stop) for row, row_stop in zip(out, stops)]
        if prefix is None and bind is None:
            n = common_prefix_length(prompts) if len(prompts) > 1 else 0
            prefix = prefill(model, prompts[0][:n], stats=stats) if n else None
        prefixes = list(prefix) if isinstance(prefix, (list, tuple)) else [prefix] * len(prompts)
        if len(prefixes) != len(prompts):
            raise ValueError(f"{len(prefixes)} prefixes for {len(prompts)} prompts")
        for p, pre in zip(prompts, prefixes):
            if pre is not None and (len(p) <= len(pre) or tuple(p[: len(pre)]) != pre.ids):
                raise ValueError("each prompt must start with its prefix's ids and extend it by at least one token")
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        outputs: list[list[int]] = [[] for _ in prompts]
        decoder = Decoder(model)
        batch: list[int] = []

        def flush() -> None:
            rows = [(prefixes[i], list(prompts[i][len(prefixes[i] or ()) :])) for i in batch]
            for i, new in zip(batch, _decode_batch(decoder, rows, batch, max_new_tokens, eos, set(stop_ids),
                                                   [stops[i] for i in batch], stats, binding, choose)):
                outputs[i] = new
            batch.clear()

        for i in order:
            width = max(len(prompts[j]) for j in batch + [i]) + max_new_tokens
            if batch and (len(batch) >= batch_size or (len(batch) + 1) * width > max_batch_tokens):
                flush()
            batch.append(i)
        flush()
        return outputs


def _cut(row: list[int], eos: set[int], stop_ids: set[int], stop: StopFn | None) -> list[int]:
    """A reference row ended where greedy_generate ends it."""
    for t in range(len(row)):
        if row[t] in eos or row[t] in stop_ids or (stop is not None and stop(row[: t + 1])):
            return row[: t + 1]
    return row


def _decode_batch(
    decoder: Decoder,
    rows: list[tuple[Prefix | None, list[int]]],
    prompt_index: list[int],
    max_new_tokens: int,
    eos: set[int],
    stop_ids: set[int],
    stops: list[StopFn | None],
    stats: DecodeStats | None,
    bind: RowBinding,
    choose: ChooseFn | None = None,
) -> list[list[int]]:
    """One batch: fill the prefixes, prefill the suffixes (left-padded), decode until every row ends.

    prompt_index[r]: row r's index among greedy_generate's prompts, the index `bind` and `choose` are
    told (`RowBinding`, `ChooseFn`; -1 for a finished row); stops[r]: row r's; choose None: the argmax.

    Suffixes are prefilled in groups of PREFILL_ROWS rows of similar length, each group padded only
    to its own longest suffix; every row's suffix ends at the same column, where decoding starts.
    """
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][1]))
    rows, stops, prompt_index = [rows[r] for r in order], [stops[r] for r in order], [prompt_index[r] for r in order]
    model = decoder.model
    device, dtype = _device(model), decoder.dtype
    b = len(rows)
    p_max = max(len(pre or ()) for pre, _ in rows)
    s_max = max(len(s) for _, s in rows)
    heads, head_dim = _kv_shape(model)
    cache = KVBuffer(len(decoder.layers), b, heads, p_max + s_max + max_new_tokens, head_dim, dtype, device)
    valid = torch.zeros(b, p_max + s_max + max_new_tokens, dtype=torch.bool, device=device)
    ids = torch.zeros(b, s_max, dtype=torch.long, device=device)
    positions = torch.zeros(b, s_max, dtype=torch.long, device=device)
    for pre in {id(pre): pre for pre, _ in rows if pre is not None}.values():
        members = torch.tensor([r for r, (q, _) in enumerate(rows) if q is pre], device=device)
        cache.fill_prefix(pre, members, p_max)
        valid[members, p_max - len(pre) : p_max] = True
    lengths = []
    for r, (pre, s) in enumerate(rows):
        n_pre = len(pre or ())
        ids[r, s_max - len(s) :] = torch.tensor(s, device=device)
        positions[r, s_max - len(s) :] = torch.arange(n_pre, n_pre + len(s), device=device)
        valid[r, p_max + s_max - len(s) : p_max + s_max] = True
        lengths.append(n_pre + len(s))
    t0 = time.perf_counter()
    end = p_max + s_max
    keys = torch.arange(end, device=device)
    last = []
    for a in range(0, b, PREFILL_ROWS):
        z = min(a + PREFILL_ROWS, b)
        width = max(len(s) for _, s in rows[a:z])
        cols = torch.arange(end - width, end, device=device)
        allowed = (valid[a:z, None, :end] & (keys[None, :] <= cols[:, None])[None]) | (keys == cols[:, None])[None]
        with bind(prompt_index[a:z]):
            hidden = decoder.run_layers_at(decoder.embed(ids[a:z, s_max - width :]),
                                           positions[a:z, s_max - width :], _additive(allowed, dtype),
                                           cache.rows(a, z, end - width))
        last.append(hidden[:, -1])
    cache.advance(end)
    logits = decoder.logits(torch.cat(last))
    if stats is not None:
        stats.prefill_tokens += sum(len(s) for _, s in rows)
        stats.prefill_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    active = list(range(b))  # original row of each batch slot
    new: list[list[int]] = [[] for _ in rows]
    next_pos = torch.tensor(lengths, device=device)
    finished = [False] * b
    for _ in range(max_new_tokens):
        if choose is None:
            tokens = logits.argmax(-1)
        else:
            tokens = choose(logits, [-1 if done else prompt_index[active[s]] for s, done in enumerate(finished)])
        for slot, tok in enumerate(tokens.tolist()):
            if finished[slot]:
                continue
            r = active[slot]
            new[r].append(tok)
            stop = stops[r]
            if tok in eos or tok in stop_ids or len(new[r]) == max_new_tokens or (stop is not None and stop(new[r])):
                finished[slot] = True
        if all(finished):
            break
        n_done = sum(finished)
        if n_done and 2 * n_done >= len(active):  # drop finished rows
            keep = [s for s in range(len(active)) if not finished[s]]
            index = torch.tensor(keep, device=device)
            cache.select(index)
            valid, next_pos, tokens = valid[index], next_pos[index], tokens[index]
            active, finished = [active[s] for s in keep], [False] * len(keep)
        col = cache.length
        valid[:, col] = True
        mask = _additive(valid[:, None, : col + 1], dtype)
        with bind([prompt_index[r] for r in active]):
            hidden = decoder.run_layers_at(decoder.embed(tokens[:, None]), next_pos[:, None], mask, cache)
        cache.advance(1)
        next_pos = next_pos + 1
        logits = decoder.logits(hidden[:, -1])
    if stats is not None:
        stats.decode_tokens += sum(len(x) for x in new)
        stats.decode_s += time.perf_counter() - t0
    out: list[list[int]] = [[] for _ in rows]
    for slot, r in enumerate(order):
        out[r] = new[slot]
    return out


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean [B, Q, K] -> additive mask [B, 1, Q, K] (0 where allowed, the dtype's min elsewhere)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]
