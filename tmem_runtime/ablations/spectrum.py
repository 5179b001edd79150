"""The preconditioning claim: B's gradient along each singular direction, against sigma_i.

With Delta W = B A, the gradient of the loss for B is dL/dB = G A^T, where G = dL/dW [out, in] is the
gradient for the effective weight W + B A (at B = 0, for the base weight). With A = S_r V_r^T (the SVD
init) column i of dL/dB is sigma_i * G v_i: the direction's gradient is scaled by sigma_i. How much
that matters depends on how much sigma_i varies over the top r against how much ||G v_i|| does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel


def weight_gradients(
    model: PreTrainedModel, weights: Sequence[torch.Tensor], batch: dict[str, torch.Tensor]
) -> tuple[float, list[torch.Tensor]]:
    """(loss, dL/dW for each of `weights`) of one HF-style batch (input_ids, attention_mask, labels [B, T];
    loss: the model's mean cross-entropy over the labelled tokens).

    Only `weights` require grad during the call; every parameter's flag and `.grad` are restored after.
    With fast weights attached the gradient is the one for the effective weight W + B A.
    """
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    saved = [p.grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for w in weights:
            w.requires_grad_(True)
        device = weights[0].device
        with torch.inference_mode(False), torch.enable_grad():
            out = model(**{k: v.to(device) for k, v in batch.items()})
            out.loss.backward()
        grads = [w.grad.detach().float().clone() for w in weights]
        return float(out.loss.detach()), grads
    finally:
        for p, flag, grad in zip(params, flags, saved):
            p.requires_grad_(flag)
            p.grad = grad


def direction_gradients(grad_w: torch.Tensor, a: torch.Tensor) -> dict[str, torch.Tensor]:
    """B's gradient along each row of A, split into A's scale and the weight gradient's projection.

    grad_w: dL/dW [out, in]; a: A [r, in]. Returns "dB" = grad_w @ a^T [out, r] (what a write's step
    follows), "dB_norm" [r] (its column norms), "sigma" [r] (the row norms of A: sigma_i for the SVD
    init) and "projection" [r] = ||grad_w v_i|| with v_i = a_i / ||a_i||, so dB_norm = sigma * projection.
    """
    a = a.float()
    sigma = a.norm(dim=1)
    d_b = grad_w.float() @ a.T
    projection = (grad_w.float() @ (a / sigma[:, None]).T).norm(dim=0)
    return {"dB": d_b, "dB_norm": d_b.norm(dim=0), "sigma": sigma, "projection": projection}


def subspace_energy(grad_w: torch.Tensor, rows: torch.Tensor) -> float:
    """Share of ||grad_w||_F^2 in the span of `rows` [k, in] (orthonormalised here): 1 if the gradient
    lives in that input subspace, about k / in for a random one."""
    q, _ = torch.linalg.qr(rows.float().T)  # [in, k], orthonormal columns
    total = grad_w.float().pow(2).sum()
    return float((grad_w.float() @ q).pow(2).sum() / total) if total > 0 else 0.0


def random_rows(k: int, in_features: int, seed: int) -> torch.Tensor:
    """k Gaussian rows [k, in_features] from a seeded generator (a random input subspace)."""
    return torch.randn(k, in_features, generator=torch.Generator().manual_seed(seed))


def log_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of log y on log x (1: y proportional to x; 0: y independent of x)."""
    lx, ly = torch.tensor(x, dtype=torch.float64).log(), torch.tensor(y, dtype=torch.float64).log()
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return float((lx * ly).sum() / (lx * lx).sum())


def share_of_variance(log_sigma: Sequence[float], log_db: Sequence[float]) -> float:
    """Within one matrix, the share of the variance of log ||dB_i|| over directions i that log sigma_i
    accounts for: var(log sigma) / var(log dB) (log dB = log sigma + log projection; 1 when the
    projections are equal, near 0 when sigma hardly varies)."""
    s = torch.tensor(log_sigma, dtype=torch.float64)
    d = torch.tensor(log_db, dtype=torch.float64)
    var_d = float(d.var(unbiased=False))
    return float(s.var(unbiased=False)) / var_d if var_d > 0 else float("nan")
