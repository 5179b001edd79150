"""Fused residual add + RMSNorm (`tmem_kernels.add_rms_norm`, op `tmem::add_rms_norm`) against
`reference.add_rms_norm` and HF's own RMSNorm modules after torch's add.

The op on the `device` fixture's device (CUDA: the Triton kernels; CPU: the torch composition) gives s = x +
residual bit for bit (torch's add, in x's dtype) and y = the RMSNorm of s: on the CPU bit for bit the HF module's
output (the same ops). The Triton forward (on CUDA, and called directly under TRITON_INTERPRET=1 on the CPU)
rounds s as torch's add does (bit for bit everywhere) and normalises it with `rmsnorm_triton`'s lines: under the
interpreter y and rstd are `rmsnorm_triton.forward(s)`'s bit for bit, and against the torch composition within
the tolerances of tests/test_rms_norm.py (Y_ULPS). The backward's one gradient (to x and to residual) is the
norm's dx rounded to x's dtype plus the gradient of s, as autograd through the composition sums them: without
a gradient of s, `rmsnorm_triton.backward`'s bit for bit under the interpreter. Gradients w.r.t. x, residual and
weight against autograd through the reference, through y, s or both; odd H, 3-D input, zero rows, a float32
weight on bf16 x (HF's promotion), double backward; opcheck, torch.compile(fullgraph=True), bad input. The
Triton kernels compile for sm_90.
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
from tests.test_rms_norm import SHAPES, Y_ULPS, ulps
from tmem_kernels import addrmsnorm, rmsnorm
from tmem_kernels import reference as ref
from tmem_kernels.library import add_rms_norm

HF_NORMS = [LlamaRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm, MistralRMSNorm]
TRITON = tmem_kernels.available("triton")


def make(shape, dtype, device, seed: int = 0, wdtype=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, residual, weight): a residual stream of magnitude ~3 and a branch output of ~1."""
    g = torch.Generator().manual_seed(seed)
    residual = (torch.randn(shape, generator=g) * 3).to(device, dtype)
    x = torch.randn(shape, generator=g).to(device, dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(device, wdtype or dtype)
    return x, residual, weight


def grads(fn, x, residual, weight, dy, ds, eps=1e-6):
    """(y, s, dx, dresidual, dweight) of fn with dy flowing into y and ds into s (None: that output unused)."""
    xr, rr, wr = (t.clone().requires_grad_(True) for t in (x, residual, weight))
    y, s = fn(xr, rr, wr, eps)
    outs = [(o, g) for o, g in ((y, dy), (s, ds)) if g is not None]
    torch.autograd.backward([o for o, _ in outs], [g for _, g in outs])
    return y.detach(), s.detach(), xr.grad, rr.grad, wr.grad


def grad_tol(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-6, torch.float32: 1e-5}.get(dtype, 1.6e-2)


def assert_grads_close(got, want, dtype) -> None:
    tol = grad_tol(dtype)
    for a, b in zip(got, want, strict=True):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


@pytest.mark.parametrize("shape", SHAPES)
def test_float64_matches_reference_with_gradients(shape, device):
    """float64: values and the three gradients against the reference's autograd, through y and s."""
    x, residual, weight = make(shape, torch.float64, device)
    g = torch.Generator().manual_seed(1)
    dy, ds = (torch.randn(shape, dtype=torch.float64, generator=g).to(device) for _ in range(2))
    y, s, *got = grads(add_rms_norm, x, residual, weight, dy, ds)
    y_ref, s_ref, *want = grads(ref.add_rms_norm, x, residual, weight, dy, ds)
    assert y.dtype == s.dtype == torch.float64
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=0)
    assert_grads_close(got, want, torch.float64)
    assert torch.equal(got[0], got[1])  # one gradient flows to x and to residual


@pytest.mark.parametrize("norm_cls", HF_NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_torchs_add_then_the_hf_module(norm_cls, dtype, device):
    """s is torch's x + residual bit for bit; y each HF module's output on s: bit for bit on the CPU, Triton on
    CUDA within Y_ULPS. Gradients as autograd through the add and the module."""
    x, residual, weight = make((4, 9, 96), dtype, device, seed=2)
    module = norm_cls(96, eps=1e-5).to(device, dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
    y, s = add_rms_norm(x, residual, module.weight, module.variance_epsilon)
    s_want = x + residual
    want = module(s_want)
    assert y.dtype == want.dtype == s.dtype == dtype
    assert torch.equal(s, s_want)
    if device.type == "cpu":
        assert torch.equal(y, want)
    else:
        assert ulps(y, want).max().item() <= Y_ULPS[dtype]
    g = torch.Generator().manual_seed(3)
    dy, ds = (torch.randn(x.shape, generator=g).to(device, dtype) for _ in range(2))
    *_, dx, dr, dw = grads(add_rms_norm, x, residual, weight, dy, ds, eps=1e-5)
    xr, rr = x.clone().requires_grad_(True), residual.clone().requires_grad_(True)
    s_mod = xr + rr
    torch.autograd.backward([module(s_mod), s_mod], [dy, ds])
    assert_grads_close((dx, dr, dw), (xr.grad, rr.grad, module.weight.grad), dtype)


@pytest.mark.parametrize("used", ["y", "s"])
def test_gradients_through_one_output(used, device):
    """Only y (the norm) or only s (the residual stream) differentiated: the other's gradient is absent, not
    zeros; the torch path and the forced Triton path as the reference's autograd."""
    x, residual, weight = make((5, 3, 40), torch.float32, device, seed=13)
    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(14)).to(device)
    dy, ds = (d, None) if used == "y" else (None, d)
    want = grads(ref.add_rms_norm, x, residual, weight, dy, ds)[2:]
    assert_grads_close(grads(add_rms_norm, x, residual, weight, dy, ds)[2:], want, torch.float32)
    if used == "s":
        assert want[2] is None  # (the weight takes no part in s)


def test_float32_weight_on_bf16_x_promotes_as_hf(device):
    """A float32 weight on bf16 x: y float32 (the normed row rounded to bf16 first), s and the x / residual
    gradients bf16, the weight's float32."""
    x, residual, weight = make((6, 40), torch.bfloat16, device, seed=4, wdtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    dy, ds = torch.randn(x.shape, generator=g).to(device), torch.randn(x.shape, generator=g).to(device, x.dtype)
    y, s, *got = grads(add_rms_norm, x, residual, weight, dy, ds)
    y_ref, s_ref, *want = grads(ref.add_rms_norm, x, residual, weight, dy, ds)
    assert y.dtype == torch.float32 and s.dtype == got[0].dtype == got[1].dtype == torch.bfloat16
    assert got[2].dtype == torch.float32
    assert torch.equal(s, s_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=0)
    assert_grads_close(got[:2], want[:2], torch.bfloat16)
    assert_grads_close(got[2:], want[2:], torch.float32)


@pytest.mark.skipif(not TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_kernels_match_the_torch_composition(shape, dtype, device):
    """The two Triton kernels called directly (compiled on CUDA, under the interpreter on the CPU) against
    `forward_torch` / `backward_torch`: s bit for bit, rstd and y as tests/test_rms_norm.py's kernels (rstd 2 ulp,
    y Y_ULPS), d within its limits; under the interpreter y, rstd and d (without ds) are `rmsnorm_triton`'s on s
    bit for bit, and d with ds that plus ds in x's dtype."""
    from tmem_kernels import addrmsnorm_triton, rmsnorm_triton

    x, residual, weight = make(shape, dtype, device, seed=6)
    x2, r2 = x.reshape(-1, shape[-1]), residual.reshape(-1, shape[-1])
    g = torch.Generator().manual_seed(7)
    dy, ds = (torch.randn(x2.shape, generator=g).to(device, dtype) for _ in range(2))
    y, s, rstd = addrmsnorm_triton.forward(x2, r2, weight, 1e-6)
    y_ref, s_ref, rstd_ref = addrmsnorm.forward_torch(x2, r2, weight, 1e-6)
    assert y.dtype == s.dtype == dtype and rstd.dtype == torch.float32
    assert torch.equal(s, s_ref)
    assert ulps(rstd, rstd_ref).max().item() <= (2 if device.type == "cpu" else 4)  # CUDA: rsqrt.approx
    assert ulps(y, y_ref).max().item() <= Y_ULPS[dtype]
    d_norm = addrmsnorm_triton.backward(dy, None, s, weight, rstd)
    d = addrmsnorm_triton.backward(dy, ds, s, weight, rstd)
    d_ref = addrmsnorm.backward_torch(dy, ds, s_ref, weight, rstd_ref)
    assert d.dtype == dtype
    # a difference of two terms (+ ds): the error measured against the larger term's magnitude, as test_rms_norm's
    scale = (rstd_ref[:, None] * (dy.float() * weight.float()).abs()).amax().item() + ds.abs().max().item()
    limit = 4 if dtype == torch.float32 else 1
    assert (d.double() - d_ref.double()).abs().max().item() <= limit * torch.finfo(dtype).eps * scale
    if device.type == "cpu":  # the interpreter: rmsnorm_triton's very lines on s
        y_rms, rstd_rms = rmsnorm_triton.forward(s, weight, 1e-6)
        assert torch.equal(y, y_rms) and torch.equal(rstd, rstd_rms)
        assert torch.equal(d_norm, rmsnorm_triton.backward(dy, s, weight, rstd))
        assert torch.equal(d, d_norm + ds)


@pytest.mark.skipif(not TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_op_through_the_triton_kernels(dtype, device, monkeypatch):
    """The op's Triton dispatch (on the CPU: under the interpreter, forced through `rmsnorm.use_triton`, which
    `addrmsnorm.use_triton` asks): a 3-D input of odd width, a weight that requires grad, zero rows; values and
    gradients as the reference's autograd, through y and s, through y only."""
    monkeypatch.setattr(rmsnorm, "use_triton", lambda x: x.dtype != torch.float64)
    assert addrmsnorm.use_triton(torch.zeros(1, dtype=dtype))
    x, residual, weight = make((3, 11, 75), dtype, device, seed=11)
    g = torch.Generator().manual_seed(12)
    dy, ds = (torch.randn(x.shape, generator=g).to(device, dtype) for _ in range(2))
    for used_ds in (ds, None):
        y, s, *got = grads(add_rms_norm, x, residual, weight, dy, used_ds)
        y_ref, s_ref, *want = grads(ref.add_rms_norm, x, residual, weight, dy, used_ds)
        assert y.shape == s.shape == got[0].shape == x.shape and got[2].shape == weight.shape
        assert torch.equal(s, s_ref)
        assert ulps(y, y_ref).max().item() <= Y_ULPS[dtype]
        assert_grads_close(got, want, dtype)
    y, s = add_rms_norm(x[:0], residual[:0], weight, 1e-6)
    assert y.shape == s.shape == (0, 11, 75)


def test_zero_rows_and_double_backward(device):
    x = torch.empty(0, 5, 33, device=device)
    y, s = add_rms_norm(x, x, torch.ones(33, device=device), 1e-6)
    assert y.shape == s.shape == (0, 5, 33)
    x, residual, weight = make((3, 17), torch.float64, device, seed=8)
    results = []
    for fn in (add_rms_norm, ref.add_rms_norm):
        xr = x.clone().requires_grad_(True)
        y, s = fn(xr, residual, weight, 1e-6)
        (dx,) = torch.autograd.grad((y**2).sum() + (s**3).sum(), xr, create_graph=True)
        (ddx,) = torch.autograd.grad(dx.pow(2).sum(), xr)
        results.append((dx.detach(), ddx))
    (dx, ddx), (dx_ref, ddx_ref) = results
    torch.testing.assert_close(dx, dx_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ddx, ddx_ref, rtol=1e-5, atol=1e-5 * ddx_ref.abs().max().item())


def test_opcheck(device):
    x, residual, weight = make((2, 5, 24), torch.float32, device, seed=9)
    op = torch.ops.tmem.add_rms_norm
    req = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    opcheck(op, (req(x), req(residual), req(weight), 1e-6))
    opcheck(op, (req(x), residual, weight, 1e-5))
    opcheck(op, (x, residual, weight, 0.0))
    _, s, rstd = op(x, residual, weight, 1e-6)
    opcheck(torch.ops.tmem.add_rms_norm_backward, (torch.randn_like(x), torch.randn_like(x), s, weight, rstd))
    opcheck(torch.ops.tmem.add_rms_norm_backward, (torch.randn_like(x), None, s, weight, rstd))


def test_compiles_fullgraph(device):
    x, residual, weight = make((3, 7, 40), torch.float32, device, seed=10)

    def fn(h, r, w, _):
        y, s = add_rms_norm(torch.tanh(h), r, w, 1e-6)
        return y * 2, s

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(15)
    dy, ds = (torch.randn(x.shape, generator=g).to(device) for _ in range(2))
    got = grads(compiled, x, residual, weight, dy, ds)
    want = grads(fn, x, residual, weight, dy, ds)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_bad_input_raises():
    x, residual, weight = make((4, 8), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"weight \[H\]"):
        add_rms_norm(x, residual, weight[:7], 1e-6)
    with pytest.raises(ValueError, match="residual must match x"):
        add_rms_norm(x, residual[:3], weight, 1e-6)
    with pytest.raises(ValueError, match="residual must match x"):
        add_rms_norm(x, residual.double(), weight, 1e-6)
    with pytest.raises(ValueError, match="residual must match x"):
        add_rms_norm(x, residual.to("meta"), weight, 1e-6)
    with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
        add_rms_norm(x, residual.tolist(), weight, 1e-6)
    with pytest.raises(TypeError, match="float tensor"):
        add_rms_norm(x.int(), residual.int(), weight, 1e-6)
    with pytest.raises(ValueError, match="eps"):
        add_rms_norm(x, residual, weight, -1.0)


_COMPILE_SCRIPT = r"""
import json
from compile_sm90 import compile_for_sm90
from tmem_kernels import addrmsnorm_triton as X
from tmem_kernels import rmsnorm_triton as R

out = {}
for dt in ("fp32", "bf16"):
    for h in (64, 2560, 8192):  # tiny widths (many rows per program), Qwen3-4B, Llama-70B
        block_m, block_h, _ = R._blocks(4096, h)
        for name, fn, ptrs, consts in (
            ("fwd", X._forward_kernel, ("x_ptr", "r_ptr", "w_ptr", "y_ptr", "s_ptr"), {}),
            ("bwd", X._backward_kernel, ("dy_ptr", "ds_ptr", "s_ptr", "w_ptr", "d_ptr"), {"HAS_DS": True}),
            ("bwd_nods", X._backward_kernel, ("dy_ptr", "ds_ptr", "s_ptr", "w_ptr", "d_ptr"), {"HAS_DS": False}),
        ):
            constexprs = {**consts, "BLOCK_M": block_m, "BLOCK_H": block_h, "INTERPRET": False}
            sig = {p: "*" + dt for p in ptrs}
            sig.update({"rstd_ptr": "*fp32", "N": "i32", "H": "i32", **{k: "constexpr" for k in constexprs}})
            if name == "fwd":
                sig["eps"] = "fp32"
            sig = {k: sig[k] for k in fn.arg_names}
            out[f"{name}_{dt}_H{h}"] = compile_for_sm90(fn, sig, constexprs, R._warps(block_m, block_h))
print(json.dumps(out))
"""


def test_triton_gpu_compile_for_sm90(sm90_compile):
    """Both kernels (the backward with and without ds) compile for an H100 (sm_90) with Triton's compiler at
    tiny and real widths, fp32 and bf16; no register spills where ptxas reports them. No GPU needed."""
    result = sm90_compile(_COMPILE_SCRIPT)
    assert len(result) == 18
    for name, meta in result.items():
        assert meta["cubin_bytes"] > 0, name
        assert meta["spill_bytes"] in (0, None), (name, meta)
