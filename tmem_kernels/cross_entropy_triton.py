"""The linear cross-entropy's chunk epilogue as one Triton kernel (`cross_entropy.loss_and_grad` on CUDA).

Same contract as `cross_entropy.softmax_grad_torch`: logits [c, V] (the head's product, in the model's
dtype) -> per-row loss lse - logit[target] (0 on ignored rows) and d loss / d logits, but one program per
row reads the row twice and writes it once, in place: pass 1 keeps a running max and sum of exponentials
(online softmax, fp32) over blocks of V; pass 2 writes weight * (softmax - one_hot) over the logits, in
their dtype, ready for the product with the head. The torch epilogue makes about eight fp32 passes over
the block and a second fp32 copy of it; at a 150k vocabulary that traffic, not the two matmuls, is what
the loss costs on a GPU.

Under TRITON_INTERPRET=1 (CPU tensors) the bf16 stores are rounded to nearest even by hand, as in
`lora_mlp`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tmem_kernels.lora_mlp import _cast, _interpreting

__all__ = ["BLOCK_V", "softmax_grad_"]

BLOCK_V = 4096  # vocabulary columns per step of a row's loop
NUM_WARPS = 8


@triton.jit
def _softmax_grad_kernel(
    logits_ptr, targets_ptr, weights_ptr, loss_ptr, V, stride,
    BLOCK_V: tl.constexpr, WITH_GRAD: tl.constexpr, INTERPRET: tl.constexpr,
):  # fmt: skip
    """One row: loss[row] = lse - logit[target] (0 where weight == 0); with WITH_GRAD the row is overwritten
    by weight * (softmax - one_hot(target))."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride
    target = tl.load(targets_ptr + row)
    weight = tl.load(weights_ptr + row)
    offs = tl.arange(0, BLOCK_V)
    top = tl.full((), float("-inf"), tl.float32)
    total = tl.zeros((), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(base + v0 + offs, mask=v0 + offs < V, other=float("-inf")).to(tl.float32)
        new_top = tl.maximum(top, tl.max(x, axis=0))
        total = total * tl.exp(top - new_top) + tl.sum(tl.exp(x - new_top), axis=0)
        top = new_top
    lse = top + tl.log(total)
    picked = tl.load(base + target).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(weight != 0, lse - picked, 0.0))
    if WITH_GRAD:
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            mask = cols < V
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            d = weight * (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0))
            tl.store(base + cols, _cast(d, logits_ptr.dtype.element_ty, INTERPRET), mask=mask)


def softmax_grad_(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The chunk epilogue in one launch. logits [c, V] (float32/float16/bfloat16, rows contiguous; overwritten
    by the gradient when `with_grad`), targets [c] int64 (valid classes), weights [c] float32 (0 on ignored
    rows) -> (per-row loss [c] float32, the gradient = logits itself, or None)."""
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16) or logits.stride(1) != 1:
        raise ValueError(f"softmax_grad_: logits must be float32/16-bit with contiguous rows, got {logits.dtype}, "
                         f"strides {logits.stride()}")  # fmt: skip
    if logits.device.type != "cuda" and not _interpreting():
        raise RuntimeError("softmax_grad_ (triton): CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    c, v = logits.shape
    loss = torch.empty(c, dtype=torch.float32, device=logits.device)
    if c:
        _softmax_grad_kernel[(c,)](
            logits, targets, weights.to(torch.float32), loss, v, logits.stride(0),
            BLOCK_V=min(BLOCK_V, triton.next_power_of_2(v)), WITH_GRAD=with_grad, INTERPRET=_interpreting(),
            num_warps=NUM_WARPS,
        )  # fmt: skip
    return loss, logits if with_grad else None
