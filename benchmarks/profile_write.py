"""Where one write's time goes: the host's phases, the device's kernels, and who waits for whom.

    python benchmarks/profile_write.py                           # Qwen3-4B shapes on CUDA, SmolLM2's on CPU
    python benchmarks/profile_write.py --model smollm2 --cases 16x512 --backends auto torch

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
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from itertools import count

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import DEVICE, SHAPES, device_name, flashcard_examples, random_model, sync
from tmem_runtime import FastWeights
from tmem_runtime.recipes import RECIPES

DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
RECIPE = RECIPES["paper"]
PREFIX = 24  # the chat preamble's tokens, shared by every card
PHASES = ("tmem.write.trunk", "tmem.write.load", "tmem.write.steps", "tmem.write.check", "tmem.write.commit")
RUNTIME_CALLS = (  # CUDA runtime / driver calls worth counting: launches, waits, copies, allocator traffic
    "cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC", "cudaGraphLaunch",
    "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaStreamWaitEvent",
    "cudaMemcpyAsync", "cudaMemsetAsync", "cudaMalloc", "cudaFree", "cudaHostAlloc",
)  # fmt: skip


def wall_times(fw: FastWeights, cards: Iterator[list], writes: int) -> list[float]:
    """Seconds per write of the next examples from `cards`, each from a synchronised start to its
    (synchronising) return."""
    times = []
    for _ in range(writes):
        examples = next(cards)
        sync()
        t = time.perf_counter()
        fw.write_examples(examples, RECIPE)
        sync()
        times.append(time.perf_counter() - t)
    return times


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
    examples, tokens = (int(x) for x in case.split("x"))
    cards = (flashcard_examples(tokens, model.config.vocab_size, examples, PREFIX, seed) for seed in count())
    fw = FastWeights(model, backend=backend)
    try:
        wall_times(fw, cards, 2)  # warm-up: JIT, autotuning, CUDA-graph capture of this shape's bucket
        times = wall_times(fw, cards, writes)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE.type == "cuda" else [])
        with profile(activities=activities) as prof:
            profiled = wall_times(fw, cards, 1)[0]
        head = (
            f"{name}, {examples} cards x {tokens // examples} tokens, backend={backend} (resolved: {fw.backend}), "
            f"{DTYPE}, {device_name()}: "
            f"write median {statistics.median(times) * 1e3:.1f} ms, min {min(times) * 1e3:.1f} ms over {writes}"
        )
        return [head, *report(prof, profiled)]
    finally:
        fw.detach()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cuda = DEVICE.type == "cuda"
    parser.add_argument("--model", nargs="+", default=["qwen3-4b"] if cuda else ["smollm2"], choices=list(SHAPES))
    parser.add_argument("--cases", nargs="+", default=["16x512", "32x1024", "16x4096"] if cuda else ["16x512"],
                        help="CxN: a write of C cards, N tokens in all (32x1024: issue 9's 32 flashcards)")
    parser.add_argument("--backends", nargs="+", default=["auto", "triton"] if cuda else ["auto"],
                        help="(on CUDA `auto` is the torch composition for one session: triton is the other side)")
    parser.add_argument("--writes", type=int, default=5, help="timed writes per case (after two warm-up writes)")
    args = parser.parse_args(argv)
    print(f"profile of one write (benchmarks/profile_write.py), {DTYPE}, on {device_name()}", flush=True)
    for name in args.model:
        model = random_model(name, DTYPE)
        for backend in args.backends:
            for case in args.cases:
                try:
                    lines = profile_case(model, name, case, backend, args.writes)
                except Exception as exc:  # one case's failure keeps the others' profiles (a device run is rare)
                    lines = [f"{name} {case} backend={backend}: FAILED {type(exc).__name__}: {exc}"]
                print("\n".join(lines), flush=True)
        del model


if __name__ == "__main__":
    main()
