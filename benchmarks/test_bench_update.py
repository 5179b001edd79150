"""Optimizer step over the flat adapter buffer: every kernel backend vs torch.optim, in one run.

Buffer: every adapter tensor of a write (A and B of gate/up/down, last 4 layers, rank 6), i.e.
4 * 3 * r * (H + I) elements: SmolLM2-135M (H=576, I=1536) and Qwen3-4B (H=2560, I=9728); fp32.

    torch         `reference.sgd_step_` / `adamw_step_` (the torch composition: several passes)
    triton        `tmem_kernels.update` (one launch; CUDA only, the interpreter is far too slow to time)
    native        the C++ extension (when built; CPU)
    torch.optim   torch.optim.SGD / AdamW (foreach), and on CUDA AdamW(fused=True) as "cuda-torch.optim-fused"

Each benchmark call runs STEPS steps (then synchronises on CUDA); the table reports per-step medians,
ratios against the torch composition, and on CUDA the fraction of the memory-bandwidth bound reached
(SGD moves 3 buffers, AdamW 7; peak from TMEM_PEAK_TBPS or the table in test_bench_lora_mlp.py).

    .venv/bin/python -m pytest benchmarks/test_bench_update.py --benchmark-columns=min,median,rounds
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from benchmarks.common import DEVICE, RANK, SHAPES, device_name, device_peaks, impl_params
from tmem_kernels import ops
from tmem_kernels import reference as ref

LAYERS = 4
STEPS = 10
DTYPE = torch.float32
IMPLS = ["torch", "native", "triton", "torch.optim", "cuda-torch.optim-fused"]  # the ones that cannot run here skip
_results: dict[tuple[str, str], dict[str, float]] = {}  # (op, model) -> impl -> seconds per step


def numel(model: str) -> int:
    h, i = SHAPES[model]
    return LAYERS * 3 * RANK * (h + i)


def _buffers(model: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    n = numel(model)
    return tuple(
        t.to(DEVICE, DTYPE)
        for t in (torch.randn(n, generator=g), torch.randn(n, generator=g), torch.zeros(n), torch.zeros(n))
    )


def _step_fn(op: str, impl: str, model: str) -> Callable[[], None]:
    """STEPS optimizer steps of `impl` on the model's flat buffer."""
    param, grad, m, v = _buffers(model)
    if "torch.optim" in impl:
        p = param.clone().requires_grad_(True)
        p.grad = grad
        if op == "sgd":
            opt = torch.optim.SGD([p], lr=1e-3, weight_decay=0.01)
        else:
            opt = torch.optim.AdamW([p], lr=1e-3, fused=impl.endswith("fused") or None)
        one = opt.step
    else:
        kernels = ops.get_ops(impl) if impl != "torch" else ref
        state = {"step": 0}
        if op == "sgd":
            one = lambda: kernels.sgd_step_(param, grad, 1e-3, 0.01)
        else:

            def one() -> None:
                state["step"] += 1
                kernels.adamw_step_(param, grad, m, v, state["step"], 1e-3)

    def run() -> None:
        for _ in range(STEPS):
            one()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("impl", impl_params(IMPLS, DTYPE))
@pytest.mark.parametrize("model", list(SHAPES))
@pytest.mark.parametrize("op", ["sgd", "adamw"])
def test_update_step(benchmark, op: str, model: str, impl: str) -> None:
    run = _step_fn(op, impl, model)
    benchmark.group = f"{op} step x{STEPS} {model} ({numel(model)} elements)"
    benchmark.extra_info.update(op=op, model=model, impl=impl, numel=numel(model), steps=STEPS)
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=2)
    if benchmark.stats is not None:  # None under --benchmark-disable
        _results.setdefault((op, model), {})[impl] = benchmark.stats.stats.median / STEPS


def summary_lines() -> list[str]:
    """The side-by-side table (empty when nothing ran); printed by benchmarks/conftest.py."""
    if not (_results):
        return []
    _, bw = device_peaks(DTYPE)
    lines = ["", f"optimizer step over the flat adapter buffer (fp32) on {device_name()}: median us per step"]
    lines.append(f"{'op / model':<18}" + "".join(f"{k:>19}" for k in IMPLS) + "   speed-up vs torch")
    for (op, model), r in _results.items():
        row = f"{op + ' ' + model:<18}" + "".join(
            f"{r[k] * 1e6:19.1f}" if k in r else f"{'-':>19}" for k in IMPLS
        )
        ratios = ", ".join(
            f"{k} {r['torch'] / v:.2f}x" for k, v in r.items() if k != "torch" and "torch" in r
        )
        lines.append(f"{row}   {ratios}")
        if bw is not None:
            nbytes = (3 if op == "sgd" else 7) * numel(model) * 4
            frac = ", ".join(f"{k} {100 * nbytes / bw / v:.0f}%" for k, v in r.items())
            lines.append(f"    memory bound {nbytes / bw * 1e6:.1f} us; fraction reached: {frac}")
    return lines


