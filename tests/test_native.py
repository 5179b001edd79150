"""The native CPU backend (`tmem_kernels.native`) against the pure-torch spec (`tmem_kernels.reference`).

Odd shapes (sizes not multiples of 8/16, several column chunks with a ragged tail, ranks 1, 6, 16
(specialised kernels) and 5, 20 (generic kernel)), forward, backward (dx, dB, dA), optimizer steps
over several steps (also against torch.optim.SGD/AdamW) and bad inputs.

Tolerances: everything is float32; the kernels use their own exp (~2 ulp) and a different summation
order than torch, so forward/backward results are compared with rtol=1e-4 and an atol of 1e-5 times
the reference's largest magnitude; optimizer steps with rtol=1e-5, atol=1e-6 after several steps.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tmem_kernels import native
from tmem_kernels import reference as ref
from tmem_kernels.ops import get_ops

# (N, H, I, r). The fused kernels cut I into 128-column chunks (64 for the generic rank path) and
# rows into 8-lane vectors: I=520 and 1400 span several chunks, 45/33/70/300/19 end in a partial
# vector; 200 x 1400 is large enough for two threads; r=5, 20, 64 take the generic (runtime-rank) path.
SHAPES = [
    (37, 29, 45, 6),
    (5, 17, 33, 1),
    (9, 40, 70, 16),
    (64, 100, 520, 6),
    (13, 24, 300, 5),
    (3, 11, 19, 20),
    (200, 64, 1400, 6),
    (4, 12, 40, 64),
]
SHAPE_IDS = [f"N{n}-H{h}-I{i}-r{r}" for n, h, i, r in SHAPES]


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    """assert_close with rtol and an atol relative to the expected tensor's largest magnitude."""
    atol = 1e-5 * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def make_mlp(n: int, h: int, i: int, r: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(n, h, generator=g),
        "w_gate": torch.randn(i, h, generator=g) / h**0.5,
        "w_up": torch.randn(i, h, generator=g) / h**0.5,
        "w_down": torch.randn(h, i, generator=g) / i**0.5,
        "a_gate": torch.randn(r, h, generator=g) / h**0.5,
        "b_gate": torch.randn(i, r, generator=g),
        "a_up": torch.randn(r, h, generator=g) / h**0.5,
        "b_up": torch.randn(i, r, generator=g),
        "a_down": torch.randn(r, i, generator=g) / i**0.5,
        "b_down": torch.randn(h, r, generator=g),
    }


# --------------------------------------------------------------------------------------------- lora_mlp


@pytest.mark.parametrize(("n", "h", "i", "r"), SHAPES, ids=SHAPE_IDS)
def test_lora_mlp_forward(n: int, h: int, i: int, r: int) -> None:
    t = make_mlp(n, h, i, r)
    close(native.lora_mlp(**t, scaling=0.75), ref.lora_mlp(**t, scaling=0.75))


@pytest.mark.parametrize("train_a", [False, True], ids=["B", "A+B"])
@pytest.mark.parametrize(("n", "h", "i", "r"), SHAPES, ids=SHAPE_IDS)
def test_lora_mlp_backward(n: int, h: int, i: int, r: int, train_a: bool) -> None:
    t = make_mlp(n, h, i, r, seed=1)
    dy = torch.randn(n, h, generator=torch.Generator().manual_seed(2))
    expected = ref.lora_mlp_backward(**t, dy=dy, scaling=1.5, train_a=train_a)

    leaves = {k: v.clone().requires_grad_(k in ("x", "b_gate", "b_up", "b_down")) for k, v in t.items()}
    if train_a:
        for k in ("a_gate", "a_up", "a_down"):
            leaves[k].requires_grad_(True)
    native.lora_mlp(**leaves, scaling=1.5).backward(dy)

    close(leaves["x"].grad, expected.dx)
    close(leaves["b_gate"].grad, expected.db_gate)
    close(leaves["b_up"].grad, expected.db_up)
    close(leaves["b_down"].grad, expected.db_down)
    if train_a:
        close(leaves["a_gate"].grad, expected.da_gate)
        close(leaves["a_up"].grad, expected.da_up)
        close(leaves["a_down"].grad, expected.da_down)
    else:
        assert leaves["a_gate"].grad is None and leaves["a_down"].grad is None
    for k in ("w_gate", "w_up", "w_down"):
        assert leaves[k].grad is None


def test_lora_mlp_leading_dims_and_partial_grads() -> None:
    """x [B, T, H]; x not requiring grad (the first adapted layer) skips dx but keeps the B grads."""
    t = make_mlp(2 * 7, 24, 50, 6, seed=3)
    dy = torch.randn(2, 7, 24)
    expected = ref.lora_mlp_backward(**t, dy=dy.reshape(14, 24), scaling=2.0)
    leaves = {k: v.clone() for k, v in t.items()}
    leaves["x"] = leaves["x"].reshape(2, 7, 24)
    leaves["b_gate"].requires_grad_(True)
    leaves["b_down"].requires_grad_(True)
    y = native.lora_mlp(**leaves, scaling=2.0)
    assert y.shape == (2, 7, 24)
    y.backward(dy)
    assert leaves["x"].grad is None and leaves["b_up"].grad is None
    close(leaves["b_gate"].grad, expected.db_gate)
    close(leaves["b_down"].grad, expected.db_down)


def test_lora_mlp_no_grad_and_registry() -> None:
    t = make_mlp(6, 16, 40, 6, seed=4)
    with torch.no_grad():
        y = get_ops("native").lora_mlp(**t)
    assert not y.requires_grad
    close(y, ref.lora_mlp(**t))


def test_lora_mlp_zero_b_is_base_mlp() -> None:
    """With B = 0 (a fresh adapter) the output is the base SwiGLU MLP."""
    t = make_mlp(11, 30, 70, 6, seed=5)
    for k in ("b_gate", "b_up", "b_down"):
        t[k].zero_()
    base = (torch.nn.functional.silu(t["x"] @ t["w_gate"].T) * (t["x"] @ t["w_up"].T)) @ t["w_down"].T
    close(native.lora_mlp(**t), base)


# ----------------------------------------------------------------- the fused pieces on their own


@pytest.mark.parametrize("numel", [1, 7, 1000 * 37, (1 << 20) + 13], ids=["1", "7", "37k", "1M+13"])
def test_swiglu_forward_backward(numel: int) -> None:
    g = torch.Generator().manual_seed(numel)
    gate, up, dh = (torch.randn(numel, generator=g) * 4 for _ in range(3))
    close(native.swiglu(gate, up), ref.swiglu(gate, up))
    for a, b in zip(native.swiglu_backward(gate, up, dh), ref.swiglu_backward(gate, up, dh)):
        close(a, b)


@pytest.mark.parametrize("numel", [0, 1, 7, (1 << 20) + 13], ids=["0", "1", "7", "1M+13"])
def test_swiglu_gradients_equal_the_reference_in_float64(numel: int) -> None:
    """swiglu on inputs that require grad is differentiable, its gradients those of `reference.swiglu` in
    float64 (the output used to come back detached: no grad_fn, so gate and up silently got no gradient)."""
    g = torch.Generator().manual_seed(numel + 1)
    gate, up, dh = (torch.randn(numel, generator=g) * 4 for _ in range(3))
    leaves = [t.clone().requires_grad_(True) for t in (gate, up)]
    native.swiglu(*leaves).backward(dh)
    wide = [t.double().requires_grad_(True) for t in (gate, up)]
    ref.swiglu(*wide).backward(dh.double())
    for got, want in zip(leaves, wide):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)
    only_up = up.clone().requires_grad_(True)
    native.swiglu(gate, only_up).backward(dh)
    torch.testing.assert_close(only_up.grad.double(), wide[1].grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert native.swiglu(*leaves).grad_fn is None


def test_swiglu_extreme_inputs() -> None:
    """Large |gate| saturates the sigmoid without inf/nan (the kernel's exp clamps its argument)."""
    gate = torch.tensor([-1e30, -1e4, -100.0, -88.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 88.0, 100.0, 1e4, 1e30])
    up, dh = torch.full_like(gate, 0.5), torch.full_like(gate, 2.0)
    h = native.swiglu(gate, up)
    dg, du = native.swiglu_backward(gate, up, dh)
    assert torch.isfinite(h).all() and torch.isfinite(dg).all() and torch.isfinite(du).all()
    torch.testing.assert_close(h, ref.swiglu(gate, up), rtol=1e-5, atol=1e-6)
    for a, b in zip((dg, du), ref.swiglu_backward(gate, up, dh)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("n", "h", "i", "r"), SHAPES, ids=SHAPE_IDS)
def test_lora_swiglu_pieces(n: int, h: int, i: int, r: int) -> None:
    g = torch.Generator().manual_seed(6)
    s = 0.5
    gu, xa = torch.randn(2, n, i, generator=g), torch.randn(n, 2 * r, generator=g)
    b_gate, b_up = torch.randn(i, r, generator=g), torch.randn(i, r, generator=g)
    a_down = torch.randn(r, i, generator=g)
    dh_base, dha = torch.randn(n, i, generator=g), torch.randn(n, r, generator=g)
    gate = gu[0] + s * xa[:, :r] @ b_gate.T
    up = gu[1] + s * xa[:, r:] @ b_up.T
    hh = ref.swiglu(gate, up)

    h_out, ha = native.lora_swiglu_forward(gu, xa, b_gate, b_up, a_down, s)
    close(h_out, hh)
    close(ha, hh @ a_down.T)

    dg, du = ref.swiglu_backward(gate, up, dh_base + dha @ a_down)
    dgu, db_gate, db_up, dxa, da_down = native.lora_swiglu_backward(
        gu, xa, b_gate, b_up, a_down, dh_base, dha, s, need_dgu=True, need_da_down=True
    )
    close(dgu[0], dg)
    close(dgu[1], du)
    close(db_gate, s * dg.T @ xa[:, :r])
    close(db_up, s * du.T @ xa[:, r:])
    close(dxa, s * torch.cat([dg @ b_gate, du @ b_up], 1))
    close(da_down, dha.T @ hh)
    dgu2, db_gate2, *_ = native.lora_swiglu_backward(gu, xa, b_gate, b_up, a_down, dh_base, dha, s, False)
    assert dgu2 is None
    torch.testing.assert_close(db_gate2, db_gate, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ optimizers


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("numel", [1, 1001, (1 << 20) + 3], ids=["1", "1001", "1M+3"])
def test_sgd_steps(numel: int, weight_decay: float) -> None:
    g = torch.Generator().manual_seed(7)
    p0 = torch.randn(numel, generator=g)
    p_native, p_ref = p0.clone(), p0.clone()
    param = torch.nn.Parameter(p0.clone())
    opt = torch.optim.SGD([param], lr=0.05, weight_decay=weight_decay)
    for _ in range(4):
        grad = torch.randn(numel, generator=g)
        native.sgd_step_(p_native, grad, 0.05, weight_decay)
        ref.sgd_step_(p_ref, grad, 0.05, weight_decay)
        param.grad = grad.clone()
        opt.step()
    torch.testing.assert_close(p_native, p_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p_native, param.detach(), rtol=1e-5, atol=1e-6)
    assert p_native._version == p_ref._version == 4  # in-place writes are seen (autograd's saved-tensor checks)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("numel", [1, 1001, (1 << 20) + 3], ids=["1", "1001", "1M+3"])
def test_adamw_steps(numel: int, weight_decay: float) -> None:
    g = torch.Generator().manual_seed(8)
    p0 = torch.randn(numel, generator=g)
    hp = {"lr": 3e-2, "beta1": 0.85, "beta2": 0.99, "eps": 1e-6, "weight_decay": weight_decay}
    state_n = [p0.clone(), torch.zeros(numel), torch.zeros(numel)]
    state_r = [p0.clone(), torch.zeros(numel), torch.zeros(numel)]
    param = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW(
        [param], lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"], weight_decay=weight_decay
    )
    for step in range(1, 6):
        grad = torch.randn(numel, generator=g)
        native.adamw_step_(state_n[0], grad, state_n[1], state_n[2], step, **hp)
        ref.adamw_step_(state_r[0], grad, state_r[1], state_r[2], step, **hp)
        param.grad = grad.clone()
        opt.step()
    for a, b in zip(state_n, state_r):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert a._version >= 5  # each step's in-place writes are seen, as the reference's are
    torch.testing.assert_close(state_n[0], param.detach(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ bad input


def test_bad_inputs_lora_mlp() -> None:
    t = make_mlp(4, 16, 24, 6)
    cases = [
        ({"x": t["x"].double()}, TypeError, "float32"),
        ({"x": torch.randn(16, 4).t()}, ValueError, "contiguous"),
        ({"w_up": torch.randn(24, 15)}, ValueError, "w_up has shape"),
        ({"b_down": torch.randn(16, 5)}, ValueError, "b_down has shape"),
        ({"a_gate": torch.randn(65, 16)}, ValueError, "rank"),
        ({"x": torch.randn(4, 17)}, ValueError, "hidden size"),
        ({"a_down": torch.randn(6, 24, device="meta")}, ValueError, "CPU"),
        ({"b_gate": t["b_gate"].half()}, TypeError, "float32"),
    ]
    for override, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            native.lora_mlp(**{**t, **override})
    with pytest.raises(ValueError, match="frozen"):
        native.lora_mlp(**{**t, "w_down": t["w_down"].clone().requires_grad_(True)})
    with pytest.raises(TypeError, match="scaling"):
        native.lora_mlp(**t, scaling=torch.tensor(1.0))


def test_bad_inputs_pieces_and_optimizers() -> None:
    a, b = torch.randn(10), torch.randn(11)
    with pytest.raises(ValueError, match="shape"):
        native.swiglu(a, b)
    with pytest.raises(TypeError, match="float32"):
        native.swiglu_backward(a, a, a.double())
    with pytest.raises(ValueError, match="contiguous"):
        native.sgd_step_(torch.randn(10, 2)[:, 0], torch.randn(10), 0.1)
    with pytest.raises(ValueError, match="exp_avg_sq has shape"):
        native.adamw_step_(a, a.clone(), a.clone(), torch.zeros(9), 1, 1e-3)
    with pytest.raises(ValueError, match="step counts from 1"):
        native.adamw_step_(a, a.clone(), a.clone(), a.clone(), 0, 1e-3)
    with pytest.raises(TypeError, match="torch.Tensor"):
        native.sgd_step_(a, [1.0] * 10, 0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\[2, N, I\]"):
        native.lora_swiglu_forward(torch.randn(3, 4, 5), torch.randn(4, 2), torch.randn(5, 1),
                                   torch.randn(5, 1), torch.randn(1, 5))  # fmt: skip


# ------------------------------------------------------------------------------------ build hygiene


def test_import_error_says_how_to_build() -> None:
    code = (
        "import sys; sys.modules['tmem_kernels._native'] = None\n"
        "try:\n    import tmem_kernels.native\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install -e . --no-build-isolation" in out and "make install" in out


def test_denormals_survive_import() -> None:
    """The extension is built with -ffast-math; it must not switch the process to flush-to-zero."""
    assert torch.tensor(1e-40).item() != 0.0


def test_nan_propagates() -> None:
    """A NaN input gives NaN outputs (not a crash, not a silent finite value)."""
    gate = torch.tensor([float("nan"), 1.0, float("inf"), -float("inf")] * 3)
    h = native.swiglu(gate, torch.ones_like(gate))
    assert torch.isnan(h[0]) and torch.isfinite(h[1])
    t = make_mlp(3, 8, 20, 6)
    t["x"][1, 2] = float("nan")
    y = native.lora_mlp(**t)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all()
