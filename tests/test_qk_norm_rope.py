"""Qwen3's per-head q/k RMSNorm and rotary in one op (`tmem_kernels.qk_norm_rope`, op `tmem::qk_norm_rope`)
against `reference.qk_norm_rope` and the two ops it replaces, `rms_norm` then `rope`.

The op on the `device` fixture's device equals `rope(rms_norm(q).transpose(1, 2), rms_norm(k).transpose(1, 2))`:
on the CPU (the torch compositions) bit for bit, values, layout and the gradients of q and k. Its two Triton
kernels (CUDA; called directly, or through the op forced, under TRITON_INTERPRET=1 on the CPU) do the two ops'
kernels' arithmetic, every rounding in the same place: under the interpreter bit for bit with `rmsnorm_triton`
then `rotary_triton` (rstd too), forward and backward, every dtype; on CUDA, where the compiler may reduce a
row's squares in another order than the norm's kernel, within the tolerances of a write step's norms (1e-5
float32, 1.6e-2 16-bit). Through the op: one op forward and one backward, nothing else. Gradients of the
weights and of cos / sin, one output unused, double backward against autograd through the reference (float64);
opcheck, torch.compile(fullgraph=True) through it, bad input. The Triton kernels compile for sm_90.
"""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck
from torch.utils._python_dispatch import TorchDispatchMode

import tmem_kernels
from tmem_kernels import qknorm_rope, rmsnorm, rotary
from tmem_kernels import reference as ref
from tmem_kernels.library import qk_norm_rope, rms_norm, rope

# (B, T, Hq, Hk, D, cos batch): GQA, one head, odd T, a non-power-of-2 half, Qwen3's head dim, per-row cos
SHAPES = [(2, 5, 4, 2, 16, 1), (1, 1, 1, 1, 8, 1), (3, 7, 2, 1, 24, 3), (2, 9, 8, 4, 128, 2), (1, 40, 2, 2, 64, 1)]
TRITON = tmem_kernels.available("triton")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 1.6e-2}  # CUDA: another reduction order
EPS = (1e-6, 1e-5)


def make(shape, dtype, device, seed: int = 0):
    """q [B, T, Hq, D], k [B, T, Hk, D] (views of one [B, T, (Hq + 2 Hk) D] projection, as a fused qkv's would
    be: not contiguous), weights [D] around 1, cos / sin [Bc, T, D] from HF's formula times a random scale."""
    b, t, hq, hk, d, bc = shape
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(b, t, (hq + 2 * hk) * d, generator=g) * 3).to(device, dtype)
    q = qkv[..., : hq * d].view(b, t, hq, d)
    k = qkv[..., hq * d : (hq + hk) * d].view(b, t, hk, d)
    wq, wk = ((1 + 0.5 * torch.randn(d, generator=g)).to(device, dtype) for _ in range(2))
    pos = torch.arange(t, dtype=torch.float32)[None] + torch.arange(bc)[:, None] * 3
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    scale = 1 + 0.1 * torch.randn(emb.shape, generator=g)
    return q, k, wq, wk, (emb.cos() * scale).to(device, dtype), (emb.sin() * scale).to(device, dtype)


def two_ops(q, k, wq, wk, eps_q, eps_k, cos, sin):
    """What the attention ran before: `rms_norm` on q and k, the transpose, `rope`."""
    return rope(rms_norm(q, wq, eps_q).transpose(1, 2), rms_norm(k, wk, eps_k).transpose(1, 2), cos, sin)


def cotangents(q, k, seed: int):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(x.transpose(1, 2).shape, generator=g).to(x.device, x.dtype) for x in (q, k))


def grads(fn, q, k, wq, wk, cos, sin, dq, dk, weights: bool = False):
    """(q_rot, k_rot, d q, d k[, d wq, d wk]) of fn at these inputs (the weights requiring grad if `weights`)."""
    qr, kr = q.detach().clone().requires_grad_(True), k.detach().clone().requires_grad_(True)
    wq, wk = wq.detach().clone().requires_grad_(weights), wk.detach().clone().requires_grad_(weights)
    yq, yk = fn(qr, kr, wq, wk, *EPS, cos, sin)
    torch.autograd.backward((yq, yk), (dq, dk))
    return yq.detach(), yk.detach(), qr.grad, kr.grad, *((wq.grad, wk.grad) if weights else ())


def assert_close64(got, want) -> None:
    """float64 against the reference: the rstd is float32 either way, so the op's backward formula (with it)
    and autograd through the reference's float32 statistics agree to 1e-6 (as `tmem::rms_norm`'s)."""
    for a, b in zip(got, want):
        assert a.dtype == torch.float64 and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())


def assert_equal_or_close(got, want, exact: bool) -> None:
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        if exact:
            assert torch.equal(a, b)
        else:
            tol = TOL[b.dtype]
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


class OpCensus(TorchDispatchMode):
    """The names of the ops dispatched under it (a custom op counts as one, whatever it runs inside)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("shape", SHAPES)
def test_float64_matches_reference_with_gradients(shape, device):
    """float64 (the statistics in float32, as HF's): values and the gradients of q, k and both weights against
    autograd through the reference."""
    q, k, wq, wk, cos, sin = make(shape, torch.float64, device)
    dq, dk = cotangents(q, k, 1)
    got = grads(qk_norm_rope, q, k, wq, wk, cos, sin, dq, dk, weights=True)
    want = grads(ref.qk_norm_rope, q, k, wq, wk, cos, sin, dq, dk, weights=True)
    assert all(torch.equal(a, b) for a, b in zip(got[:2], want[:2]))
    assert_close64(got, want)


@pytest.mark.parametrize("shape", SHAPES[:4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_equals_the_two_ops(shape, dtype, device):
    """The op gives `rms_norm` then `rope`'s outputs (strides too: the rest of the attention sees the same
    tensors) and the gradients of q and k: bit for bit on the CPU, on CUDA within the norms' tolerances."""
    q, k, wq, wk, cos, sin = make(shape, dtype, device, seed=2)
    dq, dk = cotangents(q, k, 3)
    got = grads(qk_norm_rope, q, k, wq, wk, cos, sin, dq, dk)
    want = grads(two_ops, q, k, wq, wk, cos, sin, dq, dk)
    assert_equal_or_close(got, want, exact=device.type == "cpu")
    assert got[0].stride() == want[0].stride() and got[1].stride() == want[1].stride()
    if device.type == "cpu":  # and the reference, on the torch path
        assert all(torch.equal(a, b) for a, b in zip(got[:2], ref.qk_norm_rope(q, k, wq, wk, *EPS, cos, sin)))


@pytest.mark.skipif(not TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_kernels_match_the_two_ops_kernels(shape, dtype, device):
    """The two Triton kernels called directly (compiled on CUDA, under the interpreter on the CPU) against
    `rmsnorm_triton` then `rotary_triton` (what the two ops launch): q_rot, k_rot, rstd_q, rstd_k and the
    gradients of q and k; bit for bit under the interpreter."""
    from tmem_kernels import qknorm_rope_triton, rmsnorm_triton, rotary_triton

    q, k, wq, wk, cos, sin = make(shape, dtype, device, seed=6)
    dq, dk = cotangents(q, k, 7)
    got = qknorm_rope_triton.forward(q, k, wq, wk, *EPS, cos, sin)
    got_grads = qknorm_rope_triton.backward(dq, dk, q, k, wq, wk, got[2], got[3], cos, sin)
    d = shape[4]
    flat = [x.reshape(-1, d).contiguous() for x in (q, k)]  # (as `rmsnorm.forward` gives the kernel)
    (nq, rq), (nk, rk) = (rmsnorm_triton.forward(x, w, e) for x, w, e in zip(flat, (wq, wk), EPS))
    qn, kn = nq.view(q.shape).transpose(1, 2), nk.view(k.shape).transpose(1, 2)
    want = (*rotary_triton.forward(qn, kn, cos, sin), rq.view(q.shape[:3]), rk.view(k.shape[:3]))
    gq, gk = rotary_triton.backward(dq, dk, cos, sin)
    want_grads = [rmsnorm_triton.backward(g.transpose(1, 2).reshape(-1, d), x, w, r).view(g.transpose(1, 2).shape)
                  for g, x, w, r in zip((gq, gk), flat, (wq, wk), (rq, rk))]  # fmt: skip
    assert_equal_or_close((*got, *got_grads), (*want, *want_grads), exact=device.type == "cpu")
    assert got[0].stride() == want[0].stride() and got[1].stride() == want[1].stride()
    assert got_grads[0].is_contiguous() and got_grads[1].is_contiguous()


@pytest.mark.skipif(not TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_op_through_the_triton_kernels(dtype, device, monkeypatch):
    """The op's Triton dispatch (on the CPU: under the interpreter, forced, as are the two ops'): one op
    forward and one backward, nothing else dispatched; values and gradients as the two ops' Triton kernels'
    (bit for bit under the interpreter); zero rows."""
    monkeypatch.setattr(qknorm_rope, "use_triton", lambda *ts: len({t.dtype for t in ts}) == 1)
    monkeypatch.setattr(rmsnorm, "use_triton", lambda x: x.dtype != torch.float64)
    monkeypatch.setattr(rotary, "use_triton", lambda q, k, c, s: len({q.dtype, k.dtype, c.dtype, s.dtype}) == 1)
    q, k, wq, wk, cos, sin = make((3, 11, 4, 2, 48, 3), dtype, device, seed=11)
    dq, dk = cotangents(q, k, 12)
    census = OpCensus()
    qr, kr = q.detach().clone().requires_grad_(True), k.detach().clone().requires_grad_(True)
    with census:
        yq, yk = qk_norm_rope(qr, kr, wq, wk, *EPS, cos, sin)
        torch.autograd.backward((yq, yk), (dq, dk))
    assert [op for op in census.ops if op.startswith("tmem.")] == ["tmem.qk_norm_rope", "tmem.qk_norm_rope_backward"]
    want = grads(two_ops, q, k, wq, wk, cos, sin, dq, dk)
    assert_equal_or_close((yq, yk, qr.grad, kr.grad), want, exact=device.type == "cpu")
    yq, yk = qk_norm_rope(q[:, :0], k[:, :0], wq, wk, *EPS, cos[:, :0], sin[:, :0])
    assert yq.shape == (3, 4, 0, 48) and yk.shape == (3, 2, 0, 48)


def test_weights_and_trig_gradients_one_output_unused_and_double_backward(device):
    """float64: the weights' and cos / sin's gradients, a backward through q_rot only (k's gradient then zero),
    and create_graph=True differentiating again, all as autograd through the reference."""
    q, k, wq, wk, cos, sin = make((2, 6, 4, 2, 16, 2), torch.float64, device, seed=4)
    dq, dk = cotangents(q, k, 5)
    outs = {}
    for fn in (qk_norm_rope, ref.qk_norm_rope):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, wq, wk, cos, sin)]
        yq, yk = fn(*leaves[:4], *EPS, *leaves[4:])
        first = torch.autograd.grad((yq, yk), leaves, (dq, dk), create_graph=True)
        second = torch.autograd.grad(sum(g.pow(2).sum() for g in first), leaves[:4])
        yq, _ = fn(*leaves[:4], *EPS, *leaves[4:])
        only_q = torch.autograd.grad(yq, leaves[:2], dq, allow_unused=True, materialize_grads=True)
        outs[fn] = (*first, *second, *only_q)
    assert_close64(outs[qk_norm_rope], outs[ref.qk_norm_rope])
    for fn in (qk_norm_rope, ref.qk_norm_rope):  # one step without create_graph: the op's own formulas
        got = grads(fn, q, k, wq, wk, cos, sin, dq, dk, weights=True)
        outs[fn] = got
    assert_close64(outs[qk_norm_rope], outs[ref.qk_norm_rope])


def test_mixed_dtypes_promote_as_the_two_ops(device):
    """A float32 weight on bf16 q / k (HF's promotion: the norms' outputs float32) and float32 cos / sin:
    the torch composition's dtypes and values, as the two ops'."""
    q, k, wq, wk, cos, sin = make((2, 3, 2, 1, 8, 1), torch.bfloat16, device, seed=9)
    args = (q, k, wq.float(), wk, *EPS, cos.float(), sin.float())
    got, want = qk_norm_rope(*args), two_ops(*args)
    assert got[0].dtype == got[1].dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_opcheck(device):
    q, k, wq, wk, cos, sin = make((2, 5, 4, 2, 16, 1), torch.float32, device, seed=9)
    op = torch.ops.tmem.qk_norm_rope
    opcheck(op, (q.clone().requires_grad_(True), k.clone().requires_grad_(True), wq, wk, *EPS, cos, sin))
    opcheck(op, (q.contiguous(), k, wq.clone().requires_grad_(True), wk, *EPS, cos.clone().requires_grad_(True), sin))
    opcheck(op, (q, k, wq, wk, *EPS, cos, sin))
    _, _, rq, rk = op(q, k, wq, wk, *EPS, cos, sin)
    dq, dk = cotangents(q, k, 1)
    opcheck(torch.ops.tmem.qk_norm_rope_backward, (dq, dk, q, k, wq, wk, rq, rk, cos, sin))


def test_compiles_fullgraph(device):
    q, k, wq, wk, cos, sin = make((2, 7, 4, 2, 16, 1), torch.float32, device, seed=10)

    def fn(a, b, wa, wb, eps_a, eps_b, c, s):
        yq, yk = qk_norm_rope(torch.tanh(a), b * 2, wa, wb, eps_a, eps_b, c, s)
        return yq * 3, yk

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    dq, dk = cotangents(q, k, 11)
    for a, b in zip(grads(compiled, q, k, wq, wk, cos, sin, dq, dk), grads(fn, q, k, wq, wk, cos, sin, dq, dk)):
        torch.testing.assert_close(a, b)


def test_bad_input_raises():
    q, k, wq, wk, cos, sin = make((2, 5, 4, 2, 16, 1), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"cos and sin \[B or 1, T, D\]"):
        qk_norm_rope(q, k, wq, wk, *EPS, cos[..., :8], sin[..., :8])
    with pytest.raises(ValueError, match=r"k \[B, T, Hk, D\]"):
        qk_norm_rope(q, k[:1], wq, wk, *EPS, cos, sin)
    with pytest.raises(ValueError, match=r"weights \[D\]"):
        qk_norm_rope(q, k, wq[:8], wk, *EPS, cos, sin)
    with pytest.raises(ValueError, match="even"):
        qk_norm_rope(q[..., :15], k[..., :15], wq[:15], wk[:15], *EPS, cos[..., :15], sin[..., :15])
    with pytest.raises(TypeError, match="float tensor"):
        qk_norm_rope(q.int(), k, wq, wk, *EPS, cos, sin)
    with pytest.raises(TypeError, match="torch.Tensor"):
        qk_norm_rope(q, k, wq.tolist(), wk, *EPS, cos, sin)
    with pytest.raises(ValueError, match="one device"):
        qk_norm_rope(q, k, wq, wk, *EPS, cos.to("meta"), sin.to("meta"))
    with pytest.raises(ValueError, match="eps_k must be a finite number"):
        qk_norm_rope(q, k, wq, wk, 1e-6, float("nan"), cos, sin)


_COMPILE_SCRIPT = r"""
import json
from compile_sm90 import compile_for_sm90
from tmem_kernels import qknorm_rope_triton as X

out = {}
for dt in ("fp32", "bf16"):
    for d in (64, 128):  # tiny models / SmolLM2, Llama / Qwen3
        block_r, block_d = X._blocks(d, 4096)
        constexprs = {"BLOCK_R": block_r, "BLOCK_D": block_d, "INTERPRET": False}
        for name, fn in (("fwd", X._qk_norm_rope_kernel), ("bwd", X._qk_norm_rope_backward_kernel)):
            sig = {p: ("*fp32" if p in ("rq_ptr", "rk_ptr") else "*" + dt) for p in fn.arg_names if p.endswith("_ptr")}
            sig.update({p: "fp32" for p in ("eps_q", "eps_k") if p in fn.arg_names})
            sig.update({k: "constexpr" for k in constexprs})
            sig = {k: sig.get(k, "i32") for k in fn.arg_names}
            out[f"{name}_{dt}_D{d}"] = compile_for_sm90(fn, sig, constexprs, X._warps(block_r, block_d))
print(json.dumps(out))
"""


def test_triton_gpu_compile_for_sm90(sm90_compile):
    """Both kernels compile for an H100 (sm_90) with Triton's compiler, fp32 and bf16, head dims 64 and 128; no
    register spills where ptxas reports them. No GPU needed."""
    result = sm90_compile(_COMPILE_SCRIPT)
    assert len(result) == 8
    for name, meta in result.items():
        assert meta["cubin_bytes"] > 0, name
        assert meta["spill_bytes"] in (0, None), (name, meta)
