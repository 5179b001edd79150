"""Segmented LoRA MLP (a different B per session in one batch) vs one adapter vs the bare MLP (pytest-benchmark).

SmolLM2-135M shapes (H 576, I 1536, rank 6), fp32, random weights, CPU. B stacks are views of a
[capacity, numel] slab, as the session pool lays them out. Two cases:

- decode: 16 rows (one token of each of 16 sessions), inference. `segmented` runs the 16 sessions in
  one call (16 segments of 1 row); `lora_mlp` runs the 16 rows through one adapter; `bare` is the base
  SwiGLU MLP (3 GEMMs + SiLU*mul); `per_session` calls `lora_mlp` once per session (1 row each), what
  serving the sessions one by one costs. Target: `segmented` within 1.3x of `bare`.
- write: 8 sessions x 64 tokens, forward + backward (dx and every session's dB). `segmented` in one call
  vs `lora_mlp` on 512 rows of one adapter (the same FLOPs: the lower bound) vs `per_session` (8 calls).

Each implementation is benchmarked on its own (its median in pytest-benchmark's table) and, in the last
test of a case, all of them are timed interleaved (round robin, same process): the summary printed at the
end gives each one's median time and the median of its per-round ratio to `bare` (decode) or `lora_mlp`
(write), the figure to quote on a shared machine. `torch` is the reference (spec) composition.

    TMEM_BENCH_THREADS=1 .venv/bin/python -m pytest benchmarks/test_bench_segmented.py -s
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from benchmarks.common import RANK, SHAPES
from tmem_kernels import reference as ref

native = pytest.importorskip("tmem_kernels.native", reason="native extension not built")

HIDDEN, INTER = SHAPES["smollm2"]
SCALING = 2.0
CAPACITY = 32
CASES = {  # case -> (sessions, rows per session, backward?, baseline, implementations)
    "decode 16x1": (16, 1, False, "bare", ("bare", "lora_mlp", "segmented", "per_session", "torch")),
    "write 8x64": (8, 64, True, "lora_mlp", ("lora_mlp", "segmented", "per_session", "torch")),
}

_medians: dict[str, dict[str, float]] = {}  # case -> impl -> median seconds (pytest-benchmark)
_interleaved: dict[str, dict[str, tuple[float, ...]]] = {}  # case -> impl -> see _interleave


def _tensors(sessions: int, rows: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = sessions * rows
    numel = (2 * INTER + HIDDEN) * RANK
    slab = torch.randn(CAPACITY, numel, generator=g) * 0.01
    picked = torch.randperm(CAPACITY, generator=g)[:sessions]  # sessions at scattered slab rows
    return {
        "x": torch.randn(n, HIDDEN, generator=g),
        "w_gate": torch.randn(INTER, HIDDEN, generator=g) / HIDDEN**0.5,
        "w_up": torch.randn(INTER, HIDDEN, generator=g) / HIDDEN**0.5,
        "w_down": torch.randn(HIDDEN, INTER, generator=g) / INTER**0.5,
        "a_gate": torch.randn(RANK, HIDDEN, generator=g) / HIDDEN**0.5,
        "a_up": torch.randn(RANK, HIDDEN, generator=g) / HIDDEN**0.5,
        "a_down": torch.randn(RANK, INTER, generator=g) / INTER**0.5,
        "b_gate": slab[:, : INTER * RANK].view(CAPACITY, INTER, RANK),
        "b_up": slab[:, INTER * RANK : 2 * INTER * RANK].view(CAPACITY, INTER, RANK),
        "b_down": slab[:, 2 * INTER * RANK :].view(CAPACITY, HIDDEN, RANK),
        "seg_indptr": torch.arange(sessions + 1) * rows,
        "seg_slot": picked,
    }


def _impls(case: str) -> dict[str, Callable[[], object]]:
    sessions, rows, backward, _, names = CASES[case]
    t = _tensors(sessions, rows)
    dy = torch.randn(sessions * rows, HIDDEN)
    if backward:
        t["x"].requires_grad_(True)
        for k in ("b_gate", "b_up", "b_down"):
            t[k] = t[k].detach().requires_grad_(True)
    w = [t[k] for k in ("w_gate", "w_up", "w_down")]
    a = [t[k] for k in ("a_gate", "a_up", "a_down")]
    b = [t[k] for k in ("b_gate", "b_up", "b_down")]
    slots = t["seg_slot"].tolist()

    def lora(x: torch.Tensor, slot: int) -> torch.Tensor:
        return native.lora_mlp(x, *w, a[0], b[0][slot], a[1], b[1][slot], a[2], b[2][slot], SCALING)

    fns: dict[str, Callable[[], torch.Tensor]] = {
        "bare": lambda: torch.mm(F.silu(torch.mm(t["x"], w[0].T), inplace=True).mul_(torch.mm(t["x"], w[1].T)), w[2].T),
        "lora_mlp": lambda: lora(t["x"], slots[0]),
        "segmented": lambda: native.lora_mlp_segmented(t["x"], *w, *a, *b, t["seg_indptr"], t["seg_slot"], SCALING),
        "per_session": lambda: torch.cat([lora(t["x"][j * rows : (j + 1) * rows], s) for j, s in enumerate(slots)]),
        "torch": lambda: ref.lora_mlp_segmented(t["x"], *w, *a, *b, t["seg_indptr"], t["seg_slot"], SCALING),
    }

    def step(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        if not backward:
            def infer() -> None:
                with torch.no_grad():
                    fn()
            return infer

        def train() -> None:
            fn().backward(dy)
            for leaf in (t["x"], *b):
                leaf.grad = None
        return train

    return {name: step(fns[name]) for name in names}


def _interleave(fns: dict[str, Callable[[], None]], baseline: str, rounds: int) -> dict[str, tuple[float, ...]]:
    """Time every fn once per round, in turn. Per fn: (median s, median per-round ratio to `baseline`,
    ratio of 10th-percentile times: the fast rounds, least disturbed by other processes)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    def p10(ts: list[float]) -> float:
        return sorted(ts)[len(ts) // 10]

    return {
        name: (
            statistics.median(ts),
            statistics.median(t / b for t, b in zip(ts, times[baseline])),
            p10(ts) / p10(times[baseline]),
        )
        for name, ts in times.items()
    }


_PARAMS = [pytest.param(case, impl, id=f"{case.replace(' ', '-')}-{impl}") for case in CASES for impl in CASES[case][4]]


@pytest.mark.parametrize(("case", "impl"), _PARAMS)
def test_segmented(benchmark, case: str, impl: str) -> None:
    _, _, backward, baseline, names = CASES[case]
    fns = _impls(case)
    benchmark.group = case
    benchmark.extra_info.update(case=case, impl=impl)
    benchmark.pedantic(fns[impl], rounds=10 if backward else 50, iterations=1, warmup_rounds=2)
    if benchmark.stats is not None:  # None under --benchmark-disable
        _medians.setdefault(case, {})[impl] = benchmark.stats.stats.median
    if impl == names[-1]:
        _interleaved[case] = _interleave(fns, baseline, 20 if backward else 300)


def summary_lines() -> list[str]:
    """Interleaved medians and ratios per case (printed by benchmarks/conftest.py)."""
    if not _interleaved:
        return []
    lines = ["", f"threads {torch.get_num_threads()}; interleaved rounds: median time, median per-round ratio to the "
             "baseline, ratio of the 10th-percentile times"]  # fmt: skip
    for case, res in _interleaved.items():
        vs = "vs " + CASES[case][3]
        lines.append(f"{case:<12} {'impl':<12} {'ms':>9} {vs:>12} {'p10 ratio':>10} {'pytest-benchmark ms':>20}")
        for name, (sec, ratio, fast) in res.items():
            own = _medians.get(case, {}).get(name, float("nan"))
            lines.append(f"{'':<12} {name:<12} {sec * 1e3:9.3f} {ratio:12.2f} {fast:10.2f} {own * 1e3:20.3f}")
    return lines
