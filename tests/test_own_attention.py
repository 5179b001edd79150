"""The Decoder's own attention (`fused_layers.attention`: the rotary as the op `tmem::rope`, with Qwen3's q/k
norms as `tmem::qk_norm_rope`) against HF's module.

`attention(module, ...)` must give `module(...)`'s output and gradients for the classes `own_attention`
accepts: on the CPU bit for bit (the op's forward there is HF's composition, its backward autograd's formula
with autograd's rounding), on CUDA fp32 within 1e-5 and bf16 within bf16's tolerance (the Triton rotary may
fuse a product into its add in fp32; bf16 equal). Cases: no mask (SDPA's is_causal), right padding, a shared
prefix recorded in a PrefixKV then continued (one prefix, and one per row group), tiny-llama, tiny-qwen3,
tiny-qwen2 (q/k/v biases) and tiny-mistral (GQA, an odd half head dim, Qwen3's per-head norms); eager attention
too, and the op's Triton kernels forced. Qwen3's norms and rotary as one op give the two ops' values and
gradients (bit for bit on the CPU, Triton kernels forced or not). `_attention_block` routes through it on
FUSED_NORM_DEVICES only and falls back to the module for a hooked one.
"""

from __future__ import annotations

import sys

import pytest
import torch

import tmem_kernels
from tmem_kernels import rotary
from tmem_runtime import decoder as decoder_module
from tmem_runtime import fused_layers
from tmem_runtime.decoder import Decoder, PrefixKV
from tmem_runtime.fused_layers import attention, own_attention
from tmem_runtime.models import load_model

MODELS = ["tiny-llama", "tiny-qwen3", "tiny-qwen2", "tiny-mistral"]  # Qwen2: q/k/v biases
DTYPES = [torch.float32, torch.bfloat16]


def close(a: torch.Tensor, b: torch.Tensor, device: torch.device) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    if device.type == "cpu":
        assert torch.equal(a, b)
    elif a.dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    else:
        torch.testing.assert_close(a, b, rtol=1.6e-2, atol=1.6e-2 * b.abs().max().item())


@pytest.fixture(scope="module", params=MODELS)
def model_name(request) -> str:
    return request.param


def setup(name: str, dtype: torch.dtype, device: torch.device, implementation: str = "sdpa"):
    model, _ = load_model(name, dtype=dtype, device=device, attn_implementation=implementation, load_tokenizer=False)
    dec = Decoder(model)
    layer = dec.layers[1]
    layer.self_attn.q_proj.weight.requires_grad_(True)
    layer.self_attn.v_proj.weight.requires_grad_(True)
    return model, dec, layer.self_attn


def hf(module, x, rope, mask, kv, positions):
    cache_kw = decoder_module._cache_kwarg(type(module).forward)
    out = module(hidden_states=x, attention_mask=mask, position_ids=positions, position_embeddings=rope,
                 use_cache=kv is not None, **{cache_kw: kv})  # fmt: skip
    return out[0]


def own(module, x, rope, mask, kv, positions):
    return attention(module, x, rope, mask, kv, position_ids=positions, use_cache=kv is not None)


def run_case(fn, module, dec, rows, lengths, prefix, row_prefix, dy):
    """fn's output and the gradients of rows, prefix hidden, q_proj and v_proj weights (prefix: recorded with
    fn first, the rows attending to it)."""
    rows = rows.detach().clone().requires_grad_(True)
    kv, leaves = None, [rows, module.q_proj.weight, module.v_proj.weight]
    p = 0
    if prefix is not None:
        prefix = prefix.detach().clone().requires_grad_(True)
        leaves.append(prefix)
        kv = PrefixKV(row_prefix)
        pos, rope, mask = dec._attention_inputs(prefix, 0, None)
        prefix_out = fn(module, prefix, rope, mask, kv, pos)
        kv.recording = False
        p = prefix.shape[1]
    pos, rope, mask = dec._attention_inputs(rows, p, lengths)
    out = fn(module, rows, rope, mask, kv, pos)
    loss = (out.float() * dy.float()).sum()
    if prefix is not None:
        loss = loss + prefix_out.float().sum()
    grads = torch.autograd.grad(loss, leaves)
    return (out.detach(), *grads)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "case,implementation,triton",
    [("causal", "sdpa", False), ("padded", "sdpa", False), ("prefix", "sdpa", False), ("prefixes", "sdpa", False),
     ("prefixes", "eager", False), ("prefixes", "sdpa", True), ("causal", "sdpa", True)],
)  # fmt: skip
def test_own_attention_equals_hf(model_name, dtype, case, implementation, triton, device, monkeypatch):
    """triton: the op's Triton kernels forced (on the CPU under the interpreter), as on CUDA."""
    if triton:
        if not tmem_kernels.available("triton"):
            pytest.skip("Triton is not installed")
        monkeypatch.setattr(rotary, "use_triton", lambda q, k, c, s: len({q.dtype, k.dtype, c.dtype, s.dtype}) == 1)
    model, dec, module = setup(model_name, dtype, device, implementation)
    assert own_attention(module)
    g = torch.Generator().manual_seed(0)
    b, t, h = 3, 7, model.config.hidden_size
    rows = torch.randn(b, t, h, generator=g).to(device, dtype)
    dy = torch.randn(b, t, h, generator=g).to(device, dtype)
    lengths = torch.tensor([7, 4, 1], device=device) if case != "causal" else None
    prefix = row_prefix = None
    if case == "prefix":
        prefix = torch.randn(1, 5, h, generator=g).to(device, dtype)
    elif case == "prefixes":
        prefix = torch.randn(2, 5, h, generator=g).to(device, dtype)
        row_prefix = torch.tensor([1, 0, 1], device=device)
    want = run_case(hf, module, dec, rows, lengths, prefix, row_prefix, dy)
    got = run_case(own, module, dec, rows, lengths, prefix, row_prefix, dy)
    assert all(w.abs().max() > 0 for w in want)
    for a, w in zip(got, want):
        close(a, w, device)


def force_triton(monkeypatch) -> None:
    """The Triton kernels of the norm, the rotary and the two in one forced (on the CPU under the interpreter)."""
    from tmem_kernels import qknorm_rope, rmsnorm

    if not tmem_kernels.available("triton"):
        pytest.skip("Triton is not installed")
    monkeypatch.setattr(rmsnorm, "use_triton", lambda x: x.dtype != torch.float64)
    monkeypatch.setattr(rotary, "use_triton", lambda q, k, c, s: len({q.dtype, k.dtype, c.dtype, s.dtype}) == 1)
    monkeypatch.setattr(qknorm_rope, "use_triton", lambda *ts: len({t.dtype for t in ts}) == 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,triton", [("padded", False), ("prefixes", False), ("padded", True), ("prefix", True)])
def test_qwen3s_norms_and_rotary_as_one_op_give_the_two_ops_values(dtype, case, triton, device, monkeypatch):
    """On FUSED_NORM_DEVICES (forced here on the CPU; "triton": the kernels forced too) Qwen3's q_norm, k_norm and
    rotary run as one op (`fused_qk_norm_rope`), no `rms_norm` or `rope` op left in `attention`: the output and
    gradients of the attention are those of the two ops (the path before it): bit for bit on the CPU, on CUDA
    within the norms' tolerances. Other families keep the two (Llama, Qwen2, Mistral have no q/k norms)."""
    if triton:
        force_triton(monkeypatch)
    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
    model, dec, module = setup("tiny-qwen3", dtype, device)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for norm in (module.q_norm, module.k_norm):
            norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=g))
    b, t, h = 3, 7, model.config.hidden_size
    rows = torch.randn(b, t, h, generator=g).to(device, dtype)
    dy = torch.randn(b, t, h, generator=g).to(device, dtype)
    lengths = torch.tensor([7, 4, 1], device=device)
    prefixes = {"padded": 0, "prefix": 1, "prefixes": 2}[case]
    prefix = torch.randn(prefixes, 5, h, generator=g).to(device, dtype) if prefixes else None
    row_prefix = torch.tensor([1, 0, 1], device=device) if case == "prefixes" else None
    calls = {}
    for name in ("_fused_rms_norm", "_fused_rope", "_fused_qk_norm_rope"):
        real = getattr(fused_layers, name)
        monkeypatch.setattr(fused_layers, name, lambda *a, real=real, name=name: calls.update({name: 1}) or real(*a))
    assert fused_layers.fused_qk_norm_rope(module, device)
    got = run_case(own, module, dec, rows, lengths, prefix, row_prefix, dy)
    assert calls == {"_fused_qk_norm_rope": 1}
    calls.clear()
    with monkeypatch.context() as m:
        m.setattr(fused_layers, "fused_qk_norm_rope", lambda *a: False)
        want = run_case(own, module, dec, rows, lengths, prefix, row_prefix, dy)
    assert calls == {"_fused_rms_norm": 1, "_fused_rope": 1}
    assert all(w.abs().max() > 0 for w in want)
    for a, w in zip(got, want):
        close(a, w, device)
    for name in ("tiny-llama", "tiny-qwen2", "tiny-mistral"):
        assert not fused_layers.fused_qk_norm_rope(setup(name, dtype, device)[2], device)


def test_attention_block_routes_on_fused_devices_only(monkeypatch, device):
    """`_attention_block` runs `attention` (the op in the graph) on FUSED_NORM_DEVICES (forced here on the
    CPU too) and gives the module's values; a forward hook on the module, or another device: the module."""
    model, dec, module = setup("tiny-qwen3", torch.float32, device)
    layer = dec.layers[1]
    calls = []
    for name in ("_fused_rope", "_fused_qk_norm_rope"):  # (Qwen3's rotary: with its norms, one op)
        real = getattr(fused_layers, name)
        monkeypatch.setattr(fused_layers, name, lambda *a, real=real: calls.append(1) or real(*a))
    x = torch.randn(2, 6, model.config.hidden_size, generator=torch.Generator().manual_seed(1)).to(device)
    inputs = dec._attention_inputs(x, 0, torch.tensor([6, 3], device=device))
    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ())
    want = dec._attention_block(layer, x, *inputs, None)
    assert not calls
    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
    got = dec._attention_block(layer, x, *inputs, None)
    assert calls == [1]
    close(got, want, device)
    handle = module.register_forward_hook(lambda m, i, o: o)
    assert not own_attention(module)
    dec._attention_block(layer, x, *inputs, None)
    assert calls == [1]
    handle.remove()
    model.config._attn_implementation = "flex_attention"
    assert not own_attention(module)


def test_the_own_attentions_qk_norms_run_the_fused_op(monkeypatch, device):
    """Qwen3's per-head q_norm / k_norm in `attention`: on FUSED_NORM_DEVICES (forced here on the CPU) the fused
    op, with the rotary (`tmem::qk_norm_rope`), giving the module's values (on the CPU bit for bit); a norm with
    a hook or an instance forward (as the engine gives an adapted layer's) is called, its hook's effect in the
    output, the other `rms_norm`'s op."""
    model, dec, module = setup("tiny-qwen3", torch.float32, device)
    layer = dec.layers[1]
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for norm in (module.q_norm, module.k_norm):
            norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=g))
    shapes = []
    real = fused_layers._fused_rms_norm
    monkeypatch.setattr(fused_layers, "_fused_rms_norm", lambda x, *a: shapes.append(x.dim()) or real(x, *a))
    x = torch.randn(2, 6, model.config.hidden_size, generator=g).to(device)
    inputs = dec._attention_inputs(x, 0, torch.tensor([6, 3], device=device))
    want = dec._attention_block(layer, x, *inputs, None)  # (the CPU: the modules)
    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
    qk = []
    real_qk = fused_layers._fused_qk_norm_rope
    monkeypatch.setattr(fused_layers, "_fused_qk_norm_rope", lambda q, *a: qk.append(q.dim()) or real_qk(q, *a))
    got = dec._attention_block(layer, x, *inputs, None)
    assert shapes == [3] and qk == [4]  # the input norm [B, T, H], then q and k [B, T, heads, head_dim] in one
    close(got, want, device)
    qk.clear()
    shapes.clear()
    handle = module.q_norm.register_forward_hook(lambda m, i, o: o * 0.5)
    try:
        hooked = dec._attention_block(layer, x, *inputs, None)
        assert shapes == [3, 4] and not qk and own_attention(module)  # k's the op, the hooked q's the module
        monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ())
        close(hooked, dec._attention_block(layer, x, *inputs, None), device)
        assert not torch.equal(hooked, want)
    finally:
        handle.remove()


def test_attention_block_compiles_fullgraph(monkeypatch, device):
    """torch.compile(fullgraph=True) traces `_attention_block` through `attention` with a prefix (no graph
    break; Qwen3's norms and rotary as `tmem::qk_norm_rope` in the graph) and gives eager's output and gradients."""
    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
    model, dec, module = setup("tiny-qwen3", torch.float32, device)
    layer = dec.layers[1]
    g = torch.Generator().manual_seed(3)
    prefix = torch.randn(1, 4, model.config.hidden_size, generator=g).to(device)
    rows = torch.randn(2, 5, model.config.hidden_size, generator=g).to(device)
    lengths = torch.tensor([5, 2], device=device)

    def step(p, r):
        kv = PrefixKV()
        p = dec._attention_block(layer, p, *dec._attention_inputs(p, 0, None), kv)
        kv.recording = False
        return p, dec._attention_block(layer, r, *dec._attention_inputs(r, 4, lengths), kv)

    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if "tmem" in str(n.target))
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    results = []
    for fn in (step, compiled):
        p, r = prefix.clone().requires_grad_(True), rows.clone().requires_grad_(True)
        out_p, out_r = fn(p, r)
        (out_p.sum() + (out_r * out_r).sum()).backward()
        results.append((out_p.detach(), out_r.detach(), p.grad, r.grad))
    assert seen.count("tmem.qk_norm_rope") == 2 and "tmem.rope" not in seen
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _patched_forward(orig):
    def forward(self, hidden_states, *args, **kwargs):  # a LongLoRA-style class-level patch: another attention
        out, weights = orig(self, hidden_states, *args, **kwargs)
        return out * 0.5, weights

    return forward


@pytest.mark.parametrize("patch", ["class_forward", "rotary_function", "norm_class_forward"])
def test_attention_block_runs_what_a_patched_model_runs(patch, monkeypatch, device):
    """A model whose classes or modeling functions were patched over (`LlamaAttention.forward = ...` as
    LongLoRA does, `modeling_llama.apply_rotary_pos_emb = ...` as Liger does, `LlamaRMSNorm.forward = ...`):
    `own_attention` / `fused_norm` refuse it and `_attention_block` on FUSED_NORM_DEVICES gives what the
    patched modules give, bit for bit (before: the unpatched formula, 3e-2 off for the attention patch)."""
    model, dec, module = setup("tiny-llama", torch.float32, device)
    layer = dec.layers[1]
    modeling = sys.modules[type(module).__module__]
    if patch == "class_forward":
        monkeypatch.setattr(type(module), "forward", _patched_forward(type(module).forward))
    elif patch == "rotary_function":
        monkeypatch.setattr(modeling, "apply_rotary_pos_emb", lambda q, k, cos, sin, unsqueeze_dim=1: (q, k))
    else:
        norm_cls = type(layer.input_layernorm)
        orig = norm_cls.forward
        monkeypatch.setattr(norm_cls, "forward", lambda self, x: orig(self, x) * 2)
        assert not fused_layers.fused_norm(layer.input_layernorm)
    assert own_attention(module) == (patch == "norm_class_forward")
    x = torch.randn(2, 6, model.config.hidden_size, generator=torch.Generator().manual_seed(2)).to(device)
    inputs = dec._attention_inputs(x, 0, torch.tensor([6, 4], device=device))
    want = dec._attention_block(layer, x, *inputs, None)  # (FUSED_NORM_DEVICES: CUDA only, here the modules)
    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
    got = dec._attention_block(layer, x, *inputs, None)
    assert torch.equal(got, want)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
@pytest.mark.parametrize("hook", ["backward", "backward_pre", "global_forward"])
def test_attention_block_runs_the_hooks_calling_the_modules_runs(hook, monkeypatch, device):
    """Backward hooks on the attention module and the input norm, or a global module hook, fire in
    `_attention_block` on FUSED_NORM_DEVICES as calling the modules fires them (before: only forward hooks
    were seen, and the others silently never ran on the own attention and the fused norm)."""
    from torch.nn.modules import module as torch_module

    model, dec, module = setup("tiny-llama", torch.float32, device)
    layer = dec.layers[1]
    seen: list[str] = []
    handles = []
    if hook == "global_forward":
        handles.append(torch_module.register_module_forward_hook(lambda m, i, o: seen.append(type(m).__name__)))
    for name, m in (("attention", module), ("norm", layer.input_layernorm)):
        if hook == "backward":
            handles.append(m.register_full_backward_hook(lambda m, gi, go, name=name: seen.append(name)))
        elif hook == "backward_pre":
            handles.append(m.register_full_backward_pre_hook(lambda m, go, name=name: seen.append(name)))
    try:
        assert not own_attention(module) and not fused_layers.fused_norm(layer.input_layernorm)
        monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
        x = torch.randn(2, 5, model.config.hidden_size, device=device, requires_grad=True)
        dec._attention_block(layer, x, *dec._attention_inputs(x, 0, None), None).sum().backward()
    finally:
        for h in handles:
            h.remove()
    if hook == "global_forward":
        assert {"LlamaAttention", "LlamaRMSNorm"} <= set(seen)
    else:
        assert sorted(seen) == ["attention", "norm"]
    assert own_attention(module)  # the hooks removed: the own attention again
