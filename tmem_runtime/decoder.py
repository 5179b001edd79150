"""Run a transformers decoder piecewise: embed, any slice of decoder layers, final norm, head.

The write path needs what `model(...)` does not offer: stop after the frozen trunk (layers below the
first adapted one), cache that, and later run only the adapted layers, with a shared prefix computed
once and its keys/values broadcast to every row. This module drives the model's own submodules
(embedding, rotary embedding, decoder layers, final norm, lm_head) for the Llama-family layout that
Llama, Qwen2/3 and Mistral share; `supports_piecewise(model)` says when it applies.
"""

from __future__ import annotations

import inspect
import sys

import torch
from torch import nn
from torch.nn.modules import module as _torch_module
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from tmem_kernels import rms_norm as _fused_rms_norm
from tmem_kernels import rope as _fused_rope
from tmem_runtime.models import decoder_layers

PIECEWISE_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
# transformers' RMSNorm classes whose forward is exactly `tmem_kernels.rms_norm`'s formula
# (weight * (x.float() * rsqrt(mean(x.float()^2) + variance_epsilon)).to(x.dtype), weight [H])
FUSED_RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm")
# where `rms_norm` runs the op: CUDA, where it is one Triton kernel forward and one backward instead of about
# twenty. On the CPU the op's forward is the module's own composition (bit for bit) behind a custom op's
# Python dispatch: a 32-card write of a 64-wide model took 9% more host time through it, a SmolLM2 write the
# same (benchmarks/RESULTS.md); the module runs there.
FUSED_NORM_DEVICES = ("cuda",)


def _hooked(module: nn.Module) -> bool:
    """Whether calling `module` runs hooks a direct computation of its forward would skip: its own forward,
    forward-pre, backward or backward-pre hooks (`register_full_backward_hook` ...), or global module hooks
    (`torch.nn.modules.module.register_module_forward_hook` ...), which fire on every module's call."""
    kinds = ("forward", "forward_pre", "backward", "backward_pre")
    own = any(getattr(module, f"_{kind}_hooks") for kind in kinds)
    return own or any(getattr(_torch_module, f"_global_{kind}_hooks", None) for kind in kinds)


@torch.compiler.assume_constant_result  # (dynamo reads a functools.wraps wrapper's __qualname__ as its code's)
def _transformers_function(fn: object, module_name: str, qualname: str) -> bool:
    """Whether `fn` is transformers' own `module_name.qualname` (functools.wraps decorators keep both names), not
    something patched over it: a class-level `LlamaAttention.forward = ...` (LongLoRA-style patches), a module
    global `modeling_llama.apply_rotary_pos_emb = ...`. Under torch.compile a constant of the trace."""
    return getattr(fn, "__module__", None) == module_name and getattr(fn, "__qualname__", None) == qualname


def _runs_as_defined(module: nn.Module) -> bool:
    """Whether `module(...)` runs exactly its transformers class's forward: a class of transformers' whose forward
    is still the one it defined (not patched over on the class, nor on the instance), and no hooks (`_hooked`):
    then computing that forward directly gives what calling the module gives."""
    cls = type(module)
    return (
        cls.__module__.startswith("transformers.")
        and _transformers_function(getattr(cls, "forward", None), cls.__module__, f"{cls.__name__}.forward")
        and "forward" not in vars(module)
        and not _hooked(module)
    )


def fused_norm(module: nn.Module) -> bool:
    """Whether `module` computes exactly `tmem_kernels.rms_norm`: one of transformers' FUSED_RMS_NORMS (by
    class, not a subclass), weight [H], a float variance_epsilon, and nothing hooked into or patched over
    its forward (`_runs_as_defined`: hooks, an instance `forward`, a patched class forward: then only calling
    the module is right)."""
    cls = type(module)
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    return (
        cls.__name__ in FUSED_RMS_NORMS
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 1
        and isinstance(eps, float)
        and _runs_as_defined(module)
    )


def rms_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) for a decoder's RMSNorm: through the fused op `tmem_kernels.rms_norm` on FUSED_NORM_DEVICES
    when `fused_norm(module)`, else the module itself. x [..., H] -> [..., H], the same values either way."""
    if x.device.type in FUSED_NORM_DEVICES and fused_norm(module):
        return _fused_rms_norm(x, module.weight, module.variance_epsilon)
    return module(x)


def fused_norm_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward `fused_attention_norms` gives a norm (`fused_norm(module)` held when it was routed): the op
    on FUSED_NORM_DEVICES, else the class's own forward. x [..., H] -> [..., H], the same values either way."""
    if x.device.type in FUSED_NORM_DEVICES:
        return _fused_rms_norm(x, module.weight, module.variance_epsilon)
    return type(module).forward(module, x)


def fused_attention_norms(layer: nn.Module) -> list[nn.Module]:
    """A decoder layer's attention RMSNorms (Qwen3's `self_attn.q_norm` / `k_norm`, per head) that are exactly
    the op (`fused_norm`); none for attention without them, or with norms of another formula (Gemma's
    1 + weight, OLMo2's over the whole projection: other classes)."""
    attention = getattr(layer, "self_attn", None)
    norms = (getattr(attention, name, None) for name in ("q_norm", "k_norm"))
    return [norm for norm in norms if isinstance(norm, nn.Module) and fused_norm(norm)]


# transformers' attention classes whose forward `attention` reproduces step for step: q/k/v projections viewed
# to heads, per-head q_norm / k_norm (Qwen3 only), rotate_half rotary over the whole head (`apply_rotary_pos_emb`,
# which `attention` runs as the op `tmem_kernels.rope`), the cache's update, the model's attention function
# with the module's scaling, o_proj. Biases live in the projections; the attention functions below ignore
# the sliding_window Qwen2/3 and Mistral pass (`supports_piecewise` refuses sliding-window layers anyway).
OWN_ATTENTIONS = {"LlamaAttention": False, "Qwen2Attention": False, "Qwen3Attention": True, "MistralAttention": False}
# the module functions of their modeling file that their forward computes the rotary with (`attention`: the op)
ROTARY_FUNCTIONS = ("apply_rotary_pos_emb", "rotate_half")
# the attention functions `attention` calls as HF's forward does (`ALL_ATTENTION_FUNCTIONS`, eager the module's)
OWN_ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def own_attention(module: nn.Module) -> bool:
    """Whether `attention(module, ...)` computes exactly `module(...)`: one of OWN_ATTENTIONS (by class, not a
    subclass) under an OWN_ATTENTION_IMPLEMENTATIONS attention function, nothing hooked into or patched over
    its forward (`_runs_as_defined`; hooks on its submodules run either way: `attention` calls them), and its
    modeling module's rotary (`apply_rotary_pos_emb`, `rotate_half`, which its forward calls) transformers' own."""
    cls = type(module)
    config = getattr(module, "config", None)
    norms = ("q_norm", "k_norm") if OWN_ATTENTIONS.get(cls.__name__) else ()
    parts = ("q_proj", "k_proj", "v_proj", "o_proj", *norms)
    modeling = sys.modules.get(cls.__module__)
    return (
        cls.__name__ in OWN_ATTENTIONS
        and getattr(config, "_attn_implementation", None) in OWN_ATTENTION_IMPLEMENTATIONS
        and isinstance(getattr(module, "head_dim", None), int)
        and all(isinstance(getattr(module, n, None), nn.Module) for n in parts)
        and _runs_as_defined(module)
        and all(_transformers_function(getattr(modeling, f, None), cls.__module__, f) for f in ROTARY_FUNCTIONS)
    )


def attention(
    module: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    cache: object | None = None,
    **kwargs,
) -> torch.Tensor:
    """module(hidden_states, position_embeddings, attention_mask, cache, **kwargs)[0] for an `own_attention`
    module, the rotary through `tmem_kernels.rope` (one kernel forward and one backward for q and k on CUDA
    instead of about fifteen and twenty), Qwen3's per-head q_norm / k_norm through `rms_norm` (the fused op
    where `fused_norm` holds: the trunk's layers; an adapted layer's the engine routed, `fused_norm_forward`).
    hidden_states [B, T, H], cos / sin [1 or B, T, head_dim] -> [B, T, H].
    """
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, module.head_dim)
    query = module.q_proj(hidden_states).view(hidden_shape)
    key = module.k_proj(hidden_states).view(hidden_shape)
    if OWN_ATTENTIONS[type(module).__name__]:  # Qwen3: per-head norms before the transpose
        query, key = rms_norm(module.q_norm, query), rms_norm(module.k_norm, key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)
    value = module.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = _fused_rope(query, key, cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, module.layer_idx, kwargs=kwargs)
    implementation = module.config._attn_implementation
    eager = sys.modules[type(module).__module__].eager_attention_forward
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)
    else:  # (older transformers 5.x: the lookup its modules made themselves)
        interface = eager if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
    out, _ = interface(
        module,
        query,
        key,
        value,
        attention_mask,
        dropout=0.0 if not module.training else module.attention_dropout,
        scaling=module.scaling,
        **kwargs,
    )
    return module.o_proj(out.reshape(*input_shape, -1).contiguous())


# transformers' pre-norm decoder layers whose forward is exactly `Decoder._attention_block` then `_mlp_block`:
# x + self_attn(input_layernorm(x), ...) with the cache, mask, positions and rotary it is given (the Decoder's,
# the same either way), then x + mlp(post_attention_layernorm(x)). `run_trunk` runs them as those halves.
HALVED_LAYERS = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer", "MistralDecoderLayer")
# the submodules that forward calls, in order (`_attention_block`: the first two; `_mlp_block`: the others)
HALF_MODULES = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


def runs_as_halves(layer: nn.Module) -> bool:
    """Whether `Decoder._attention_block` then `Decoder._mlp_block` compute exactly `layer(...)`: one of
    HALVED_LAYERS (by class, not a subclass) whose forward is transformers' own with nothing hooked into it
    (`_runs_as_defined`: a patched class or instance forward, a hook on the layer or a global one: only calling
    the layer is right; hooks on its submodules run either way, the halves call them), called through
    nn.Module's `__call__` or transformers' `GradientCheckpointingLayer.__call__` (not one patched over), and
    not a sliding-attention layer (Qwen2/3 give those modules a `sliding_window`). (Mistral's config-wide
    window reaches the attention function from the attention module, which the halves call with the layer's
    arguments or, under sdpa / eager, which take no window, reproduce: the Decoder's mask rules either way.)"""
    call = type(layer).__call__
    return (
        type(layer).__name__ in HALVED_LAYERS
        and _runs_as_defined(layer)
        and (
            call is nn.Module.__call__
            or _transformers_function(call, "transformers.modeling_layers", "GradientCheckpointingLayer.__call__")
        )
        and getattr(getattr(layer, "self_attn", None), "sliding_window", None) is None
        and all(isinstance(getattr(layer, n, None), nn.Module) for n in HALF_MODULES)
    )


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
    return hasattr(model, "lm_head") and all(hasattr(layer, a) for layer in inner.layers for a in HALF_MODULES)


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


def additive_mask(lengths: torch.Tensor, q_len: int, prefix_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Causal + right-padding mask, additive. lengths [B] (real query tokens per row) -> [B, 1, Q, P+Q].

    Query i (absolute position P+i) sees every prefix key and suffix keys j <= i with j < length.
    """
    device = lengths.device
    key = torch.arange(-prefix_len, q_len, device=device)  # [P+Q]: from the first query's position (prefix < 0)
    later = key[None, :] > key[prefix_len:, None]  # [Q, P+Q]: keys after the query (no prefix key is)
    blocked = later[None] | (key >= lengths[:, None])[:, None, :]  # [B, Q, P+Q]: or past the row (no prefix key is)
    mask = torch.zeros(blocked.shape, dtype=dtype, device=device)
    return mask.masked_fill_(blocked, torch.finfo(dtype).min)[:, None]


class Decoder:
    """Piecewise forward through a Llama-family causal LM's own submodules."""

    def __init__(self, model: nn.Module) -> None:
        if not supports_piecewise(model):
            raise ValueError(f"{type(model).__name__} is not a Llama-family decoder the piecewise path drives")
        self.model = model
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
        MLP. Nothing in it depends on the fast weights. `lengths` and `prefix` as in `run_layers`. On
        FUSED_NORM_DEVICES a layer that `runs_as_halves` runs as `_attention_block` and `_mlp_block` (its
        norms the fused op, its attention `attention`: 4 or 5 ops fewer per norm, about 10 for the rotary);
        any other layer, and every layer elsewhere, is called as `run_layers` calls it.
        """
        p = 0 if prefix is None or prefix.recording else prefix.get_seq_length(first_adapted)
        inputs = self._attention_inputs(hidden, p, lengths)
        halves = hidden.device.type in FUSED_NORM_DEVICES
        for layer in self.layers[:first_adapted]:
            if halves and runs_as_halves(layer):
                hidden = self._attention_block(layer, hidden, *inputs, prefix)
                _, hidden = self._mlp_block(layer, None, hidden, None)
            else:
                hidden = self._call_layer(layer, hidden, *inputs, prefix)
        return self._attention_block(self.layers[first_adapted], hidden, *inputs, prefix)

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
        halved layers: no prefix, every token). prefix [G, P, H] or None, hidden [B, T, H], token_index [N]
        or None -> (prefix, hidden) of the same shapes."""
        b, t, width = hidden.shape
        flat = hidden.reshape(b * t, width)
        rows = flat if token_index is None else flat.index_select(0, token_index)
        n_prefix = 0 if prefix is None else prefix.shape[0] * prefix.shape[1]
        tokens = rows if prefix is None else torch.cat([prefix.reshape(n_prefix, width), rows])
        tokens = tokens + layer.mlp(rms_norm(layer.post_attention_layernorm, tokens))
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
        b, t, _ = hidden.shape
        positions = torch.arange(past, past + t, device=hidden.device)[None]
        rope = self.inner.rotary_emb(hidden, positions)
        if lengths is None and past == 0:
            return positions, rope, None
        if lengths is None:
            lengths = torch.full((b,), t, device=hidden.device)
        return positions, rope, additive_mask(lengths, t, past, hidden.dtype)

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
        b, t, _ = hidden.shape
        positions = torch.arange(prefix_len + t, device=hidden.device)[None]
        cos, sin = self.inner.rotary_emb(hidden, positions)
        if lengths is None:
            lengths = torch.full((b,), t, device=hidden.device)
        mask = additive_mask(lengths, t, prefix_len, hidden.dtype)
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
        """hidden + self_attn(input_layernorm(hidden)): the first half of a pre-norm decoder layer. On
        FUSED_NORM_DEVICES the attention runs as `attention` (the rotary as one op) where `own_attention` holds
        and the rotary spans the whole head, else the module itself."""
        x = rms_norm(layer.input_layernorm, hidden)
        module = layer.self_attn
        if hidden.device.type in FUSED_NORM_DEVICES and own_attention(module) and rope[0].shape[-1] == module.head_dim:
            return hidden + attention(module, x, rope, mask, kv, position_ids=positions, use_cache=kv is not None)
        out = module(
            hidden_states=x,
            attention_mask=mask,
            position_ids=positions,
            position_embeddings=rope,
            use_cache=kv is not None,
            **{self._attn_cache_kw: kv},
        )
        return hidden + (out[0] if isinstance(out, tuple) else out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + lm_head. hidden [..., H] -> logits [..., V] (float32)."""
        return self.model.lm_head(self.final_norm(hidden)).float()

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's final norm (`rms_norm`). hidden [..., H] -> [..., H]."""
        return rms_norm(self.inner.norm, hidden)

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
