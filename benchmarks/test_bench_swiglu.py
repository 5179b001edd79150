"""A gated MLP's SiLU activation and product forward + backward (d gate, d up): torch's composition vs the fused op.

    hf      `reference.swiglu`: F.silu(gate) * up (two kernels forward, silu(gate) saved) and autograd's
            backward (two products and silu_backward: three kernels)
    fused   `tmem_kernels.swiglu` (op `tmem::swiglu`): one Triton kernel forward, one backward giving both
            gradients on CUDA (`swiglu_act_triton`; gate and up saved, the sigmoid recomputed); on the CPU the same
            composition behind the op's dispatch
    native  (CPU, fp32) `native.swiglu`: the C++ extension's one-pass forward and backward

One call: h = swiglu(gate, up), backward of h (dh), gate and up [N, I] requiring grad, at SmolLM2-135M (I 1536)
and Qwen3-4B (I 9728) intermediate widths, N = 512 / 4096 tokens; bf16 on CUDA, fp32 on the CPU (where
Qwen3-4B x 4096, 160 MB per tensor, runs only with TMEM_BENCH_SLOW=1). A write runs one per MLP per step.

    .venv/bin/python -m pytest benchmarks/test_bench_swiglu.py --benchmark-columns=min,median,rounds
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import DEVICE, SHAPES, bench_fwd_bwd, fused_vs_hf_lines, model_token_cases
from tmem_kernels import reference as ref
from tmem_kernels import swiglu

DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
IMPLS = {"hf": ref.swiglu, "fused": swiglu}
if DEVICE.type == "cpu":
    try:
        from tmem_kernels import native

        IMPLS["native"] = native.swiglu
    except ImportError:  # pragma: no cover - the extension is optional
        pass
_results: dict[tuple[str, int], dict[str, float]] = {}  # (model, N) -> impl -> median s
CASES = model_token_cases()


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("model,n", CASES)
def test_swiglu(benchmark, model: str, n: int, impl: str) -> None:
    i = SHAPES[model][1]
    g = torch.Generator().manual_seed(0)
    gate = (3 * torch.randn(n, i, generator=g)).to(DEVICE, DTYPE).requires_grad_(True)
    up = torch.randn(n, i, generator=g).to(DEVICE, DTYPE).requires_grad_(True)
    dh = torch.randn(n, i, generator=g).to(DEVICE, DTYPE)
    fn = IMPLS[impl]

    def run() -> None:
        gate.grad = up.grad = None
        fn(gate, up).backward(dh)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    bench_fwd_bwd(benchmark, run, f"swiglu fwd+bwd {model} I={i} N={n} {DTYPE}", _results, (model, n), impl)


def summary_lines() -> list[str]:
    """The side-by-side table (empty when nothing ran); printed by benchmarks/conftest.py."""
    return fused_vs_hf_lines("swiglu fwd+bwd", DTYPE, list(IMPLS), _results)
