"""Where a write runs transformers' modules as tmem's fused ops, and those replacements.

The Decoder (`decoder.py`) calls some of a Llama-family model's modules itself; on FUSED_NORM_DEVICES (CUDA)
it runs them as tmem's ops instead: the RMSNorms as `tmem::rms_norm` (`rms_norm`; a residual add and the
norm after it as `tmem::add_rms_norm`, `add_rms_norm`; in write steps the adapted layers' per-head q/k norms
too, `fused_attention_norms` / `fused_norm_forward`, which the engine routes), the attention with its rotary
as `tmem::rope` (`attention`; Qwen3's q/k norms and rotary as one op, `tmem::qk_norm_rope`, where both
norms compute the op: `fused_qk_norm_rope`), and whole pre-norm decoder layers as the Decoder's two halves
(`runs_as_halves`), and a gated MLP's SiLU activation and product as `tmem::swiglu` (`mlp`; the torch backend's
adapted MLP in write steps asks `fused_on` for it too, `tmem_kernels.lora_mlp_composed`). Only for modules that run
exactly as transformers defines them: known classes (not subclasses), their forward transformers' own (not patched
on the class, the instance or the modeling module), and no hooks; anything else is called as the module.
`fused_on(device)` is the one switch every reader asks at call time: patching this module's FUSED_NORM_DEVICES
switches all.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules import module as _torch_module
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from tmem_kernels import add_rms_norm as _fused_add_rms_norm
from tmem_kernels import qk_norm_rope as _fused_qk_norm_rope
from tmem_kernels import rms_norm as _fused_rms_norm
from tmem_kernels import rope as _fused_rope
from tmem_kernels import swiglu as _fused_swiglu
from tmem_runtime.models import is_silu

# transformers' RMSNorm classes whose forward is exactly `tmem_kernels.rms_norm`'s formula
# (weight * (x.float() * rsqrt(mean(x.float()^2) + variance_epsilon)).to(x.dtype), weight [H])
FUSED_RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm")
# where the fused ops run (`fused_on`: `rms_norm`'s op, the Decoder's own attention and halved layers): CUDA, where
# the norm is one Triton kernel forward and one backward instead of about twenty. On the CPU the op's forward is
# the module's own composition (bit for bit) behind a custom op's Python dispatch: a 32-card write of a 64-wide
# model took 9% more host time through it, a SmolLM2 write the same (benchmarks/RESULTS.md); the module runs there.
FUSED_NORM_DEVICES = ("cuda",)


def fused_on(device: torch.device) -> bool:
    """Whether tensors on `device` take the fused ops: its type in FUSED_NORM_DEVICES, read at call time (the one
    place that holds it: patching it here switches the norms, the own attention and the halved layers alike)."""
    return device.type in FUSED_NORM_DEVICES


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


def _own_class_forward(module: nn.Module) -> bool:
    """Whether `module` is of a transformers class whose forward is still the one it defined (not patched over on
    the class)."""
    cls = type(module)
    return cls.__module__.startswith("transformers.") and _transformers_function(
        getattr(cls, "forward", None), cls.__module__, f"{cls.__name__}.forward"
    )


def _runs_as_defined(module: nn.Module) -> bool:
    """Whether `module(...)` runs exactly its transformers class's forward: a class of transformers' whose forward
    is still the one it defined (not patched over on the class, nor on the instance), and no hooks (`_hooked`):
    then computing that forward directly gives what calling the module gives."""
    return _own_class_forward(module) and "forward" not in vars(module) and not _hooked(module)


def _op_norm_class(module: nn.Module) -> bool:
    """One of transformers' FUSED_RMS_NORMS (by class, not a subclass) with weight [H] and a float
    variance_epsilon: the class computes `tmem_kernels.rms_norm`'s formula."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    return (
        type(module).__name__ in FUSED_RMS_NORMS
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 1
        and isinstance(eps, float)
    )


def fused_norm(module: nn.Module) -> bool:
    """Whether `module` computes exactly `tmem_kernels.rms_norm`: one of transformers' FUSED_RMS_NORMS (by
    class, not a subclass), weight [H], a float variance_epsilon, and nothing hooked into or patched over
    its forward (`_runs_as_defined`: hooks, an instance `forward`, a patched class forward: then only calling
    the module is right)."""
    return _op_norm_class(module) and _runs_as_defined(module)


def rms_norm(module: nn.Module, x: torch.Tensor, routed: Sequence[nn.Module] = ()) -> torch.Tensor:
    """module(x) for a decoder's RMSNorm: through the fused op `tmem_kernels.rms_norm` where the module computes
    exactly it (`norm_computes_op`: on FUSED_NORM_DEVICES a `fused_norm`, or one of the `routed` norms), else the
    module itself. x [..., H] -> [..., H], the same values either way."""
    if norm_computes_op(module, x.device, routed):
        return _fused_rms_norm(x, module.weight, module.variance_epsilon)
    return module(x)


def add_rms_norm(module: nn.Module, hidden: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(module(hidden + delta), hidden + delta) for a decoder's RMSNorm after a residual add: one fused op,
    `tmem_kernels.add_rms_norm`, on FUSED_NORM_DEVICES when `fused_norm(module)`, else the add, then `rms_norm`.
    hidden (the residual stream), delta (a half layer's output) [..., H] -> two [..., H], the same values either
    way (the op's sum is torch's add; its norm `rms_norm`'s op on that sum)."""
    if fused_on(hidden.device) and fused_norm(module):
        return _fused_add_rms_norm(delta, hidden, module.weight, module.variance_epsilon)
    hidden = hidden + delta
    return rms_norm(module, hidden), hidden


def fused_norm_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The forward `fused_attention_norms` gives a norm (`fused_norm(module)` held when it was routed): the op
    on FUSED_NORM_DEVICES, else the class's own forward. x [..., H] -> [..., H], the same values either way."""
    if fused_on(x.device):
        return _fused_rms_norm(x, module.weight, module.variance_epsilon)
    return type(module).forward(module, x)


def norm_computes_op(norm: nn.Module, device: torch.device, routed: Sequence[nn.Module] = ()) -> bool:
    """Whether calling `norm` on x on `device` computes exactly `tmem_kernels.rms_norm`, the op: on a `fused_on`
    device, a `fused_norm`, or one of `routed` (the q_norm / k_norm an engine routed to `fused_norm_forward`,
    `fused_attention_norms`: in the write steps, whose trunk and steps are the Decoder's only callers of
    `attention`; `Decoder.routed_norms`) still of the op's class, its class forward transformers' own and nothing
    hooked into it since."""
    if not fused_on(device):
        return False
    if fused_norm(norm):
        return True
    is_routed = any(norm is r for r in routed)
    return is_routed and _op_norm_class(norm) and _own_class_forward(norm) and not _hooked(norm)


def fused_attention_norms(layer: nn.Module) -> list[nn.Module]:
    """A decoder layer's attention RMSNorms (Qwen3's `self_attn.q_norm` / `k_norm`, per head) that are exactly
    the op (`fused_norm`); none for attention without them, or with norms of another formula (Gemma's
    1 + weight, OLMo2's over the whole projection: other classes)."""
    attention = getattr(layer, "self_attn", None)
    norms = (getattr(attention, name, None) for name in ("q_norm", "k_norm"))
    return [norm for norm in norms if isinstance(norm, nn.Module) and fused_norm(norm)]


# transformers' gated MLPs whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)) (biases, if any,
# in the projections): with a SiLU act_fn, what `mlp` computes with `tmem::swiglu` for the middle
GATED_MLPS = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP")
_SILU_SEEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # act_fn -> (its class forward, is_silu)


def _computes_silu(act_fn: object) -> bool:
    """Whether calling `act_fn` is exactly SiLU (`models.is_silu`, judged on a probe once per activation module and
    class forward, then remembered) with nothing hooked into or patched over it on the instance: then
    `tmem::swiglu` may stand for the call."""
    if not isinstance(act_fn, nn.Module) or _hooked(act_fn) or "forward" in vars(act_fn):
        return False
    forward = type(act_fn).forward
    seen = _SILU_SEEN.get(act_fn)
    if seen is None or seen[0] is not forward:
        seen = _SILU_SEEN[act_fn] = (forward, is_silu(act_fn))
    return seen[1]


def fused_swiglu_mlp(module: nn.Module) -> bool:
    """Whether `mlp(module, x)` may compute the module's forward with `tmem::swiglu`: one of GATED_MLPS (by class,
    not a subclass), nothing hooked into or patched over its forward (`_runs_as_defined`; hooks on its projections
    run either way: `mlp` calls them), and an act_fn that computes SiLU (`_computes_silu`: not called then)."""
    projections = (getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
    return (
        type(module).__name__ in GATED_MLPS
        and _runs_as_defined(module)
        and all(isinstance(p, nn.Module) for p in projections)
        and _computes_silu(getattr(module, "act_fn", None))
    )


def mlp(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """module(x) for a decoder layer's MLP: on FUSED_NORM_DEVICES a `fused_swiglu_mlp` as down_proj(swiglu(gate_proj(x),
    up_proj(x))) (`tmem_kernels.swiglu`: one kernel forward and one backward on CUDA instead of two and three),
    else the module itself. x [..., H] -> [..., H]; the op's CPU path gives the module's values bit for bit, its
    Triton kernels round h once (`tmem_kernels.swiglu_act`)."""
    if fused_on(x.device) and fused_swiglu_mlp(module):
        return module.down_proj(_fused_swiglu(module.gate_proj(x), module.up_proj(x)))
    return module(x)


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


def fused_qk_norm_rope(module: nn.Module, device: torch.device, routed: Sequence[nn.Module] = ()) -> bool:
    """Whether `attention` runs an `own_attention` module's q_norm / k_norm and its rotary as one op,
    `tmem_kernels.qk_norm_rope`: a Qwen3 attention whose two norms both compute the fused op
    (`norm_computes_op`: the trunk's layers; an adapted layer's, its norms among `routed`)."""
    norms = (getattr(module, "q_norm", None), getattr(module, "k_norm", None))
    return OWN_ATTENTIONS[type(module).__name__] and all(norm_computes_op(n, device, routed) for n in norms)


def _normed_and_rotated(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    routed: Sequence[nn.Module],
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention`'s queries and keys from the projections viewed to heads, [B, T, H, D] -> [B, H, T, D]: Qwen3's
    per-head norms (`rms_norm`), the transpose, the rotary (`tmem_kernels.rope`); the three as one op,
    `tmem_kernels.qk_norm_rope`, where `fused_qk_norm_rope` holds (the same values: the op is the two's
    composition)."""
    if fused_qk_norm_rope(module, query.device, routed):
        q_norm, k_norm = module.q_norm, module.k_norm
        eps = q_norm.variance_epsilon, k_norm.variance_epsilon
        return _fused_qk_norm_rope(query, key, q_norm.weight, k_norm.weight, *eps, cos, sin)
    if OWN_ATTENTIONS[type(module).__name__]:  # Qwen3: per-head norms before the transpose
        query, key = rms_norm(module.q_norm, query, routed), rms_norm(module.k_norm, key, routed)
    return _fused_rope(query.transpose(1, 2), key.transpose(1, 2), cos, sin)


def attention(
    module: nn.Module,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None,
    cache: object | None = None,
    routed_norms: Sequence[nn.Module] = (),
    **kwargs,
) -> torch.Tensor:
    """module(hidden_states, position_embeddings, attention_mask, cache, **kwargs)[0] for an `own_attention`
    module, the rotary through `tmem_kernels.rope` (one kernel forward and one backward for q and k on CUDA
    instead of about fifteen and twenty), Qwen3's per-head q_norm / k_norm through `rms_norm` (the fused op
    where `fused_norm` holds: the trunk's layers; an adapted layer's the engine routed, `fused_norm_forward`);
    where both norms compute the fused op (`fused_qk_norm_rope`; `routed_norms`: the engine's routed norms, as
    the Decoder passes them), the norms and the rotary as one op (`tmem_kernels.qk_norm_rope`: one kernel forward
    and one backward on CUDA instead of three and three).
    hidden_states [B, T, H], cos / sin [1 or B, T, head_dim] -> [B, T, H].
    """
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, module.head_dim)
    query = module.q_proj(hidden_states).view(hidden_shape)
    key = module.k_proj(hidden_states).view(hidden_shape)
    query, key = _normed_and_rotated(module, query, key, *position_embeddings, routed_norms)
    value = module.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
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
