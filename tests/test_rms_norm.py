"""Fused RMSNorm (`tmem_kernels.rms_norm`, op `tmem::rms_norm`) against `reference.rms_norm` and HF's own
RMSNorm modules.

The op on the `device` fixture's device (CUDA: the Triton kernels; CPU: the torch composition) equals
LlamaRMSNorm / Qwen2 / Qwen3 / Mistral's forward: on the CPU bit for bit (the same ops). The Triton kernels
(on CUDA, and called directly under TRITON_INTERPRET=1 on the CPU) reduce a row's sum of squares in another
order: rstd within 2 ulp (float32), so the normalised row, rounded to x's dtype, may round the other way (1 ulp
of it), which the weight (below 4 here) makes at most 2 ulp of y in bf16/fp16; float32 y within 8 ulp.
Measured under the interpreter (20 seeds, H up to 4096): rstd 2 ulp, y 0 ulp (bf16), 2 (fp16), 5 (fp32).
Gradients w.r.t. x and weight against autograd through the reference; odd H, 3-D input, zero rows, a float32
weight on bf16 x (HF's promotion), double backward; opcheck, torch.compile(fullgraph=True) through it, bad
input. The Triton kernels compile for sm_90.
"""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

import tmem_kernels
from tmem_kernels import reference as ref
from tmem_kernels import rmsnorm
from tmem_kernels.library import rms_norm

HF_NORMS = [LlamaRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm, MistralRMSNorm]
SHAPES = [(7, 37), (2, 5, 64), (3, 1000), (130, 24), (1, 1)]  # odd H, 3-D, H > one warp, many rows per program
TRITON = tmem_kernels.available("triton")
Y_ULPS = {torch.float32: 8, torch.bfloat16: 2, torch.float16: 2}  # Triton's y vs the composition's (docstring)


def make(shape, dtype, device, seed: int = 0, wdtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(device, dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(device, wdtype or dtype)
    return x, weight


def ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| in units in the last place of want's dtype at want's magnitude."""
    info = torch.finfo(want.dtype)
    mag = want.double().abs().clamp_min(info.tiny)  # subnormals: the spacing of the smallest normal's binade
    spacing = info.eps * torch.exp2(torch.floor(torch.log2(mag)))
    return (got.double() - want.double()).abs() / spacing


def grads(fn, x, weight, dy, eps=1e-6):
    xr, wr = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    y = fn(xr, wr, eps)
    y.backward(dy)
    return y.detach(), xr.grad, wr.grad


@pytest.mark.parametrize("shape", SHAPES)
def test_float64_matches_reference_with_gradients(shape, device):
    """float64 x: the statistics in float32 as HF's; values and both gradients against the reference's autograd."""
    x, weight = make(shape, torch.float64, device)
    dy = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(device)
    y, dx, dw = grads(rms_norm, x, weight, dy)
    y_ref, dx_ref, dw_ref = grads(ref.rms_norm, x, weight, dy)
    assert y.dtype == dx.dtype == dw.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-6, atol=1e-6 * dx_ref.abs().max().item())
    torch.testing.assert_close(dw, dw_ref, rtol=1e-6, atol=1e-6 * dw_ref.abs().max().item())


@pytest.mark.parametrize("norm_cls", HF_NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_the_hf_module(norm_cls, dtype, device):
    """The op gives each HF module's output: bit for bit on the CPU; Triton on CUDA within 2 ulp (bf16) / 8 ulp
    (fp32) (see the module docstring). Gradients as autograd through the module."""
    x, weight = make((4, 9, 96), dtype, device, seed=2)
    module = norm_cls(96, eps=1e-5).to(device, dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
    y = rms_norm(x, module.weight, module.variance_epsilon)
    want = module(x)
    assert y.dtype == want.dtype == dtype
    if device.type == "cpu":
        assert torch.equal(y, want)
    else:
        assert ulps(y, want).max().item() <= Y_ULPS[dtype]
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    _, dx, dw = grads(rms_norm, x, weight, dy, eps=1e-5)
    xr = x.clone().requires_grad_(True)
    module(xr).backward(dy)
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(dx, xr.grad, rtol=tol, atol=tol * xr.grad.abs().max().item())
    torch.testing.assert_close(dw, module.weight.grad, rtol=tol, atol=tol * module.weight.grad.abs().max().item())


def test_float32_weight_on_bf16_x_promotes_as_hf(device):
    """HF multiplies weight * normed.to(x.dtype): a float32 weight on bf16 x gives float32, the normed row
    rounded to bf16 first."""
    x, weight = make((6, 40), torch.bfloat16, device, seed=4, wdtype=torch.float32)
    module = LlamaRMSNorm(40).to(device)
    with torch.no_grad():
        module.weight.copy_(weight)
    y = rms_norm(x, weight, 1e-6)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, module(x), rtol=1e-6, atol=0)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(device)
    _, dx, dw = grads(rms_norm, x, weight, dy)
    _, dx_ref, dw_ref = grads(ref.rms_norm, x, weight, dy)
    assert dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    torch.testing.assert_close(dx, dx_ref, rtol=1.6e-2, atol=1.6e-2 * dx_ref.abs().max().item())
    torch.testing.assert_close(dw, dw_ref, rtol=1e-5, atol=1e-5 * dw_ref.abs().max().item())


@pytest.mark.skipif(not TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_kernels_match_the_torch_composition(shape, dtype, device):
    """The two Triton kernels called directly (compiled on CUDA, under the interpreter on the CPU) against
    `forward_torch` / `backward_torch`: rstd within 2 ulp, y within Y_ULPS, dx within 1 (16-bit) / 4 (fp32)
    epsilons of its larger term (measured: 0.35, 1.5)."""
    from tmem_kernels import rmsnorm_triton

    x, weight = make(shape, dtype, device, seed=6)
    x2 = x.reshape(-1, shape[-1])
    dy = torch.randn(x2.shape, generator=torch.Generator().manual_seed(7)).to(device, dtype)
    y, rstd = rmsnorm_triton.forward(x2, weight, 1e-6)
    y_ref, rstd_ref = rmsnorm.forward_torch(x2, weight, 1e-6)
    dx = rmsnorm_triton.backward(dy, x2, weight, rstd)
    dx_ref = rmsnorm.backward_torch(dy, x2, weight, rstd_ref)
    assert y.dtype == dx.dtype == dtype and rstd.dtype == torch.float32
    assert ulps(rstd, rstd_ref).max().item() <= (2 if device.type == "cpu" else 4)  # CUDA: rsqrt.approx
    assert ulps(y, y_ref).max().item() <= Y_ULPS[dtype]
    # dx: a difference of two terms; its error is measured against the larger term's magnitude
    scale = (rstd_ref[:, None] * (dy.float() * weight.float()).abs()).amax().item()
    limit = 4 if dtype == torch.float32 else 1
    assert (dx.double() - dx_ref.double()).abs().max().item() <= limit * torch.finfo(dtype).eps * scale


@pytest.mark.skipif(not TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_op_through_the_triton_kernels(dtype, device, monkeypatch):
    """The op's Triton dispatch (on the CPU: under the interpreter, forced): a 3-D input of odd width, a weight
    that requires grad, zero rows; values and gradients as the reference's autograd."""
    monkeypatch.setattr(rmsnorm, "use_triton", lambda x: x.dtype != torch.float64)
    x, weight = make((3, 11, 75), dtype, device, seed=11)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(12)).to(device, dtype)
    y, dx, dw = grads(rms_norm, x, weight, dy)
    y_ref, dx_ref, dw_ref = grads(ref.rms_norm, x, weight, dy)
    assert y.shape == dx.shape == x.shape and dw.shape == weight.shape
    assert ulps(y, y_ref).max().item() <= Y_ULPS[dtype]
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(dx, dx_ref, rtol=tol, atol=tol * dx_ref.abs().max().item())
    torch.testing.assert_close(dw, dw_ref, rtol=tol, atol=tol * dw_ref.abs().max().item())
    assert rms_norm(x[:0], weight, 1e-6).shape == (0, 11, 75)


def test_zero_rows_and_double_backward(device):
    x = torch.empty(0, 5, 33, device=device)
    assert rms_norm(x, torch.ones(33, device=device), 1e-6).shape == (0, 5, 33)
    x, weight = make((3, 17), torch.float64, device, seed=8)
    for fn in (rms_norm, ref.rms_norm):
        xr = x.clone().requires_grad_(True)
        (dx,) = torch.autograd.grad((fn(xr, weight, 1e-6) ** 2).sum(), xr, create_graph=True)
        (ddx,) = torch.autograd.grad(dx.pow(2).sum(), xr)
        if fn is rms_norm:
            got = (dx.detach(), ddx)
    torch.testing.assert_close(got[0], dx.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[1], ddx, rtol=1e-5, atol=1e-5 * ddx.abs().max().item())


def test_opcheck(device):
    x, weight = make((2, 5, 24), torch.float32, device, seed=9)
    op = torch.ops.tmem.rms_norm
    opcheck(op, (x.clone().requires_grad_(True), weight.clone().requires_grad_(True), 1e-6))
    opcheck(op, (x.clone().requires_grad_(True), weight, 1e-5))
    opcheck(op, (x, weight, 0.0))
    _, rstd = op(x, weight, 1e-6)
    opcheck(torch.ops.tmem.rms_norm_backward, (torch.randn_like(x), x, weight, rstd))


def test_compiles_fullgraph(device):
    x, weight = make((3, 7, 40), torch.float32, device, seed=10)
    fn = lambda h, w: rms_norm(torch.tanh(h), w, 1e-6) * 2  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    dy = torch.randn_like(x)
    got = grads(lambda h, w, _: compiled(h, w), x, weight, dy)
    want = grads(lambda h, w, _: fn(h, w), x, weight, dy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_bad_input_raises():
    x, weight = make((4, 8), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"weight \[H\]"):
        rms_norm(x, weight[:7], 1e-6)
    with pytest.raises(ValueError, match=r"weight \[H\]"):
        rms_norm(x, weight[None], 1e-6)
    with pytest.raises(TypeError, match="float tensor"):
        rms_norm(x.int(), weight, 1e-6)
    with pytest.raises(TypeError, match="float tensor"):
        rms_norm(x, weight.long(), 1e-6)
    with pytest.raises(TypeError, match="torch.Tensor"):
        rms_norm(x.tolist(), weight, 1e-6)
    with pytest.raises(ValueError, match="one device"):
        rms_norm(x, weight.to("meta"), 1e-6)
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, weight, -1.0)
    with pytest.raises(ValueError, match="eps"):
        rms_norm(x, weight, float("nan"))


_COMPILE_SCRIPT = r"""
import json
from compile_sm90 import compile_for_sm90
from tmem_kernels import rmsnorm_triton as X

out = {}
for dt in ("fp32", "bf16"):
    for h in (64, 2560, 8192):  # tiny widths (many rows per program), Qwen3-4B, Llama-70B (Qwen3-14B: the same blocks)
        block_m, block_h, _ = X._blocks(4096, h)
        for name, fn, ptrs in (("fwd", X._forward_kernel, ("x_ptr", "w_ptr", "y_ptr")),
                               ("bwd", X._backward_kernel, ("dy_ptr", "x_ptr", "w_ptr", "dx_ptr"))):
            constexprs = {"BLOCK_M": block_m, "BLOCK_H": block_h, "INTERPRET": False}
            sig = {p: "*" + dt for p in ptrs}
            sig.update({"rstd_ptr": "*fp32", "N": "i32", "H": "i32", **{k: "constexpr" for k in constexprs}})
            if name == "fwd":
                sig["eps"] = "fp32"
            sig = {k: sig[k] for k in fn.arg_names}
            out[f"{name}_{dt}_H{h}"] = compile_for_sm90(fn, sig, constexprs, X._warps(block_m, block_h))
print(json.dumps(out))
"""


def test_triton_gpu_compile_for_sm90(sm90_compile):
    """Both kernels compile for an H100 (sm_90) with Triton's compiler at tiny and real widths, fp32 and bf16;
    no register spills where ptxas reports them. No GPU needed."""
    result = sm90_compile(_COMPILE_SCRIPT)
    assert len(result) == 12
    for name, meta in result.items():
        assert meta["cubin_bytes"] > 0, name
        assert meta["spill_bytes"] in (0, None), (name, meta)
