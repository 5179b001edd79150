"""End to end at real shapes: one write on random-weight SmolLM2-135M and Qwen3-4B, 512 and 4096 tokens.

One write = 16 new flashcard-like examples of tokens/16 tokens each (a 24-token prefix all share, as a chat
template gives, the same in every write, then random tokens; the loss on each row's last quarter, its
"answer") with the paper's
recipe (SGD, lr 5e-4, 5 epochs, batch 16 -> 5 steps). Every path runs in the same process, on the same
model, side by side:

    auto        the fast path as the runtime picks it (Triton + CUDA graphs on CUDA; native on CPU)
    auto-eager  CUDA only: the same without CUDA graphs
    torch       the fast path with the pure-torch reference ops
    peft        PEFT LoRA + torch.optim.SGD, the model's full forward and backward every step

The work is counted with torch's FlopCounterMode on the torch path (Triton kernels are invisible to
it; the math is the same). The summary prints each path's median, its speed-up over PEFT and the
share of the device's bound it reaches: on CUDA the dense 16-bit peak (benchmarks.common.PEAKS), on
CPU torch.mm's rate measured in the same run at the MLP's shape. bf16 on CUDA, fp32 on CPU; on CPU
Qwen3-4B (16 GB of fp32 weights) runs only with TMEM_BENCH_SLOW=1.

    .venv/bin/python -m pytest benchmarks/test_bench_write_shapes.py --benchmark-columns=median,rounds
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import (
    DEVICE,
    SHAPES,
    SLOW,
    TOKENS,
    device_name,
    device_peaks,
    flashcard_examples,
    impl_params,
    mm_rate,
    random_model,
)
from tmem_runtime import FastWeights
from tmem_runtime.recipes import RECIPES

DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
RECIPE = RECIPES["paper"]
EXAMPLES, PREFIX = 16, 24
CASES = [
    pytest.param(model, n, id=f"{model}-N{n}")
    for model in SHAPES
    for n in TOKENS
    if model == "smollm2" or DEVICE.type == "cuda" or SLOW
]
IMPLS = ["auto", "auto-eager", "torch", "peft"]  # rows that cannot run here skip with the reason

_models: dict[str, torch.nn.Module] = {}
_results: dict[str, dict[str, float]] = {}  # case -> impl -> median seconds per write
_flops: dict[str, dict[str, float]] = {}  # case -> "torch" | "peft" -> FLOPs of one write


def _model(name: str) -> torch.nn.Module:
    """A random-weight model at `name`'s shapes (one kept at a time: Qwen3-4B is large)."""
    if name not in _models:
        _models.clear()
        _models[name] = random_model(name, DTYPE)
    return _models[name]


def _count_flops(fw: FastWeights, examples) -> float:
    """FLOPs of one write, attention counted as the math path's matmuls: torch 2.11's counter rejects the
    fused SDPA kernels' grouped-query shapes (its sdpa_flop_count asserts equal head counts)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fw.write_examples(examples, RECIPE)
    return counter.get_total_flops()


@pytest.mark.parametrize("impl", impl_params(IMPLS, DTYPE))
@pytest.mark.parametrize("model_name, tokens", CASES)
def test_write_at_real_shapes(benchmark, model_name: str, tokens: int, impl: str) -> None:
    case = f"{model_name}-N{tokens}"
    model = _model(model_name)
    examples = flashcard_examples(tokens, model.config.vocab_size, EXAMPLES, PREFIX)
    backend = "auto" if impl.startswith("auto") else impl
    fw = FastWeights(model, backend=backend, cuda_graphs=impl != "auto-eager")
    try:
        if impl in ("torch", "peft"):
            _flops.setdefault(case, {})[impl] = _count_flops(fw, examples)
        benchmark.group = f"write {case} (paper recipe, 5 steps)"
        benchmark.extra_info.update(case=case, impl=impl, device=device_name(), dtype=str(DTYPE))
        big = DEVICE.type == "cpu" and tokens >= 4096
        seeds = iter(range(1, 1000))

        def new_cards():  # every round writes new cards (their trunk runs), under the same chat preamble
            return (flashcard_examples(tokens, model.config.vocab_size, EXAMPLES, PREFIX, next(seeds)), RECIPE), {}

        losses = benchmark.pedantic(
            fw.write_examples,
            setup=new_cards,
            rounds=1 if big else (2 if DEVICE.type == "cpu" else 5),
            warmup_rounds=0 if big else 1,
        )
        assert len(losses) == RECIPE.epochs and all(x == x for x in losses)
        if benchmark.stats is not None:  # None under --benchmark-disable
            _results.setdefault(case, {})[impl] = benchmark.stats.stats.median
    finally:
        fw.detach()


def summary_lines() -> list[str]:
    """The side-by-side table (empty when nothing ran); printed by benchmarks/conftest.py."""
    if not (_results):
        return []
    peak_flops, _ = device_peaks(DTYPE)
    lines = ["", f"one write (paper recipe, 5 steps, {EXAMPLES} examples), {DTYPE}, on {device_name()}: median s"]
    lines.append(f"{'case':<18}" + "".join(f"{k:>12}" for k in IMPLS) + "   speed-up vs peft")
    for case, r in _results.items():
        row = f"{case:<18}" + "".join(f"{r[k]:12.3f}" if k in r else f"{'-':>12}" for k in IMPLS)
        ratios = ", ".join(f"{k} {r['peft'] / v:.2f}x" for k, v in r.items() if k != "peft" and "peft" in r)
        lines.append(f"{row}   {ratios}")
    for case, r in _results.items():
        flops = _flops.get(case, {})
        if "torch" not in flops:
            continue
        work = flops["torch"]
        line = f"{case}: fast path {work / 1e9:.1f} GFLOP"
        if "peft" in flops:
            line += f", PEFT {flops['peft'] / 1e9:.1f} GFLOP (FLOP ratio {flops['peft'] / work:.2f}x)"
        if peak_flops is not None:
            bound = work / peak_flops
            shares = ", ".join(f"{k} {100 * bound / v:.0f}%" for k, v in r.items() if k != "peft")
            line += f"; compute bound {bound * 1e3:.1f} ms, reached: {shares}"
        elif DEVICE.type == "cpu":
            model, tokens = case.split("-N")
            h, i = SHAPES[model]
            mm = mm_rate(int(tokens), h, i, DTYPE)
            shares = ", ".join(f"{k} {100 * work / v / mm:.0f}%" for k, v in r.items() if k != "peft")
            line += f"; torch.mm {mm / 1e9:.1f} GFLOP/s at [{tokens}, {h}] x [{h}, {i}], share reached: {shares}"
        lines.append(line)
    return lines


@pytest.fixture(scope="module", autouse=True)
def _release_models():
    yield
    _models.clear()
