"""Fused SwiGLU activation (`tmem_kernels.swiglu`, op `tmem::swiglu`): h = silu(gate) * up against
`reference.swiglu` / `reference.swiglu_backward` and torch's composition `F.silu(gate) * up`.

The op on the `device` fixture's device: on the CPU the torch composition, bit for bit `F.silu(gate) * up` and its
autograd in every dtype; on CUDA (and called directly, or forced through the op, under TRITON_INTERPRET=1 on the
CPU) the Triton kernels, one launch forward and one backward giving both gradients, which compute in float32 and
round each output once. In bf16/fp16 that is not torch's rounding (torch rounds silu(gate) before the product, dh *
up before silu_backward): against float64 the kernels' h, dgate and dup are within 1 ulp of the dtype (correctly
rounded but where float32 cancels in dgate's 1 + gate * (1 - sig); measured 0.5 ulp in bf16, 0.52 in fp16 under the
interpreter) and never further than torch's own composition (measured 1.4 ulp); in float32 both within 1e-5
relative (the kernel's exp is another one: 3.6 ulp of h measured, torch's 2.3). Gradients w.r.t. gate and up;
odd widths, 3-D input, rows strided (gate and up halves of one [N, 2I] projection), zero rows, double backward;
opcheck, torch.compile(fullgraph=True), bad input. The Triton kernels compile for sm_90.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import tmem_kernels
from tmem_kernels import reference as ref
from tmem_kernels import swiglu_act
from tmem_kernels.library import swiglu

SHAPES = [(7, 37), (2, 5, 64), (3, 1000), (130, 24), (1, 1), (4, 2500)]  # odd I, 3-D, several column tiles
TRITON = tmem_kernels.available("triton")
MANTISSA = {torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


def make(shape, dtype, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate, up, dh): gate over SiLU's whole curve (~3 sigma), up and the upstream gradient ~1."""
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(shape, generator=g) * 3).to(device, dtype)
    up = torch.randn(shape, generator=g).to(device, dtype)
    dh = torch.randn(shape, generator=g).to(device, dtype)
    return gate, up, dh


def ulps(got: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|got - exact| in units in the last place of `dtype` at exact's magnitude (exact: float64)."""
    info = torch.finfo(dtype)
    mag = exact.abs().clamp_min(info.tiny)  # subnormals: the smallest normal binade's spacing
    spacing = torch.exp2(torch.floor(torch.log2(mag)) - MANTISSA[dtype])
    return (got.double() - exact).abs() / spacing


def grads(fn, gate, up, dh):
    """(h, dgate, dup) of fn(gate, up) for the upstream gradient dh."""
    gr, ur = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    h = fn(gr, ur)
    h.backward(dh)
    return h.detach(), gr.grad, ur.grad


def exact(gate, up, dh) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, dgate, dup) in float64 by the spec (`reference.swiglu`, `reference.swiglu_backward`)."""
    g, u, d = (t.double() for t in (gate, up, dh))
    return (ref.swiglu(g, u), *ref.swiglu_backward(g, u, d))


def assert_within_the_kernels_bounds(got, gate, up, dh, dtype) -> None:
    """(h, dgate, dup) against float64: 16-bit within 1 ulp and no further than torch's composition anywhere;
    float32 within 1e-5 relative (1e-6 of the largest: dgate cancels where silu' crosses 0)."""
    want = exact(gate, up, dh)
    torch_ = grads(lambda g, u: F.silu(g) * u, gate, up, dh)
    for name, a, w, t in zip(("h", "dgate", "dup"), got, want, torch_, strict=True):
        assert a.dtype == dtype and a.shape == w.shape, name
        if dtype == torch.float32:
            torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=1e-6 * w.abs().max().item(), msg=name)
        else:
            err, torch_err = ulps(a, w, dtype).max().item(), ulps(t, w, dtype).max().item()
            assert err <= 1.0 and err <= max(torch_err, 0.5 + 1e-3), (name, err, torch_err)


@pytest.mark.parametrize("shape", SHAPES)
def test_float64_matches_reference_with_gradients(shape, device):
    """float64 (the torch composition everywhere): h bit for bit `reference.swiglu`, the gradients autograd's
    through it bit for bit and `reference.swiglu_backward`'s formula to the rounding."""
    gate, up, dh = make(shape, torch.float64, device)
    got = grads(swiglu, gate, up, dh)
    want = grads(ref.swiglu, gate, up, dh)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    for a, b in zip(got[1:], ref.swiglu_backward(gate, up, dh), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_the_op_against_torchs_composition(shape, dtype, device):
    """On the CPU the op is torch's `F.silu(gate) * up` and its autograd bit for bit; on CUDA (the Triton kernels)
    within the kernels' bounds against float64 (module docstring)."""
    gate, up, dh = make(shape, dtype, device, seed=1)
    got = grads(swiglu, gate, up, dh)
    if device.type == "cpu":
        want = grads(lambda g, u: F.silu(g) * u, gate, up, dh)
        assert all(a.dtype == dtype and torch.equal(a, b) for a, b in zip(got, want, strict=True))
    else:
        assert_within_the_kernels_bounds(got, gate, up, dh, dtype)
    assert got[0].is_contiguous()


@pytest.mark.skipif(not TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_kernels_against_float64_and_torchs_error(shape, dtype, device):
    """The two Triton kernels called directly (compiled on CUDA, under the interpreter on the CPU): h, and dgate
    with dup from the one backward launch, within the kernels' bounds (16-bit: 1 ulp of float64, never worse than
    torch's composition); under the interpreter in bf16 correctly rounded (0.5 ulp) where no cancellation."""
    from tmem_kernels import swiglu_act_triton

    gate, up, dh = make(shape, dtype, device, seed=2)
    i = shape[-1]
    g2, u2, d2 = (t.reshape(-1, i) for t in (gate, up, dh))
    h = swiglu_act_triton.forward(g2, u2)
    dgate, dup = swiglu_act_triton.backward(d2, g2, u2)
    assert h.is_contiguous() and dgate.is_contiguous() and dup.is_contiguous()
    assert_within_the_kernels_bounds((h, dgate, dup), g2, u2, d2, dtype)
    if device.type == "cpu" and dtype == torch.bfloat16:
        want_h, _, want_dup = exact(g2, u2, d2)
        assert ulps(h, want_h, dtype).max().item() <= 0.5 + 1e-3
        assert ulps(dup, want_dup, dtype).max().item() <= 0.5 + 1e-3


@pytest.mark.skipif(not TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_op_through_the_triton_kernels(dtype, device, monkeypatch):
    """The op's Triton dispatch (on the CPU: under the interpreter, forced through `swiglu_act.use_triton`): a 3-D
    input of odd width; gate and up as the two halves of one [..., 2I] projection (rows strided: read in place);
    one gradient asked for; zero rows. Values and gradients within the kernels' bounds; the backward is one
    `tmem::swiglu_backward` call giving both."""
    monkeypatch.setattr(swiglu_act, "use_triton", lambda g: g.dtype != torch.float64)
    gate, up, dh = make((3, 11, 75), dtype, device, seed=3)
    assert_within_the_kernels_bounds(grads(swiglu, gate, up, dh), gate, up, dh, dtype)

    both = torch.cat([gate, up], -1)  # [3, 11, 150]: gate = both[..., :75], up = both[..., 75:]
    g_view, u_view = both[..., :75], both[..., 75:]
    assert not g_view.is_contiguous()
    h = swiglu(g_view, u_view)
    torch.testing.assert_close(h, swiglu(gate, up), rtol=0, atol=0)

    gr = gate.clone().requires_grad_(True)
    (dgate,) = torch.autograd.grad(swiglu(gr, up), gr, dh)  # up takes no gradient
    torch.testing.assert_close(dgate, grads(swiglu, gate, up, dh)[1], rtol=0, atol=0)
    assert swiglu(gate[:0], up[:0]).shape == (0, 11, 75)


def test_one_backward_launch_saves_gate_and_up_only(device, monkeypatch):
    """The autograd node keeps gate and up, nothing else (the sigmoid is recomputed); with the kernels forced one
    `tmem::swiglu_backward` call gives both gradients."""
    gate, up, dh = make((5, 33), torch.float32, device, seed=4)
    gr, ur = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        h = swiglu(gr, ur)
    assert len(saved) == 2 and saved[0] is gr and saved[1] is ur
    if TRITON:
        monkeypatch.setattr(swiglu_act, "use_triton", lambda g: True)
        calls = []
        real = swiglu_act.backward
        monkeypatch.setattr(swiglu_act, "backward", lambda *a: calls.append(1) or real(*a))
        h.backward(dh)
        assert len(calls) == 1 and gr.grad is not None and ur.grad is not None


def test_zero_rows_and_double_backward(device):
    gate = torch.empty(0, 5, 33, device=device)
    assert swiglu(gate, gate).shape == (0, 5, 33)
    gate, up, _ = make((3, 17), torch.float64, device, seed=5)
    results = []
    for fn in (swiglu, ref.swiglu):
        gr, ur = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
        h = fn(gr, ur)
        dg, du = torch.autograd.grad((h**2).sum(), (gr, ur), create_graph=True)
        ddg, ddu = torch.autograd.grad((dg * du).sum() + dg.pow(2).sum(), (gr, ur))
        results.append((dg.detach(), du.detach(), ddg, ddu))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_opcheck(device):
    gate, up, dh = make((2, 5, 24), torch.float32, device, seed=6)
    op = torch.ops.tmem.swiglu
    req = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    opcheck(op, (req(gate), req(up)))
    opcheck(op, (req(gate), up))
    opcheck(op, (gate, up))
    opcheck(torch.ops.tmem.swiglu_backward, (dh, gate, up))


def test_compiles_fullgraph(device):
    gate, up, dh = make((3, 7, 40), torch.float32, device, seed=7)

    def fn(g, u):
        return swiglu(torch.tanh(g) * 4, u) * 2

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for a, b in zip(grads(compiled, gate, up, dh), grads(fn, gate, up, dh), strict=True):
        torch.testing.assert_close(a, b)


def test_bad_input_raises():
    gate, up, _ = make((4, 8), torch.float32, "cpu")
    with pytest.raises(ValueError, match="up must match gate"):
        swiglu(gate, up[:3])
    with pytest.raises(ValueError, match="up must match gate"):
        swiglu(gate, up.double())
    with pytest.raises(ValueError, match="up must match gate"):
        swiglu(gate, up.to("meta"))
    with pytest.raises(TypeError, match="up must be a torch.Tensor"):
        swiglu(gate, up.tolist())
    with pytest.raises(TypeError, match="float tensor"):
        swiglu(gate.int(), up.int())


_COMPILE_SCRIPT = r"""
import json
from compile_sm90 import compile_for_sm90
from tmem_kernels import swiglu_act_triton as S

out = {}
for dt in ("fp32", "bf16"):
    for n, i in ((16, 128), (4096, 1536), (4096, 9728)):  # decode-sized, SmolLM2's and Qwen3-4B's MLP widths
        block_m, block_n, _, warps = S.blocks(n, i)
        for name, fn in (("fwd", S._forward_kernel), ("bwd", S._backward_kernel)):
            constexprs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "INTERPRET": False}
            sig = {a: ("*" + dt if a.endswith("_ptr") else "constexpr" if a in constexprs else "i32")
                   for a in fn.arg_names}
            out[f"{name}_{dt}_{n}x{i}"] = compile_for_sm90(fn, sig, constexprs, warps)
print(json.dumps(out))
"""


def test_triton_gpu_compile_for_sm90(sm90_compile):
    """Both kernels compile for an H100 (sm_90) with Triton's compiler at decode and write sizes, fp32 and bf16;
    no register spills where ptxas reports them. No GPU needed."""
    result = sm90_compile(_COMPILE_SCRIPT)
    assert len(result) == 12
    for name, meta in result.items():
        assert meta["cubin_bytes"] > 0, name
        assert meta["spill_bytes"] in (0, None), (name, meta)
