"""PackedLinear (oneDNN-packed CPU weights) against F.linear, and models packed the way load_model packs them.

The spec is `F.linear` on the same weight: equal to float32 rounding (oneDNN sums in another order),
for any row count, 3-D and strided inputs, with and without bias; autograd, other dtypes and a changed
weight fall back or repack. Whole models (every family the README names, the real SmolLM2): same
parameters and state_dict, same logits, the same greedy tokens, deep copies, inference mode.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.test_families import FAMILIES
from tmem_runtime import load_model
from tmem_runtime.decoding import greedy_generate
from tmem_runtime.packed_linears import (
    AVAILABLE,
    PackedLinear,
    _packed,
    pack_linears,
    packable_dtypes,
    unpack_linears,
)

pytestmark = pytest.mark.skipif(not AVAILABLE, reason="this torch has no oneDNN")


def _pair(n: int = 96, k: int = 64, bias: bool = True, seed: int = 0) -> tuple[nn.Linear, PackedLinear]:
    torch.manual_seed(seed)
    plain = nn.Linear(k, n, bias=bias).requires_grad_(False)
    return plain, PackedLinear.from_linear(plain)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = want.abs().max().clamp_min(1.0)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert ((got - want).abs().max() / scale).item() < 1e-5


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 64), (3, 64), (17, 64), (200, 64), (2, 5, 64), (1, 1, 64)])
def test_equals_f_linear(shape, bias):
    plain, packed = _pair(bias=bias)
    x = torch.randn(*shape)
    assert packed._uses_packed(x)
    _close(packed(x), F.linear(x, plain.weight, plain.bias))


def test_packed_under_inference_mode_serves_no_grad_calls_after():
    plain, packed = _pair()
    x = torch.randn(4, 64)
    with torch.inference_mode():
        _close(packed(x), F.linear(x, plain.weight, plain.bias))  # packs inside inference mode
    with torch.no_grad():
        _close(packed(x), F.linear(x, plain.weight, plain.bias))
    _close(packed(x), F.linear(x, plain.weight, plain.bias))


def test_strided_and_inference_mode_inputs():
    plain, packed = _pair()
    x = torch.randn(3, 10, 64)[:, ::2]
    _close(packed(x), F.linear(x, plain.weight, plain.bias))
    with torch.inference_mode():
        y = torch.randn(64, 7).t()
        got = packed(y)
        assert got.is_inference()
        _close(got, F.linear(y, plain.weight, plain.bias))


def test_bfloat16_within_bfloat16_rounding():
    if torch.bfloat16 not in packable_dtypes():
        pytest.skip("oneDNN has no bf16 path on this CPU")
    plain, packed = _pair()
    plain.bfloat16()
    x = torch.randn(9, 64, dtype=torch.bfloat16)
    assert packed._uses_packed(x)
    want = F.linear(x.float(), plain.weight.float(), plain.bias.float())
    got = packed(x)
    assert got.dtype == torch.bfloat16
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < 2e-2


def test_autograd_falls_back_with_the_same_gradients():
    plain, packed = _pair()
    x = torch.randn(5, 64, requires_grad=True)
    assert not packed._uses_packed(x)
    packed(x).square().sum().backward()
    want = x.grad.clone()
    x.grad = None
    F.linear(x, plain.weight, plain.bias).square().sum().backward()
    assert torch.equal(x.grad, want)
    plain.weight.requires_grad_(True)  # a trained weight: never packed while autograd records
    assert not packed._uses_packed(torch.randn(5, 64))
    with torch.no_grad():
        assert packed._uses_packed(torch.randn(5, 64))


def test_float16_and_1d_inputs_run_as_f_linear():
    plain, packed = _pair()
    x = torch.randn(64)
    assert not packed._uses_packed(x)
    assert torch.equal(packed(x), F.linear(x, plain.weight, plain.bias))
    packed.half()
    if torch.float16 not in packable_dtypes():
        h = torch.randn(4, 64, dtype=torch.float16)
        assert not packed._uses_packed(h)
        assert torch.equal(packed(h), F.linear(h, packed.weight, packed.bias))


def test_a_changed_weight_is_repacked():
    plain, packed = _pair()
    x = torch.randn(6, 64)
    packed(x)  # packs
    with torch.no_grad():
        plain.weight.mul_(-2.0)  # in place: a new version of the same tensor
    _close(packed(x), F.linear(x, plain.weight, plain.bias))
    plain.load_state_dict({"weight": torch.randn(96, 64), "bias": torch.randn(96)})
    _close(packed(x), F.linear(x, plain.weight, plain.bias))
    packed.double().float()  # new storage
    _close(packed(x), F.linear(x, packed.weight, packed.bias))


def test_a_linear_under_two_names_of_one_parent_is_one_packed_module():
    """A module registered twice in the same parent (and once more elsewhere): every name gets the same
    PackedLinear, and unpacking gives every name the same nn.Linear. The second name in one parent used to
    keep the old module (named_children() yields a module once per parent)."""
    plain, _ = _pair()
    inner = nn.Module()
    inner.first, inner.again = plain, plain
    model = nn.Module()
    model.inner, model.other = inner, plain
    x = torch.randn(5, 64)
    want = F.linear(x, plain.weight, plain.bias)
    assert pack_linears(model) == 1
    assert type(inner.first) is PackedLinear and inner.again is inner.first and model.other is inner.first
    with torch.no_grad():
        _close(inner.again(x), want)
    assert unpack_linears(model) == 1
    assert type(inner.first) is nn.Linear and inner.again is inner.first and model.other is inner.first
    _close(inner.again(x), want)


def test_wrong_input_width_raises_like_nn_linear():
    _, packed = _pair()
    with pytest.raises(RuntimeError):
        packed(torch.randn(4, 65))


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_model_keeps_its_parameters_and_logits(family):
    model, _ = load_model(f"tiny-{family}", packed_linears=False)
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    params, keys = dict(model.named_parameters()), list(model.state_dict())
    ids = torch.randint(3, 500, (3, 11))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    assert pack_linears(model) == len(linears) > 0
    assert all(isinstance(model.get_submodule(n), PackedLinear) for n in linears)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == keys
    with torch.inference_mode():
        _close(model(input_ids=ids).logits, want)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        _close(twin(input_ids=ids).logits, want)
    assert len(_packed) > 0
    assert unpack_linears(model) == len(linears)
    assert not any(m.weight in _packed for m in linears.values())
    assert all(type(model.get_submodule(n)) is nn.Linear for n in linears)
    assert all(p is params[n] for n, p in model.named_parameters())


def test_load_model_packs_on_the_cpu_unless_told_not_to():
    model, _ = load_model("tiny-llama")
    assert isinstance(model.lm_head, PackedLinear)
    assert isinstance(model.model.layers[0].mlp.down_proj, PackedLinear)
    plain, _ = load_model("tiny-llama", packed_linears=False)
    assert type(plain.lm_head) is nn.Linear


def test_smollm2_greedy_tokens_equal_unpacked():
    """The real model, its lm_head tied to the embedding: the same 16 greedy tokens for 6 prompts."""
    model, tok = load_model("smollm2-135m", packed_linears=False)
    prompts = [tok.encode(f"The {w} of the old house was") for w in ("door", "roof", "garden", "key", "cat", "owner")]
    with torch.inference_mode():
        want = greedy_generate(model, prompts, 16, batch_size=6)
    assert pack_linears(model) == 211
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.inference_mode():
        assert greedy_generate(model, prompts, 16, batch_size=6) == want
