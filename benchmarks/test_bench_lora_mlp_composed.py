"""One adapted LoRA SwiGLU MLP forward + backward (x and the three B's): autograd vs the hand-written backward.

    hf      autograd through the torch composition a write step ran before (`reference.lora_linear`'s addmm per
            projection, `tmem_kernels.swiglu` between): 10 kernels forward, 17 backward
    fused   `tmem_kernels.lora_mlp_composed` (op `tmem::lora_mlp_composed`): the same forward, a backward that
            sums each gradient inside the products (addmm chains): 13 kernels

What the torch backend's write step runs per adapted layer on CUDA (`engine._mlp_forward`), at SmolLM2-135M and
Qwen3-4B widths, rank 6, N = 512 / 4096 tokens; bf16 on CUDA, fp32 on the CPU (Qwen3-4B x 4096 only with
TMEM_BENCH_SLOW=1). The kernel counts are fixed (tests/test_lora_mlp_composed.py); what they are worth in time is
what this measures: little where the products dominate, the launches saved where a step is launch-bound (a GPU).

    .venv/bin/python -m pytest benchmarks/test_bench_lora_mlp_composed.py --benchmark-columns=min,median,rounds
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import DEVICE, SHAPES, bench_fwd_bwd, fused_vs_hf_lines, model_token_cases
from tmem_kernels import lora_mlp_composed, swiglu
from tmem_kernels.reference import lora_linear

DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
RANK = 6


def _autograd(x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, scaling):  # noqa: ANN001, ANN202
    gate = lora_linear(x, w_gate, a_gate, b_gate, scaling)
    up = lora_linear(x, w_up, a_up, b_up, scaling)
    return lora_linear(swiglu(gate, up), w_down, a_down, b_down, scaling)


IMPLS = {"hf": _autograd, "fused": lora_mlp_composed}
_results: dict[tuple[str, int], dict[str, float]] = {}  # (model, N) -> impl -> median s
CASES = model_token_cases()


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("model,n", CASES)
def test_lora_mlp_composed(benchmark, model: str, n: int, impl: str) -> None:
    h, i = SHAPES[model]
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, DTYPE)

    x = rand(n, h, scale=1.0).requires_grad_(True)
    ws = [rand(i, h, scale=h**-0.5), rand(i, h, scale=h**-0.5), rand(h, i, scale=i**-0.5)]
    a = [rand(RANK, h, scale=1.0), rand(RANK, h, scale=1.0), rand(RANK, i, scale=1.0)]
    b = [rand(i, RANK, scale=1e-3).requires_grad_(True), rand(i, RANK, scale=1e-3).requires_grad_(True),
         rand(h, RANK, scale=1e-3).requires_grad_(True)]  # fmt: skip
    dy = rand(n, h, scale=1.0)
    fn = IMPLS[impl]

    def run() -> None:
        x.grad = b[0].grad = b[1].grad = b[2].grad = None
        fn(x, *ws, a[0], b[0], a[1], b[1], a[2], b[2], 1.0).backward(dy)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    bench_fwd_bwd(benchmark, run, f"lora mlp fwd+bwd {model} H={h} I={i} N={n} {DTYPE}", _results, (model, n), impl)


def summary_lines() -> list[str]:
    """The side-by-side table (empty when nothing ran); printed by benchmarks/conftest.py."""
    return fused_vs_hf_lines("lora mlp (composed) fwd+bwd", DTYPE, list(IMPLS), _results)
