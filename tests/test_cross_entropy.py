"""Chunked linear cross-entropy (`tmem_kernels.cross_entropy`, op `tmem::linear_cross_entropy`)
against `reference.linear_cross_entropy` (F.cross_entropy on the full fp32 logits).

Odd shapes (K not a multiple of the chunk, one-row chunks, a chunk larger than K), chunks whose rows are
all ignored, every row ignored (NaN loss, zero gradient, as F.cross_entropy), a custom ignore_index; loss
and d/d hidden in float64 (tight), float32 and bfloat16 (as close to float64 as the reference's own
16-bit products). opcheck on the op, and torch.compile(fullgraph=True) through it (no graph break, no
host sync), with the gradient through it. The same for the per-row weighted variant (op
`tmem::linear_cross_entropy_rows`, what a write's steps use): each row's loss times its weight, and the
gradient of any weighted sum of them.
"""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import tmem_kernels
from tmem_kernels import cross_entropy as lce
from tmem_kernels import reference as ref
from tmem_kernels.library import linear_cross_entropy, linear_cross_entropy_rows

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPILOGUES = ["torch"] + (["triton"] if tmem_kernels.available("triton") else [])


def make(k: int, h: int, v: int, dtype=torch.float64, seed: int = 0, ignored=()) -> tuple:
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(k, h, generator=g) * 2).to(DEVICE, dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(DEVICE, dtype)
    targets = torch.randint(0, v, (k,), generator=g)
    targets[list(ignored)] = -100
    return hidden, weight, targets.to(DEVICE)


def loss_and_grad(fn, hidden, weight, targets, **kw):
    h = hidden.clone().requires_grad_(True)
    loss = fn(h, weight, targets, **kw)
    loss.backward()
    return loss.detach(), h.grad


CASES = [  # (K, H, V, chunk_size, ignored rows)
    (37, 24, 101, 8, range(8, 16)),  # the second chunk is all ignored; the last chunk partial
    (5, 7, 3, 1, [0, 4]),  # one-row chunks, a tiny vocabulary
    (13, 16, 257, 64, []),  # one chunk larger than K
    (64, 20, 1000, 16, range(0, 64, 3)),
    (1, 9, 50, None, []),  # default chunking
]


@pytest.mark.parametrize("k,h,v,chunk,ignored", CASES)
def test_matches_reference_float64(k, h, v, chunk, ignored):
    hidden, weight, targets = make(k, h, v, ignored=ignored)
    got, got_grad = loss_and_grad(linear_cross_entropy, hidden, weight, targets, chunk_size=chunk)
    want, want_grad = loss_and_grad(ref.linear_cross_entropy, hidden, weight, targets)
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-12)
    assert bool((got_grad[list(ignored)] == 0).all())


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("k,v,chunk,ignored", [(37, 101, 8, range(8, 16)), (9, 5000, 4, range(9)), (3, 7, 1, [1])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_epilogue_matches_reference(epilogue, k, v, chunk, ignored, dtype):
    """The torch and Triton (under the interpreter on CPU) chunk epilogues, called directly: V over several
    of the kernel's blocks, all-ignored chunks and rows, bf16 gradients written in place."""
    hidden, weight, targets = make(k, 16, v, dtype=dtype, seed=5, ignored=ignored)
    loss, grad = lce.loss_and_grad(hidden, weight, targets, chunk_size=chunk, epilogue=epilogue)
    want, want_grad = loss_and_grad(ref.linear_cross_entropy, hidden, weight, targets)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(loss, want, rtol=tol, atol=tol, equal_nan=True)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad, want_grad, rtol=tol, atol=tol * want_grad.abs().max().item())


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matches_reference_low_precision(dtype, tol):
    hidden, weight, targets = make(45, 32, 300, dtype=dtype, seed=1, ignored=range(10, 20))
    got, got_grad = loss_and_grad(linear_cross_entropy, hidden, weight, targets, chunk_size=16)
    want, want_grad = loss_and_grad(ref.linear_cross_entropy, hidden, weight, targets)
    exact, exact_grad = loss_and_grad(ref.linear_cross_entropy, hidden.double(), weight.double(), targets)
    assert got_grad.dtype == dtype
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    # as close to the float64 truth as the reference's own low-precision products are (+ slack)
    err = (got_grad.double() - exact_grad).abs().max()
    ref_err = (want_grad.double() - exact_grad).abs().max()
    assert err <= 2 * ref_err + tol * exact_grad.abs().max(), (err, ref_err)


def test_every_row_ignored_is_nan_with_zero_gradient_like_f_cross_entropy():
    hidden, weight, targets = make(9, 8, 20, ignored=range(9))
    got, got_grad = loss_and_grad(linear_cross_entropy, hidden, weight, targets, chunk_size=4)
    want, want_grad = loss_and_grad(ref.linear_cross_entropy, hidden, weight, targets)
    assert torch.isnan(got) and torch.isnan(want)
    assert bool((want_grad == 0).all())
    torch.testing.assert_close(got_grad, want_grad)


def test_custom_ignore_index_and_grad_scaling():
    hidden, weight, targets = make(12, 10, 40, seed=2)
    targets[3:6] = 7  # ignore class 7 instead of -100
    h = hidden.clone().requires_grad_(True)
    (3.0 * linear_cross_entropy(h, weight, targets, ignore_index=7, chunk_size=5)).backward()
    h_ref = hidden.clone().requires_grad_(True)
    (3.0 * ref.linear_cross_entropy(h_ref, weight, targets, ignore_index=7)).backward()
    torch.testing.assert_close(h.grad, h_ref.grad)


def test_no_grad_computes_no_gradient_and_same_loss():
    hidden, weight, targets = make(20, 12, 60, seed=3)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, chunk_size=7)
    loss_only, grad = lce.loss_and_grad(hidden, weight, targets, chunk_size=7, with_grad=False)
    assert grad is None
    torch.testing.assert_close(loss, ref.linear_cross_entropy(hidden, weight, targets))
    torch.testing.assert_close(loss_only, loss)


def test_chunk_rows_bounds_the_logits_block():
    assert lce.chunk_rows(10_000, 151_936) == 64  # 64 MiB / (4 B * 151936) = 110 -> 64
    assert lce.chunk_rows(10_000, 49_152) == 256
    assert lce.chunk_rows(10, 49_152) == 10  # capped at K
    assert lce.chunk_rows(10_000, 10**9) == 16  # at least 16 rows
    assert lce.chunk_rows(0, 100) == 1
    # the fewest chunks under the cap, of equal size (a multiple of 16): 320 -> 2 x 160, not 256 + 64
    assert lce.chunk_rows(320, 49_152) == 160
    assert lce.chunk_rows(257, 49_152) == 144  # 144 + 113
    assert lce.chunk_rows(256, 49_152) == 256
    for k in range(1, 2000, 37):
        rows = lce.chunk_rows(k, 49_152)
        assert rows <= 256 and -(-k // rows) == -(-k // 256)  # never more chunks than the cap needs


def test_opcheck():
    hidden, weight, targets = make(37, 16, 101, dtype=torch.float32, ignored=range(8, 16))
    opcheck(torch.ops.tmem.linear_cross_entropy, (hidden.requires_grad_(True), weight, targets, -100, 8, True))
    opcheck(torch.ops.tmem.linear_cross_entropy, (hidden.detach(), weight, targets, -100, 64, False))


def test_compiles_fullgraph_without_host_sync():
    hidden, weight, targets = make(30, 16, 77, dtype=torch.float32, ignored=[1, 2])
    fn = lambda h: linear_cross_entropy(torch.tanh(h), weight, targets, chunk_size=8) * 2
    torch._dynamo.reset()
    got, got_grad = loss_and_grad(lambda h, *_: torch.compile(fn, fullgraph=True, backend="aot_eager")(h),
                                  hidden, weight, targets)  # fmt: skip
    want, want_grad = loss_and_grad(lambda h, *_: fn(h), hidden, weight, targets)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


def test_bad_input_raises():
    hidden, weight, targets = make(6, 8, 10, dtype=torch.float32)
    with pytest.raises(ValueError, match="do not agree"):
        linear_cross_entropy(hidden, weight[:, :7], targets)
    with pytest.raises(TypeError, match="int64"):
        linear_cross_entropy(hidden, weight, targets.int())
    with pytest.raises(TypeError, match="one float dtype"):
        linear_cross_entropy(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match="frozen"):
        linear_cross_entropy(hidden, weight.clone().requires_grad_(True), targets)


def rows_and_grad(fn, hidden, weight, targets, row_weight, upstream, **kw):
    """(fn's per-row losses, d (upstream . losses) / d hidden)."""
    h = hidden.clone().requires_grad_(True)
    losses = fn(h, weight, targets, row_weight, **kw)
    (losses * upstream).sum().backward()
    return losses.detach(), h.grad


@pytest.mark.parametrize("k,h,v,chunk,ignored", CASES)
def test_weighted_rows_match_reference_float64(k, h, v, chunk, ignored):
    """Per-row weights (some 0 on scored rows), an upstream gradient per row, as a batched write's groups."""
    hidden, weight, targets = make(k, h, v, ignored=ignored)
    g = torch.Generator().manual_seed(k)
    row_weight = torch.rand(k, generator=g, dtype=torch.float64).to(DEVICE)
    row_weight[::5] = 0.0
    upstream = torch.randn(k, generator=g, dtype=torch.float64).to(DEVICE)
    got, got_grad = rows_and_grad(linear_cross_entropy_rows, hidden, weight, targets, row_weight, upstream,
                                  chunk_size=chunk)  # fmt: skip
    want, want_grad = rows_and_grad(ref.linear_cross_entropy_rows, hidden, weight, targets, row_weight, upstream)
    assert got.shape == (k,) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-12)
    assert bool((got[list(ignored)] == 0).all()) and bool((got_grad[list(ignored)] == 0).all())


@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_weighted_rows_each_epilogue_and_the_mean_loss(epilogue, dtype, tol):
    """Both chunk epilogues; with weights 1 / #scored the rows sum to the mean loss of `linear_cross_entropy`."""
    hidden, weight, targets = make(45, 32, 3000, dtype=dtype, seed=4, ignored=range(10, 20))
    scored = targets != -100
    row_weight = scored.float() / scored.sum()
    rows, grad = lce.weighted_rows_and_grad(hidden, weight, targets, row_weight, chunk_size=16, epilogue=epilogue)
    want, want_grad = loss_and_grad(ref.linear_cross_entropy, hidden, weight, targets)
    assert rows.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(rows.sum(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(grad, want_grad, rtol=tol, atol=tol * want_grad.abs().max().item())
    mean, mean_grad = lce.loss_and_grad(hidden, weight, targets, chunk_size=16, epilogue=epilogue)
    torch.testing.assert_close(rows.sum(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, mean_grad, rtol=1e-6, atol=1e-6 * mean_grad.abs().max().item())


def test_weighted_rows_opcheck_compile_and_bad_input():
    hidden, weight, targets = make(37, 16, 101, dtype=torch.float32, ignored=range(8, 16))
    row_weight = torch.rand(37, device=DEVICE)
    op = torch.ops.tmem.linear_cross_entropy_rows
    opcheck(op, (hidden.clone().requires_grad_(True), weight, targets, row_weight, -100, 8, True))
    opcheck(op, (hidden, weight, targets, row_weight, -100, 64, False))
    fn = lambda h: (linear_cross_entropy_rows(torch.tanh(h), weight, targets, row_weight, chunk_size=8) ** 2).sum()
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got, got_grad = loss_and_grad(lambda h, *_: compiled(h), hidden, weight, targets)
    want, want_grad = loss_and_grad(lambda h, *_: fn(h), hidden, weight, targets)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)
    with pytest.raises(ValueError, match="row_weight"):
        linear_cross_entropy_rows(hidden, weight, targets, row_weight[:-1])
    with pytest.raises(TypeError, match="row_weight"):
        linear_cross_entropy_rows(hidden, weight, targets, torch.ones(37, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="frozen"):
        linear_cross_entropy_rows(hidden, weight.clone().requires_grad_(True), targets, row_weight)
    h = hidden.clone().requires_grad_(True)
    losses = linear_cross_entropy_rows(h, weight, targets, row_weight)
    with pytest.raises(RuntimeError, match="double backward"):  # its gradient is not differentiable
        torch.autograd.grad(losses.sum(), h, create_graph=True)


_COMPILE_SCRIPT = r"""
import json
from compile_sm90 import compile_for_sm90
from tmem_kernels import cross_entropy_triton as X

out = {}
for dt in ("fp32", "bf16"):
    for with_grad in (True, False):
        constexprs = {"BLOCK_V": X.BLOCK_V, "WITH_GRAD": with_grad, "INTERPRET": False}
        sig = {"logits_ptr": "*" + dt, "targets_ptr": "*i64", "weights_ptr": "*fp32", "loss_ptr": "*fp32",
               "V": "i32", "stride": "i32", **{k: "constexpr" for k in constexprs}}
        out[f"{dt}_grad{int(with_grad)}"] = compile_for_sm90(X._softmax_grad_kernel, sig, constexprs, X.NUM_WARPS)
print(json.dumps(out))
"""


def test_triton_epilogue_compiles_for_sm90(sm90_compile):
    """The fused epilogue compiles for an H100 (sm_90) with Triton's compiler, fp32 and bf16 logits, with and
    without the gradient pass; no register spills where ptxas reports them. No GPU needed."""
    result = sm90_compile(_COMPILE_SCRIPT)
    assert len(result) == 4
    for name, meta in result.items():
        assert meta["cubin_bytes"] > 0, name
        assert meta["spill_bytes"] in (0, None), (name, meta)
