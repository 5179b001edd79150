"""Fused LoRA SwiGLU MLP, forward + backward: every kernel backend vs PEFT's LoRA layer, in one run.

Implementations (all with A frozen and B trained, x requiring grad, as in a memory write past its first
adapted layer):

    torch        `reference.lora_mlp` (the torch composition, autograd)
    triton       `tmem_kernels.lora_mlp` (CUDA only: under the interpreter it is far too slow to time)
    triton+sgd   the same with `sgd_lr` (B updated inside the backward, no dB handed to autograd)
    native       the C++ extension (when built; CPU fp32 only)
    peft         three peft.tuners.lora.Linear wrapping nn.Linear, the PEFT reference path

Shapes: SmolLM2-135M (H=576, I=1536) and Qwen3-4B (H=2560, I=9728), tokens 512 and 4096, rank 6,
random weights; bf16 on CUDA, fp32 on CPU (TMEM_BENCH_DTYPE=float32|bfloat16 overrides). On CPU the
Qwen3-4B x 4096 case runs only with TMEM_BENCH_SLOW=1. At the end a table prints the median times, each
backend's speed-up over PEFT and over the torch composition, and on CUDA the fraction of the
compute / memory bound reached (FLOPs and bytes counted analytically; peaks from TMEM_PEAK_TFLOPS /
TMEM_PEAK_TBPS or a table keyed by the device name).

    .venv/bin/python -m pytest benchmarks/test_bench_lora_mlp.py --benchmark-columns=min,median,rounds
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.common import (
    DEVICE,
    RANK,
    SHAPES,
    device_name,
    device_peaks,
    impl_params,
    kernel_backends,
    shape_cases,
)
from tmem_kernels import ops

DTYPE = getattr(torch, os.environ.get("TMEM_BENCH_DTYPE", "bfloat16" if DEVICE.type == "cuda" else "float32"))
CASES = shape_cases()
BACKENDS = kernel_backends(DTYPE)
IMPLS = ["torch", "native", "triton", "triton+sgd", "peft"]  # every row; the ones that cannot run here skip


def mlp_cost(n: int, h: int, i: int, r: int, elt: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one forward + backward (dx and dB; A frozen; base weights frozen).

    FLOPs: forward 3 base GEMMs (2NHI each) + LoRA shrink/expand; backward dh (1 GEMM) and dx (2 GEMMs)
    + LoRA terms + dB. Bytes: the minimum traffic of the fused design: weights read twice (forward and
    backward), x, y, dy, dx once, gate/up/h written, gate/up/dgate/dup round trips.
    """
    base = 2 * n * h * i
    lora_fwd = 2 * n * h * 2 * r + 2 * n * i * r + 2 * n * r * (2 * i + h)
    lora_bwd = 2 * n * h * r + 2 * n * r * i + 2 * n * i * 2 * r + 2 * n * 2 * r * h + 2 * n * r * (2 * i + h)
    flops = 6 * base + lora_fwd + lora_bwd
    weights = 3 * h * i
    acts = n * (4 * h + 9 * i)  # x, y, dy, dx; gate, up, h written; gate, up read; dgate, dup written+read
    return float(flops), float(elt * (2 * weights + acts))


# --------------------------------------------------------------------------------------------------
# Inputs and implementations
# --------------------------------------------------------------------------------------------------

_results: dict[str, dict[str, float]] = {}  # case -> impl -> median seconds
_costs: dict[str, tuple[float, float]] = {}
_TENSORS: dict[str, dict[str, torch.Tensor]] = {}


def _tensors(model: str, n: int) -> dict[str, torch.Tensor]:
    """Shared inputs for every implementation of one case (cached: the Qwen3-4B weights are large)."""
    key = f"{model}-N{n}"
    if key not in _TENSORS:
        _TENSORS.clear()
        h, i = SHAPES[model]
        g = torch.Generator().manual_seed(0)

        def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
            return (torch.randn(*shape, generator=g) * scale).to(DEVICE, DTYPE)

        _TENSORS[key] = dict(
            x=rnd(n, h), dy=rnd(n, h, scale=1e-2),
            w_gate=rnd(i, h, scale=h**-0.5), w_up=rnd(i, h, scale=h**-0.5), w_down=rnd(h, i, scale=i**-0.5),
            a_gate=rnd(RANK, h, scale=h**-0.5), b_gate=rnd(i, RANK, scale=1e-2),
            a_up=rnd(RANK, h, scale=h**-0.5), b_up=rnd(i, RANK, scale=1e-2),
            a_down=rnd(RANK, i, scale=i**-0.5), b_down=rnd(h, RANK, scale=1e-2),
        )  # fmt: skip
    return _TENSORS[key]


def _peft_mlp(t: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """down(silu(gate(x)) * up(x)) with each projection a peft.tuners.lora.Linear around nn.Linear."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    cfg = LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=["proj"])
    layers = []
    for proj in ("gate", "up", "down"):
        w = t[f"w_{proj}"]
        base = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        base.weight = nn.Parameter(w, requires_grad=False)
        layer = LoraLinear(base, "default", config=cfg, r=RANK, lora_alpha=RANK).to(DEVICE, DTYPE)
        layer.lora_A["default"].weight = nn.Parameter(t[f"a_{proj}"].clone(), requires_grad=False)
        layer.lora_B["default"].weight = nn.Parameter(t[f"b_{proj}"].clone(), requires_grad=True)
        layers.append(layer)
    gate, up, down = layers
    return lambda x: down(F.silu(gate(x)) * up(x))


def _step_fn(impl: str, t: dict[str, torch.Tensor]) -> Callable[[], None]:
    """One forward + backward of `impl` on the case's tensors."""
    x = t["x"].clone().requires_grad_(True)
    dy = t["dy"]
    if impl == "peft":
        mlp = _peft_mlp(t)
        forward = lambda: mlp(x)
    else:
        fn = ops.get_ops("triton" if impl == "triton+sgd" else impl).lora_mlp
        w = {k: v for k, v in t.items() if k not in ("x", "dy")}
        for k in ("b_gate", "b_up", "b_down"):
            w[k] = w[k].clone().requires_grad_(True)
        if impl == "triton+sgd":
            forward = lambda: fn(x, **w, sgd_lr=1e-6)
        else:
            forward = lambda: fn(x, **w)

    def step() -> None:
        forward().backward(dy)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    return step


# --------------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", impl_params(IMPLS, DTYPE))
@pytest.mark.parametrize("model, n", CASES)
def test_lora_mlp_fwd_bwd(benchmark, model: str, n: int, impl: str) -> None:
    case = f"{model}-N{n}"
    t = _tensors(model, n)
    h, i = SHAPES[model]
    _costs[case] = mlp_cost(n, h, i, RANK, t["x"].element_size())
    step = _step_fn(impl, t)
    benchmark.group = f"lora_mlp fwd+bwd {case}"
    benchmark.extra_info.update(case=case, impl=impl, device=str(DEVICE), dtype=str(DTYPE))
    big = DEVICE.type == "cpu" and n * h * i > 512 * 2560 * 9728 // 2
    rounds = 3 if big else (10 if DEVICE.type == "cpu" else 50)
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1 if big else 2)
    if benchmark.stats is not None:  # None under --benchmark-disable
        _results.setdefault(case, {})[impl] = benchmark.stats.stats.median


def kernel_costs(n: int, h: int, i: int, elt: int) -> dict[str, tuple[float, float]]:
    """(FLOPs, bytes) of each Triton kernel of one B-only fwd+bwd (base GEMMs and the tensors each must move;
    the rank-6 terms are negligible). Split-K reduce and the SGD apply: bytes only (fp32 partials ignored)."""
    nhi = n * h * i
    return {
        "_fwd_gate_up_kernel": (4.0 * nhi, elt * (n * h + 2 * i * h + 3 * n * i)),  # x, Wg, Wu; h, gate, up
        "_fwd_down_kernel": (2.0 * nhi, elt * (n * i + h * i + n * h)),  # h, Wd; y
        "_bwd_dh_kernel": (2.0 * nhi, elt * (n * h + h * i + 4 * n * i)),  # dy, Wd, gate, up; dgate, dup
        "_bwd_dx_kernel": (4.0 * nhi, elt * (2 * n * i + 2 * i * h + n * h)),  # dgate, dup, Wg, Wu; dx
    }


@pytest.mark.skipif(DEVICE.type != "cuda", reason="per-kernel device times come from the CUDA profiler")
@pytest.mark.parametrize("model, n", CASES)
def test_kernel_shares(model: str, n: int) -> None:
    """Each Triton kernel's device time in one fwd+bwd (torch.profiler, 5 steps) for the summary's shares."""
    from torch.profiler import ProfilerActivity, profile

    step = _step_fn("triton", _tensors(model, n))
    step()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
    times = {}
    for evt in prof.key_averages():
        if evt.key.startswith("_") and evt.key.endswith("_kernel"):
            total = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
            times[evt.key] = total * 1e-6 / 5  # seconds per step
    assert "_fwd_gate_up_kernel" in times and "_bwd_dh_kernel" in times, sorted(times)
    _kernel_times[f"{model}-N{n}"] = times


_kernel_times: dict[str, dict[str, float]] = {}  # case -> Triton kernel -> seconds per fwd+bwd


def kernel_share_lines() -> list[str]:
    peak_flops, peak_bw = device_peaks(DTYPE)
    if not _kernel_times or peak_flops is None or peak_bw is None:
        return []
    elt = torch.finfo(DTYPE).bits // 8
    lines = ["", f"per-kernel (torch.profiler), {DTYPE}, on {device_name()}: us per fwd+bwd, bound, share of it"]
    for case, times in _kernel_times.items():
        model, n = case.split("-N")
        costs = kernel_costs(int(n), *SHAPES[model], elt)
        parts = []
        for name, t in sorted(times.items(), key=lambda kv: -kv[1]):
            if name in costs:
                flops, nbytes = costs[name]
                bound, kind = max((flops / peak_flops, "compute"), (nbytes / peak_bw, "memory"))
                parts.append(f"{name.strip('_').removesuffix('_kernel')} {t * 1e6:.0f} ({kind} {100 * bound / t:.0f}%)")
            else:
                parts.append(f"{name.strip('_').removesuffix('_kernel')} {t * 1e6:.0f}")
        lines.append(f"{case:<16} " + ", ".join(parts))
    return lines


# --------------------------------------------------------------------------------------------------
# Summary table (printed through the terminal reporter: visible without -s)
# --------------------------------------------------------------------------------------------------


def summary_lines() -> list[str]:
    """The side-by-side table (empty when nothing ran); printed by benchmarks/conftest.py."""
    if not (_results):
        return []
    peak_flops, peak_bw = device_peaks(DTYPE)
    lines = ["", f"lora_mlp forward+backward, rank {RANK}, {DTYPE}, on {device_name()}: median ms"]
    head = f"{'case':<18}" + "".join(f"{impl:>12}" for impl in IMPLS)
    lines.append(head + "   speed-up vs peft | vs torch")
    for case, r in _results.items():
        row = f"{case:<18}" + "".join(f"{r[k] * 1e3:12.3f}" if k in r else f"{'-':>12}" for k in IMPLS)
        vs_peft = ", ".join(f"{k} {r['peft'] / v:.2f}x" for k, v in r.items() if k != "peft" and "peft" in r)
        vs_torch = ", ".join(f"{k} {r['torch'] / v:.2f}x" for k, v in r.items() if k not in ("torch", "peft"))
        vs_torch = vs_torch if "torch" in r else ""
        lines.append(f"{row}   {vs_peft} | {vs_torch}")
    for case, r in _results.items():
        flops, nbytes = _costs[case]
        unit, scale = ("TFLOP/s", 1e12) if DEVICE.type == "cuda" else ("GFLOP/s", 1e9)
        rates = ", ".join(f"{k} {flops / v / scale:.2f}" for k, v in r.items())
        lines.append(f"{case}: {flops / 1e9:.1f} GFLOP, {nbytes / 1e6:.0f} MB min traffic; {unit}: {rates}")
        if peak_flops is not None and peak_bw is not None:
            t_compute, t_memory = flops / peak_flops, nbytes / peak_bw
            bound, kind = max((t_compute, "compute"), (t_memory, "memory"))
            frac = ", ".join(f"{k} {100 * bound / v:.0f}%" for k, v in r.items())
            lines.append(f"    {kind}-bound at {bound * 1e3:.3f} ms; fraction of the bound reached: {frac}")
    if peak_flops is None and DEVICE.type == "cuda":
        lines.append("(unknown device peaks: set TMEM_PEAK_TFLOPS and TMEM_PEAK_TBPS for bound fractions)")
    return lines + kernel_share_lines()


@pytest.fixture(scope="module", autouse=True)
def _release_tensors():
    yield
    _TENSORS.clear()
