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

from benchmarks.common import DEVICE, SHAPES, TOKENS, device_name
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

    run()  # warm-up (Triton compiles here)
    benchmark.group = f"rms_norm fwd+bwd {model} H={h} N={n} {DTYPE}"
    benchmark.extra_info.update(model=model, n=n, impl=impl)
    benchmark.pedantic(run, rounds=20 if DEVICE.type == "cpu" else 50, iterations=1, warmup_rounds=2)
    if benchmark.stats is not None:  # None under --benchmark-disable
        _results.setdefault((model, n), {})[impl] = benchmark.stats.stats.median


def summary_lines() -> list[str]:
    """The side-by-side table (empty when nothing ran); printed by benchmarks/conftest.py."""
    if not (_results):
        return []
    lines = ["", f"rms_norm fwd+bwd on {device_name()} ({DTYPE}, {torch.get_num_threads()} threads)"]
    lines.append(f"{'model / N':<18}" + "".join(f"{k + ' us':>12}" for k in IMPLS) + "   fused vs hf")
    for (model, n), r in _results.items():
        row = f"{model + ' ' + str(n):<18}" + "".join(f"{r[i] * 1e6:12.1f}" if i in r else f"{'-':>12}" for i in IMPLS)
        if "hf" in r and "fused" in r:
            row += f"   {r['fused'] / r['hf']:.2f}x"
        lines.append(row)
    return lines


