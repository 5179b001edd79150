"""The LoRA SwiGLU MLP as library products with a hand-written backward (op `tmem::lora_mlp_composed`).

What a write step runs for one session's adapted MLP where the products are cuBLAS's (the torch backend on
CUDA). The forward is `reference.lora_mlp`'s products, each projection one `addmm` (`reference.lora_linear`), with
the SiLU and product as `tmem::swiglu`'s dispatch (`swiglu_act.forward`). x [N, H]; shapes in `reference`:

    xa_g = x A_g^T    gate = addmm(x W_g^T, xa_g, B_g^T, s)    (up likewise)
    h = swiglu(gate, up)    ha = h A_d^T    y = addmm(h W_d^T, ha, B_d^T, s)

The backward sums each input's gradient inside the products (`addmm`), where autograd through the same forward
computes every term apart and adds them (rows reach x through four products: three adds; and two per expand):

    g = s dy    dB_d = g^T ha    dha = g B_d    dh = addmm(dy W_d, dha, A_d)
    dgate, dup = swiglu_backward(gate, up, dh)    (one op: `tmem::swiglu_backward`)
    dB_g = (s dgate)^T xa_g    dxa_g = (s dgate) B_g    (up likewise)
    dx = addmm(addmm(addmm(dgate W_g, dup, W_u), dxa_g, A_g), dxa_u, A_u)
    dA_g = dxa_g^T x, dA_u = dxa_u^T x, dA_d = dha^T h     (only where asked: a write that trains A)

That is 13 kernels backward where autograd launches 17 (at s = 1, x and the B's wanted), the forward's 10
unchanged: the same values forward, and backward each sum rounded once where autograd rounds every partial sum.
"""

from __future__ import annotations

import torch

from tmem_kernels import swiglu_act

__all__ = ["backward", "forward"]


def forward(
    x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, a_gate: torch.Tensor,
    b_gate: torch.Tensor, a_up: torch.Tensor, b_up: torch.Tensor, a_down: torch.Tensor, b_down: torch.Tensor,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(y [N, H], gate [N, I], up [N, I], xa_g [N, r], xa_u [N, r], ha [N, r]) for x [N, H]: y and what the
    backward reads."""
    xa_g, xa_u = x @ a_gate.T, x @ a_up.T
    gate = torch.addmm(x @ w_gate.T, xa_g, b_gate.T, alpha=scaling)
    up = torch.addmm(x @ w_up.T, xa_u, b_up.T, alpha=scaling)
    h = swiglu_act.forward(gate, up)
    ha = h @ a_down.T
    return torch.addmm(h @ w_down.T, ha, b_down.T, alpha=scaling), gate, up, xa_g, xa_u, ha


def backward(
    dy: torch.Tensor, x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
    a_gate: torch.Tensor, b_gate: torch.Tensor, a_up: torch.Tensor, b_up: torch.Tensor, a_down: torch.Tensor,
    b_down: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, xa_g: torch.Tensor, xa_u: torch.Tensor,
    ha: torch.Tensor, scaling: float, need: tuple[bool, ...],
) -> tuple[torch.Tensor | None, ...]:  # fmt: skip
    """The gradients of (x, a_gate, b_gate, a_up, b_up, a_down, b_down) given dy [N, H] and the forward's saved
    tensors; need: which of those seven are wanted (None for the others)."""
    need_x, need_ag, need_bg, need_au, need_bu, need_ad, need_bd = need
    g = dy if scaling == 1 else dy * scaling
    db_down = g.T @ ha if need_bd else None
    dha = g @ b_down
    dh = torch.addmm(dy @ w_down, dha, a_down)
    dgate, dup = torch.ops.tmem.swiglu_backward(dh, gate, up)  # (`swiglu_act.backward` as its op: traceable)
    gg, gu = (dgate, dup) if scaling == 1 else (dgate * scaling, dup * scaling)
    db_gate = gg.T @ xa_g if need_bg else None
    db_up = gu.T @ xa_u if need_bu else None
    dxa_g = gg @ b_gate if need_x or need_ag else None
    dxa_u = gu @ b_up if need_x or need_au else None
    dx = None
    if need_x:
        dx = torch.addmm(torch.addmm(torch.addmm(dgate @ w_gate, dup, w_up), dxa_g, a_gate), dxa_u, a_up)
    da_gate = dxa_g.T @ x if need_ag else None
    da_up = dxa_u.T @ x if need_au else None
    da_down = dha.T @ swiglu_act.forward(gate, up) if need_ad else None
    return dx, da_gate, db_gate, da_up, db_up, da_down, db_down
