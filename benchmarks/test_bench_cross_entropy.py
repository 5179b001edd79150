"""Loss of the frozen head at the write's loss positions: chunked linear cross-entropy vs full logits.

    plain     F.cross_entropy((hidden @ W.T).float(), targets): the [K, V] logits, in the model's dtype and
              in fp32, then autograd's [K, V] gradient (`reference.linear_cross_entropy`, what the write did)
    chunked   `tmem_kernels.linear_cross_entropy` (op `tmem::linear_cross_entropy`): rows in chunks of
              `cross_entropy.chunk_rows(K, V)`, the gradient w.r.t. hidden computed in the same pass; on
              CUDA each chunk's softmax/gradient is the fused Triton epilogue (`cross_entropy_triton`)
    chunked-rows `tmem_kernels.linear_cross_entropy_rows` (op `tmem::linear_cross_entropy_rows`) with weights
              1 / #scored, summed: the same loss through the per-row op a write's steps run
    chunked-torch (CUDA only) the same chunks with the torch epilogue (`cross_entropy.loss_and_grad`
              called directly: its backward is one multiply)

Each call is one forward + backward (hidden requires grad, the head is frozen) at SmolLM2-135M
(H 576, V 49152) and Qwen3-4B (H 2560, V 151936) head shapes, K = 512 / 4096 loss positions, a quarter of
them ignored (-100); bf16 on CUDA, fp32 on CPU (CPU: SmolLM2 x 512 only, unless TMEM_BENCH_SLOW=1).
Peak memory: bytes allocated above the inputs during one call (CUDA: the caching allocator's peak; CPU:
the profiler's memory timeline of every tensor allocation). The summary prints times, peaks and the ratios side by side.

    .venv/bin/python -m pytest benchmarks/test_bench_cross_entropy.py --benchmark-columns=min,median,rounds
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from benchmarks.common import CONFIGS, DEVICE, SHAPES, SLOW, TOKENS, device_name
from tmem_kernels import cross_entropy, linear_cross_entropy, linear_cross_entropy_rows
from tmem_kernels import reference as ref

DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
IMPLS = {
    "plain": ref.linear_cross_entropy,
    "chunked": linear_cross_entropy,
    # what a write's steps run (per-row weights 1 / #scored: the same mean loss)
    "chunked-rows": lambda h, w, t: linear_cross_entropy_rows(h, w, t, (t != -100).float() / (t != -100).sum()).sum(),
}
if DEVICE.type == "cuda":
    IMPLS["chunked-torch"] = lambda h, w, t: cross_entropy.loss_and_grad(h.detach(), w, t, epilogue="torch")
_results: dict[tuple[str, int], dict[str, tuple[float, int]]] = {}  # (model, K) -> impl -> (s, peak bytes)


def cases() -> list:
    return [
        pytest.param(model, k, id=f"{model}-K{k}")
        for model in SHAPES
        for k in TOKENS
        if DEVICE.type == "cuda" or SLOW or (model, k) == ("smollm2", 512)
    ]


def _inputs(model: str, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h, v = SHAPES[model][0], CONFIGS[model]["vocab_size"]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(k, h, generator=g).to(DEVICE, DTYPE).requires_grad_(True)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(DEVICE, DTYPE)
    targets = torch.randint(0, v, (k,), generator=g)
    targets[::4] = -100
    return hidden, weight, targets.to(DEVICE)


def _step(impl: str, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> Callable[[], None]:
    fn = IMPLS[impl]

    def run() -> None:
        hidden.grad = None
        out = fn(hidden, weight, targets)
        if isinstance(out, torch.Tensor):
            out.backward()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    return run


def peak_bytes(run: Callable[[], None]) -> int:
    """Bytes allocated above what was live before, at the peak of one call of `run`."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action  # the profiler's allocation timeline (private API)

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as p:
        run()
    live = peak = 0
    for _, action, _, size in p._memory_profile().timeline:  # (time, action, (key, version), bytes), in order
        live += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("model,k", cases())
def test_cross_entropy(benchmark, model: str, k: int, impl: str) -> None:
    hidden, weight, targets = _inputs(model, k)
    run = _step(impl, hidden, weight, targets)
    run()  # warm-up (and the .grad buffer exists before the peak is taken)
    peak = peak_bytes(run)
    benchmark.group = f"linear cross-entropy fwd+bwd {model} K={k} V={weight.shape[0]} {DTYPE}"
    benchmark.extra_info.update(model=model, k=k, impl=impl, peak_bytes=peak)
    benchmark.pedantic(run, rounds=5 if DEVICE.type == "cpu" else 20, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        _results.setdefault((model, k), {})[impl] = (benchmark.stats.stats.median, peak)


def summary_lines() -> list[str]:
    """The side-by-side table (empty when nothing ran); printed by benchmarks/conftest.py."""
    if not (_results):
        return []
    lines = ["", f"linear cross-entropy fwd+bwd on {device_name()} ({DTYPE}, {torch.get_num_threads()} threads)"]
    lines.append(f"{'model / K':<16}{'chunk':>7}" + "".join(f"{k + ' ms':>18}{k + ' MiB':>19}" for k in IMPLS)
                 + "   vs plain: time, peak")  # fmt: skip
    for (model, k), r in _results.items():
        chunk = cross_entropy.chunk_rows(k, CONFIGS[model]["vocab_size"])
        row = f"{model + ' ' + str(k):<16}{chunk:>7}" + "".join(
            f"{r[i][0] * 1e3:18.1f}{r[i][1] / 2**20:19.1f}" if i in r else f"{'-':>18}{'-':>19}" for i in IMPLS
        )
        if "plain" in r:
            plain_t, plain_m = r["plain"]
            row += "   " + "; ".join(
                f"{i} {t / plain_t:.2f}x, {m / max(plain_m, 1):.2f}x" for i, (t, m) in r.items() if i != "plain"
            )
        lines.append(row)
    return lines


