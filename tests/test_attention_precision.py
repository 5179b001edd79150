"""A write step's attention runs in float32 on the CPU for reduced-precision models (attention_precision.py)."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tmem_runtime import FastWeights, load_model
from tmem_runtime.attention_precision import Float32Attention, write_step_attention
from tmem_runtime.recipes import Recipe
from tmem_runtime.write import IGNORE_INDEX


def qkv_mask(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(3, 4, 7, 16, generator=gen).to(dtype).requires_grad_() for _ in range(3))
    mask = torch.zeros(3, 1, 7, 7)
    mask.masked_fill_(torch.ones(7, 7, dtype=torch.bool).triu(1), torch.finfo(dtype).min)
    return q, k, v, mask.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_attention_is_computed_in_float32(dtype):
    q, k, v, mask = qkv_mask(dtype)
    with Float32Attention():
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert out.dtype == dtype
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask.float())
    assert torch.equal(out, want.to(dtype))
    want_grads = torch.autograd.grad(want.to(dtype).float().square().sum(), (q32, k32, v32))
    for got, w in zip(grads, want_grads):
        assert torch.equal(got, w.to(dtype))
    plain = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # outside the block: the bf16/fp16 kernel
    assert not torch.equal(plain, out)


def test_float32_attention_changes_nothing_else():
    q, k, v, mask = qkv_mask(torch.float32)
    with Float32Attention():
        same = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        mm = q[0, 0] @ k[0, 0].T
    assert torch.equal(same, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert torch.equal(mm, q[0, 0] @ k[0, 0].T)
    bq, bk, bv, bmask = qkv_mask(torch.bfloat16)
    with Float32Attention():  # positional arguments as well as keywords
        positional = F.scaled_dot_product_attention(bq, bk, bv, bmask)
        keywords = F.scaled_dot_product_attention(query=bq, key=bk, value=bv, attn_mask=bmask)
    assert torch.equal(positional, keywords)


def test_other_threads_keep_their_precision():
    q, k, v, mask = qkv_mask(torch.bfloat16)
    plain = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    seen = {}

    def other() -> None:
        seen["out"] = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    with Float32Attention():
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert torch.equal(seen["out"], plain)


def test_the_context_applies_only_to_reduced_precision_on_the_cpu_with_grad():
    assert isinstance(write_step_attention(torch.zeros(2, dtype=torch.bfloat16)), Float32Attention)
    assert not isinstance(write_step_attention(torch.zeros(2)), Float32Attention)
    with torch.no_grad():
        assert not isinstance(write_step_attention(torch.zeros(2, dtype=torch.bfloat16)), Float32Attention)


class AttentionDtypes(TorchDispatchMode):
    """Counts the query dtypes of the aten attention kernels dispatched, with or without grad recording."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = func.overloadpacket.__name__
        if "scaled_dot_product" in name and "backward" not in name:
            self.seen[args[0].dtype] += 1
        return func(*args, **(kwargs or {}))


def test_a_bf16_write_runs_its_steps_attention_in_float32():
    model, _ = load_model("tiny-llama", dtype=torch.bfloat16)
    fw = FastWeights(model, init="random", backend="torch")
    gen = torch.Generator().manual_seed(0)
    head = torch.randint(0, 500, (6,), generator=gen).tolist()
    batch = []
    for i in range(4):
        tail = torch.randint(0, 500, (4 + i,), generator=gen).tolist()
        batch.append((head + tail, [IGNORE_INDEX] * 7 + tail[1:]))
    census = AttentionDtypes()
    with census:
        losses = fw.write_examples(batch, Recipe(optimizer="sgd", lr=1e-2, epochs=2, batch_size=4))
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    # the trunk (no grad) keeps the model's bf16 kernels; the steps' adapted layers run in float32
    assert census.seen[torch.bfloat16] > 0 and census.seen[torch.float32] > 0
    fw.detach()
