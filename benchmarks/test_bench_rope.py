"""Rotary embedding of q and k, forward + backward: HF's composition vs the fused op.

    hf      `reference.rope`: HF's apply_rotary_pos_emb (q * cos + rotate_half(q) * sin, the same for k) and
            autograd's backward of it, about fifteen kernels forward and twenty backward on a GPU
    fused   `tmem_kernels.rope` (op `tmem::rope`): one Triton kernel forward, one backward for q and k on CUDA
            (`rotary_triton`); on the CPU the same composition forward and a closed-form backward

One call: (q_rot, k_rot) = rope(q, k, cos, sin), backward with (dq, dk), q [B, Hq, T, D] and k as HF's attention
leaves them (projections viewed to heads and transposed), cos / sin [1, T, D], at SmolLM2-135M (9 heads of 64,
3 kv heads) and Qwen3-4B (32 heads of 128, 8 kv heads) shapes, B * T = 512 / 4096 tokens (T = 64); bf16 on
CUDA, fp32 on the CPU. A write step runs one per adapted layer at a few hundred tokens: on a GPU their cost is
the launches.

    .venv/bin/python -m pytest benchmarks/test_bench_rope.py --benchmark-columns=min,median,rounds
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import DEVICE, TOKENS, bench_fwd_bwd, fused_vs_hf_lines
from tmem_kernels import reference as ref
from tmem_kernels import rope

DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
HEADS = {"smollm2": (9, 3, 64), "qwen3-4b": (32, 8, 128)}  # (q heads, kv heads, head dim)
SEQ = 64
IMPLS = {"hf": ref.rope, "fused": rope}
_results: dict[tuple[str, int], dict[str, float]] = {}  # (model, N) -> impl -> median s


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("model,n", [pytest.param(m, n, id=f"{m}-N{n}") for m in HEADS for n in TOKENS])
def test_rope(benchmark, model: str, n: int, impl: str) -> None:
    hq, hk, d = HEADS[model]
    b = n // SEQ
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, SEQ, hq, d, generator=g).to(DEVICE, DTYPE).transpose(1, 2).requires_grad_(True)
    k = torch.randn(b, SEQ, hk, d, generator=g).to(DEVICE, DTYPE).transpose(1, 2).requires_grad_(True)
    angles = torch.arange(SEQ)[:, None] / 10000 ** (torch.arange(0, d, 2) / d)
    emb = torch.cat([angles, angles], dim=-1)[None]
    cos, sin = emb.cos().to(DEVICE, DTYPE), emb.sin().to(DEVICE, DTYPE)
    dq, dk = torch.randn(q.shape, generator=g).to(DEVICE, DTYPE), torch.randn(k.shape, generator=g).to(DEVICE, DTYPE)
    fn = IMPLS[impl]

    def run() -> None:
        q.grad = k.grad = None
        torch.autograd.backward(fn(q, k, cos, sin), (dq, dk))
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    group = f"rope fwd+bwd {model} {hq}/{hk} heads of {d} N={n} {DTYPE}"
    bench_fwd_bwd(benchmark, run, group, _results, (model, n), impl)


def summary_lines() -> list[str]:
    """The side-by-side table (empty when nothing ran); printed by benchmarks/conftest.py."""
    return fused_vs_hf_lines("rope fwd+bwd", DTYPE, list(IMPLS), _results)
