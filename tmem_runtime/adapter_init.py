"""The adapter's starting point: A0 (shared by every session) and B0, from the model's own weights.

    "svd"     TMEM's: A0 = S_r V_r^T of each targeted weight (frozen), B0 = 0
    "random"  A0 Kaiming-uniform as nn.Linear / PEFT initialise it, B0 = 0
    "pissa"   A0 = sqrt(S_r) V_r^T, B0 = U_r sqrt(S_r); the base weight becomes the residual W - B0 A0

Same-shape weights are stacked so that one batched SVD covers them ([2L, I, H] for gate and up,
[L, H, I] for down). Everything is float32 whatever the model's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tmem_kernels import reference
from tmem_runtime.layout import AdapterLayout

INITS = ("svd", "random", "pissa")
SVD_METHODS = ("randomized", "exact")


def top_singular(stacked: torch.Tensor, rank: int, method: str, seed: int) -> tuple[torch.Tensor, ...]:
    """(U [L, M, r], S [L, r], Vh [L, r, K]) of a stack of weights [L, M, K], float32."""
    if method == "randomized":
        from tmem_kernels.rsvd import randomized_svd_top_r

        return randomized_svd_top_r(stacked, rank, seed=seed)
    return reference.svd_top_r(stacked, rank)


def initial_factors(
    mlps: list[tuple[int, nn.Module]],
    layout: AdapterLayout,
    init: str = "svd",
    svd: str = "randomized",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0 [a_numel], B0 [b_numel]) in `layout`'s order, float32 on the weights' device.

    mlps: (layer index, mlp) of the adapted layers, in the layout's slot order.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if svd not in SVD_METHODS:
        raise ValueError(f"svd must be one of {SVD_METHODS}, got {svd!r}")
    device = mlps[0][1].gate_proj.weight.device
    a0 = torch.zeros(layout.a_numel, device=device)
    b0 = torch.zeros(layout.b_numel, device=device)
    index = {(s.layer, s.target): i for i, s in enumerate(layout.slots)}
    if init == "random":
        gen = torch.Generator().manual_seed(seed)
        for i, s in enumerate(layout.slots):
            bound = 1.0 / math.sqrt(s.in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear/PEFT
            layout.a_view(a0, i).copy_((torch.rand(layout.rank, s.in_features, generator=gen) * 2 - 1) * bound)
        return a0, b0
    layers = [idx for idx, _ in mlps]
    for group in (("gate_proj", "up_proj"), ("down_proj",)):
        stacked = torch.stack([getattr(mlp, t).weight.detach().float() for t in group for _, mlp in mlps])
        u, s, vh = top_singular(stacked, layout.rank, svd, seed)
        for k, key in enumerate((layer, t) for t in group for layer in layers):
            i = index[key]
            if init == "svd":
                layout.a_view(a0, i).copy_(s[k, :, None] * vh[k])
            else:  # pissa
                root = s[k].sqrt()
                layout.a_view(a0, i).copy_(root[:, None] * vh[k])
                layout.b_view(b0, i).copy_(u[k] * root[None, :])
    return a0, b0
