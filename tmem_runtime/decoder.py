"""Run a transformers decoder piecewise: embed, any slice of decoder layers, final norm, head.

The write path needs what `model(...)` does not offer: stop after the frozen trunk (layers below the
first adapted one), cache that, and later run only the adapted layers, with a shared prefix computed
once and its keys/values broadcast to every row. This module drives the model's own submodules
(embedding, rotary embedding, decoder layers, final norm, lm_head) for the Llama-family layout that
Llama, Qwen2/3 and Mistral share; `supports_piecewise(model)` says when it applies.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn

from tmem_runtime import fused_layers
from tmem_runtime.models import decoder_layers

# (fused_layers' functions are looked up on that module at call time: patching one there switches the Decoder too)
PIECEWISE_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


def supports_piecewise(model: nn.Module) -> bool:
    """Whether `Decoder` can drive this model (Llama-family layout, full attention everywhere)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PIECEWISE_MODEL_TYPES:
        return False
    # Sliding-window layers need a banded mask this module does not build. (Mistral's plain
    # `sliding_window` only differs beyond the window: longer writes take the model's own forward, see
    # `Decoder.full_attention_covers`.)
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
        return False
    inner = getattr(model, "model", None)
    if not all(hasattr(inner, a) for a in ("embed_tokens", "rotary_emb", "norm", "layers")):
        return False
    # `run_adapted_layers` drives a layer's halves itself: the pre-norm Llama layer layout
    halves = fused_layers.HALF_MODULES
    return hasattr(model, "lm_head") and all(hasattr(layer, a) for layer in inner.layers for a in halves)


class PrefixKV:
    """A minimal cache object for HF attention modules: shared prefixes' keys/values.

    In "record" mode (`update` on a prefix batch) it stores each layer's keys/values; in "extend"
    mode it returns [prefix ; new] without storing anything, the prefix broadcast to the batch (one
    prefix) or picked per row by `row_prefix` [B] (several prefixes: one per session of a write).
    HF attention calls only `update(key, value, layer_idx, ...)` on the cache it is given.
    """

    def __init__(self, row_prefix: torch.Tensor | None = None) -> None:
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.recording = True
        self.row_prefix = row_prefix

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.recording:
            self.kv[layer_idx] = (key, value)
            return key, value
        pk, pv = self.kv[layer_idx]
        if pk.shape[0] == 1:
            b = key.shape[0]
            pk, pv = pk.expand(b, -1, -1, -1), pv.expand(b, -1, -1, -1)
        else:
            pk, pv = pk.index_select(0, self.row_prefix), pv.index_select(0, self.row_prefix)
        return torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        kv = self.kv.get(layer_idx)
        return 0 if kv is None else kv[0].shape[2]


# where an additive mask's rows start at multiples of MASK_ROW_ALIGNMENT elements: on CUDA the memory-efficient SDPA
# kernel (what a float mask selects) takes such a mask as it is, and pads any other into a fresh copy on every call
# (torch's `preprocess_mask`: a pad and a copy per attention call, each layer, forward and backward)
MASK_ALIGNED_DEVICES = ("cuda",)
MASK_ROW_ALIGNMENT = 8


def additive_mask(lengths: torch.Tensor, q_len: int, prefix_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Causal + right-padding mask, additive. lengths [B] (real query tokens per row) -> [B, 1, Q, P+Q].

    Query i (absolute position P+i) sees every prefix key and suffix keys j <= i with j < length. On
    MASK_ALIGNED_DEVICES its rows lie MASK_ROW_ALIGNMENT-aligned: a slice of [B, 1, Q, P+Q rounded up].
    """
    device = lengths.device
    key = torch.arange(-prefix_len, q_len, device=device)  # [P+Q]: from the first query's position (prefix < 0)
    later = key[None, :] > key[prefix_len:, None]  # [Q, P+Q]: keys after the query (no prefix key is)
    blocked = later[None] | (key >= lengths[:, None])[:, None, :]  # [B, Q, P+Q]: or past the row (no prefix key is)
    b, q, k = blocked.shape
    align = MASK_ROW_ALIGNMENT if device.type in MASK_ALIGNED_DEVICES else 1
    mask = torch.zeros((b, q, -(-k // align) * align), dtype=dtype, device=device)[..., :k]
    return mask.masked_fill_(blocked, torch.finfo(dtype).min)[:, None]


def _rows_mask(hidden: torch.Tensor, past: int, lengths: torch.Tensor | None) -> torch.Tensor | None:
    """The additive mask [B, 1, T, past + T] of rows hidden [B, T, H] continuing `past` prefix tokens, `lengths`
    [B] real tokens per row (None: all T); None when there is neither a prefix nor padding (plain causal)."""
    b, t, _ = hidden.shape
    if lengths is None and past == 0:
        return None
    if lengths is None:
        lengths = torch.full((b,), t, device=hidden.device)
    return additive_mask(lengths, t, past, hidden.dtype)


class Decoder:
    """Piecewise forward through a Llama-family causal LM's own submodules."""

    def __init__(self, model: nn.Module, routed_norms: Sequence[nn.Module] = ()) -> None:
        """routed_norms: the adapted layers' q_norm / k_norm an engine routes to the fused op in write steps
        (`fused_layers.fused_attention_norms`): the trunk and the steps the Decoder runs take them as the op
        (`fused_layers.fused_qk_norm_rope`)."""
        if not supports_piecewise(model):
            raise ValueError(f"{type(model).__name__} is not a Llama-family decoder the piecewise path drives")
        self.model = model
        self.routed_norms = tuple(routed_norms)
        self.inner = model.model
        self.layers = decoder_layers(model)
        self._cache_kw = _cache_kwarg(type(self.layers[0]).forward)
        self._attn_cache_kw = _cache_kwarg(type(self.layers[0].self_attn).forward)

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.embed_tokens.weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> hidden [B, T, H]."""
        return self.inner.embed_tokens(input_ids)

    def run_layers(
        self,
        hidden: torch.Tensor,
        start: int,
        stop: int,
        lengths: torch.Tensor | None = None,
        prefix: PrefixKV | None = None,
    ) -> torch.Tensor:
        """Decoder layers [start, stop) on hidden [B, T, H] -> [B, T, H].

        `lengths` [B]: real tokens per row (right padding), None when no row is padded. `prefix`: a
        PrefixKV; recording when `prefix.recording`, else the rows continue that prefix.
        """
        p = 0 if prefix is None or prefix.recording else prefix.get_seq_length(start)
        positions, cos_sin, mask = self._attention_inputs(hidden, p, lengths)
        return self._run(hidden, positions, cos_sin, mask, prefix, start, stop)

    def run_trunk(
        self,
        hidden: torch.Tensor,
        first_adapted: int,
        lengths: torch.Tensor | None = None,
        prefix: PrefixKV | None = None,
    ) -> torch.Tensor:
        """Everything below the first adapted MLP: layers [0, first_adapted), then that layer's attention half.

        hidden [B, T, H] (embedded tokens) -> [B, T, H], the residual stream entering layer first_adapted's
        MLP. Nothing in it depends on the fast weights. `lengths` and `prefix` as in `run_layers`. Where
        `fused_layers.fused_on` the device, a layer that `runs_as_halves` runs as `_attention_half` and
        `_mlp_half` (its norms the fused op, its attention `fused_layers.attention`: 4 or 5 ops fewer per norm,
        about 10 for the rotary), each half's residual add and the norm after it one op (`add_rms_norm`);
        any other layer, and every layer elsewhere, is called as `run_layers` calls it.
        """
        p = 0 if prefix is None or prefix.recording else prefix.get_seq_length(first_adapted)
        inputs = self._attention_inputs(hidden, p, lengths)
        halves = fused_layers.fused_on(hidden.device)
        delta = None  # the last half's output, not yet added to hidden: the next half's norm adds it
        for layer in self.layers[:first_adapted]:
            if halves and fused_layers.runs_as_halves(layer):
                hidden, delta = self._attention_half(layer, hidden, delta, *inputs, prefix)
                hidden, delta = self._mlp_half(layer, hidden, delta)
            else:
                hidden = self._call_layer(layer, hidden if delta is None else hidden + delta, *inputs, prefix)
                delta = None
        hidden, delta = self._attention_half(self.layers[first_adapted], hidden, delta, *inputs, prefix)
        return hidden + delta

    def trunk_modules(self, first_adapted: int) -> list[nn.Module]:
        """The modules whose weights `run_trunk(..., first_adapted)` reads: the embedding, layers
        [0, first_adapted), and that layer's input norm and attention."""
        first = self.layers[first_adapted]
        return [self.inner.embed_tokens, *self.layers[:first_adapted], first.input_layernorm, first.self_attn]

    def run_layers_at(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor | None,
        cache: object | None,
        start: int = 0,
        stop: int | None = None,
    ) -> torch.Tensor:
        """Decoder layers [start, stop) on hidden [B, T, H] at explicit positions [B, T].

        mask: additive [B, 1, T, K] over the K keys the cache returns (None: plain causal, no cache
        before). cache: any object with HF's `update(key, value, layer_idx, ...)`, or None.
        """
        rope = self.inner.rotary_emb(hidden, positions)
        return self._run(hidden, positions, rope, mask, cache, start, stop)

    def _run(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: object | None,
        start: int,
        stop: int | None,
    ) -> torch.Tensor:
        for layer in self.layers[start:stop]:
            hidden = self._call_layer(layer, hidden, positions, rope, mask, cache)
        return hidden

    def _call_layer(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: object | None,
    ) -> torch.Tensor:
        """layer(hidden, ...) [B, T, H] -> [B, T, H]: the decoder layer module itself, hooks and all."""
        out = layer(
            hidden,
            attention_mask=mask,
            position_ids=positions,
            position_embeddings=rope,
            use_cache=cache is not None,
            **{self._cache_kw: cache},
        )
        return out[0] if isinstance(out, tuple) else out

    def run_adapted_layers(
        self,
        hidden: torch.Tensor,
        start: int,
        stop: int,
        lengths: torch.Tensor | None = None,
        prefix_hidden: torch.Tensor | None = None,
        row_prefix: torch.Tensor | None = None,
        token_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Layer `start`'s MLP half, then layers (start, stop), on rows [B, T, H] that `run_trunk(..., start)`
        left at that MLP's input; each adapted MLP called once per layer on every token.

        That one call is what lets a backward kernel update B in place. Per layer after `start`,
        attention runs on the shared prefixes `prefix_hidden` [G, P, H] (if any; their keys/values kept)
        and then on the rows (attending to their prefix); then the MLP runs once on [prefix tokens ; row
        tokens] ([G * P + N, H], in that order). G == 1: every row continues the one prefix; G > 1 (a
        write of G sessions, whose adapted layers differ): row i continues prefix row_prefix[i] ([B] on
        the device). `lengths` [B] as in `run_layers`. token_index [N]: the row tokens the MLPs run, as
        flat positions in [B, T] (the real ones: a padding position keeps its value, which no real
        token reads); None: all B * T. Returns (prefixes [G, P, H] or None, rows [B, T, H]).
        """
        p = 0 if prefix_hidden is None else prefix_hidden.shape[1]
        row_inputs, prefix_inputs = self._row_and_prefix_inputs(hidden, p, lengths)
        kv = PrefixKV(row_prefix) if p else None
        for i, layer in enumerate(self.layers[start:stop]):
            if i > 0:  # layer `start`'s attention ran in the trunk
                if kv is not None:
                    kv.recording = True
                    prefix_hidden = self._attention_block(layer, prefix_hidden, *prefix_inputs, kv)
                    kv.recording = False
                hidden = self._attention_block(layer, hidden, *row_inputs, kv)
            prefix_hidden, hidden = self._mlp_block(layer, prefix_hidden, hidden, token_index)
        return prefix_hidden, hidden

    @staticmethod
    def _mlp_block(
        layer: nn.Module, prefix: torch.Tensor | None, hidden: torch.Tensor, token_index: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """x + mlp(post_attention_layernorm(x)) over [prefix tokens ; row tokens (those at token_index)]
        in one MLP call: the second half of a pre-norm decoder layer (see `run_adapted_layers`; `run_trunk`'s
        halved layers: no prefix, every token). The MLP through `fused_layers.mlp` (an adapted one, whose forward
        the engine replaced, is called; a frozen one between adapted layers may run `tmem::swiglu`). prefix
        [G, P, H] or None, hidden [B, T, H], token_index [N] or None -> (prefix, hidden) of the same shapes."""
        b, t, width = hidden.shape
        flat = hidden.reshape(b * t, width)
        rows = flat if token_index is None else flat.index_select(0, token_index)
        n_prefix = 0 if prefix is None else prefix.shape[0] * prefix.shape[1]
        tokens = rows if prefix is None else torch.cat([prefix.reshape(n_prefix, width), rows])
        tokens = tokens + fused_layers.mlp(layer.mlp, fused_layers.rms_norm(layer.post_attention_layernorm, tokens))
        rows = tokens
        if prefix is not None:  # (split: its backward is one cat, two slices' are two zero-padded copies and an add)
            prefix_tokens, rows = tokens.split([n_prefix, tokens.shape[0] - n_prefix])
            prefix = prefix_tokens.view_as(prefix)
        flat = rows if token_index is None else flat.index_copy(0, token_index, rows)
        return prefix, flat.view(b, t, width)

    def _attention_inputs(
        self, hidden: torch.Tensor, past: int, lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """(positions [1, T], rotary (cos, sin), additive mask or None) for rows hidden [B, T, H] that
        continue `past` prefix tokens; `lengths` [B] as in `run_layers`. No mask: plain causal (SDPA's
        is_causal path), when there is neither a prefix nor padding."""
        positions = torch.arange(past, past + hidden.shape[1], device=hidden.device)[None]
        return positions, self.inner.rotary_emb(hidden, positions), _rows_mask(hidden, past, lengths)

    def _row_and_prefix_inputs(
        self, hidden: torch.Tensor, prefix_len: int, lengths: torch.Tensor | None
    ) -> tuple[tuple, tuple | None]:
        """(`_attention_inputs(hidden, prefix_len, lengths)`, `_attention_inputs` of the prefix (None when prefix_len
        is 0)) for rows hidden [B, T, H] continuing a prefix_len-token prefix. The rotary of positions [0, P + T)
        comes from one call, split: a position's cos / sin do not depend on the others' (the rope types whose
        frequencies follow the longest position, dynamic and longrope, past the model's original context: the
        prefix's are the whole sequence's, as in the model's own forward over it)."""
        if not prefix_len:
            return self._attention_inputs(hidden, 0, lengths), None
        positions = torch.arange(prefix_len + hidden.shape[1], device=hidden.device)[None]
        cos, sin = self.inner.rotary_emb(hidden, positions)
        mask = _rows_mask(hidden, prefix_len, lengths)
        rows = positions[:, prefix_len:], (cos[:, prefix_len:], sin[:, prefix_len:]), mask
        return rows, (positions[:, :prefix_len], (cos[:, :prefix_len], sin[:, :prefix_len]), None)

    def _attention_block(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        kv: PrefixKV | None,
    ) -> torch.Tensor:
        """hidden + self_attn(input_layernorm(hidden)): the first half of a pre-norm decoder layer
        (`_attention_half`, its output added). hidden [B, T, H] -> [B, T, H]."""
        hidden, out = self._attention_half(layer, hidden, None, positions, rope, mask, kv)
        return hidden + out

    def _attention_half(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        delta: torch.Tensor | None,
        positions: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        kv: PrefixKV | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, self_attn(input_layernorm(x))) for x = hidden + delta (delta: the previous half's output not yet
        added, or None: x = hidden), the residual add left to the caller (or to the next half's norm). The norm
        `fused_layers.rms_norm`, with the add before it `fused_layers.add_rms_norm` (one op). Where
        `fused_layers.fused_on` the device, the attention runs as `fused_layers.attention` (the rotary as one op)
        where `own_attention` holds and the rotary spans the whole head, else the module itself. hidden, delta
        [B, T, H] -> two [B, T, H]."""
        if delta is None:
            x = fused_layers.rms_norm(layer.input_layernorm, hidden)
        else:
            x, hidden = fused_layers.add_rms_norm(layer.input_layernorm, hidden, delta)
        module = layer.self_attn
        fused = fused_layers.fused_on(hidden.device) and fused_layers.own_attention(module)
        if fused and rope[0].shape[-1] == module.head_dim:
            out = fused_layers.attention(module, x, rope, mask, kv, self.routed_norms, position_ids=positions,
                                         use_cache=kv is not None)  # fmt: skip
            return hidden, out
        out = module(
            hidden_states=x,
            attention_mask=mask,
            position_ids=positions,
            position_embeddings=rope,
            use_cache=kv is not None,
            **{self._attn_cache_kw: kv},
        )
        return hidden, (out[0] if isinstance(out, tuple) else out)

    @staticmethod
    def _mlp_half(layer: nn.Module, hidden: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, mlp(post_attention_layernorm(x))) for x = hidden + delta (the attention half's output), the add
        and the norm one op (`fused_layers.add_rms_norm`), the residual add left to the next half's norm, the MLP
        `fused_layers.mlp` (its activation and product one op, `tmem::swiglu`, for a SiLU gated MLP): the second
        half of a `run_trunk` layer, every token. hidden, delta [B, T, H] -> two [B, T, H]."""
        b, t, width = hidden.shape
        x, hidden = fused_layers.add_rms_norm(
            layer.post_attention_layernorm, hidden.reshape(b * t, width), delta.reshape(b * t, width)
        )
        return hidden.view(b, t, width), fused_layers.mlp(layer.mlp, x).view(b, t, width)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + lm_head. hidden [..., H] -> logits [..., V] (float32)."""
        return self.model.lm_head(self.final_norm(hidden)).float()

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's final norm (`fused_layers.rms_norm`). hidden [..., H] -> [..., H]."""
        return fused_layers.rms_norm(self.inner.norm, hidden)

    def full_attention_covers(self, tokens: int) -> bool:
        """Whether sequences of `tokens` attend as this module's full causal masks say: a model with a plain
        sliding window (Mistral's `sliding_window`, which `supports_piecewise` lets through) only within it."""
        window = getattr(self.model.config, "sliding_window", None)
        applies = self.model.config.model_type == "mistral"  # (Qwen2/Qwen3 keep one unused: refused if used)
        return not (applies and window is not None and tokens > window)

    @property
    def linear_head(self) -> bool:
        """Whether the logits are norm(hidden) @ lm_head.weight.T (a Linear head without bias): what
        `tmem_kernels.linear_cross_entropy_rows` computes."""
        head = self.model.lm_head
        return isinstance(head, nn.Linear) and head.bias is None


def _cache_kwarg(forward) -> str:
    """The name under which this transformers version passes the KV cache to `forward`."""
    params = inspect.signature(forward).parameters
    return next((k for k in ("cache", "past_key_values", "past_key_value") if k in params), "past_key_values")
