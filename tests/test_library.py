"""The custom ops (`tmem_kernels.library`, `torch.ops.tmem.*`): opcheck, parity with the spec, compile, export.

- `torch.library.opcheck` on every op (schema and declared mutations, fake tensors against the real
  kernel's output metadata, autograd registration, AOT dispatch with static and dynamic shapes), with
  odd shapes; Triton under TRITON_INTERPRET=1 on CPU (conftest.py).
- Each backend's op-backed LoRA MLP against `reference` (y, dx, dA, dB), and the in-backward SGD op:
  B stepped in place by -lr * dB, declared as mutating B (version counter bumped, no .grad).
- A tiny Llama with FastWeights attached: `torch.compile(fullgraph=True)` (zero graph breaks, else it
  raises) gives eager's logits, and a compiled loss's backward eager's gradients (and, with in-backward
  SGD, eager's stepped B); `torch.export` of the model gives eager's logits. The compile tests use the
  aot_eager backend (dynamo + AOTAutograd + fake tensors: where a custom op could break); one test runs
  inductor end to end.
- Dynamic rows: an export with a `Dim` on the sequence, and `torch.compile(dynamic=True)`, run one graph
  below and above the decode threshold. Double backward through the LoRA MLP ops against the spec's;
  AdamW with a device step below 1 against torch.optim.AdamW's first step.
"""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch.library import opcheck
from torch.utils._python_dispatch import TorchDispatchMode

import tmem_kernels
from tmem_kernels import library
from tmem_kernels import reference as ref
from tmem_kernels.tiles import DECODE_ROWS
from tmem_runtime import FastWeights, load_model
from tmem_runtime.trainer import Workspace

BACKENDS = [b for b in tmem_kernels.BACKENDS if tmem_kernels.available(b)]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# AdamW's step as a number and as a device tensor (the native kernel reads its step on the host: number only)
STEP_CASES = [(b, t) for b in BACKENDS for t in (False, True) if not (b == "native" and t)]
NAMES = ("w_gate", "w_up", "w_down", "a_gate", "b_gate", "a_up", "b_up", "a_down", "b_down")


def device_of(backend: str) -> torch.device:
    return torch.device("cpu") if backend == "native" else DEVICE


def mlp_tensors(n=7, h=24, i=40, r=3, seed=0, device="cpu") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """x [n, h] and the nine MLP tensors in `lora_mlp` order, scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device)
    w = [rnd(i, h, scale=h**-0.5), rnd(i, h, scale=h**-0.5), rnd(h, i, scale=i**-0.5), rnd(r, h, scale=h**-0.5),
         rnd(i, r), rnd(r, h, scale=h**-0.5), rnd(i, r), rnd(r, i, scale=i**-0.5), rnd(h, r)]  # fmt: skip
    return rnd(n, h), w


def as_leaves(x, w, need_x=True, train_a=False):
    x = x.clone().requires_grad_(need_x)
    w = [t.clone().requires_grad_(name.startswith("b_") or (train_a and name.startswith("a_"))) for name, t in
         zip(NAMES, w)]  # fmt: skip
    return x, w


def op_extra(backend: str, scaling: float, save: bool = True, sgd_lr: float | None = None) -> tuple:
    """The op's non-tensor arguments after the ten tensors."""
    return (scaling, sgd_lr, save) if backend == "triton" else (scaling,)


# ------------------------------------------------------------------------------------------------
# opcheck
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train_a,need_x", [(False, True), (True, False)])
def test_opcheck_lora_mlp(backend, train_a, need_x):
    x, w = mlp_tensors(device=device_of(backend))
    x, w = as_leaves(x, w, need_x, train_a)
    opcheck(getattr(torch.ops.tmem, f"lora_mlp_{backend}"), (x, *w, *op_extra(backend, 0.75)))


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not installed")
@pytest.mark.parametrize("path", ["fused", "cublas"])
def test_opcheck_lora_mlp_triton_inference_paths(path, monkeypatch):
    """Inference (save=False) through either decode path, chosen inside the op: its fake holds for both."""
    monkeypatch.setenv("TMEM_DECODE_PATH", path)
    x, w = mlp_tensors(n=5, device=DEVICE)
    opcheck(torch.ops.tmem.lora_mlp_triton, (x, *w, *op_extra("triton", 0.75, save=False)))
    want = ref.lora_mlp(x, *w, 0.75)
    torch.testing.assert_close(torch.ops.tmem.lora_mlp_triton(x, *w, 0.75, None, False)[0], want, rtol=1e-4,
                               atol=1e-5)  # fmt: skip


@pytest.mark.skipif("native" not in BACKENDS, reason="native extension not built")
@pytest.mark.parametrize("need", [(True, True, True), (False, False, False), (True, False, True)])
def test_opcheck_lora_mlp_native_backward(need):
    x, w = mlp_tensors(n=5, h=20, i=36, r=2, seed=1)
    _, *saved = torch.ops.tmem.lora_mlp_native(x, *w, 0.5)
    dy = torch.randn_like(x)
    opcheck(torch.ops.tmem.lora_mlp_native_backward, (dy, x, *w, *saved, 0.5, *need))


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not installed")
@pytest.mark.parametrize("need", [(True, True, True), (False, True, False), (True, False, False)])
def test_opcheck_lora_mlp_triton_backward(need):
    x, w = mlp_tensors(n=5, h=20, i=36, r=2, seed=1, device=DEVICE)
    _, *saved = torch.ops.tmem.lora_mlp_triton(x, *w, 0.5, None, True)
    dy = torch.randn_like(x)
    opcheck(torch.ops.tmem.lora_mlp_triton_backward, (dy, x, *w, *saved, 0.5, *need))


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not installed")
@pytest.mark.parametrize("flags", [(True, False, True, True, True), (False, True, True, False, True)])
def test_opcheck_lora_mlp_triton_backward_sgd(flags):
    x, w = mlp_tensors(n=5, h=20, i=36, r=2, seed=1, device=DEVICE)
    _, *saved = torch.ops.tmem.lora_mlp_triton(x, *w, 0.5, None, True)
    dy = torch.randn_like(x)
    opcheck(torch.ops.tmem.lora_mlp_triton_backward_sgd_, (dy, x, *w, *saved, 0.5, 0.1, *flags))


@pytest.mark.parametrize("backend,step_as_tensor", STEP_CASES)
def test_opcheck_optimizer_steps(backend, step_as_tensor):
    dev = device_of(backend)
    g = torch.Generator().manual_seed(2)
    p, grad, m, v = (torch.randn(1000 + 37, generator=g).to(dev) for _ in range(4))
    v = v.abs()
    step = (torch.tensor(3.0, device=dev), 0.0) if step_as_tensor else (None, 3.0)
    opcheck(getattr(torch.ops.tmem, f"sgd_step_{backend}"), (p.clone(), grad, 0.1, 0.01))
    opcheck(getattr(torch.ops.tmem, f"adamw_step_{backend}"),
            (p.clone(), grad, m.clone(), v.clone(), *step, 1e-2, 0.9, 0.999, 1e-8, 0.01))  # fmt: skip


def test_opcheck_randomized_svd():
    w = torch.randn(2, 30, 21, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    opcheck(torch.ops.tmem.randomized_svd_top_r, (w, 4, 4, 3, 0, None))
    opcheck(torch.ops.tmem.randomized_svd_top_r, (w.mT.contiguous(), 5, 2, 2, 1, True))


# ------------------------------------------------------------------------------------------------
# Parity with the spec
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train_a", [False, True])
def test_lora_mlp_op_matches_reference(backend, train_a):
    x, w = mlp_tensors(n=11, h=28, i=44, r=5, seed=4, device=device_of(backend))
    x = x.view(1, 11, 28)  # leading dims are flattened by the op's function
    dy = torch.randn_like(x)
    got_x, got_w = as_leaves(x, w, True, train_a)
    y = tmem_kernels.get_ops(backend).lora_mlp(got_x, *got_w, 0.5)
    y.backward(dy)
    want_x, want_w = as_leaves(x, w, True, train_a)
    y_ref = ref.lora_mlp(want_x, *want_w, 0.5)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_x.grad, want_x.grad, rtol=1e-4, atol=1e-5)
    for name, got, want in zip(NAMES, got_w, want_w):
        if want.requires_grad:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5, msg=name)
        else:
            assert got.grad is None, name


class ZeroFills(TorchDispatchMode):
    """Counts the aten ops dispatched that only make zeros (a kernel each on a GPU)."""

    NAMES = ("zeros", "zeros_like", "new_zeros", "zero_", "fill_")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.count += func.overloadpacket.__name__ in self.NAMES
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_lora_mlp_op_backward_makes_no_zero_gradients(backend):
    """The ops' saved outputs are non-differentiable: autograd hands their backward no zero-filled gradient
    for them (a zeros kernel per saved output and call, 4 per Triton MLP backward before)."""
    x, w = mlp_tensors(device=device_of(backend))
    x, w = as_leaves(x, w)
    y = tmem_kernels.get_ops(backend).lora_mlp(x, *w, 0.5)
    with ZeroFills() as mode:
        y.backward(torch.ones_like(y))
    assert mode.count == 0
    assert all(t.grad is not None for t in (x, w[4], w[6], w[8]))


def test_linear_cross_entropy_rows_backward_makes_no_zero_gradient():
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(9, 16, generator=g).requires_grad_(True)
    weight, targets = torch.randn(37, 16, generator=g), torch.randint(0, 37, (9,), generator=g)
    losses = tmem_kernels.linear_cross_entropy_rows(hidden, weight, targets, torch.ones(9))
    with ZeroFills() as mode:
        losses.sum().backward()
    assert mode.count == 0
    (want,) = torch.autograd.grad(ref.linear_cross_entropy(hidden, weight, targets) * 9, hidden)
    torch.testing.assert_close(hidden.grad, want)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not installed")
def test_sgd_in_backward_steps_b_in_place():
    x, w = mlp_tensors(n=9, h=24, i=40, r=4, seed=5, device=DEVICE)
    dy, lr = torch.randn_like(x), 0.3
    got_x, got_w = as_leaves(x, w)
    versions = [t._version for t in got_w]
    library.lora_mlp_triton(got_x, *got_w, 0.5, sgd_lr=lr).backward(dy)
    want = ref.lora_mlp_backward(x, *w, dy=dy, scaling=0.5)
    torch.testing.assert_close(got_x.grad, want.dx, rtol=1e-4, atol=1e-5)  # dx read the old B's
    for name, db in zip(("b_gate", "b_up", "b_down"), (want.db_gate, want.db_up, want.db_down)):
        b = got_w[NAMES.index(name)]
        assert b.grad is None, f"{name}: stepped in the backward, so no gradient"
        assert b._version > versions[NAMES.index(name)], f"{name}: the in-place update must bump its version"
        torch.testing.assert_close(b.detach(), w[NAMES.index(name)] - lr * db, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,step_as_tensor", STEP_CASES)
def test_optimizer_step_ops_match_reference(backend, step_as_tensor):
    dev = device_of(backend)
    ops = tmem_kernels.get_ops(backend)
    g = torch.Generator().manual_seed(6)
    p0, m0 = torch.randn(777, generator=g).to(dev), torch.zeros(777, device=dev)
    mine, spec = [p0.clone(), m0.clone(), m0.clone()], [p0.clone(), m0.clone(), m0.clone()]
    for step in range(1, 4):
        grad = torch.randn(777, generator=g).to(dev)
        s = torch.tensor(float(step), device=dev) if step_as_tensor else step
        ops.adamw_step_(mine[0], grad, mine[1], mine[2], s, 1e-2, weight_decay=0.05)
        ref.adamw_step_(spec[0], grad, spec[1], spec[2], step, 1e-2, weight_decay=0.05)
        ops.sgd_step_(mine[0], grad, 0.1, 0.01)
        ref.sgd_step_(spec[0], grad, 0.1, 0.01)
    for a, b in zip(mine, spec):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,step_as_tensor", STEP_CASES)
def test_adamw_step_below_one_is_torch_optims_first_step(backend, step_as_tensor):
    """torch.optim.AdamW's steps count from 1. A device-tensor step of 0 made the bias correction 1 - beta**0
    = 0 and the update inf, silently (refusing it would need a host sync): a step tensor below 1 is now
    taken as 1, and gives torch.optim.AdamW's first step; a number below 1 is refused on every backend."""
    dev = device_of(backend)
    g = torch.Generator().manual_seed(17)
    p0, grad = torch.randn(513, generator=g).to(dev), torch.randn(513, generator=g).to(dev)
    want = torch.nn.Parameter(p0.clone())
    want.grad = grad.clone()
    torch.optim.AdamW([want], lr=1e-2, weight_decay=0.05).step()
    adamw_step_ = tmem_kernels.get_ops(backend).adamw_step_
    for step in (0, -3, 1):
        if not step_as_tensor and step < 1:
            with pytest.raises(ValueError, match="counts from 1"):
                adamw_step_(p0.clone(), grad, torch.zeros_like(p0), torch.zeros_like(p0), step, 1e-2)
            continue
        got, m, v = p0.clone(), torch.zeros_like(p0), torch.zeros_like(p0)
        adamw_step_(got, grad, m, v, torch.tensor(step, device=dev) if step_as_tensor else step, 1e-2,
                    weight_decay=0.05)  # fmt: skip
        assert torch.isfinite(got).all(), step
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6, msg=f"step {step}")


def test_randomized_svd_op_matches_exact_svd():
    w = torch.randn(3, 40, 25, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(DEVICE)
    u, s, vh = tmem_kernels.randomized_svd_top_r(w, 4)
    u_ref, s_ref, vh_ref = ref.svd_top_r(w, 4)
    torch.testing.assert_close(s, s_ref, rtol=1e-8, atol=0)
    # the best rank-4 approximation is unique (distinct singular values): signs of the vectors cancel
    torch.testing.assert_close((u * s[:, None]) @ vh, (u_ref * s_ref[:, None]) @ vh_ref, rtol=1e-8, atol=1e-10)
    a0 = tmem_kernels.randomized_svd_lora_init(w, 4)
    torch.testing.assert_close(a0, s.unsqueeze(-1) * vh)


# ------------------------------------------------------------------------------------------------
# Bad input: clear errors, nothing changed
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_raises_in_eager_and_in_fake_mode(backend):
    x, w = mlp_tensors(device=device_of(backend))
    op = getattr(torch.ops.tmem, f"lora_mlp_{backend}")
    bad = list(w)
    bad[NAMES.index("b_up")] = bad[NAMES.index("b_up")][:-1].contiguous()  # [I - 1, r]
    with pytest.raises(ValueError, match="b_up"):
        op(x, *bad, *op_extra(backend, 1.0))
    if backend != "torch":  # the fake implementation checks the same (export / compile see the error)
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as mode, pytest.raises(ValueError, match="b_up"):
            op(mode.from_tensor(x), *(mode.from_tensor(t) for t in bad), *op_extra(backend, 1.0))
    frozen = [t.clone().requires_grad_(name == "w_up") for name, t in zip(NAMES, w)]
    with pytest.raises(ValueError, match="frozen"):
        tmem_kernels.get_ops(backend).lora_mlp(x, *frozen, 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_steps_refuse_bad_input_and_change_nothing(backend):
    """Step 0, a grad or moment of another shape (one that would broadcast too): a ValueError before
    any buffer is touched, on every backend (the torch composition decayed param and moved exp_avg first)."""
    dev = device_of(backend)
    p, g, m, v = (torch.full((10,), 0.5, device=dev) for _ in range(4))
    sgd, adamw = getattr(torch.ops.tmem, f"sgd_step_{backend}"), getattr(torch.ops.tmem, f"adamw_step_{backend}")
    short = torch.ones(1, device=dev)
    cases = [
        (adamw, (p, g, m, v, None, 0.0, 0.1), "step counts from 1"),
        (adamw, (p, g, short, v, None, 1.0, 0.1), "exp_avg"),
        (adamw, (p, short, m, v, None, 1.0, 0.1), "grad"),
        (sgd, (p, short, 0.1, 0.01), "grad"),
    ]
    for op, args, match in cases:
        with pytest.raises(ValueError, match=match):
            op(*args)
        assert all(torch.equal(t, torch.full((10,), 0.5, device=dev)) for t in (p, g, m, v))

@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_steps_refuse_mixed_dtypes_or_devices_and_change_nothing(backend):
    """A moment of another dtype (the torch composition decayed param, then failed) or a buffer on the meta
    device (every backend returned without stepping: a silent no-op): an error, every buffer unchanged."""
    dev = device_of(backend)
    p, g, m, v = (torch.full((10,), 0.5, device=dev) for _ in range(4))
    sgd, adamw = getattr(torch.ops.tmem, f"sgd_step_{backend}"), getattr(torch.ops.tmem, f"adamw_step_{backend}")
    f64, meta = torch.zeros(10, dtype=torch.float64, device=dev), torch.zeros(10, device="meta")
    cases = [
        (adamw, (p, g, f64, v, None, 1.0, 0.1)),
        (adamw, (p, g, m, meta, None, 1.0, 0.1)),
        (adamw, (p, meta, m, v, None, 1.0, 0.1)),
        (sgd, (p, meta, 0.1, 0.01)),
        (sgd, (p, g.double(), 0.1, 0.01)),
    ]
    for op, args in cases:
        with pytest.raises((TypeError, ValueError), match="dtype|device|meta"):
            op(*args)
        assert all(torch.equal(t, torch.full((10,), 0.5, device=dev)) for t in (p, g, m, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_steps_run_outside_autograd(backend):
    """As torch.optim's steps: param may be an nn.Parameter (the torch composition raised "a leaf Variable
    that requires grad is being used in an in-place operation"), and a grad that requires grad records no
    graph into param (the torch composition gave param a grad_fn)."""
    dev = device_of(backend)
    ops = tmem_kernels.get_ops(backend)
    gen = torch.Generator().manual_seed(10)
    p0, grad0 = torch.randn(50, generator=gen).to(dev), torch.randn(50, generator=gen).to(dev)
    want = [p0.clone(), torch.zeros(50, device=dev), torch.zeros(50, device=dev)]
    ref.adamw_step_(*want[:1], grad0, *want[1:], 1, 1e-2)
    ref.sgd_step_(want[0], grad0, 0.1, 0.01)
    param, grad = torch.nn.Parameter(p0.clone()), grad0.clone().requires_grad_(True)
    m, v = torch.zeros(50, device=dev), torch.zeros(50, device=dev)
    ops.adamw_step_(param, grad, m, v, 1, 1e-2)
    ops.sgd_step_(param, grad, 0.1, 0.01)
    assert param.is_leaf and param.grad_fn is None and m.grad_fn is None and v.grad_fn is None
    for got, exp in zip((param.detach(), m, v), want):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)


def test_lora_mlp_torch_refuses_0d_and_integer_x():
    x, w = mlp_tensors()
    with pytest.raises(ValueError, match="at least one dimension"):  # was an IndexError
        tmem_kernels.lora_mlp_torch(x[0, 0], *w)
    with pytest.raises(TypeError, match="floating"):  # was addmm's "not implemented for 'Long'"
        tmem_kernels.lora_mlp_torch(x.long(), *(t.long() for t in w))


def test_linear_cross_entropy_refuses_double_backward():
    """Its gradient is computed in the forward, detached from hidden: a gradient penalty through it silently
    lost the loss's Hessian term. With create_graph=True it now raises; a plain backward is unchanged."""
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(9, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(37, 16, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 37, (9,), generator=g)
    h = hidden.clone().requires_grad_(True)
    loss = tmem_kernels.linear_cross_entropy(h, weight, targets) + 0.5 * h.pow(2).sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, h, create_graph=True)
    (got,) = torch.autograd.grad(tmem_kernels.linear_cross_entropy(h, weight, targets), h)
    (want,) = torch.autograd.grad(ref.linear_cross_entropy(h, weight, targets), h)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_mlp_double_backward_matches_reference(backend):
    """create_graph=True then a gradient of the gradient (a gradient penalty, a Hessian-vector product):
    the kernel ops' backward ops had no autograd formula, so the second backward failed late with torch's
    "no autograd formula was registered". Under create_graph=True their backward now runs the torch
    composition (differentiable again): both orders match the spec's, w.r.t. x, the B's and the A's."""
    x, w = mlp_tensors(n=6, h=20, i=36, r=2, seed=15, device=device_of(backend))
    g = torch.Generator().manual_seed(16)
    dy = torch.randn(x.shape, generator=g).to(x.device)
    results = []
    for lora_mlp in (tmem_kernels.get_ops(backend).lora_mlp, ref.lora_mlp):
        lx, lw = as_leaves(x, w, True, True)
        leaves = [lx, *(t for t in lw if t.requires_grad)]
        first = torch.autograd.grad(lora_mlp(lx, *lw, 0.5), leaves, dy, create_graph=True)
        penalty = sum(f.pow(2).sum() for f in first)
        results.append([*first, *torch.autograd.grad(penalty, leaves)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert results[1][-1].abs().max() > 0


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not installed")
def test_triton_double_backward_with_sgd_in_backward_is_refused_early():
    """The in-backward SGD steps B in place and gives autograd no dB: with create_graph=True its first
    backward raises a clear error, before any B is stepped."""
    x, w = mlp_tensors(device=DEVICE)
    x, w = as_leaves(x, w)
    before = [t.detach().clone() for t in w]
    y = library.lora_mlp_triton(x, *w, 0.5, sgd_lr=0.1)
    with pytest.raises(RuntimeError, match="double backward .* not supported with sgd_lr"):
        torch.autograd.grad(y.sum(), x, create_graph=True)
    assert all(torch.equal(t, b) for t, b in zip(w, before))


def test_ops_run_outside_cpu_autocast():
    """In torch.autocast("cpu", bfloat16): the native LoRA MLP failed ("self and mat2 must have the same dtype"),
    its backward too; the rSVD returned bf16 (its fake says float32) ~4e3x less accurate; the cross-entropy
    with a gradient failed ("Expected out tensor to have dtype BFloat16"). Each now gives its result outside
    autocast (float32 for the native op, whatever its inputs' dtype)."""
    g = torch.Generator().manual_seed(12)
    w = torch.randn(2, 60, 41, generator=g)
    hidden, weight, targets = torch.randn(9, 16, generator=g), torch.randn(37, 16, generator=g), torch.arange(9)
    want_svd = tmem_kernels.randomized_svd_top_r(w, 4)
    h = hidden.clone().requires_grad_(True)
    want_loss = tmem_kernels.linear_cross_entropy(h, weight, targets)
    (want_grad,) = torch.autograd.grad(want_loss, h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for got, want in zip(tmem_kernels.randomized_svd_top_r(w, 4), want_svd):
            torch.testing.assert_close(got, want)  # dtype float32 included
        loss = tmem_kernels.linear_cross_entropy(h, weight, targets)
        (grad,) = torch.autograd.grad(loss, h)
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(grad, want_grad)
    if "native" not in BACKENDS:
        return
    x, w = mlp_tensors(n=6)
    got_x, got_w = as_leaves(x, w, True, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = tmem_kernels.lora_mlp_native(got_x, *got_w, 0.5)
        y.backward(torch.ones_like(y))  # the backward inside the region too
    want_x, want_w = as_leaves(x, w, True, True)
    y_ref = ref.lora_mlp(want_x, *want_w, 0.5)
    y_ref.backward(torch.ones_like(y_ref))
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for got, want in zip((got_x, *got_w), (want_x, *want_w)):
        if want.requires_grad:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif("native" not in BACKENDS, reason="native extension not built")
def test_native_adamw_refuses_a_device_step():
    p = torch.zeros(10)
    with pytest.raises(ValueError, match="Python number"):
        torch.ops.tmem.adamw_step_native(p, p.clone(), p.clone(), p.clone(), torch.tensor(1.0), 0.0, 1e-3)
    assert torch.equal(p, torch.zeros(10))


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not installed")
def test_triton_backward_without_saved_tensors_raises():
    x, w = mlp_tensors(device=DEVICE)
    x, w = as_leaves(x, w)
    y = torch.ops.tmem.lora_mlp_triton(x, *w, 1.0, None, False)[0]  # save=False, yet grads are wanted
    with pytest.raises(RuntimeError, match="save=False"):
        y.sum().backward()


# ------------------------------------------------------------------------------------------------
# A model with fast weights: torch.compile(fullgraph=True) and torch.export
# ------------------------------------------------------------------------------------------------


def written_model(backend: str):
    """tiny-llama with fast weights whose B's are random (a written adapter: the kernels run)."""
    model, _ = load_model("tiny-llama", device=device_of(backend))
    fw = FastWeights(model, backend=backend)
    state = fw.state_dict()
    g = torch.Generator().manual_seed(8)
    for name, t in state.items():
        if name.endswith("lora_B"):
            t.copy_(torch.randn(t.shape, generator=g) * 0.05)
    fw.load_state_dict(state)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=g).to(fw.device)
    return model, fw, ids


def tmem_ops_in(fn, *args) -> tuple[list[str], object]:
    """Compile fn with fullgraph=True (any graph break raises) on aot_eager; (the tmem ops in the graph, output)."""
    seen: list[str] = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if "tmem" in str(n.target))
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    return seen, torch.compile(fn, fullgraph=True, backend=backend)(*args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_logits_and_gradients_match_eager(backend):
    model, fw, ids = written_model(backend)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        seen, got = tmem_ops_in(lambda t: model(input_ids=t).logits, ids)
    assert seen, "the compiled graph should call the tmem ops"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    compiled_write_step_matches_eager(model, fw, ids)
    fw.detach()


def compiled_write_step_matches_eager(model, fw: FastWeights, ids: torch.Tensor) -> list[str]:  # noqa: ANN001
    """A write step (the session's B copied to a workspace, the loss's gradient landing in it) compiled with
    fullgraph=True gives eager's loss and gradient; returns the tmem ops in the compiled graph."""
    loss_fn = lambda t: model(input_ids=t, labels=t).loss
    ws, binding = write_step_binding(fw)
    with fw.store.engine.bindings.bind(binding):
        want_loss = loss_fn(ids)
        ws.set_grad(torch.autograd.grad(want_loss, ws.leaves))  # as WriteRun.step
        want_grad = ws.grad.clone()
        ws.grad.zero_()
        seen, got_loss = tmem_ops_in(loss_fn, ids)
        ws.set_grad(torch.autograd.grad(got_loss, ws.leaves))
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert want_grad.abs().max() > 0
    torch.testing.assert_close(ws.grad, want_grad, rtol=1e-4, atol=1e-7)
    return seen


def test_compile_fullgraph_write_step_with_the_fused_attention_norms(monkeypatch):
    """tiny-qwen3: in a write step the adapted layers' q_norm / k_norm run `tmem::rms_norm` (on CUDA; forced
    here on the CPU too): torch.compile(fullgraph=True) traces their instance forward without a graph break,
    the op in the graph, and gives eager's loss and gradient."""
    from tmem_runtime import fused_layers

    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
    model, _ = load_model("tiny-qwen3", device=DEVICE)
    fw = FastWeights(model, backend="torch")
    assert fw.store.engine.attention_norms
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(8)).to(DEVICE)
    seen = compiled_write_step_matches_eager(model, fw, ids)
    assert seen.count("tmem.rms_norm") == len(fw.store.engine.attention_norms)
    fw.detach()


def write_step_binding(fw: FastWeights, sgd_lr: float | None = None) -> tuple[Workspace, object]:
    """The workspace and binding a one-session write step runs under (see tmem_runtime/trainer.py)."""
    ws = Workspace(fw.store.engine, [0], train_a=False)
    return ws, ws.binding(None, torch.tensor([0]), (0,), False, sgd_lr)


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton is not installed")
def test_compile_fullgraph_sgd_in_backward_steps_b_as_eager():
    model, fw, ids = written_model("triton")
    ws, binding = write_step_binding(fw, sgd_lr=0.1)  # what a plain-SGD write on the Triton backend binds
    start = ws.b.clone()
    loss_fn = lambda t: model(input_ids=t, labels=t).loss
    with fw.store.engine.bindings.bind(binding):
        loss_fn(ids).backward(inputs=list(ws.leaves))
        want = ws.b.clone()
        ws.b.copy_(start)
        seen, loss = tmem_ops_in(loss_fn, ids)
        loss.backward(inputs=list(ws.leaves))
    assert not torch.equal(want, start)
    torch.testing.assert_close(ws.b, want, rtol=1e-5, atol=1e-7)
    fw.detach()


@pytest.mark.parametrize("backend,step_as_tensor", STEP_CASES)
def test_compile_fullgraph_optimizer_steps_match_eager(backend, step_as_tensor):
    dev = device_of(backend)
    ops = tmem_kernels.get_ops(backend)
    g = torch.Generator().manual_seed(9)
    grad = torch.randn(333, generator=g).to(dev)
    start = [torch.randn(333, generator=g).to(dev), torch.zeros(333, device=dev), torch.zeros(333, device=dev)]
    step = torch.tensor(2.0, device=dev) if step_as_tensor else 2

    def update(p, m, v):  # an AdamW step then an SGD step, both mutating their buffers
        ops.adamw_step_(p, grad, m, v, step, 1e-2)
        ops.sgd_step_(p, grad, 0.1, 0.01)

    want = [t.clone() for t in start]
    update(*want)
    got = [t.clone() for t in start]
    seen, _ = tmem_ops_in(update, *got)
    if backend != "torch":
        assert {f"tmem.adamw_step_{backend}", f"tmem.sgd_step_{backend}"} <= set(seen), seen
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


class Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_export_matches_eager(backend):
    model, fw, ids = written_model(backend)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not properly registered as a parameter.*")  # the factors
        want = model(input_ids=ids).logits
        program = torch.export.export(Logits(model), (ids,))
        got = program.module()(ids)
    targets = {str(n.target) for n in program.graph.nodes}
    if backend != "torch":  # the reference composition decomposes into aten ops
        assert f"tmem.lora_mlp_{backend}.default" in targets
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    fw.detach()


# row counts on either side of the decode threshold (decode tiles, and the cuBLAS path on CUDA, at or below it)
FEW_ROWS, MANY_ROWS = DECODE_ROWS // 2, 2 * DECODE_ROWS + 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_export_with_dynamic_rows_runs_at_any_row_count(backend, monkeypatch):
    """torch.export with the sequence length a Dim: the Triton op's decode-or-fused choice was a Python branch
    on the row count in its function, which specialised the export (a guard on the rows). The choice is now
    made inside the op, so one exported program runs below and above the threshold, and follows the
    decode path chosen when it runs ($TMEM_DECODE_PATH read at run time, not at export)."""
    model, fw, ids = written_model(backend)
    seq = torch.export.Dim("seq", min=2, max=64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not properly registered as a parameter.*")
        program = torch.export.export(Logits(model), (ids,), dynamic_shapes={"input_ids": {1: seq}})
        if backend != "torch":
            assert f"tmem.lora_mlp_{backend}.default" in {str(n.target) for n in program.graph.nodes}
        g = torch.Generator().manual_seed(13)
        for rows in (FEW_ROWS, MANY_ROWS):
            batch = torch.randint(0, model.config.vocab_size, (2, rows // 2), generator=g).to(fw.device)
            want = model(input_ids=batch).logits
            for path in ("fused", "cublas"):  # cublas: the torch composition inside the Triton op
                monkeypatch.setenv("TMEM_DECODE_PATH", path)
                torch.testing.assert_close(program.module()(batch), want, rtol=1e-5, atol=1e-5)
    fw.detach()


class LoRAMLP(torch.nn.Module):
    """One backend's LoRA MLP op on x [N, H], the nine tensors as attributes (the B's trainable)."""

    def __init__(self, backend: str, w: list[torch.Tensor]) -> None:
        super().__init__()
        self.lora_mlp = tmem_kernels.get_ops(backend).lora_mlp
        self.w = w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_mlp(x, *self.w, 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_dynamic_rows_one_graph_for_every_row_count(backend):
    """torch.compile(fullgraph=True, dynamic=True): no graph break (fullgraph raises on one), one graph for
    row counts below and above the decode threshold (a recompile raises), y and the gradients as the spec's,
    in inference and in a training step."""
    x0, w0 = mlp_tensors(n=MANY_ROWS, seed=14, device=device_of(backend))
    _, w = as_leaves(x0, w0)
    seen, module = [], LoRAMLP(backend, w)

    def count(gm, example_inputs):
        seen.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend=count)
    for k, rows in enumerate((FEW_ROWS, MANY_ROWS)):
        x = x0[:rows].clone().requires_grad_(True)
        with torch._dynamo.config.patch(error_on_recompile=k > 0):
            with torch.no_grad():
                torch.testing.assert_close(compiled(x), ref.lora_mlp(x, *w0, 0.5), rtol=1e-4, atol=1e-5)
            y = compiled(x)
        want_x, want_w = as_leaves(x.detach(), w0)
        y_ref = ref.lora_mlp(want_x, *want_w, 0.5)
        dy = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, *(t for t in w if t.requires_grad)], dy)
        want = torch.autograd.grad(y_ref, [want_x, *(t for t in want_w if t.requires_grad)], dy)
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if backend != "torch":
        assert all(any(f"lora_mlp_{backend}" in str(n.target) for n in gm.graph.nodes) for gm in seen)


@pytest.mark.skipif("native" not in BACKENDS, reason="native extension not built")
def test_compile_inductor_native_matches_eager():
    model, fw, ids = written_model("native")
    torch._dynamo.reset()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = torch.compile(model, fullgraph=True)(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    fw.detach()


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------


def test_public_api_and_version():
    from pathlib import Path

    from setuptools.config.pyprojecttoml import read_configuration

    root = Path(__file__).resolve().parents[1]
    for name in tmem_kernels.__all__:
        assert hasattr(tmem_kernels, name), name
    public = {n for n, f in vars(library).items()
              if not n.startswith("_") and inspect.isfunction(f) and f.__module__ == library.__name__}  # fmt: skip
    assert public - set(library.__all__) == set(), "public op wrappers missing from library.__all__"
    assert read_configuration(root / "pyproject.toml")["project"]["version"] == tmem_kernels.__version__
    registered = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("tmem::"))
    readme = (root / "README.md").read_text()

    def documented(op: str) -> bool:  # a row of its own, or "`sgd_step_torch` / `_native` / `_triton`"
        base, _, backend = op.rpartition("_")
        return f"`{op}`" in readme or (f"`{base}_torch`" in readme and f"`_{backend}`" in readme)

    assert [op for op in registered if not documented(op)] == [], "ops missing from the README's op table"
    section = readme.split("## Kernel ops")[1].split("\n## ")[0]
    table = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    listed = [name.strip("` ") for cell in table for name in cell.split(" / ")]
    base = ""
    for k, name in enumerate(listed):  # "`sgd_step_torch` / `_native` / `_triton`": the first names the base
        base = name.rpartition("_")[0] if not name.startswith("_") else base
        listed[k] = base + name if name.startswith("_") else name
    assert listed and [op for op in listed if op not in registered] == [], "README rows of ops that do not exist"
    mentioned = lambda name: name in listed or f"`{name}" in readme or f"tmem_kernels.{name}(" in readme  # noqa: E731
    assert [name for name in tmem_kernels.__all__ if not mentioned(name)] == [], "exports the README never mentions"
    ops = [getattr(tmem_kernels, name) for name in tmem_kernels.OPS] + [tmem_kernels.randomized_svd_lora_init]
    assert [f.__name__ for f in ops if "[" not in (f.__doc__ or "")] == [], "op functions without shapes"
    for backend in tmem_kernels.BACKENDS:  # every backend's op is registered here
        assert f"lora_mlp_{backend}" in registered
    assert set(tmem_kernels.OPS) <= set(registered)
