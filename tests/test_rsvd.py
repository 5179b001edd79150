"""tmem_kernels.rsvd against reference.svd_top_r: controlled spectra, odd shapes, real SmolLM2 weights."""

from __future__ import annotations

import pytest
import torch

from tmem_kernels import reference
from tmem_kernels.rsvd import randomized_svd_lora_init, randomized_svd_top_r


@pytest.fixture(autouse=True)
def _one_thread():
    """These problems are tiny products and factorisations: a second OpenMP thread buys nothing, and on
    a loaded 2-core box every parallel region waits for a descheduled thread (measured: 4 s instead of
    14 ms for one [131, 97] case). Accuracy does not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _orth(n: int, k: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64)).Q.to(dtype)


def _with_spectrum(lead: int, m: int, k: int, sigma: torch.Tensor, dtype=torch.float64, seed=0):
    """W [lead, m, k] = U diag(sigma) V^T with random orthonormal U, V (sigma: min(m, k) values)."""
    gen = torch.Generator().manual_seed(seed)
    p = min(m, k)
    ws = [
        _orth(m, p, gen, torch.float64) @ torch.diag(sigma.double()) @ _orth(k, p, gen, torch.float64).T
        for _ in range(lead)
    ]
    return torch.stack(ws).to(dtype)


def _rel_err(s: torch.Tensor, s_ref: torch.Tensor) -> float:
    return ((s.double() - s_ref.double()).abs() / s_ref.double()).max().item()


def _check_triplets(w, u, s, vh, r, atol):
    """Shapes, orthonormality, U^T W V = diag(S), descending S."""
    lead, m, k = w.shape
    assert u.shape == (lead, m, r) and s.shape == (lead, r) and vh.shape == (lead, r, k)
    eye = torch.eye(r, dtype=u.dtype)
    torch.testing.assert_close(u.mT @ u, eye.expand(lead, r, r), atol=atol, rtol=0)
    torch.testing.assert_close(vh @ vh.mT, eye.expand(lead, r, r), atol=atol, rtol=0)
    proj = u.mT @ w.to(u.dtype) @ vh.mT
    torch.testing.assert_close(proj, torch.diag_embed(s), atol=atol * s.max().item(), rtol=0)
    assert (s[..., :-1] >= s[..., 1:] - atol).all()


@pytest.mark.parametrize("shape", [(3, 37, 23), (2, 23, 51), (1, 131, 97), (2, 200, 77)])
@pytest.mark.parametrize("r", [1, 6, 16])
def test_matches_reference_geometric_spectrum(shape, r):
    lead, m, k = shape
    p = min(m, k)
    sigma = 0.9 ** torch.arange(p, dtype=torch.float64)
    w = _with_spectrum(lead, m, k, sigma)
    u, s, vh = randomized_svd_top_r(w, r)
    u0, s0, vh0 = reference.svd_top_r(w, r)
    assert s.dtype == torch.float64
    assert _rel_err(s, s0) < 1e-10
    _check_triplets(w, u, s, vh, r, atol=1e-10)
    # gapped spectrum: the vectors themselves agree up to sign
    torch.testing.assert_close((vh * vh0).sum(-1).abs(), torch.ones_like(s), atol=1e-8, rtol=0)
    torch.testing.assert_close((u * u0).sum(-2).abs(), torch.ones_like(s), atol=1e-8, rtol=0)


@pytest.mark.parametrize("gram", [True, False])
@pytest.mark.parametrize("transpose", [False, True])
def test_flat_spectrum_float32(gram, transpose):
    """A flat top (sigma_7 / sigma_6 = 0.995, like the LLM weights) in float32, both sides, both paths."""
    m, k = 301, 173
    sigma = torch.cat([torch.tensor([2.0, 1.6, 1.3, 1.15, 1.06, 1.0]), 0.995 * 0.999 ** torch.arange(k - 6)])
    w = _with_spectrum(2, m, k, sigma, dtype=torch.float32, seed=1)
    if transpose:
        w = w.mT.contiguous()
    u, s, vh = randomized_svd_top_r(w, 6, gram=gram)
    _, s0, vh0 = reference.svd_top_r(w, 6)
    assert s.dtype == torch.float32
    assert _rel_err(s, s0) < 1e-4
    _check_triplets(w, u, s, vh, 6, atol=1e-4)
    # the top-6 right subspace agrees (principal angles ~ 0) even where v_6 / v_7 nearly tie
    cos = torch.linalg.svdvals(vh.double() @ vh0.double().mT)
    assert cos.min().item() > 1 - 1e-4


def test_gram_and_direct_agree():
    w = _with_spectrum(2, 90, 61, 0.95 ** torch.arange(61.0), dtype=torch.float64)
    a = randomized_svd_lora_init(w, 6, gram=True)
    b = randomized_svd_lora_init(w, 6, gram=False)
    torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


def test_exact_when_krylov_space_is_full():
    """(n_iter + 1) * b >= min(M, K): the Krylov space is the whole space, so the answer is exact."""
    w = torch.randn(2, 40, 19, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _, s, _ = randomized_svd_top_r(w, 6, oversample=0, n_iter=3)  # 4 blocks of 6 >= 19
    _, s0, _ = reference.svd_top_r(w, 6)
    assert _rel_err(s, s0) < 1e-12


def test_lora_init_contract_and_bf16():
    sigma = 0.8 ** torch.arange(48, dtype=torch.float64)
    w64 = _with_spectrum(3, 64, 48, sigma, seed=2)
    w = w64.to(torch.bfloat16)
    a0 = randomized_svd_lora_init(w, 6)
    a0_ref = reference.svd_lora_init(w, 6)
    assert a0.shape == (3, 6, 48) and a0.dtype == torch.float32
    torch.testing.assert_close(a0, a0_ref, atol=1e-5, rtol=1e-4)  # same canonical signs: no alignment
    _, s, vh = randomized_svd_top_r(w, 6)
    torch.testing.assert_close(a0, s.unsqueeze(-1) * vh)


@pytest.mark.parametrize("shape", [(2, 40, 25), (2, 25, 40)], ids=["tall", "wide"])
def test_exact_svd_signs_do_not_depend_on_lapack(shape, monkeypatch):
    """Another LAPACK may return any singular pair negated (u_i, v_i -> -u_i, -v_i): the exact init's
    factors, and so an adapter file's A0, must not change with it (files move between machines)."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    u0, s0, vh0 = reference.svd_top_r(w, 6)
    flip = torch.tensor([1.0, -1.0, -1.0, 1.0, -1.0, 1.0])
    svd = torch.linalg.svd

    def flipped_svd(a, full_matrices=True):  # noqa: ANN001, ANN202
        u, s, vh = svd(a, full_matrices=full_matrices)
        f = torch.ones(s.shape[-1])
        f[:6] = flip
        return u * f, s, vh * f.unsqueeze(-1)

    monkeypatch.setattr(torch.linalg, "svd", flipped_svd)
    u1, s1, vh1 = reference.svd_top_r(w, 6)
    assert not torch.equal(svd(w, full_matrices=False)[2][:, :6], flipped_svd(w, False)[2][:, :6])
    for a, b in ((u0, u1), (s0, s1), (vh0, vh1)):
        assert torch.equal(a, b)
    torch.testing.assert_close(u1 * s1.unsqueeze(-2) @ vh1, u0 * s0.unsqueeze(-2) @ vh0)


def test_autocast_does_not_lower_the_work_dtype():
    """Under a caller's torch.autocast the products still run in float32 (the documented work dtype)."""
    w = torch.randn(2, 57, 83, generator=torch.Generator().manual_seed(6))
    want = randomized_svd_top_r(w, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = randomized_svd_top_r(w, 6)
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_deterministic_for_a_seed():
    w = torch.randn(2, 57, 83, generator=torch.Generator().manual_seed(4))
    first = randomized_svd_top_r(w, 6, seed=7)
    again = randomized_svd_top_r(w.clone(), 6, seed=7)
    for x, y in zip(first, again):
        assert torch.equal(x, y)
    other = randomized_svd_top_r(w, 6, seed=8, n_iter=1)
    assert not torch.equal(first[2], other[2])


def test_rank_deficient_and_zero():
    gen = torch.Generator().manual_seed(5)
    low = torch.randn(2, 50, 3, generator=gen, dtype=torch.float64) @ torch.randn(
        2, 3, 40, generator=gen, dtype=torch.float64
    )
    u, s, vh = randomized_svd_top_r(low, 6)
    _, s0, _ = reference.svd_top_r(low, 6)
    assert torch.isfinite(u).all() and torch.isfinite(vh).all()
    torch.testing.assert_close(s, s0, atol=1e-9, rtol=1e-9)
    zero = torch.zeros(2, 30, 20)
    u, s, vh = randomized_svd_top_r(zero, 4)
    assert torch.isfinite(u).all() and torch.isfinite(vh).all() and (s == 0).all()


def test_non_contiguous_input():
    w = torch.randn(4, 60, 45, dtype=torch.float64)[::2].mT  # [2, 45, 60], strided
    _, s, _ = randomized_svd_top_r(w, 5)
    _, s0, _ = reference.svd_top_r(w, 5)
    assert _rel_err(s, s0) < 1e-6


@pytest.mark.parametrize(
    "w, r, kwargs, err",
    [
        (torch.randn(5, 4), 2, {}, ValueError),  # 2-D
        (torch.randn(1, 2, 5, 4), 2, {}, ValueError),  # 4-D
        (torch.ones(2, 5, 4, dtype=torch.int64), 2, {}, TypeError),
        (torch.randn(2, 5, 4, dtype=torch.complex64), 2, {}, TypeError),
        (torch.randn(2, 5, 4), 0, {}, ValueError),
        (torch.randn(2, 5, 4), 5, {}, ValueError),  # r > min(M, K)
        (torch.randn(2, 5, 4), 2.0, {}, TypeError),
        (torch.randn(2, 5, 4), True, {}, TypeError),
        (torch.randn(2, 5, 4), 2, {"oversample": -1}, ValueError),
        (torch.randn(2, 5, 4), 2, {"n_iter": -1}, ValueError),
    ],
)
def test_bad_inputs(w, r, kwargs, err):
    with pytest.raises(err):
        randomized_svd_top_r(w, r, **kwargs)
    with pytest.raises(err):
        randomized_svd_lora_init(w, r, **kwargs)


@pytest.fixture(scope="module")
def smollm2_mlp_weights() -> dict[str, torch.Tensor]:
    from tmem_runtime.models import load_model, target_mlps

    model, _ = load_model("smollm2-135m")
    mlps = [mlp for _, mlp in target_mlps(model, 4)]
    return {
        "gate_up": torch.stack([p.weight.detach() for mlp in mlps for p in (mlp.gate_proj, mlp.up_proj)]),
        "down": torch.stack([mlp.down_proj.weight.detach() for mlp in mlps]),
    }


@pytest.mark.slow
def test_smollm2_accuracy_target(smollm2_mlp_weights):
    """Issue 4 target: top-6 singular values of all 12 targeted matrices within 1e-3 relative of the
    exact SVD, and A0 = S_6 V_6^T close to the exact one (flat spectra: sigma_7 / sigma_6 ~ 0.99)."""
    for name, w in smollm2_mlp_weights.items():
        assert w.shape[0] == (8 if name == "gate_up" else 4)
        _, s0, vh0 = reference.svd_top_r(w, 6)  # torch.linalg.svd in float32, as the issue measures
        s0, vh0 = s0.double(), vh0.double()
        for seed in (0, 1):
            _, s, vh = randomized_svd_top_r(w, 6, seed=seed)
            assert _rel_err(s, s0) < 1e-4, name  # target 1e-3; defaults give ~1e-6 (fp32 exact's own error)
            a0 = s.double().unsqueeze(-1) * vh.double()
            a0_ref = s0.unsqueeze(-1) * vh0
            a0 = a0 * torch.sign((a0 * a0_ref).sum(-1, keepdim=True))
            rel = (a0 - a0_ref).norm(dim=(-2, -1)) / a0_ref.norm(dim=(-2, -1))
            assert rel.max().item() < 2e-3, name  # defaults give ~2e-4 (v_6 / v_7 nearly tie)
            cos = torch.linalg.svdvals(vh.double() @ vh0.mT)  # top-6 subspace: principal angles
            assert cos.min().item() > 1 - 1e-4, name
