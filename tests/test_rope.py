"""Rotary embedding (`tmem_kernels.rope`, op `tmem::rope`) against `reference.rope` and HF's own
`apply_rotary_pos_emb`.

The op on the `device` fixture's device (CUDA: the Triton kernels; CPU: the torch composition) equals HF's
function for Llama / Qwen2 / Qwen3 / Mistral: on the CPU bit for bit (the same ops). The Triton kernels (on
CUDA, and called directly under TRITON_INTERPRET=1 on the CPU) round each product to the dtype before the sum
as torch does: 16-bit outputs and gradients equal torch's bit for bit; float32 within 1 ulp of the larger
product (a GPU may fuse a product into the add). Gradients against autograd through the reference, q and k as
HF's attention leaves them (a projection viewed to heads and transposed), GQA (fewer k heads), cos per batch
row or broadcast, zero rows, cos / sin gradients, double backward; opcheck, torch.compile(fullgraph=True)
through it, bad input. The Triton kernels compile for sm_90.
"""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope
from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb as mistral_rope
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb as qwen2_rope
from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb as qwen3_rope

import tmem_kernels
from tmem_kernels import reference as ref
from tmem_kernels import rotary
from tmem_kernels.library import rope

HF_ROPES = [llama_rope, qwen2_rope, qwen3_rope, mistral_rope]
# (B, Hq, Hk, T, D, cos batch): GQA, one head, odd T, head dims of tiny models / Qwen3 / a non-power-of-2 half
SHAPES = [(2, 4, 2, 5, 16, 1), (1, 1, 1, 1, 8, 1), (3, 8, 8, 7, 128, 3), (2, 6, 3, 33, 24, 2), (4, 2, 1, 40, 64, 1)]
TRITON = tmem_kernels.available("triton")
FLOAT32_TOL = dict(rtol=2e-7, atol=2e-6)  # 1 ulp at |values| up to ~16 (fused multiply-add on a GPU)


def make(shape, dtype, device, seed: int = 0):
    """q [B, Hq, T, D], k [B, Hk, T, D] (views of [B, T, H, D] projections, as HF's), cos / sin [Bc, T, D] from
    HF's rotary formula (cat(freqs, freqs)) times a random scale (the kernels must not assume the halves equal)."""
    b, hq, hk, t, d, bc = shape
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, t, hq, d, generator=g) * 2).to(device, dtype).transpose(1, 2)
    k = (torch.randn(b, t, hk, d, generator=g) * 2).to(device, dtype).transpose(1, 2)
    pos = torch.arange(t, dtype=torch.float32)[None] + torch.arange(bc)[:, None] * 3
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    scale = 1 + 0.1 * torch.randn(emb.shape, generator=g)
    return q, k, (emb.cos() * scale).to(device, dtype), (emb.sin() * scale).to(device, dtype)


def grads(fn, q, k, cos, sin, dq, dk):
    qr, kr = q.detach().clone().requires_grad_(True), k.detach().clone().requires_grad_(True)
    yq, yk = fn(qr, kr, cos, sin)
    torch.autograd.backward((yq, yk), (dq, dk))
    return yq.detach(), yk.detach(), qr.grad, kr.grad


def cotangents(q, k, seed: int):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(x.shape, generator=g).to(x.device, x.dtype) for x in (q, k))


@pytest.mark.parametrize("shape", SHAPES)
def test_float64_matches_reference_with_gradients(shape, device):
    q, k, cos, sin = make(shape, torch.float64, device)
    dq, dk = cotangents(q, k, 1)
    got = grads(rope, q, k, cos, sin, dq, dk)
    want = grads(ref.rope, q, k, cos, sin, dq, dk)
    for a, b in zip(got, want):
        assert a.dtype == torch.float64 and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("hf_rope", HF_ROPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_hf(hf_rope, dtype, device):
    """The op gives HF's function's outputs and gradients: bit for bit on the CPU and in bf16; float32 on
    CUDA within 1 ulp."""
    q, k, cos, sin = make((2, 4, 2, 9, 32, 1), dtype, device, seed=2)
    dq, dk = cotangents(q, k, 3)
    got = grads(rope, q, k, cos, sin, dq, dk)
    want = grads(hf_rope, q, k, cos, sin, dq, dk)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        if device.type == "cpu" or dtype != torch.float32:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, **FLOAT32_TOL)


@pytest.mark.skipif(not TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_kernels_match_the_torch_composition(shape, dtype, device):
    """The two Triton kernels called directly (compiled on CUDA, under the interpreter on the CPU) against
    `forward_torch` / `backward_torch`: 16-bit bit for bit; float32 within 1 ulp (exact on the CPU)."""
    from tmem_kernels import rotary_triton

    q, k, cos, sin = make(shape, dtype, device, seed=6)
    dq, dk = cotangents(q, k, 7)
    got = (*rotary_triton.forward(q, k, cos, sin), *rotary_triton.backward(dq, dk, cos, sin))
    want = (*rotary.forward_torch(q, k, cos, sin), *rotary.backward_torch(dq, dk, cos, sin, dtype, dtype))
    for a, b in zip(got, want):
        assert a.dtype == dtype and a.shape == b.shape
        if dtype != torch.float32 or device.type == "cpu":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, **FLOAT32_TOL)
    assert got[0].stride() == q.stride() and got[1].stride() == k.stride()  # HF's products keep q's layout


@pytest.mark.skipif(not TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_op_through_the_triton_kernels(dtype, device, monkeypatch):
    """The op's Triton dispatch (on the CPU: under the interpreter, forced), contiguous inputs this time:
    values and gradients as the reference's autograd; zero rows."""
    monkeypatch.setattr(rotary, "use_triton", lambda q, k, c, s: len({q.dtype, k.dtype, c.dtype, s.dtype}) == 1)
    q, k, cos, sin = make((3, 4, 2, 11, 48, 3), dtype, device, seed=11)
    q, k = q.contiguous(), k.contiguous()
    dq, dk = cotangents(q, k, 12)
    got = grads(rope, q, k, cos, sin, dq, dk)
    want = grads(ref.rope, q, k, cos, sin, dq, dk)
    for a, b in zip(got, want):
        if dtype == torch.bfloat16 or device.type == "cpu":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, **FLOAT32_TOL)
    yq, yk = rope(q[:, :, :0], k[:, :, :0], cos[:, :0], sin[:, :0])
    assert yq.shape == (3, 4, 0, 48) and yk.shape == (3, 2, 0, 48)


def test_cos_sin_gradients_mixed_dtypes_and_double_backward(device):
    """cos / sin that require grad get autograd's gradients; a float32 cos on bf16 q promotes as HF's
    products; create_graph=True differentiates again."""
    q, k, cos, sin = make((2, 4, 2, 6, 16, 2), torch.float64, device, seed=4)
    dq, dk = cotangents(q, k, 5)
    outs = {}
    for fn in (rope, ref.rope):
        qr, kr = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
        cr, sr = cos.clone().requires_grad_(True), sin.clone().requires_grad_(True)
        yq, yk = fn(qr, kr, cr, sr)
        first = torch.autograd.grad((yq, yk), (qr, kr, cr, sr), (dq, dk), create_graph=True)
        second = torch.autograd.grad(sum(g.pow(2).sum() for g in first), (cr, sr))
        outs[fn] = (*first, *second)
    for a, b in zip(outs[rope], outs[ref.rope]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    qb, kb, cos32, sin32 = make((1, 2, 2, 3, 8, 1), torch.bfloat16, device, seed=9)
    got, want = rope(qb, kb, cos32.float(), sin32.float()), ref.rope(qb, kb, cos32.float(), sin32.float())
    assert got[0].dtype == torch.float32 and all(torch.equal(a, b) for a, b in zip(got, want))


def test_opcheck(device):
    q, k, cos, sin = make((2, 4, 2, 5, 16, 1), torch.float32, device, seed=9)
    op = torch.ops.tmem.rope
    opcheck(op, (q.clone().requires_grad_(True), k.clone().requires_grad_(True), cos, sin))
    opcheck(op, (q.contiguous(), k, cos.clone().requires_grad_(True), sin))
    opcheck(op, (q, k, cos, sin))
    dq, dk = cotangents(q, k, 1)
    opcheck(torch.ops.tmem.rope_backward, (dq, dk, cos, sin))


def test_compiles_fullgraph(device):
    q, k, cos, sin = make((2, 4, 2, 7, 16, 1), torch.float32, device, seed=10)

    def fn(a, b, c, s):
        yq, yk = rope(torch.tanh(a), b * 2, c, s)
        return yq * 3, yk

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    dq, dk = cotangents(q, k, 11)
    got = grads(compiled, q, k, cos, sin, dq, dk)
    want = grads(fn, q, k, cos, sin, dq, dk)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_bad_input_raises():
    q, k, cos, sin = make((2, 4, 2, 5, 16, 1), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"cos and sin \[B or 1, T, D\]"):
        rope(q, k, cos[..., :8], sin[..., :8])
    with pytest.raises(ValueError, match=r"k \[B, Hk, T, D\]"):
        rope(q, k[:1], cos, sin)
    with pytest.raises(ValueError, match=r"cos and sin"):
        rope(q[0], k, cos, sin)
    with pytest.raises(ValueError, match="even"):
        rope(q[..., :15], k[..., :15], cos[..., :15], sin[..., :15])
    with pytest.raises(TypeError, match="float tensor"):
        rope(q.int(), k, cos, sin)
    with pytest.raises(TypeError, match="torch.Tensor"):
        rope(q.tolist(), k, cos, sin)
    with pytest.raises(ValueError, match="one device"):
        rope(q, k, cos.to("meta"), sin)


_COMPILE_SCRIPT = r"""
import json
from compile_sm90 import compile_for_sm90
from tmem_kernels import rotary_triton as X

out = {}
for dt in ("fp32", "bf16"):
    for d in (64, 128):  # tiny models / SmolLM2, Llama / Qwen3
        block_r, block_d2 = X._blocks(d)
        for name, backward in (("fwd", False), ("bwd", True)):
            fn = X._rope_kernel
            constexprs = {"BLOCK_R": block_r, "BLOCK_D2": block_d2, "BACKWARD": backward, "INTERPRET": False}
            sig = {p: "*" + dt for p in ("q_ptr", "k_ptr", "qo_ptr", "ko_ptr", "cos_ptr", "sin_ptr")}
            sig.update({k: "constexpr" for k in constexprs})
            sig = {k: sig.get(k, "i32") for k in fn.arg_names}
            out[f"{name}_{dt}_D{d}"] = compile_for_sm90(fn, sig, constexprs, X._warps(block_r, block_d2))
print(json.dumps(out))
"""


def test_triton_gpu_compile_for_sm90(sm90_compile):
    """Both kernels (one jit function, BACKWARD constexpr) compile for an H100 (sm_90) with Triton's compiler,
    fp32 and bf16, head dims 64 and 128; no register spills where ptxas reports them. No GPU needed."""
    result = sm90_compile(_COMPILE_SCRIPT)
    assert len(result) == 8
    for name, meta in result.items():
        assert meta["cubin_bytes"] > 0, name
        assert meta["spill_bytes"] in (0, None), (name, meta)
