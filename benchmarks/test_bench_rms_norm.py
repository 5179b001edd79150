"""RMSNorm forward + backward (d x): HF's composition vs the fused op.

    hf      `reference.rms_norm`: LlamaRMSNorm's forward (x.float(), pow, mean, add, rsqrt, mul, cast, mul) and
            autograd's backward of it, about eight kernels forward and a dozen backward on a GPU
    fused   `tmem_kernels.rms_norm` (op `tmem::rms_norm`): one Triton kernel forward, one backward on CUDA
            (`rmsnorm_triton`); on the CPU the same composition forward and a closed-form backward

One call: y = norm(x), y.backward(dy), x [N, H] requiring grad, the weight frozen (as the write's norms), at
SmolLM2-135M (H 576) and Qwen3-4B (H 2560) widths, N = 512 / 4096 tokens; bf16 on CUDA, fp32 on the CPU.
A write step runs tens of these at a few hundred tokens: on a GPU their cost is the launches.

    .venv/bin/python -m pytest benchmarks/test_bench_rms_norm.py --benchmark-columns=min,median,rounds
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import DEVICE, SHAPES, TOKENS, bench_fwd_bwd, fused_vs_hf_lines
from tmem_kernels import reference as ref
from tmem_kernels import rms_norm

DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
EPS = 1e-6
IMPLS = {"hf": ref.rms_norm, "fused": rms_norm}
_results: dict[tuple[str, int], dict[str, float]] = {}  # (model, N) -> impl -> median s


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("model,n", [pytest.param(m, n, id=f"{m}-N{n}") for m in SHAPES for n in TOKENS])
def test_rms_norm(benchmark, model: str, n: int, impl: str) -> None:
    h = SHAPES[model][0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, generator=g).to(DEVICE, DTYPE).requires_grad_(True)
    weight = (1 + 0.1 * torch.randn(h, generator=g)).to(DEVICE, DTYPE)
    dy = torch.randn(n, h, generator=g).to(DEVICE, DTYPE)
    fn = IMPLS[impl]

    def run() -> None:
        x.grad = None
        fn(x, weight, EPS).backward(dy)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    bench_fwd_bwd(benchmark, run, f"rms_norm fwd+bwd {model} H={h} N={n} {DTYPE}", _results, (model, n), impl)


def summary_lines() -> list[str]:
    """The side-by-side table (empty when nothing ran); printed by benchmarks/conftest.py."""
    return fused_vs_hf_lines("rms_norm fwd+bwd", DTYPE, list(IMPLS), _results)


