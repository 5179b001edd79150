"""Chunked linear cross-entropy (op `tmem::linear_cross_entropy`): a frozen head's loss without [K, V] logits.

    hidden [K, H] (the final-normed states at the loss positions), weight [V, H] (the head, frozen),
    targets [K] (int64, `ignore_index` where a row is not scored)
    loss = mean over rows t != ignore_index of  logsumexp(hidden[t] @ weight.T) - (hidden[t] @ weight.T)[target]

Same value as `reference.linear_cross_entropy` (F.cross_entropy on the fp32 logits; NaN when every row is
ignored, with a zero gradient, as F.cross_entropy gives), but the rows run in chunks of C, so at most one
[C, V] block of logits lives at a time (a 150k vocabulary makes [K, V] fp32 logits 600 kB per row). With
`with_grad` the gradient w.r.t. hidden is computed in the same pass (softmax - one_hot, scaled by
1 / #scored rows, times the head), so a backward needs no second pass over the head and nothing but that
[K, H] gradient is kept.

Graph-safe: the chunk loop is fixed by the static K and C, nothing is read back to the host (the scored-row
count stays a device tensor), so the function can be captured in a CUDA graph and traced by torch.compile.
Products run in the inputs' dtype (fp32 accumulation, as a matmul does); the softmax in fp32 (fp64 for fp64).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["DEFAULT_CHUNK_BYTES", "IGNORE_INDEX", "check_row_weight", "chunk_rows", "loss_and_grad",
           "weighted_rows_and_grad"]

IGNORE_INDEX = -100
DEFAULT_CHUNK_BYTES = 64 << 20  # one chunk's fp32 logits: [C, V] * 4 bytes at most (C >= 16)
_MIN_CHUNK = 16


def chunk_rows(num_rows: int, vocab: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk: the fewest chunks whose fp32 logits fit `chunk_bytes` (at most the largest power of 2
    of rows that fits, at least 16 rows), of equal size rounded up to a multiple of 16, capped at `num_rows`
    (at least 1). Equal chunks: 320 rows of a 49k vocabulary run as 2 x 160, not 256 + 64, whose small
    product is the slowest per row (1.15x the whole loss's time on the CPU)."""
    cap = max(_MIN_CHUNK, chunk_bytes // (4 * max(vocab, 1)))
    cap = 1 << (cap.bit_length() - 1)
    chunks = max(1, -(-num_rows // cap))
    rows = min(cap, -(-num_rows // chunks // _MIN_CHUNK) * _MIN_CHUNK)
    return max(1, min(rows, num_rows))


def check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> None:
    """Clear errors for shapes, dtypes and devices the chunked loss would get wrong."""
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"linear_cross_entropy: {name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError(
            "linear_cross_entropy: expected hidden [K, H], weight [V, H], targets [K]; got "
            f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(targets.shape)}"
        )
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != targets.shape[0]:
        raise ValueError(
            f"linear_cross_entropy: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and targets "
            f"{tuple(targets.shape)} do not agree (hidden [K, H], weight [V, H], targets [K])"
        )
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise TypeError(
            f"linear_cross_entropy: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one float dtype"
        )
    if targets.dtype != torch.long:
        raise TypeError(f"linear_cross_entropy: targets must be int64, got {targets.dtype}")
    if not hidden.device == weight.device == targets.device:
        raise ValueError(
            f"linear_cross_entropy: tensors on different devices: hidden {hidden.device}, weight {weight.device}, "
            f"targets {targets.device}"
        )
    if chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")


def check_row_weight(row_weight: torch.Tensor, targets: torch.Tensor) -> None:
    """Clear errors for a row weight the weighted loss would misread: a float tensor shaped as targets [K],
    on their device."""
    if not isinstance(row_weight, torch.Tensor) or not row_weight.is_floating_point():
        raise TypeError(f"linear_cross_entropy_rows: row_weight must be a float tensor, got {row_weight!r:.80}")
    if isinstance(targets, torch.Tensor) and (row_weight.shape != targets.shape or row_weight.device != targets.device):
        raise ValueError(
            f"linear_cross_entropy_rows: row_weight {tuple(row_weight.shape)} on {row_weight.device} must match "
            f"targets {tuple(targets.shape)} on {targets.device}"
        )


def softmax_grad_torch(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk's epilogue in torch: logits [c, V] (the head's product), targets [c] (ignored rows: any valid
    class), weights [c] (1 / #scored, 0 on ignored rows) -> (lse - logit[target] per row [c], or 0 on
    ignored rows; d loss / d logits [c, V] in logits' dtype, or None). The softmax runs in float32 (float64
    for float64), in place on one block (torch.logsumexp would allocate a second one)."""
    acc = torch.promote_types(logits.dtype, torch.float32)
    work = logits.to(acc)
    picked = work.gather(1, targets[:, None]).squeeze(1)
    top = work.amax(dim=-1, keepdim=True)
    probs = work.sub_(top).exp_()
    sums = probs.sum(dim=-1, keepdim=True)
    row_loss = torch.where(weights != 0, (top + sums.log()).squeeze(1) - picked, 0.0)
    if not with_grad:
        return row_loss, None
    probs.mul_(weights[:, None] / sums)  # softmax / #scored
    probs.scatter_add_(1, targets[:, None], -weights[:, None])  # - one_hot / #scored
    return row_loss, probs.to(logits.dtype)


Epilogue = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None]]


def _epilogue(name: str, device: torch.device, dtype: torch.dtype) -> Epilogue:
    """The chunk epilogue: "torch", "triton" (`cross_entropy_triton`), or "auto" (Triton on CUDA for
    16/32-bit floats when it is installed, else torch)."""
    if name == "auto":
        name = "triton" if device.type == "cuda" and dtype != torch.float64 else "torch"
        if name == "triton":
            try:
                from tmem_kernels import cross_entropy_triton  # noqa: F401
            except ImportError:
                name = "torch"
    if name == "torch":
        return softmax_grad_torch
    if name == "triton":
        from tmem_kernels.cross_entropy_triton import softmax_grad_

        return softmax_grad_
    raise ValueError(f"linear_cross_entropy: epilogue must be 'auto', 'torch' or 'triton', got {name!r}")


def loss_and_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    with_grad: bool = True,
    epilogue: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(loss, d loss / d hidden) of the mean cross-entropy of hidden @ weight.T against targets, in chunks.

    hidden [K, H], weight [V, H] (same float dtype), targets [K] int64 -> loss: 0-d float32 (float64 for
    float64 input, the dtype the softmax runs in); the gradient [K, H] in hidden's dtype (None without
    `with_grad`). chunk_size: rows per chunk (default `chunk_rows`). epilogue: what turns a chunk's logits
    into its losses and gradient ("auto": the fused Triton kernel on CUDA, torch otherwise).
    Rows whose target is `ignore_index` add nothing; targets must otherwise lie in [0, V).
    """
    chunk_size = _checked_chunk(hidden, weight, targets, chunk_size)
    scored = targets != ignore_index
    acc = torch.promote_types(hidden.dtype, torch.float32)
    inv_count = scored.sum().to(acc).reciprocal()  # inf when nothing is scored: NaN, as F.cross_entropy
    weights = torch.where(scored, inv_count, 0.0)  # ignored rows: 0, never 0 * inf
    row_losses, grad = _chunked(hidden, weight, targets, scored, weights, chunk_size, with_grad, epilogue)
    return row_losses.sum() * inv_count, grad


def weighted_rows_and_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    row_weight: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    chunk_size: int | None = None,
    with_grad: bool = True,
    epilogue: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(row_weight[t] x cross-entropy of row t, d (their sum) / d hidden), in chunks, as `loss_and_grad`.

    hidden [K, H], weight [V, H], targets [K] int64, row_weight [K] (any float dtype, e.g. 1 / the targets
    of the row's group: each group's loss its own mean) -> losses [K] float32 (float64 for float64 input;
    0 on rows whose target is `ignore_index`), gradient [K, H] in hidden's dtype (None without `with_grad`).
    Each row's loss depends on its own hidden row only, so the gradient of any weighted sum of the losses
    is this gradient with each row scaled by its weight in that sum.
    """
    chunk_size = _checked_chunk(hidden, weight, targets, chunk_size)
    check_row_weight(row_weight, targets)
    scored = targets != ignore_index
    acc = torch.promote_types(hidden.dtype, torch.float32)
    weights = torch.where(scored, row_weight.to(acc), 0.0)
    row_losses, grad = _chunked(hidden, weight, targets, scored, weights, chunk_size, with_grad, epilogue)
    return row_losses * weights, grad


def _checked_chunk(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int | None) -> int:
    """The rows per chunk (default `chunk_rows`), once the inputs are checked (`check_inputs`)."""
    check_inputs(hidden, weight, targets, 1 if chunk_size is None else chunk_size)
    return chunk_rows(hidden.shape[0], weight.shape[0]) if chunk_size is None else chunk_size


def _chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    scored: torch.Tensor,
    weights: torch.Tensor,
    chunk_size: int,
    with_grad: bool,
    epilogue: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(unweighted cross-entropy per row [K], 0 where `weights` is 0; the gradient of sum(weights x those)
    w.r.t. hidden [K, H] or None): the chunk loop both losses share (inputs already checked)."""
    k = hidden.shape[0]
    finish = _epilogue(epilogue, hidden.device, hidden.dtype)
    safe_targets = torch.where(scored, targets, torch.zeros_like(targets))
    row_losses = []
    grad = torch.empty_like(hidden) if with_grad else None
    for lo in range(0, k, chunk_size):
        hi = min(k, lo + chunk_size)
        logits = hidden[lo:hi] @ weight.T  # [c, V]: the one block of logits
        row_loss, dlogits = finish(logits, safe_targets[lo:hi], weights[lo:hi], with_grad)
        row_losses.append(row_loss)
        if grad is not None:
            torch.mm(dlogits, weight, out=grad[lo:hi])
        del logits, dlogits  # freed before the next chunk's block is allocated
    acc = torch.promote_types(hidden.dtype, torch.float32)
    return (torch.cat(row_losses) if row_losses else torch.zeros(0, dtype=acc, device=hidden.device)), grad
