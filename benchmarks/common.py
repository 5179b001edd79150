"""What the benchmark suites share: the device, the model shapes, device peaks, the summary printer.

Environment: TMEM_BENCH_SLOW=1 runs the CPU cases that take minutes (Qwen3-4B x 4096 tokens);
TMEM_BENCH_THREADS=N sets torch's CPU threads (1 on a shared 2-core box: no cross-thread waits);
TMEM_PEAK_TFLOPS / TMEM_PEAK_TBPS override the peak table for devices it does not know.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Sequence

import pytest
import torch

from tmem_kernels import ops
from tmem_runtime.models import MODEL_CONFIGS, load_model
from tmem_runtime.write import IGNORE_INDEX

RANK = 6
SHAPES = {"smollm2": (576, 1536), "qwen3-4b": (2560, 9728)}  # (hidden, intermediate)
TOKENS = (512, 4096)
SLOW = os.environ.get("TMEM_BENCH_SLOW", "") not in ("", "0")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if os.environ.get("TMEM_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["TMEM_BENCH_THREADS"]))


def model_token_cases() -> list:
    """pytest params (model, N) over SHAPES x TOKENS, ids "model-N<n>"; on the CPU without TMEM_BENCH_SLOW the
    largest (Qwen3-4B x 4096: 160 MB per fp32 [N, I] tensor) is left out."""
    return [pytest.param(m, n, id=f"{m}-N{n}") for m in SHAPES for n in TOKENS
            if DEVICE.type == "cuda" or SLOW or (m, n) != ("qwen3-4b", 4096)]  # fmt: skip

# random-weight stand-ins at the real models' shapes (timing only)
MODEL_NAMES = {"smollm2": "smollm2-135m", "qwen3-4b": "qwen3-4b"}  # the benchmarks' names -> MODEL_CONFIGS
CONFIGS = {name: MODEL_CONFIGS[full] for name, full in MODEL_NAMES.items()}

# dense peaks: name substring -> (16-bit tensor-core FLOP/s, fp32 non-tensor FLOP/s, bytes/s); first match wins
PEAKS = {
    "H100 PCIe": (756e12, 51e12, 2.0e12),
    "H100": (989e12, 67e12, 3.35e12),  # SXM
    "H200": (989e12, 67e12, 4.8e12),
    "A100": (312e12, 19.5e12, 2.0e12),
    "L4": (121e12, 30e12, 0.3e12),
}


def random_model(name: str, dtype: torch.dtype, device: torch.device = DEVICE) -> torch.nn.Module:
    """A frozen, eval-mode causal LM with CONFIGS[name]'s shapes and random weights (seeded):
    `load_model("shapes-<model>")`, built on `device` in `dtype`."""
    return load_model(f"shapes-{MODEL_NAMES[name]}", dtype=dtype, device=device)[0]


Example = tuple[list[int], list[int]]


def flashcard_examples(
    tokens: int, vocab: int, examples: int = 16, prefix: int = 24, seed: int = 0, answer: int | None = None
) -> list[Example]:
    """`examples` flashcard-like rows of tokens/examples tokens: a shared `prefix` (as a chat template gives:
    the same for every seed), a random "question", then a random "answer" (`answer` tokens; None: the row's
    last quarter) that carries the loss, as `write_qa` trains. Returns (input_ids, labels) pairs; labels are
    -100 outside the answer. Another `seed`: other cards (a write of new cards; the same seed twice is a replay)."""
    head = torch.randint(0, vocab, (prefix,), generator=torch.Generator().manual_seed(0)).tolist()
    g = torch.Generator().manual_seed(1 + seed)
    length = tokens // examples
    answer = length // 4 if answer is None else answer
    rows = []
    for _ in range(examples):
        ids = head + torch.randint(0, vocab, (length - prefix,), generator=g).tolist()
        rows.append((ids, [-100] * (length - answer) + ids[-answer:]))
    return rows


def prefixed_examples(n: int, seed: int, shared: int = 9) -> list[Example]:
    """n examples of 4 to 13 random tokens (ids 3..499) after one `shared`-token prefix (a chat preamble, the
    same for every seed), the loss on each tail past its first two tokens: the tests' batched-write cards."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.randint(3, 500, (shared,), generator=torch.Generator().manual_seed(99)).tolist()
    out = []
    for _ in range(n):
        tail = torch.randint(3, 500, (int(torch.randint(4, 14, (), generator=gen)),), generator=gen).tolist()
        out.append((head + tail, [IGNORE_INDEX] * (shared + 2) + tail[2:]))
    return out


def bench_fwd_bwd(benchmark, run, group: str, results: dict, key: tuple, impl: str) -> None:  # noqa: ANN001
    """Time `run` (one forward + backward of an op; called once first: Triton compiles there) in pytest-benchmark
    `group`; its median goes to results[key][impl] (key = (model, N), as `fused_vs_hf_lines` prints them)."""
    run()
    benchmark.group = group
    benchmark.extra_info.update(model=key[0], n=key[1], impl=impl)
    benchmark.pedantic(run, rounds=20 if DEVICE.type == "cpu" else 50, iterations=1, warmup_rounds=2)
    if benchmark.stats is not None:  # None under --benchmark-disable
        results.setdefault(key, {})[impl] = benchmark.stats.stats.median


def fused_vs_hf_lines(title: str, dtype: torch.dtype, impls: Sequence[str], results: dict) -> list[str]:
    """A side-by-side table of `bench_fwd_bwd`'s results: microseconds per impl per (model, N), and the fused
    op's time over HF's composition (empty when nothing ran)."""
    if not results:
        return []
    lines = ["", f"{title} on {device_name()} ({dtype}, {torch.get_num_threads()} threads)"]
    lines.append(f"{'model / N':<18}" + "".join(f"{k + ' us':>12}" for k in impls) + "   fused vs hf")
    for (model, n), r in results.items():
        row = f"{model + ' ' + str(n):<18}" + "".join(f"{r[i] * 1e6:12.1f}" if i in r else f"{'-':>12}" for i in impls)
        if "hf" in r and "fused" in r:
            row += f"   {r['fused'] / r['hf']:.2f}x"
        lines.append(row)
    return lines


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU"


def device_peaks(dtype: torch.dtype) -> tuple[float | None, float | None]:
    """(FLOP/s for `dtype`, bytes/s) of this CUDA device, from the env vars or PEAKS; None where unknown."""
    if DEVICE.type != "cuda":
        return None, None
    row = next((v for k, v in PEAKS.items() if k in device_name()), None)
    flops, bw = os.environ.get("TMEM_PEAK_TFLOPS"), os.environ.get("TMEM_PEAK_TBPS")
    peak_flops = float(flops) * 1e12 if flops else (row[0 if dtype != torch.float32 else 1] if row else None)
    peak_bw = float(bw) * 1e12 if bw else (row[2] if row else None)
    return peak_flops, peak_bw


CUDA_ONLY = {"auto-eager"}  # rows that only mean something on a GPU (auto-eager: a write without CUDA graphs)


def unavailable(impl: str, dtype: torch.dtype = torch.float32) -> str | None:
    """Why `impl` cannot be timed here (None: it can). A kernel backend, a "triton+..." variant,
    "peft", "cuda-..." or one of CUDA_ONLY (CUDA-only rows)."""
    if impl in CUDA_ONLY and DEVICE.type != "cuda":
        return "CUDA only"
    if impl == "peft":
        return None if importlib.util.find_spec("peft") else "PEFT is not installed"
    if impl.startswith("cuda-") or impl.startswith("triton"):
        if DEVICE.type != "cuda":
            return "needs CUDA (Triton under the CPU interpreter is far too slow to time)"
        if impl.startswith("triton") and not ops.available("triton"):
            return "Triton is not installed"
    if impl == "native":
        if DEVICE.type != "cpu" or dtype != torch.float32:
            return "the native extension runs float32 on the CPU"
        if not ops.available("native"):
            return "the native extension is not built"
    return None


def impl_params(impls: list[str], dtype: torch.dtype = torch.float32) -> list:
    """`impls` as pytest params, the ones that cannot run here skipped with the reason (never absent)."""
    return [
        pytest.param(i, marks=pytest.mark.skip(reason=why)) if (why := unavailable(i, dtype)) else i for i in impls
    ]


def kernel_backends(dtype: torch.dtype) -> list[str]:
    """Kernel backends importable here and worth timing on DEVICE (the interpreter is far too slow)."""
    return [name for name in ops.BACKENDS if unavailable(name, dtype) is None]


def shape_cases(slow_cpu: tuple[str, int] = ("qwen3-4b", 4096)) -> list:
    """pytest params (model, tokens) over SHAPES x TOKENS; `slow_cpu` only on CUDA or with TMEM_BENCH_SLOW."""
    return [
        pytest.param(model, n, id=f"{model}-N{n}")
        for model in SHAPES
        for n in TOKENS
        if DEVICE.type == "cuda" or SLOW or (model, n) != slow_cpu
    ]


def sync() -> None:
    """Wait for DEVICE's queued work (a no-op on the CPU): where a timed interval ends."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def mm_rate(m: int, k: int, n: int, dtype: torch.dtype = torch.float32, rounds: int = 20) -> float:
    """Measured torch.mm throughput (FLOP/s) for [m, k] x [k, n] on DEVICE (median of `rounds`)."""
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    w = torch.randn(k, n, device=DEVICE).to(dtype)
    times = []
    for _ in range(rounds + 1):
        sync()
        t = time.perf_counter()
        torch.mm(x, w)
        sync()
        times.append(time.perf_counter() - t)
    return 2 * m * k * n / sorted(times[1:])[rounds // 2]


def median_s(benchmark) -> float | None:  # noqa: ANN001
    """A pytest-benchmark fixture's median seconds; None under --benchmark-disable (the body ran once,
    untimed, as a smoke test: the suite's tables then leave the row out)."""
    return None if benchmark.stats is None else benchmark.stats.stats.median


def write_summary(config: pytest.Config, lines: list[str]) -> None:
    """Print past pytest's output capture, so a suite's table shows without -s."""
    reporter = config.pluginmanager.getplugin("terminalreporter")
    capman = config.pluginmanager.getplugin("capturemanager")
    if reporter is None or capman is None:
        print("\n".join(lines))
        return
    with capman.global_and_fixture_disabled():
        for line in lines:
            reporter.write_line(line)
