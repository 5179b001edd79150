"""Residual add + RMSNorm forward + backward (d x, d residual): HF's composition vs the fused op.

    hf      `reference.add_rms_norm`: torch's add, then LlamaRMSNorm's forward (about eight kernels) and
            autograd's backward of both (a dozen kernels, and the add of the two branches' gradients)
    fused   `tmem_kernels.add_rms_norm` (op `tmem::add_rms_norm`): one Triton kernel forward (s and y), one
            backward (d) on CUDA (`addrmsnorm_triton`); on the CPU the same composition forward and a closed-form
            backward

One call: y, s = add_rms_norm(x, residual), backward of y (dy) and s (ds), x and residual [N, H] requiring grad,
the weight frozen (as the write's norms), at SmolLM2-135M (H 576) and Qwen3-4B (H 2560) widths, N = 512 / 4096
tokens; bf16 on CUDA, fp32 on the CPU. A pre-norm decoder runs one per half layer.

    .venv/bin/python -m pytest benchmarks/test_bench_add_rms_norm.py --benchmark-columns=min,median,rounds
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import DEVICE, SHAPES, TOKENS, bench_fwd_bwd, fused_vs_hf_lines
from tmem_kernels import add_rms_norm
from tmem_kernels import reference as ref

DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
EPS = 1e-6
IMPLS = {"hf": ref.add_rms_norm, "fused": add_rms_norm}
_results: dict[tuple[str, int], dict[str, float]] = {}  # (model, N) -> impl -> median s


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("model,n", [pytest.param(m, n, id=f"{m}-N{n}") for m in SHAPES for n in TOKENS])
def test_add_rms_norm(benchmark, model: str, n: int, impl: str) -> None:
    h = SHAPES[model][0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, h, generator=g).to(DEVICE, DTYPE).requires_grad_(True)
    residual = (3 * torch.randn(n, h, generator=g)).to(DEVICE, DTYPE).requires_grad_(True)
    weight = (1 + 0.1 * torch.randn(h, generator=g)).to(DEVICE, DTYPE)
    dy, ds = (torch.randn(n, h, generator=g).to(DEVICE, DTYPE) for _ in range(2))
    fn = IMPLS[impl]

    def run() -> None:
        x.grad = residual.grad = None
        torch.autograd.backward(fn(x, residual, weight, EPS), (dy, ds))
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    bench_fwd_bwd(benchmark, run, f"add_rms_norm fwd+bwd {model} H={h} N={n} {DTYPE}", _results, (model, n), impl)


def summary_lines() -> list[str]:
    """The side-by-side table (empty when nothing ran); printed by benchmarks/conftest.py."""
    return fused_vs_hf_lines("add_rms_norm fwd+bwd", DTYPE, list(IMPLS), _results)
