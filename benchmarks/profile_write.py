"""Where one write's time goes: the host's phases, the device's kernels, and who waits for whom.

    python benchmarks/profile_write.py                           # Qwen3-4B shapes on CUDA, SmolLM2's on CPU
    python benchmarks/profile_write.py --model smollm2 --cases 16x512 --backends auto torch
    python benchmarks/profile_write.py --cases pool16x8 --backends auto torch   # the pool's batched write

For each (model, case, backend): a write of new flashcard-like examples (case "CxN": C cards of N/C tokens; the
same chat preamble in every write, other cards) with the paper recipe (5 epochs of batches of 16: 5 SGD steps
for 16 cards, 10 for 32)
on a random-weight model at the real shapes (bf16 on CUDA, fp32 on CPU), as
`benchmarks/test_bench_write_shapes.py` times it. After two warm-up writes it prints

- the median wall time of `--writes` writes;
- one profiled write (torch.profiler), by the phases the runtime labels with `record_function`:
  `tmem.write.trunk` (the frozen layers, on the host's clock), `.load` (the graph buffers filled), `.steps`
  (the training steps: launched, or replayed as CUDA graphs), `.check` (the write's one read of the
  device: on the host's clock this is the time the host waited for the device), `.commit`;
- on CUDA: the device's busy time (union of kernel intervals) against the write's wall time, the kernel
  count, the CUDA runtime calls that launch or wait (launches, graph launches, synchronisations, copies,
  frees), the kernels that took the most device time;
- the host-side operators that took the most time of their own.

A write whose `.check` is short and whose device is mostly idle is bound by the host (Python, launches):
shorten the host's path. A long `.check` with a busy device is bound by the kernels: tune them.

The pool case "poolSxC" (`make gpu-check`'s `profile_pool` phase runs pool16x8, issue 10's write: 16 sessions,
8 new cards each, the batched write >= 8x faster than 16 sequential ones): a SessionPool of S sessions on the
same random-weight model, every write new token-level cards shaped as `benchmarks/test_bench_pool.py`'s
(POOL_CARD tokens, the chat preamble shared; its recipe: 2 epochs of batches of 8, so 2 steps per session;
no tokenizer needed). After two warm-up writes of each shape (CUDA graphs captured) its head line gives the
median of `--writes` batched writes of the S sessions, the median of `--writes` writes of one session alone,
and S x that against the batched write (what test_bench_pool's "sequential" measures, by estimate: compare its
`[pool]` line). Then one profiled batched write with the breakdown above. What to look at: the trunk phase (the
frozen layers over all S x C cards' rows at once: host-bound if its time is far above the device's busy share,
i.e. eager launches per layer), steps + check (the adapted layers' steps, one batch of every session's cards per
step: the segmented Triton kernels `_expand*`/`_gate_up*` among the top kernels on CUDA, graph launches among the
runtime calls), the time outside the phases (host planning: schedules, collation, uploads), and `cudaGraphLaunch`
against `cudaLaunchKernel` counts (a capture inside the profiled write shows as thousands of launches: the
warm-up missed a bucket). A pool case runs once per resolved backend (on CUDA `auto` is Triton for a pool).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import count
from typing import TypeVar

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import DEVICE, SHAPES, device_name, flashcard_examples, random_model, sync
from benchmarks.test_bench_pool import RECIPE as POOL_RECIPE
from tmem_runtime import FastWeights, SessionPool
from tmem_runtime.backends import resolve_backend
from tmem_runtime.recipes import RECIPES

DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
RECIPE = RECIPES["paper"]
PREFIX = 24  # the chat preamble's tokens, shared by every card
# the pool case's cards, shaped as benchmarks/test_bench_pool.py's under the GPU run's tokenizer (SmolLM2's chat
# template): 49-50 tokens, the first 33 the same in every card (system prompt, "What is the code of locker "),
# the loss on the last 5 (three digits, <|im_end|>, a newline)
POOL_CARD, POOL_PREFIX, POOL_ANSWER = 49, 33, 5
PHASES = ("tmem.write.trunk", "tmem.write.load", "tmem.write.steps", "tmem.write.check", "tmem.write.commit")
RUNTIME_CALLS = (  # CUDA runtime / driver calls worth counting: launches, waits, copies, allocator traffic
    "cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaGraphLaunch",
    "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaStreamWaitEvent",
    "cudaMemcpyAsync", "cudaMemsetAsync", "cudaMalloc", "cudaFree", "cudaHostAlloc",
)  # fmt: skip


T = TypeVar("T")


def wall_times(write: Callable[[T], object], inputs: Iterator[T], writes: int) -> list[float]:
    """Seconds per `write` of the next input from `inputs` (new cards each time), each from a synchronised
    start to its (synchronising) return."""
    times = []
    for _ in range(writes):
        cards = next(inputs)
        sync()
        t = time.perf_counter()
        write(cards)
        sync()
        times.append(time.perf_counter() - t)
    return times


def profiled(write: Callable[[T], object], inputs: Iterator[T]) -> tuple[profile, float]:
    """One `write` of the next input under torch.profiler (CPU, and CUDA where there is one): (profile, wall s)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
    with profile(activities=activities) as prof:
        wall_s = wall_times(write, inputs, 1)[0]
    return prof, wall_s


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (microseconds)."""
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total


def report(prof: profile, wall_s: float) -> list[str]:
    """The profiled write's phases, device occupancy, runtime calls and top operators, as text lines."""
    events = prof.events()
    lines = [f"  profiled write: {wall_s * 1e3:.1f} ms wall"]
    host_events = [e for e in events if e.device_type == DeviceType.CPU]
    spans = {name: sum(e.time_range.elapsed_us() for e in host_events if e.name == name) for name in PHASES}
    covered = sum(spans.values())
    lines.append(
        "  host phases (ms): "
        + ", ".join(f"{n.rsplit('.', 1)[1]} {us / 1e3:.2f}" for n, us in spans.items())
        + f"; outside them {max(wall_s * 1e6 - covered, 0) / 1e3:.2f}"
    )
    # (the runtime's ranges also show on the device's timeline, as annotations spanning their kernels: left out)
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.name.startswith("tmem.")]
    if kernels:
        busy = busy_us([(e.time_range.start, e.time_range.end) for e in kernels])
        lines.append(
            f"  device: {len(kernels)} kernels/copies, busy {busy / 1e3:.2f} ms = {100 * busy / (wall_s * 1e6):.0f}% "
            "of the wall time"
        )
        by_kernel: Counter[str] = Counter()
        for e in kernels:
            by_kernel[e.name] += e.time_range.elapsed_us()
        lines.append("  top kernels (device ms, name):")
        lines += [f"    {us / 1e3:8.3f}  {name[:110]}" for name, us in by_kernel.most_common(12)]
    calls = Counter(e.name for e in host_events if e.name in RUNTIME_CALLS)
    call_us: Counter[str] = Counter()
    for e in host_events:
        if e.name in RUNTIME_CALLS:
            call_us[e.name] += e.time_range.elapsed_us()
    if calls:
        lines.append(
            "  runtime calls (count, host ms): "
            + ", ".join(f"{n} {calls[n]} ({call_us[n] / 1e3:.2f})" for n, _ in calls.most_common())
        )
    host = [a for a in prof.key_averages() if a.device_type == DeviceType.CPU and not a.key.startswith("tmem.")]
    host.sort(key=lambda a: a.self_cpu_time_total, reverse=True)
    lines.append("  top host operators (self ms, calls, name):")
    lines += [f"    {a.self_cpu_time_total / 1e3:8.2f} {a.count:6d}  {a.key[:100]}" for a in host[:12]]
    return lines


def profile_case(model: torch.nn.Module, name: str, case: str, backend: str, writes: int) -> list[str]:
    """One FastWeights write of case "CxN" (C cards, N tokens in all): timed, then profiled (text lines)."""
    examples, tokens = (int(x) for x in case.split("x"))
    cards = (flashcard_examples(tokens, model.config.vocab_size, examples, PREFIX, seed) for seed in count())
    fw = FastWeights(model, backend=backend)
    try:

        def write(ex: list) -> None:
            fw.write_examples(ex, RECIPE)

        wall_times(write, cards, 2)  # warm-up: JIT, autotuning, CUDA-graph capture of this shape's bucket
        times = wall_times(write, cards, writes)
        prof, wall_s = profiled(write, cards)
        head = (
            f"{name}, {examples} cards x {tokens // examples} tokens, backend={backend} (resolved: {fw.backend}), "
            f"{DTYPE}, {device_name()}: "
            f"write median {statistics.median(times) * 1e3:.1f} ms, min {min(times) * 1e3:.1f} ms over {writes}"
        )
        return [head, *report(prof, wall_s)]
    finally:
        fw.detach()


def pool_size(case: str) -> tuple[int, int]:
    """(sessions, cards per session) of a pool case "poolSxC"."""
    sessions, cards = (int(x) for x in case.removeprefix("pool").split("x"))
    return sessions, cards


def profile_pool_case(model: torch.nn.Module, name: str, case: str, backend: str, writes: int) -> list[str]:
    """A SessionPool's batched write of case "poolSxC" (S sessions x C new cards of POOL_CARD tokens each,
    test_bench_pool.py's recipe), timed against one session's write alone, then profiled (text lines)."""
    sessions, per = pool_size(case)
    names = [f"w{i}" for i in range(sessions)]
    seeds = count()

    def new_cards(group: list[str]) -> Iterator[dict[str, list]]:  # every write: new cards (their trunk runs)
        while True:
            yield {
                s: flashcard_examples(per * POOL_CARD, model.config.vocab_size, per, POOL_PREFIX, next(seeds),
                                      answer=POOL_ANSWER)
                for s in group
            }  # fmt: skip

    pool = SessionPool(model, capacity=sessions, backend=backend)
    try:
        for s in names:
            pool.open(s)

        def write(cards: dict[str, list]) -> None:
            pool.write_examples_many(cards, POOL_RECIPE)

        batched, alone = new_cards(names), new_cards(names[:1])
        wall_times(write, batched, 2)  # warm-up: JIT, CUDA-graph capture of the batched write's buckets
        times = wall_times(write, batched, writes)
        wall_times(write, alone, 2)  # the same for one session's write (its own buckets)
        one = wall_times(write, alone, writes)
        prof, wall_s = profiled(write, batched)
        med, one_med = statistics.median(times), statistics.median(one)
        head = (
            f"{name} pool, {sessions} sessions x {per} new cards x {POOL_CARD} tokens "
            f"({sessions * per * POOL_CARD} trunk rows), backend={backend} (resolved: {pool.engine.backend}), "
            f"{DTYPE}, {device_name()}: batched write median {med * 1e3:.1f} ms, min {min(times) * 1e3:.1f} ms; "
            f"one session alone median {one_med * 1e3:.1f} ms; {sessions} sequential ~ {sessions * one_med * 1e3:.0f}"
            f" ms = {sessions * one_med / med:.2f}x the batched write (issue 10: >= 8x at 16 sessions); over {writes}"
        )
        return [head, *report(prof, wall_s)]
    finally:
        pool.detach()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = DEVICE.type == "cuda"
    parser.add_argument("--model", nargs="+", default=["qwen3-4b"] if cuda else ["smollm2"], choices=list(SHAPES))
    parser.add_argument("--cases", nargs="+", default=["16x512", "32x1024", "16x4096"] if cuda else ["16x512"],
                        help="CxN: a FastWeights write of C cards, N tokens in all (32x1024: issue 9's 32 "
                             "flashcards); poolSxC: a SessionPool's batched write of S sessions x C new cards "
                             "(pool16x8: issue 10's)")  # fmt: skip
    parser.add_argument("--backends", nargs="+", default=["auto", "triton"] if cuda else ["auto"],
                        help="(on CUDA `auto` is the torch composition for one session, Triton for a pool: a pool "
                             "case runs once per resolved backend)")  # fmt: skip
    parser.add_argument("--writes", type=int, default=5, help="timed writes per case (after two warm-up writes)")
    args = parser.parse_args(argv)
    one = [c for c in args.cases if not c.startswith("pool")]
    pools = [c for c in args.cases if c.startswith("pool")]
    for name in args.model:
        model = random_model(name, DTYPE)
        for title, cases, run in (("one write", one, profile_case), ("a batched pool write", pools, profile_pool_case)):
            if cases:
                print(f"profile of {title} (benchmarks/profile_write.py), {DTYPE}, on {device_name()}", flush=True)
            for case in cases:
                done = set()  # a pool case's resolved backends (a pool's `auto` is Triton on CUDA: run once)
                for backend in args.backends:
                    if run is profile_pool_case:
                        resolved = resolve_backend(backend, DEVICE, DTYPE, sessions=pool_size(case)[0])
                        if resolved in done:
                            continue
                        done.add(resolved)
                    try:
                        lines = run(model, name, case, backend, args.writes)
                    except Exception as exc:  # one case's failure keeps the others' profiles (a device run is rare)
                        lines = [f"{name} {case} backend={backend}: FAILED {type(exc).__name__}: {exc}"]
                    print("\n".join(lines), flush=True)
        del model


if __name__ == "__main__":
    main()
