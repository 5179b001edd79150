"""The LoRA SwiGLU MLP with a hand-written backward (`tmem_kernels.lora_mlp_composed`, op `tmem::lora_mlp_composed`)
against the spec (`reference.lora_mlp`, `reference.lora_mlp_backward`: autograd on the reference forward).

On the `device` fixture's device (the CPU here; CUDA where there is one). In float64 the op's forward and every
gradient (x, the B's, the A's) equal the spec's to rounding, at scaling 1 and not; in float32 and bf16 they are
judged against float64: the forward is the spec's products (bit for bit the reference in float32 on the CPU), and
the backward's sums, each rounded once inside a product, are never further from float64 than autograd through the
same forward (which rounds every partial sum). What the backward launches: 13 kernels where autograd's is 17.
Gradients asked for only where needed (x not requiring grad: none of its products run), double backward through
the reference, opcheck, torch.compile(fullgraph=True), bad input.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.library import opcheck
from torch.utils._python_dispatch import TorchDispatchMode

from tmem_kernels import reference as ref
from tmem_kernels.library import lora_mlp_composed, swiglu

N, H, INTER, R = 37, 24, 40, 6
NAMES = ("x", "a_gate", "b_gate", "a_up", "b_up", "a_down", "b_down")


def make(dtype: torch.dtype, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, list, list, list]:
    """(x [N, H], (w_gate, w_up, w_down), (a_gate, a_up, a_down), (b_gate, b_up, b_down)), scaled so every
    term of the MLP matters."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    x = rand(N, H)
    ws = [rand(INTER, H, scale=0.2), rand(INTER, H, scale=0.2), rand(H, INTER, scale=0.2)]
    a = [rand(R, H, scale=0.3), rand(R, H, scale=0.3), rand(R, INTER, scale=0.3)]
    b = [rand(INTER, R, scale=0.1), rand(INTER, R, scale=0.1), rand(H, R, scale=0.1)]
    return x, ws, a, b


def run(fn, x, ws, a, b, dy, scaling: float, wanted=NAMES) -> tuple[torch.Tensor, dict]:  # noqa: ANN001
    """(y, {name: gradient}) of fn over copies of the inputs, those named in `wanted` requiring grad."""
    xs = x.clone().requires_grad_("x" in wanted)
    as_ = [t.clone().requires_grad_(n in wanted) for t, n in zip(a, ("a_gate", "a_up", "a_down"))]
    bs = [t.clone().requires_grad_(n in wanted) for t, n in zip(b, ("b_gate", "b_up", "b_down"))]
    y = fn(xs, *ws, as_[0], bs[0], as_[1], bs[1], as_[2], bs[2], scaling)
    y.backward(dy)
    leaves = dict(zip(NAMES, (xs, as_[0], bs[0], as_[1], bs[1], as_[2], bs[2])))
    return y.detach(), {n: leaves[n].grad for n in wanted}


def autograd_mlp(x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, scaling):  # noqa: ANN001
    """The same forward under autograd: what a write step ran before the op (`reference.lora_linear`s, `swiglu`)."""
    gate = ref.lora_linear(x, w_gate, a_gate, b_gate, scaling)
    up = ref.lora_linear(x, w_up, a_up, b_up, scaling)
    return ref.lora_linear(swiglu(gate, up), w_down, a_down, b_down, scaling)


@pytest.mark.parametrize("scaling", [1.0, 2.0])
def test_float64_matches_the_spec_with_every_gradient(scaling, device):
    x, ws, a, b = make(torch.float64, device)
    dy = torch.randn(N, H, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    y, got = run(lora_mlp_composed, x, ws, a, b, dy, scaling)
    want = ref.lora_mlp_backward(x, *ws, a[0], b[0], a[1], b[1], a[2], b[2], dy, scaling, train_a=True)
    torch.testing.assert_close(y, ref.lora_mlp(x, *ws, a[0], b[0], a[1], b[1], a[2], b[2], scaling), rtol=0, atol=0)
    names = {"x": "dx", "a_gate": "da_gate", "b_gate": "db_gate", "a_up": "da_up", "b_up": "db_up",
             "a_down": "da_down", "b_down": "db_down"}  # fmt: skip
    for name, field in names.items():
        torch.testing.assert_close(got[name], getattr(want, field), rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_never_further_from_float64_than_autograd(dtype, device):
    """The backward's sums rounded once inside the products: every gradient within 1.05x (plus 1e-7 of its norm)
    of autograd's distance from the float64 gradient, through the same forward; the forward equals autograd's."""
    x, ws, a, b = make(dtype, device, seed=3)
    dy = torch.randn(N, H, generator=torch.Generator().manual_seed(4)).to(device, dtype)
    wanted = ("x", "b_gate", "b_up", "b_down")  # a B-only write's gradients
    y, got = run(lora_mlp_composed, x, ws, a, b, dy, 1.0, wanted)
    y_auto, auto = run(autograd_mlp, x, ws, a, b, dy, 1.0, wanted)
    wide = [t.double() for t in ws], [t.double() for t in a], [t.double() for t in b]
    _, exact = run(lora_mlp_composed, x.double(), *wide, dy.double(), 1.0, wanted)
    assert torch.equal(y, y_auto)
    for name in wanted:
        truth = exact[name]
        err, err_auto = ((g.double() - truth).norm() for g in (got[name], auto[name]))
        assert err <= 1.05 * err_auto + 1e-7 * truth.norm(), (name, float(err), float(err_auto))


class _Kernels(TorchDispatchMode):
    """Counts the ops a block dispatches (views and the op's own call excluded)."""

    VIEWS = {"view", "t", "_unsafe_view", "transpose", "detach", "expand", "unsqueeze", "permute", "slice", "select",
             "squeeze", "alias", "as_strided", "_reshape_alias", "lift_fresh"}  # fmt: skip

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = func.overloadpacket.__name__
        if name not in self.VIEWS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def test_the_backward_sums_inside_the_products(device):
    """A B-only write's backward (x and the B's wanted, scaling 1): 8 products and 4 addmm around the SwiGLU's
    backward op, no add (autograd through the same forward: 12 products and 4 adds); x not wanted: none of its
    products run."""
    x, ws, a, b = make(torch.float32, device)
    dy = torch.ones(N, H, device=device)
    counts = {}
    for wanted in (("x", "b_gate", "b_up", "b_down"), ("b_gate", "b_up", "b_down")):
        xs = x.clone().requires_grad_("x" in wanted)
        bs = [t.clone().requires_grad_(True) for t in b]
        y = lora_mlp_composed(xs, *ws, a[0], bs[0], a[1], bs[1], a[2], bs[2], 1.0)
        with _Kernels() as k:
            y.backward(dy)
        counts[wanted] = dict(k.ops)
    assert counts[("x", "b_gate", "b_up", "b_down")] == {"mm": 8, "addmm": 4, "swiglu_backward": 1}, counts
    assert counts[("b_gate", "b_up", "b_down")] == {"mm": 5, "addmm": 1, "swiglu_backward": 1}, counts


def test_double_backward_through_the_reference(device):
    x, ws, a, b = make(torch.float64, device)
    xs, bs = x.clone().requires_grad_(True), [t.clone().requires_grad_(True) for t in b]
    xr, br = x.clone().requires_grad_(True), [t.clone().requires_grad_(True) for t in b]
    for inp, bb, fn in ((xs, bs, lora_mlp_composed), (xr, br, ref.lora_mlp)):
        y = fn(inp, *ws, a[0], bb[0], a[1], bb[1], a[2], bb[2], 1.0)
        (g,) = torch.autograd.grad(y.square().sum(), inp, create_graph=True)
        g.square().sum().backward()
    for got, want in zip((xs.grad, *(t.grad for t in bs)), (xr.grad, *(t.grad for t in br))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_opcheck(device):
    x, ws, a, b = make(torch.float32, device)
    op = torch.ops.tmem.lora_mlp_composed.default
    opcheck(op, (x.requires_grad_(True), *ws, a[0], b[0].requires_grad_(True), a[1], b[1].requires_grad_(True),
                 a[2], b[2].requires_grad_(True), 1.0))  # fmt: skip
    opcheck(op, (x.detach(), *ws, *(t for pair in zip(a, (t.detach() for t in b)) for t in pair), 2.0))


def test_compiles_fullgraph(device):
    x, ws, a, b = make(torch.float32, device)
    fn = torch.compile(lora_mlp_composed, fullgraph=True, backend="aot_eager")
    args = (x, *ws, a[0], b[0], a[1], b[1], a[2], b[2], 1.0)
    torch.testing.assert_close(fn(*args), lora_mlp_composed(*args), rtol=0, atol=0)


def test_bad_input_raises(device):
    x, ws, a, b = make(torch.float32, device)
    with pytest.raises(ValueError, match="b_up has shape"):
        lora_mlp_composed(x, *ws, a[0], b[0], a[1], b[1][:, :3], a[2], b[2])
    with pytest.raises(TypeError, match="w_up is torch.float64"):
        lora_mlp_composed(x, ws[0], ws[1].double(), ws[2], a[0], b[0], a[1], b[1], a[2], b[2])
    with pytest.raises(ValueError, match="requires grad"):
        lora_mlp_composed(x, ws[0].requires_grad_(True), ws[1], ws[2], a[0], b[0], a[1], b[1], a[2], b[2])
