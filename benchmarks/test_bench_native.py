"""Native CPU ops vs their torch compositions, side by side in one run (pytest-benchmark).

Shapes: SmolLM2-135M (H=576, I=1536) and Qwen3-4B (H=2560, I=9728), tokens per write 512 and 4096,
rank 6, random weights. Qwen3-4B x 4096 takes minutes on a 2-core CPU: it runs only with
TMEM_BENCH_SLOW=1. TMEM_BENCH_THREADS=n sets torch's (and so the kernels') thread count. Each op is
benchmarked as `native` and as `torch` in the same group; at the end of the module a table is printed
with both medians, their ratio and the median of interleaved per-pair ratios (torch/native, > 1: native
faster; the interleaved one is the robust figure on a shared machine), plus, for the whole MLP
forward+backward, the fraction of this CPU's `torch.mm` fp32 throughput it reaches.

    .venv/bin/python -m pytest benchmarks/test_bench_native.py -s --benchmark-columns=min,median,rounds
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from benchmarks.common import RANK, SHAPES, median_s, shape_cases
from tmem_kernels import reference as ref

native = pytest.importorskip("tmem_kernels.native", reason="native extension not built")

SCALING = 2.0
LAYERS = 4
if os.environ.get("TMEM_BENCH_THREADS"):  # e.g. 1: kernel efficiency without cross-thread waits
    torch.set_num_threads(int(os.environ["TMEM_BENCH_THREADS"]))

CASES = shape_cases()
IMPLS = ("native", "torch")

_results: dict[tuple[str, str], dict[str, float]] = {}  # (op, case) -> impl -> median seconds
_ratios: dict[tuple[str, str], float] = {}  # (op, case) -> median interleaved torch/native time ratio
_flops: dict[str, float] = {}  # case -> flops of one lora_mlp forward+backward


def _run(benchmark, op: str, case: str, impl: str, fns: dict[str, Callable[[], object]], big: bool) -> None:
    """Benchmark fns[impl] (1 warm-up round) and record its median under (op, case, impl).

    In the "torch" test (which runs right after the "native" one) the two are also timed interleaved,
    native and torch alternating, with the benchmark's timer: the median of the per-pair ratios is
    what the summary reports, since it is far less sensitive to the load of other processes.
    """
    benchmark.group = f"{op} {case}"
    benchmark.extra_info.update(op=op, case=case, impl=impl)
    rounds = 3 if big else 15
    benchmark.pedantic(fns[impl], rounds=rounds, iterations=1, warmup_rounds=1)
    if (median := median_s(benchmark)) is not None:
        _results.setdefault((op, case), {})[impl] = median
    if impl == "torch" and "native" in fns:
        timer = benchmark._timer  # the --benchmark-timer in use (perf_counter by default)
        ratios = []
        for _ in range(rounds):
            t0 = timer()
            fns["native"]()
            t1 = timer()
            fns["torch"]()
            t2 = timer()
            ratios.append((t2 - t1) / max(t1 - t0, 1e-9))
        _ratios[(op, case)] = statistics.median(ratios)


def _mlp_tensors(model: str, n: int, requires_grad: bool) -> dict[str, torch.Tensor]:
    h, i = SHAPES[model]
    g = torch.Generator().manual_seed(0)
    t = {
        "x": torch.randn(n, h, generator=g),
        "w_gate": torch.randn(i, h, generator=g) / h**0.5,
        "w_up": torch.randn(i, h, generator=g) / h**0.5,
        "w_down": torch.randn(h, i, generator=g) / i**0.5,
        "a_gate": torch.randn(RANK, h, generator=g) / h**0.5,
        "b_gate": torch.randn(i, RANK, generator=g) * 0.01,
        "a_up": torch.randn(RANK, h, generator=g) / h**0.5,
        "b_up": torch.randn(i, RANK, generator=g) * 0.01,
        "a_down": torch.randn(RANK, i, generator=g) / i**0.5,
        "b_down": torch.randn(h, RANK, generator=g) * 0.01,
    }
    if requires_grad:
        for k in ("x", "b_gate", "b_up", "b_down"):
            t[k].requires_grad_(True)
    return t


# ---------------------------------------------------------------------------------------------- SwiGLU


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("model", "n"), CASES)
def test_swiglu_fwd(benchmark, model: str, n: int, impl: str) -> None:
    i = SHAPES[model][1]
    gate, up = torch.randn(n, i), torch.randn(n, i)
    fns = {"native": lambda: native.swiglu(gate, up), "torch": lambda: ref.swiglu(gate, up)}
    _run(benchmark, "swiglu fwd", f"{model}-N{n}", impl, fns, big=False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("model", "n"), CASES)
def test_swiglu_bwd(benchmark, model: str, n: int, impl: str) -> None:
    i = SHAPES[model][1]
    gate, up, dh = torch.randn(n, i), torch.randn(n, i), torch.randn(n, i)
    fns = {"native": lambda: native.swiglu_backward(gate, up, dh), "torch": lambda: ref.swiglu_backward(gate, up, dh)}
    _run(benchmark, "swiglu bwd", f"{model}-N{n}", impl, fns, big=False)


# ------------------------------------------------------------------- LoRA epilogue + SwiGLU (fused part)


def _torch_lora_swiglu_fwd(gu, xa, b_gate, b_up, a_down, s):  # noqa: ANN001, ANN202
    """The torch composition of `native.lora_swiglu_forward` (addmm epilogues, in-place SwiGLU)."""
    r = b_gate.shape[1]
    gate = torch.addmm(gu[0], xa[:, :r], b_gate.T, alpha=s)
    up = torch.addmm(gu[1], xa[:, r:], b_up.T, alpha=s)
    h = F.silu(gate, inplace=True).mul_(up)
    return h, h @ a_down.T


def _torch_lora_swiglu_bwd(gu, xa, b_gate, b_up, a_down, dh_base, dha, s):  # noqa: ANN001, ANN202
    """The torch composition of `native.lora_swiglu_backward` (need_dgu=True, need_da_down=False)."""
    r = b_gate.shape[1]
    gate = torch.addmm(gu[0], xa[:, :r], b_gate.T, alpha=s)
    up = torch.addmm(gu[1], xa[:, r:], b_up.T, alpha=s)
    dh = torch.addmm(dh_base, dha, a_down)
    dg, du = ref.swiglu_backward(gate, up, dh)
    db_gate = (dg.T @ xa[:, :r]).mul_(s)
    db_up = (du.T @ xa[:, r:]).mul_(s)
    dxa = torch.cat([dg @ b_gate, du @ b_up], 1).mul_(s)
    return (dg, du), db_gate, db_up, dxa


def _epilogue_tensors(model: str, n: int) -> dict[str, torch.Tensor]:
    h, i = SHAPES[model]
    g = torch.Generator().manual_seed(1)
    return {
        "gu": torch.randn(2, n, i, generator=g),
        "xa": torch.randn(n, 2 * RANK, generator=g),
        "b_gate": torch.randn(i, RANK, generator=g) * 0.1,
        "b_up": torch.randn(i, RANK, generator=g) * 0.1,
        "a_down": torch.randn(RANK, i, generator=g) / i**0.5,
        "dh_base": torch.randn(n, i, generator=g),
        "dha": torch.randn(n, RANK, generator=g),
    }


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("model", "n"), CASES)
def test_lora_swiglu_fwd(benchmark, model: str, n: int, impl: str) -> None:
    t = _epilogue_tensors(model, n)
    args = (t["gu"], t["xa"], t["b_gate"], t["b_up"], t["a_down"], SCALING)
    fns = {"native": lambda: native.lora_swiglu_forward(*args), "torch": lambda: _torch_lora_swiglu_fwd(*args)}
    _run(benchmark, "lora+swiglu fwd", f"{model}-N{n}", impl, fns, big=False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("model", "n"), CASES)
def test_lora_swiglu_bwd(benchmark, model: str, n: int, impl: str) -> None:
    t = _epilogue_tensors(model, n)
    args = (t["gu"], t["xa"], t["b_gate"], t["b_up"], t["a_down"], t["dh_base"], t["dha"], SCALING)
    fns = {"native": lambda: native.lora_swiglu_backward(*args), "torch": lambda: _torch_lora_swiglu_bwd(*args)}
    _run(benchmark, "lora+swiglu bwd", f"{model}-N{n}", impl, fns, big=False)


# ------------------------------------------------------------------------------- whole LoRA MLP


def _mlp_step(fn: Callable, t: dict[str, torch.Tensor], dy: torch.Tensor) -> None:
    for k in ("x", "b_gate", "b_up", "b_down"):
        t[k].grad = None
    y = fn(**t, scaling=SCALING)
    y.backward(dy)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("model", "n"), CASES)
def test_lora_mlp_fwd_bwd(benchmark, model: str, n: int, impl: str) -> None:
    """One layer's MLP forward + backward (dx and dB), the unit of a memory write's k steps."""
    h, i = SHAPES[model]
    t = _mlp_tensors(model, n, requires_grad=True)
    dy = torch.randn(n, h)
    _flops[f"{model}-N{n}"] = 12.0 * n * h * i  # 3 GEMMs forward, 3 backward (dh, dx via gate and up)
    fns = {"native": lambda: _mlp_step(native.lora_mlp, t, dy), "torch": lambda: _mlp_step(ref.lora_mlp, t, dy)}
    _run(benchmark, "lora_mlp fwd+bwd", f"{model}-N{n}", impl, fns, big=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("model", "n"), CASES)
def test_lora_mlp_fwd(benchmark, model: str, n: int, impl: str) -> None:
    """Forward only, no grad (inference with the fast weights attached)."""
    t = _mlp_tensors(model, n, requires_grad=False)

    def run(fn: Callable) -> None:
        with torch.no_grad():
            fn(**t, scaling=SCALING)

    fns = {"native": lambda: run(native.lora_mlp), "torch": lambda: run(ref.lora_mlp)}
    _run(benchmark, "lora_mlp fwd", f"{model}-N{n}", impl, fns, big=True)


@pytest.mark.parametrize(("model", "n"), CASES)
def test_mm_throughput(benchmark, model: str, n: int) -> None:
    """torch.mm at the MLP's gate shape [N, H] x [H, I]: this CPU's fp32 matrix-product throughput."""
    h, i = SHAPES[model]
    x, w = torch.randn(n, h), torch.randn(i, h)
    _run(benchmark, "torch.mm", f"{model}-N{n}", "mm", {"mm": lambda: torch.mm(x, w.T)}, big=True)
    _flops[f"mm {model}-N{n}"] = 2.0 * n * h * i


# ------------------------------------------------------------------------------- optimizer steps


def _buffer_numel(model: str) -> int:
    """Numel of the flat adapter buffer: rank-6 A and B on gate/up/down of the last 4 layers."""
    h, i = SHAPES[model]
    return LAYERS * RANK * 3 * (h + i)


OPT_CASES = [pytest.param(m, id=m) for m in SHAPES]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model", OPT_CASES)
def test_sgd_step(benchmark, model: str, impl: str) -> None:
    n = _buffer_numel(model)
    p, g = torch.randn(n), torch.randn(n)
    fns = {"native": lambda: native.sgd_step_(p, g, 1e-3, 0.0), "torch": lambda: ref.sgd_step_(p, g, 1e-3, 0.0)}
    _run(benchmark, "sgd step", model, impl, fns, big=False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("model", OPT_CASES)
def test_sgd_step_wd(benchmark, model: str, impl: str) -> None:
    n = _buffer_numel(model)
    p, g = torch.randn(n), torch.randn(n)
    fns = {"native": lambda: native.sgd_step_(p, g, 1e-3, 0.01), "torch": lambda: ref.sgd_step_(p, g, 1e-3, 0.01)}
    _run(benchmark, "sgd step wd=0.01", model, impl, fns, big=False)


@pytest.mark.parametrize("impl", (*IMPLS, "torch.optim.AdamW(fused)"))
@pytest.mark.parametrize("model", OPT_CASES)
def test_adamw_step(benchmark, model: str, impl: str) -> None:
    n = _buffer_numel(model)
    p, g = torch.randn(n), torch.randn(n)
    m, v = torch.zeros(n), torch.zeros(n)
    param = torch.nn.Parameter(p.clone())
    param.grad = g
    opt = torch.optim.AdamW([param], lr=1e-3, weight_decay=0.01, fused=True)
    fns = {
        "native": lambda: native.adamw_step_(p, g, m, v, 3, 1e-3),
        "torch": lambda: ref.adamw_step_(p, g, m, v, 3, 1e-3),
        "torch.optim.AdamW(fused)": opt.step,
    }
    _run(benchmark, "adamw step", model, impl, fns, big=False)


# ------------------------------------------------------------------------------- summary table


def summary_lines() -> list[str]:
    """native vs torch per op and case, and the LoRA MLP's throughput against torch.mm (printed by
    benchmarks/conftest.py)."""
    if not _results:
        return []
    lines = [
        "",
        f"{'op':<18} {'case':<18} {'native ms':>10} {'torch ms':>10} {'torch/native':>12} {'interleaved':>11}",
    ]
    for (op, case), r in _results.items():
        if "native" in r and "torch" in r:
            lines.append(
                f"{op:<18} {case:<18} {r['native'] * 1e3:10.3f} {r['torch'] * 1e3:10.3f} "
                f"{r['torch'] / r['native']:12.2f} {_ratios.get((op, case), float('nan')):11.2f}"
            )
        for impl, sec in r.items():
            if impl not in IMPLS and impl != "mm":
                lines.append(f"{op:<18} {case:<18} {impl}: {sec * 1e3:.3f} ms")
    for case, flops in _flops.items():
        if case.startswith("mm "):
            continue
        mm = _results.get(("torch.mm", case), {}).get("mm")
        mlp = _results.get(("lora_mlp fwd+bwd", case), {})
        if mm and "native" in mlp:
            mm_rate = _flops[f"mm {case}"] / mm / 1e9
            rates = {k: flops / v / 1e9 for k, v in mlp.items()}
            lines.append(
                f"lora_mlp fwd+bwd {case}: native {rates['native']:.1f} GFLOP/s, torch "
                f"{rates.get('torch', float('nan')):.1f} GFLOP/s; torch.mm {mm_rate:.1f} GFLOP/s -> native "
                f"at {100 * rates['native'] / mm_rate:.0f}% of the mm throughput"
            )
    return lines
