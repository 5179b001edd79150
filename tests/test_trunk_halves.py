"""The write's trunk runs its decoder layers as the Decoder's two halves (`runs_as_halves`) against HF's modules.

On FUSED_NORM_DEVICES (CUDA; here the CPU too, forced) `Decoder.run_trunk` runs each layer below the first
adapted one as `_attention_half` (the fused input norm, `attention`: Qwen3's q/k norms and the rotary one op)
then `_mlp_half` (the fused post-attention norm), each residual add and the norm after it one op
(`tmem::add_rms_norm`), instead of calling the layer module: on the CPU bit for bit what calling the modules
gives (the ops' CPU forwards are HF's compositions), for tiny-llama, tiny-qwen3 (per-head q/k norms),
tiny-qwen2 (q/k/v biases) and tiny-mistral, fp32 and bf16, with no mask, right padding, and a
shared prefix recorded then continued. A layer that must be called (hooked, its forward or __call__ patched,
a subclass, a sliding-attention one) is called: with the hook's or the patch's effect. Qwen3's trunk with its q/k
norms and rotary as one op is the trunk of the two ops, bit for bit on the CPU (their Triton kernels forced too).
The halves' SiLU gated MLPs run their activation and product as `tmem::swiglu` (`fused_layers.mlp`): bit for bit
the MLP modules through the op's composition, within bf16's own error through its kernels; an MLP that must be
called (hooked, patched, a subclass, a GELU or hooked act_fn) is called.
"""

from __future__ import annotations

import pytest
import torch

import tmem_kernels
from tmem_kernels import rmsnorm
from tmem_runtime import fused_layers
from tmem_runtime.decoder import Decoder, PrefixKV
from tmem_runtime.fused_layers import runs_as_halves
from tmem_runtime.models import load_model

MODELS = ["tiny-llama", "tiny-qwen3", "tiny-qwen2", "tiny-mistral"]
FIRST_ADAPTED = 4  # of 6 layers: four trunk layers, then layer 4's attention


def close(a: torch.Tensor, b: torch.Tensor, device: torch.device) -> None:
    """Bit for bit on the CPU; on CUDA the Triton norm and rotary round otherwise (as test_own_attention)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    if device.type == "cpu":
        assert torch.equal(a, b)
    else:
        tol = 1e-5 if a.dtype == torch.float32 else 1.6e-2
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


def setup(name: str, dtype: torch.dtype, device: torch.device, implementation: str = "sdpa") -> Decoder:
    """A tiny model's Decoder, its RMSNorm weights (input, post-attention, Qwen3's q/k) not all ones."""
    model, _ = load_model(name, dtype=dtype, device=device, attn_implementation=implementation, load_tokenizer=False)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=g))
    return Decoder(model)


def trunk(dec: Decoder, case: str, device: torch.device) -> list[torch.Tensor]:
    """run_trunk's outputs for `case` ("causal": no mask; "padded": right padding; "prefix": a shared prefix
    recorded, then padded rows continuing it; its keys/values too), under no_grad as encode_trunk runs it."""
    g = torch.Generator().manual_seed(6)
    vocab = dec.model.config.vocab_size
    ids = torch.randint(3, vocab, (3, 9), generator=g).to(device)
    lengths = None if case == "causal" else torch.tensor([9, 5, 1], device=device)
    out = []
    with torch.no_grad():
        kv = None
        if case == "prefix":
            kv = PrefixKV()
            prefix_ids = torch.randint(3, vocab, (1, 6), generator=g).to(device)
            out.append(dec.run_trunk(dec.embed(prefix_ids), FIRST_ADAPTED, prefix=kv))
            kv.recording = False
            out.extend(t for i in range(FIRST_ADAPTED + 1) for t in kv.kv[i])
        out.append(dec.run_trunk(dec.embed(ids), FIRST_ADAPTED, lengths=lengths, prefix=kv))
    return out


def count_layer_calls(monkeypatch) -> list[int]:
    """Records the index of every layer `run_trunk` calls as a module (`Decoder._call_layer`)."""
    called: list[int] = []
    real = Decoder._call_layer

    def call(self, layer, *args):
        called.append(list(self.layers).index(layer))
        return real(self, layer, *args)

    monkeypatch.setattr(Decoder, "_call_layer", call)
    return called


def count_norms(monkeypatch) -> tuple[list[int], list[int]]:
    """Records every call of the fused norm op (`fused_layers._fused_rms_norm`) and of the fused residual add +
    norm op (`fused_layers._fused_add_rms_norm`): two lists, one entry per call."""
    norms: list[int] = []
    added: list[int] = []
    real_norm, real_added = fused_layers._fused_rms_norm, fused_layers._fused_add_rms_norm
    monkeypatch.setattr(fused_layers, "_fused_rms_norm", lambda *a: norms.append(1) or real_norm(*a))
    monkeypatch.setattr(fused_layers, "_fused_add_rms_norm", lambda *a: added.append(1) or real_added(*a))
    return norms, added


def unfused_add_rms_norm(module, hidden, delta):
    """What the halves ran before `fused_layers.add_rms_norm`: torch's add, then the norm op on the sum."""
    hidden = hidden + delta
    return fused_layers.rms_norm(module, hidden), hidden


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["causal", "padded", "prefix"])
@pytest.mark.parametrize("name", MODELS)
def test_the_trunks_halves_give_the_layer_modules_output(name, case, dtype, device, monkeypatch):
    """The trunk through the halves (every trunk layer, none called) equals the trunk of HF's modules (every
    layer called, the norms and attention HF's: FUSED_NORM_DEVICES as on the CPU)."""
    dec = setup(name, dtype, device)
    called = count_layer_calls(monkeypatch)
    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ())
    want = trunk(dec, case, device)
    assert called == list(range(FIRST_ADAPTED)) * (2 if case == "prefix" else 1)
    called.clear()
    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
    assert all(runs_as_halves(layer) for layer in dec.layers)
    norms, added = count_norms(monkeypatch)
    qk = []
    real_qk = fused_layers._fused_qk_norm_rope
    monkeypatch.setattr(fused_layers, "_fused_qk_norm_rope", lambda *a: qk.append(1) or real_qk(*a))
    got = trunk(dec, case, device)
    assert called == []
    runs = 2 if case == "prefix" else 1
    # layer 0's input norm alone; every other input norm and every post-attention norm after its residual add
    assert len(norms) == runs and len(added) == runs * 2 * FIRST_ADAPTED
    # Qwen3's q and k norms with the rotary, one op per attention (+ layer 4's attention half)
    assert len(qk) == (runs * (FIRST_ADAPTED + 1) if name == "tiny-qwen3" else 0)
    assert all(w.abs().max() > 0 for w in want)
    for a, w in zip(got, want, strict=True):
        close(a, w, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["padded", "prefix"])
@pytest.mark.parametrize("triton", [False, True])
def test_qwen3s_trunk_with_its_norms_and_rotary_as_one_op_is_the_trunk_before(triton, case, dtype, device, monkeypatch):
    """tiny-qwen3's trunk with the q/k norms and the rotary as one op (`fused_qk_norm_rope`; "triton": the
    norm's, the rotary's and that op's Triton kernels forced, on the CPU under the interpreter) gives the trunk of
    the two ops (`rms_norm`, then `rope`: the path before it): on the CPU bit for bit, keys and values too."""
    if triton:
        from tmem_kernels import qknorm_rope, rmsnorm, rotary

        pytest.importorskip("triton")
        monkeypatch.setattr(rmsnorm, "use_triton", lambda x: x.dtype != torch.float64)
        monkeypatch.setattr(rotary, "use_triton", lambda q, k, c, s: len({q.dtype, k.dtype, c.dtype, s.dtype}) == 1)
        monkeypatch.setattr(qknorm_rope, "use_triton", lambda *ts: len({t.dtype for t in ts}) == 1)
    dec = setup("tiny-qwen3", dtype, device)
    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
    qk = []
    real_qk = fused_layers._fused_qk_norm_rope
    monkeypatch.setattr(fused_layers, "_fused_qk_norm_rope", lambda *a: qk.append(1) or real_qk(*a))
    got = trunk(dec, case, device)
    assert len(qk) == (FIRST_ADAPTED + 1) * (2 if case == "prefix" else 1)
    monkeypatch.setattr(fused_layers, "fused_qk_norm_rope", lambda *a: False)
    want = trunk(dec, case, device)
    assert all(w.abs().max() > 0 for w in want)
    for a, w in zip(got, want, strict=True):
        close(a, w, device)


@pytest.mark.skipif(not tmem_kernels.available("triton"), reason="Triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["causal", "padded", "prefix"])
@pytest.mark.parametrize("name", MODELS)
def test_the_fused_residual_add_and_norm_give_the_adds_then_the_norms(name, case, dtype, device, monkeypatch):
    """The halves' residual add + next norm as one op (`fused_layers.add_rms_norm`: `tmem::add_rms_norm`), the
    norms' Triton kernels forced (CUDA's structure; under the interpreter on the CPU): run_trunk's outputs (the
    prefix's keys / values too) are those of the add then `tmem::rms_norm` (the halves before the fused op) bit
    for bit; the fused op ran for every add that a norm follows (two per layer, less the first input norm)."""
    monkeypatch.setattr(rmsnorm, "use_triton", lambda x: x.dtype != torch.float64)
    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
    dec = setup(name, dtype, device)
    norms, added = count_norms(monkeypatch)
    got = trunk(dec, case, device)
    assert len(added) == (2 if case == "prefix" else 1) * 2 * FIRST_ADAPTED
    monkeypatch.setattr(fused_layers, "add_rms_norm", unfused_add_rms_norm)
    added.clear()
    want = trunk(dec, case, device)
    assert not added
    for a, w in zip(got, want, strict=True):
        assert a.dtype == w.dtype and torch.equal(a, w)


def test_the_trunks_halves_under_eager_attention(device, monkeypatch):
    """The same with the eager attention function (`attention` calls the modeling module's own)."""
    dec = setup("tiny-qwen3", torch.float32, device, implementation="eager")
    want = trunk(dec, "prefix", device)
    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
    called = count_layer_calls(monkeypatch)
    got = trunk(dec, "prefix", device)
    assert called == []
    for a, w in zip(got, want, strict=True):
        close(a, w, device)


def test_mistrals_sliding_window_is_the_decoders_mask_either_way(device, monkeypatch):
    """Mistral's config-wide sliding window (shorter than the rows here): the halves give what calling the
    layers gives, the window unused by both (the mask is the Decoder's; sdpa and eager take no window)."""
    dec = setup("tiny-mistral", torch.float32, device)
    dec.model.config.sliding_window = 3
    assert not dec.full_attention_covers(9)
    want = trunk(dec, "prefix", device)
    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
    assert runs_as_halves(dec.layers[0])
    for a, w in zip(trunk(dec, "prefix", device), want, strict=True):
        close(a, w, device)


def _scaled_output(orig):
    def forward(self, *args, **kwargs):  # a patch over the layer: another computation than the halves'
        return orig(self, *args, **kwargs) * 0.5

    return forward


@pytest.mark.parametrize(
    "change", ["forward_hook", "forward_pre_hook", "global_hook", "class_forward", "instance_forward",
               "class_call", "subclass", "sliding_window"],
)  # fmt: skip
def test_a_layer_that_must_be_called_is_called(change, device, monkeypatch):
    """Layer 1 hooked (its own forward / pre hook, a global module hook), its forward patched (on the class,
    on the instance), its class's __call__ patched, a subclass of another module with the class's name, or a
    sliding-attention layer (Qwen2/3's per-layer `sliding_window`): `runs_as_halves` refuses it and
    `run_trunk` calls it (only it, the others still run as halves; a patched class: each of its layers),
    giving what calling the modules gives; the halves' output would miss the change."""
    from torch.nn.modules import module as torch_module

    dec = setup("tiny-qwen3", torch.float32, device)
    layer = dec.layers[1]
    cls = type(layer)
    clean = trunk(dec, "padded", device)  # (the CPU's modules: bit for bit the halves, above)
    handles, seen = [], []
    if change == "forward_hook":
        handles.append(layer.register_forward_hook(lambda m, i, o: o * 0.5))
    elif change == "forward_pre_hook":
        handles.append(layer.register_forward_pre_hook(lambda m, args: (args[0] * 0.5, *args[1:])))
    elif change == "global_hook":
        handles.append(torch_module.register_module_forward_hook(lambda m, i, o: seen.append(m) or None))
    elif change == "class_forward":
        monkeypatch.setattr(cls, "forward", _scaled_output(cls.forward))
    elif change == "instance_forward":
        layer.forward = _scaled_output(cls.forward).__get__(layer)
    elif change == "class_call":
        monkeypatch.setattr(cls, "__call__", _scaled_output(cls.__call__))
    elif change == "subclass":
        layer.__class__ = type(cls.__name__, (cls,), {"forward": _scaled_output(cls.forward)})
    else:
        layer.self_attn.sliding_window = 3
    try:
        assert not runs_as_halves(layer)
        want = trunk(dec, "padded", device)  # FUSED_NORM_DEVICES as on the CPU: every layer called
        monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
        called = count_layer_calls(monkeypatch)
        seen.clear()
        got = trunk(dec, "padded", device)
    finally:
        for h in handles:
            h.remove()
    if change == "global_hook":
        assert layer in seen  # (the halves would not call it)
    every = change in ("global_hook", "class_forward", "class_call")  # (every module hooked, every layer patched)
    assert called == (list(range(FIRST_ADAPTED)) if every else [1])
    changed = change not in ("global_hook", "sliding_window")
    assert not torch.equal(want[-1], clean[-1]) if changed else torch.equal(want[-1], clean[-1])
    close(got[-1], want[-1], device)


def test_the_trunk_off_fused_devices_calls_every_layer(device, monkeypatch):
    """Off FUSED_NORM_DEVICES (the CPU, unforced) every trunk layer is called as the module, as before."""
    dec = setup("tiny-llama", torch.float32, device)
    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda",) if device.type == "cpu" else ())
    called = count_layer_calls(monkeypatch)
    trunk(dec, "causal", device)
    assert called == list(range(FIRST_ADAPTED))


def count_swiglu(monkeypatch) -> list[int]:
    """Records every call of the fused SwiGLU op in `fused_layers.mlp` (`fused_layers._fused_swiglu`)."""
    calls: list[int] = []
    real = fused_layers._fused_swiglu
    monkeypatch.setattr(fused_layers, "_fused_swiglu", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["padded", "prefix"])
@pytest.mark.parametrize("kernel", ["composition", "triton"])
@pytest.mark.parametrize("name", MODELS)
def test_the_trunks_mlps_through_the_fused_swiglu_give_the_modules_mlps(name, kernel, case, dtype, device, monkeypatch):
    """The halved layers' MLPs as down_proj(swiglu(gate_proj(x), up_proj(x))) (`fused_layers.mlp`: `tmem::swiglu`
    once per trunk layer; FUSED_NORM_DEVICES forced on the CPU; "triton": the op's kernels forced, under the
    interpreter) give run_trunk's outputs (keys / values too) of the halves calling the MLP modules: through the
    op's torch composition bit for bit on the CPU; through its kernels (which round h once, in float32) in fp32
    within 2e-6 of the largest value (4 layers; measured 4.2e-7 on the CPU), in bf16 judged against bf16's own
    error (the same trunk in float64): no less accurate than the modules' (mean error within 1.1x theirs, measured
    0.89-1.02x) and apart from them by at most 2.5x the modules' largest error (measured 1.7x)."""
    import copy

    from tmem_kernels import swiglu_act

    if kernel == "triton":
        pytest.importorskip("triton")
        monkeypatch.setattr(swiglu_act, "use_triton", lambda g: g.dtype != torch.float64)
    dec = setup(name, dtype, device)
    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
    assert all(fused_layers.fused_swiglu_mlp(layer.mlp) for layer in dec.layers)
    calls = count_swiglu(monkeypatch)
    got = trunk(dec, case, device)
    assert len(calls) == FIRST_ADAPTED * (2 if case == "prefix" else 1)
    monkeypatch.setattr(fused_layers, "fused_swiglu_mlp", lambda module: False)
    calls.clear()
    want = trunk(dec, case, device)
    assert not calls and all(w.abs().max() > 0 for w in want)
    exact = kernel == "composition" and device.type == "cpu"
    for a, w in zip(got, want, strict=True):
        assert a.dtype == w.dtype and a.shape == w.shape
        if exact:
            assert torch.equal(a, w)
        elif dtype == torch.float32:
            torch.testing.assert_close(a, w, rtol=0, atol=2e-6 * w.abs().max().item())
    if dtype == torch.bfloat16 and not exact:
        truth = trunk(Decoder(copy.deepcopy(dec.model).to(torch.float64)), case, device)

        def mean_error(outs: list[torch.Tensor]) -> float:
            return sum((o.double() - t).abs().sum().item() for o, t in zip(outs, truth)) / sum(
                t.abs().sum().item() for t in truth
            )

        assert mean_error(got) <= 1.1 * mean_error(want)
        for a, w, t in zip(got, want, truth, strict=True):
            assert (a.double() - w.double()).abs().max() <= 2.5 * (w.double() - t).abs().max()


def _gelu_config_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=2, hidden_act="gelu")
    return LlamaMLP(config)


@pytest.mark.parametrize(
    "change", ["none", "forward_hook", "forward_pre_hook", "instance_forward", "class_forward", "subclass",
               "act_gelu", "act_hook", "act_instance_forward", "act_class_forward"],
)  # fmt: skip
def test_a_gated_mlp_that_must_be_called_is_called(change, device, monkeypatch):
    """`fused_layers.mlp` runs the fused op only for a plain SiLU gated MLP (`fused_swiglu_mlp`): hooked, its
    forward patched (instance, class), a subclass, a GELU act_fn (judged on a probe: `models.is_silu`), a hooked
    or patched act_fn: the module is called, with the change's effect. Off FUSED_NORM_DEVICES: always called."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    dec = setup("tiny-llama", torch.float32, device)
    mlp = dec.layers[0].mlp
    cls, act_cls = type(mlp), type(mlp.act_fn)
    if change == "forward_hook":
        mlp.register_forward_hook(lambda m, i, o: o * 0.5)
    elif change == "forward_pre_hook":
        mlp.register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))
    elif change == "instance_forward":
        mlp.forward = _scaled_output(cls.forward).__get__(mlp)
    elif change == "class_forward":
        monkeypatch.setattr(cls, "forward", _scaled_output(cls.forward))
    elif change == "subclass":
        mlp.__class__ = type(cls.__name__, (cls,), {"forward": _scaled_output(cls.forward)})
    elif change == "act_gelu":
        mlp = _gelu_config_mlp().to(device)
    elif change == "act_hook":
        mlp.act_fn.register_forward_hook(lambda m, i, o: o * 0.5)
    elif change == "act_instance_forward":
        mlp.act_fn.forward = lambda x: torch.nn.functional.gelu(x)
    elif change == "act_class_forward":
        assert fused_layers.fused_swiglu_mlp(mlp)  # (judged SiLU once: the class forward's change is seen)
        monkeypatch.setattr(act_cls, "forward", lambda self, x: torch.nn.functional.gelu(x))
    assert isinstance(mlp, LlamaMLP)
    x = torch.randn(2, 5, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(7)).to(device)
    want = mlp(x)
    calls = count_swiglu(monkeypatch)
    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda",) if device.type == "cpu" else ())
    assert torch.equal(fused_layers.mlp(mlp, x), want) and not calls  # off the fused devices: the module
    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
    assert fused_layers.fused_swiglu_mlp(mlp) == (change == "none")
    got = fused_layers.mlp(mlp, x)
    assert len(calls) == (change == "none")
    if change != "none":
        assert not torch.equal(want, mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))
    close(got, want, device)
