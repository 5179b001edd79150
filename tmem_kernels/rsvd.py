"""Batched randomized SVD: the top-r singular triplets of a stack of matrices, for TMEM's init.

    w [L, M, K]  ->  U [L, M, r], S [L, r] (descending), Vh [L, r, K]        (same contract as
                     A0 = S_r Vh_r  [L, r, K]                                 `reference.svd_top_r`)

Algorithm: randomized block Krylov (block Lanczos with full reorthogonalisation) + Rayleigh-Ritz.

    A = W or W^T, whichever has the smaller second side n = min(M, K) (the sketch lives there)
    Q_0 = orth(Omega)                                    Omega [n, b] Gaussian, b = r + oversample
    X_j = A^T A Q_j,  Q_{j+1} = orth(X_j - Q Q^T X_j)    j = 0 .. n_iter-1   (projection done twice)
    X_q = A^T A Q_q                                      (one more application, for the last block)
    T = Q^T X = Q^T A^T A Q   [(q+1)b, (q+1)b],  T = Y Theta Y^T      Rayleigh-Ritz (small eigh)
    V = Q Y_r (top-r Ritz vectors),  S = ||A v_i||,  U = A V / S

No core SVD is needed after Rayleigh-Ritz: the Ritz vectors are A^T A-orthogonal (V^T A^T A V =
Theta), so A V / S is already orthonormal. (Internally the basis is stored as rows, [L, k, n], so
every product has its long side last; MKL runs [*, k]-wide right-hand sides several times slower.)

The Krylov space holds every power iterate A^T A, (A^T A)^2, ... of the sketch, not only the last one,
so the Ritz values converge with the square root of the spectral gap where plain subspace (power)
iteration converges with the gap itself. That matters here: the targeted LLM weights have flat spectra
(sigma_7 / sigma_6 ~ 0.99), and `torch.svd_lowrank` needs q=32, niter=16 for 2e-4.

`orth` is CholeskyQR2 (two rounds of Gram + Cholesky + triangular solve: batched GEMMs, cheap on any
device), falling back to Householder QR (`torch.linalg.qr`) for the whole batch when a Cholesky fails
or its diagonal says the block is too ill-conditioned for CholeskyQR2 to be accurate; in that case the
block is nudged by a tiny seeded random perturbation first, so a rank-deficient block (an exactly
low-rank W, a zero W) still yields fresh orthonormal directions (harmless to Rayleigh-Ritz).

A^T A is applied either as two skinny products (`gram=False`) or through the explicit Gram matrix
G = A^T A [n, n] formed once (`gram=True`); `gram=None` picks the cheaper one by a flop count.

Precision: float32 throughout (float64 for float64 input) whatever the weight dtype, so bf16 / fp16
weights are up-cast once. Determinism: Omega (and any fallback perturbation) comes from a CPU
`torch.Generator` seeded with `seed`, then moves to w's device, so a seed gives the same sketch on
CPU and CUDA; signs are canonicalised (the largest-|.| entry of each singular vector on the
min(M, K) side positive: Vh's rows when M >= K, U's columns otherwise).

No Triton here, on purpose: every step is a batched GEMM (cuBLAS / MKL already run those at peak) or a
tiny batched factorisation ([b, b] Cholesky, [kdim, kdim] eigh). A fused Gram + Cholesky kernel would
only save a few launches of [b, b]-sized work; it did not earn its keep, so there is no kernel to test.
"""

from __future__ import annotations

import torch

from tmem_kernels.autocast import autocast_off
from tmem_kernels.reference import canonical_signs

__all__ = ["randomized_svd_top_r", "randomized_svd_lora_init"]

# Defaults chosen on the real SmolLM2-135M weights (last 4 MLPs; see benchmarks/RESULTS.md):
# block b = r + 4 = 10 rows, 16 Krylov steps (Krylov dim 170) -> max relative error of the top-6
# singular values ~6e-7 over seeds (target 1e-3; the float32 exact SVD itself is ~1e-6 off float64),
# A0 within ~1.5e-4 (relative Frobenius, up to signs) of the float64 exact A0. 14 steps: 1e-6 / 1e-3;
# 12 steps: 5e-5 / 9e-3, each ~3% cheaper. At a fixed Krylov dimension, narrower blocks and more
# steps converge faster (b=16, 8 steps: 3.5e-4 at dim 144).
DEFAULT_OVERSAMPLE = 4
DEFAULT_N_ITER = 16


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _randn(shape: tuple[int, ...], gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Gaussian from the CPU generator (device-independent stream), moved to `like`'s device/dtype."""
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=like.device, dtype=like.dtype)


def _cholesky_qr2(x: torch.Tensor) -> torch.Tensor | None:
    """Orthonormal rows spanning x's rows, x [L, k, n], by CholeskyQR2; None where that is unsafe."""
    tol = 16 * torch.finfo(x.dtype).eps ** 0.5  # CholeskyQR2 is accurate for cond(x) up to ~1/sqrt(eps)
    q = x
    for _ in range(2):
        chol, info = torch.linalg.cholesky_ex(q @ q.mT)
        d = chol.diagonal(dim1=-2, dim2=-1)
        # diag(L) ~ the row norms left after removing earlier rows: its spread bounds cond(x) below.
        if bool((info != 0).any() | (d.amin(-1) <= tol * d.amax(-1)).any()):
            return None
        # L^-1 q as (L^-1) @ q: inverting the [k, k] factor and one GEMM beats a batched TRSM on
        # [k, n] right-hand sides ~5x on CPU (MKL) for these k; accuracy is the same for CholeskyQR2.
        eye = torch.eye(q.shape[-2], dtype=q.dtype, device=q.device).expand_as(chol)
        q = torch.linalg.solve_triangular(chol, eye, upper=False) @ q
    return q


def _project_out(x: torch.Tensor, basis: torch.Tensor | None) -> torch.Tensor:
    """x - x basis^T basis, twice (block classical Gram-Schmidt, reorthogonalised). Rows: basis [L, c, n]."""
    if basis is None:
        return x
    for _ in range(2):
        x = x - (x @ basis.mT) @ basis
    return x


def _orthonormalize(x: torch.Tensor, basis: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """Orthonormal rows spanning x's rows after projecting out `basis`: CholeskyQR2, Householder fallback."""
    x = _project_out(x, basis)
    q = _cholesky_qr2(x)
    if q is not None:
        return q
    # Ill-conditioned or rank-deficient: perturb by a tiny random block (sqrt(eps) of x's norm; unit
    # scale if x is zero) so every row carries a new direction, then Householder QR, twice.
    scale = torch.linalg.matrix_norm(x, keepdim=True)
    scale = torch.where(scale > 0, scale * torch.finfo(x.dtype).eps ** 0.5, torch.ones_like(scale))
    x = x + scale * _randn(tuple(x.shape), gen, x)
    for _ in range(2):
        x = torch.linalg.qr(_project_out(x, basis).mT).Q.mT
    return x


def _gram(a: torch.Tensor) -> torch.Tensor:
    """G = A^T A for a [L, m, n], from the upper 2x2 blocks only (3/4 of a full GEMM's flops;
    torch has no batched SYRK). Blocks of n/2 keep each GEMM large enough to run near peak."""
    n = a.shape[-1]
    if n < 256:
        return a.mT @ a
    h = n // 2
    a1, a2 = a[..., :h], a[..., h:]
    g = a.new_empty(a.shape[0], n, n)
    g[:, :h, :h] = a1.mT @ a1
    g[:, h:, h:] = a2.mT @ a2
    g12 = a1.mT @ a2
    g[:, :h, h:] = g12
    g[:, h:, :h] = g12.mT
    return g


def _gram_is_cheaper(m: int, n: int, b: int, n_apply: int) -> bool:
    """Flops of forming G once (1.5 m n^2, see `_gram`) + n_apply G-products (2 n^2 b) vs n_apply
    pairs of skinny products (4 m n b). The Gram's square GEMMs run ~3x closer to peak than [b, *]
    skinny ones (measured on this CPU: ~50 vs ~12-16 GFLOP/s per core), so the direct side is charged 3x.
    SmolLM2-135M ([1536, 576]) -> Gram; Qwen3-4B ([9728, 2560]) -> direct."""
    gram = 1.5 * m * n * n + n_apply * 2 * n * n * b
    direct = n_apply * 4 * m * n * b
    return gram < 3 * direct


def _check(w: torch.Tensor, r: int, oversample: int, n_iter: int) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 3:
        raise ValueError(f"w must be a 3-D stack [L, M, K] of matrices, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"w must have a real floating dtype, got {w.dtype}")
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r must be an int, got {type(r).__name__}")
    _, m, k = w.shape
    if not 1 <= r <= min(m, k):
        raise ValueError(f"r must satisfy 1 <= r <= min(M, K) = {min(m, k)} for w of shape {tuple(w.shape)}")
    if oversample < 0 or n_iter < 0:
        raise ValueError(f"oversample and n_iter must be >= 0, got {oversample} and {n_iter}")


def randomized_svd_top_r(
    w: torch.Tensor,
    r: int,
    *,
    oversample: int = DEFAULT_OVERSAMPLE,
    n_iter: int = DEFAULT_N_ITER,
    seed: int = 0,
    gram: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r singular triplets of every matrix in a stack, by randomized block Krylov + Rayleigh-Ritz.

    w [L, M, K] (any real float dtype, any device) -> U [L, M, r], S [L, r] descending, Vh [L, r, K],
    float32 (float64 for float64 input), as `reference.svd_top_r` (the same canonical signs).
    `oversample`: extra sketch columns (block b = r + oversample); `n_iter`: Krylov steps (A^T A
    applications after the first); the Krylov space has (n_iter + 1) * b columns, capped at
    min(M, K), where it becomes exact. `seed` fixes the sketch. `gram`: apply A^T A through the
    explicit Gram matrix (True), as two products (False), or whichever costs fewer flops (None).
    """
    _check(w, r, oversample, n_iter)
    with autocast_off(w.device.type):  # the products run in the work dtype, autocast or not
        return _block_krylov_top_r(w, r, oversample, n_iter, seed, gram)


def _block_krylov_top_r(
    w: torch.Tensor, r: int, oversample: int, n_iter: int, seed: int, gram: bool | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`randomized_svd_top_r` on checked arguments."""
    dtype = _work_dtype(w.dtype)
    lead, m_w, k_w = w.shape
    tall = m_w >= k_w
    a = w.to(dtype)
    if not tall:
        a = a.mT  # A = W^T: a transposed view, BLAS reads it in place
    m, n = a.shape[-2:]  # n = min(M, K): the sketch and the Krylov basis live in R^n

    b = min(r + oversample, n)
    kdim = min(n, (n_iter + 1) * b)  # at n the Krylov space is all of R^n and the result is exact
    gen = torch.Generator().manual_seed(seed)

    use_gram = _gram_is_cheaper(m, n, b, -(-kdim // b)) if gram is None else gram
    # The basis is kept as rows ([L, k, n]): products then have the long side last, which MKL and
    # cuBLAS run far better than [*, k]-wide right-hand sides for k ~ 6-16.
    if use_gram:
        g = _gram(a)  # symmetric: x @ g == (g @ x^T)^T
        apply = lambda v: v @ g
    else:
        apply = lambda v: (v @ a.mT) @ a

    # Preallocated: rows [0, c) of `basis` are the orthonormal basis so far, `images` its A^T A image.
    basis = a.new_empty(lead, kdim, n)
    images = a.new_empty(lead, kdim, n)
    basis[:, :b] = _orthonormalize(_randn((lead, b, n), gen, a), None, gen)
    lo, hi = 0, b
    while True:
        images[:, lo:hi] = apply(basis[:, lo:hi])  # X_j = Q_j A^T A
        if hi == kdim:
            break
        width = min(b, kdim - hi)
        basis[:, hi : hi + width] = _orthonormalize(images[:, lo : lo + width], basis[:, :hi], gen)
        lo, hi = hi, hi + width
    t = images @ basis.mT  # = Q A^T A Q^T, [kdim, kdim]
    t = 0.5 * (t + t.mT)
    _, y = torch.linalg.eigh(t)  # ascending
    vt = y[..., -r:].flip(-1).mT @ basis  # top-r Ritz vectors as rows [L, r, n]
    # Ritz vectors are A^T A-orthogonal (V^T A^T A V = Theta), so U = A V / S is orthonormal as is:
    # no core SVD needed; S = ||A v_i|| (= sqrt(theta_i), computed without squaring).
    ut = vt @ a.mT  # (A V)^T [L, r, m]
    s, order = torch.linalg.vector_norm(ut, dim=-1).sort(dim=-1, descending=True)  # ties: rounding only
    vt = vt.gather(-2, order.unsqueeze(-1).expand_as(vt))
    ut = ut.gather(-2, order.unsqueeze(-1).expand_as(ut))
    ut = ut / torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(-1)
    ut, vt = canonical_signs(ut, vt)  # vt is the shorter (n-) side: its largest-|.| entries positive
    if tall:
        return ut.mT, s, vt  # W = U S V^T
    return vt.mT, s, ut  # W^T = A = U S V^T  ->  W = V S U^T


def randomized_svd_lora_init(
    w: torch.Tensor,
    r: int,
    *,
    oversample: int = DEFAULT_OVERSAMPLE,
    n_iter: int = DEFAULT_N_ITER,
    seed: int = 0,
    gram: bool | None = None,
) -> torch.Tensor:
    """TMEM's A0 = S_r V_r^T from the randomized SVD. w [L, M, K] -> A0 [L, r, K] (float32; float64
    for float64 input), same contract as `reference.svd_lora_init`; keywords as `randomized_svd_top_r`.
    """
    _, s, vh = randomized_svd_top_r(w, r, oversample=oversample, n_iter=n_iter, seed=seed, gram=gram)
    return s.unsqueeze(-1) * vh
