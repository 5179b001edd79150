"""What a CUDA graph of a write step would freeze, traced on the CPU: do the steps that share a graph key agree?

A captured step replays exactly what the host decided while it was captured: the ops and their order, every
non-tensor argument (Python scalars, shapes, launch grids, constexprs), and the address of every tensor it
reads that it did not make itself. `cuda_graphs.GraphedSteps` replays one graph for every step sharing a key
(`StepBatch.signature`, per bucket), with only the contents of the step's StepBatch copied into the graph's
static batch. So a replay is right only if every step of a key, run eagerly, would issue the same trace:

    trace = [(op, non-tensor args, per tensor arg: shape, stride, dtype and where it lives)]
    where  = ("made", k)      the k-th tensor made inside this step (an op output on fresh storage)
             ("batch", name)  a tensor field of the step's StepBatch (graphs copy new values into it)
             ("ext", address) anything else (model weights, the bucket's buffers, ...), by storage address

`StepTracer` records a trace (a TorchDispatchMode for the aten and custom ops, plus Triton launches under the
interpreter: kernel name, grid, scalars, constexprs and tensor arguments; a launch inside a dispatched op,
e.g. a `torch.ops.tmem` custom op, is recorded with its tensors' layouts only, since the op's own
allocations are not visible to the mode). `TracedSteps` stands in for `GraphedSteps` on the CPU with the same
call: the first step of a key runs eagerly on its own batch (traced), the "capture" runs the step on a clone
of the batch (traced; then every tensor of `state` is restored, since a capture computes nothing), and every
later step of the key runs on that static batch after `copy_`, its trace compared with the capture's.
`traced_static_writes(engine)` is a `StaticWrites` whose buckets run their steps through `TracedSteps`.

    python -m benchmarks.graph_trace             # a batched 4-session write (triton backend), then a 1-session one
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from tmem_runtime.engine import FastWeightEngine
from tmem_runtime.static_write import StaticWrite, StaticWrites
from tmem_runtime.write import StepBatch

Entry = tuple  # (kind, name, args...)
_ACTIVE: list[StepTracer] = []  # the tracer Triton launches report to (innermost last)


def _value(x: object) -> object:
    """A non-tensor argument as a comparable value (floats exactly)."""
    if isinstance(x, (list, tuple)):
        return tuple(_value(v) for v in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _value(v)) for k, v in x.items()))
    if isinstance(x, float):
        return float.hex(x)
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(x)
    return (type(x).__name__, repr(x))


class StepTracer(TorchDispatchMode):
    """Records one step's trace (see the module docstring). `names`: {data address: name} of the tensors
    to report by name (the StepBatch's fields). After the step, `survivors()` lists the tensors made inside
    it that are still alive (on CUDA: graph-pool memory that outlives its capture)."""

    def __init__(self, names: dict[int, str] | None = None, foreign: dict[int, str] | None = None) -> None:
        super().__init__()
        self.names = names or {}
        self.foreign = foreign or {}  # storage id (cdata) -> which earlier step made it (still alive)
        self.trace: list[Entry] = []
        self.made: dict[int, int] = {}  # storage address -> k (the k-th storage made in this step)
        self.made_refs: list[tuple[StorageWeakRef, int, str]] = []  # (storage, k, op that made it)
        self.depth = 0  # > 0 while a dispatched op runs (its Triton launches are its own)

    def where(self, t: torch.Tensor) -> tuple:
        ptr = t.untyped_storage().data_ptr()
        if ptr == 0:
            return ("empty",)
        if ptr in self.made:
            return ("made", self.made[ptr], t.storage_offset())
        name = self.names.get(t.data_ptr())
        if name is not None:
            return ("batch", name)
        made_before = self.foreign.get(t.untyped_storage()._cdata)
        if made_before is not None:
            return ("foreign", made_before, t.storage_offset())
        return ("ext", ptr, t.storage_offset())

    def tensor(self, t: torch.Tensor, addresses: bool = True) -> tuple:
        layout = (tuple(t.shape), tuple(t.stride()), str(t.dtype), t.device.type)
        return ("T", *layout, self.where(t) if addresses else ("inner",))

    def args(self, values: Sequence[object], addresses: bool = True) -> tuple:
        return tuple(self.tensor(v, addresses) if isinstance(v, torch.Tensor) else _value(v) for v in values)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        flat = tree_flatten((args, kwargs))[0]
        described = self.args(flat)
        inputs = {x.untyped_storage().data_ptr() for x in flat if isinstance(x, torch.Tensor)}
        self.depth += 1
        try:
            out = func(*args, **kwargs)
        finally:
            self.depth -= 1
        outs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        for o in outs:
            ptr = o.untyped_storage().data_ptr()
            if ptr != 0 and ptr not in inputs:  # fresh storage (a view or in-place op returns an input's)
                self.made[ptr] = len(self.made_refs)
                self.made_refs.append((StorageWeakRef(o.untyped_storage()), len(self.made_refs), str(func)))
        self.trace.append(("op", str(func), described, self.args(outs)))
        return out

    def launch(self, name: str, grid: object, args: Sequence[object], kwargs: dict) -> None:
        inner = self.depth > 0
        self.trace.append(("triton", name, _value(grid), self.args(args, not inner),
                           self.args(list(kwargs.values()), not inner), tuple(kwargs), inner))  # fmt: skip

    def survivors(self, keep: Sequence[torch.Tensor] = ()) -> list[tuple[int, str]]:
        """(k, op) of the tensors made in the step that are still alive, other than `keep`'s storages."""
        kept = {StorageWeakRef(t.untyped_storage()).cdata for t in keep}
        return [(k, op) for ref, k, op in self.made_refs if not ref.expired() and ref.cdata not in kept]

    @contextmanager
    def recording(self) -> Iterator[StepTracer]:
        _ACTIVE.append(self)
        try:
            with self:
                yield self
        finally:
            _ACTIVE.remove(self)


_PATCHED = False


def _patch_triton() -> None:
    """Make Triton launches under the interpreter report to the active tracer (idempotent). The launch
    itself runs with the dispatch modes off (the interpreter's own copies are not the step's ops)."""
    global _PATCHED
    if _PATCHED:
        return
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):  # noqa: ANN001, ANN202
        if _ACTIVE and not warmup:
            _ACTIVE[-1].launch(self.__name__, grid, args, kwargs)
        with _disable_current_modes():
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    _PATCHED = True


def batch_names(batch: StepBatch) -> dict[int, str]:
    """{data address: field name} of a StepBatch's tensors (they may be views of one upload)."""
    return {t.data_ptr(): name for name, t in zip(StepBatch.TENSORS, batch.tensors_or_none())
            if t is not None}  # fmt: skip


def first_difference(a: list[Entry], b: list[Entry]) -> str | None:
    """Where two traces first differ (None: identical), with both entries and how many differ."""
    n = min(len(a), len(b))
    diff = [i for i in range(n) if a[i] != b[i]]
    if not diff and len(a) == len(b):
        return None
    if not diff:
        return f"lengths {len(a)} != {len(b)}; the longer goes on with {(a + b)[n]}"
    i = diff[0]
    return f"{len(diff)} of {n} entries differ (lengths {len(a)}, {len(b)}); first at #{i}:\n  {a[i]}\n  {b[i]}"


@dataclass
class Divergence:
    """A step whose trace differs from the one its key's graph would replay."""

    key: Hashable
    step: int  # the call's number on this TracedSteps, from 1
    against: str  # "capture" (a later step vs the captured one) or "eager" (the capture vs its eager first run)
    difference: str

    def __str__(self) -> str:
        return f"step {self.step} vs its key's {self.against}: {self.difference}\n  key {self.key}"


@dataclass
class TracedSteps:
    """A CPU stand-in for `cuda_graphs.GraphedSteps` that checks what a replay would get wrong.

    state: the tensors a step writes (restored after the traced "capture", which on CUDA runs nothing).
    divergences: every later step (and every capture) whose trace differs from its key's capture (eager
    first run). survivors: per traced step, the tensors it made that outlive it other than its loss (on
    CUDA, a capture's are graph-pool memory). foreign_reads: steps that read a tensor an earlier step made
    (a replay would read what that step's graph last wrote there, or memory another graph reuses). splits:
    per key, the group sizes (`StepBatch.groups`) of the steps it ran: several where a key groups steps whose
    rows split differently among their sessions."""

    state: Sequence[torch.Tensor]
    graphs: dict[Hashable, tuple[StepBatch, list[Entry]]] = field(default_factory=dict)
    divergences: list[Divergence] = field(default_factory=list)
    survivors: list[tuple[int, str, list[tuple[int, str]]]] = field(default_factory=list)
    foreign_reads: list[tuple[int, str, tuple]] = field(default_factory=list)
    splits: dict[Hashable, set[tuple[int, ...]]] = field(default_factory=dict)  # key -> its steps' group sizes
    calls: int = 0
    replays: int = 0
    _alive: list[tuple[StorageWeakRef, str]] = field(default_factory=list)

    def _traced(self, what: str, batch: StepBatch, step_fn: Callable[[StepBatch], torch.Tensor]) -> tuple:
        """(loss, trace) of step_fn(batch), traced; records what the step leaves alive and reads of earlier ones."""
        foreign = {ref.cdata: name for ref, name in self._alive if not ref.expired()}
        with StepTracer(batch_names(batch), foreign).recording() as tracer:
            loss = step_fn(batch)
        label = f"step {self.calls} ({what})"
        for entry in tracer.trace:
            for arg in entry[3] if entry[0] == "triton" else entry[2]:
                if isinstance(arg, tuple) and arg[:1] == ("T",) and arg[-1][0] == "foreign":
                    self.foreign_reads.append((self.calls, entry[1], arg[-1]))
        alive = tracer.survivors([loss])
        self.survivors.append((self.calls, what, alive))
        made = {k: ref for ref, k, _ in tracer.made_refs}
        self._alive += [(made[k], f"{label} #{k} {op}") for k, op in alive]
        return loss, tracer.trace

    def __call__(self, key: Hashable, batch: StepBatch, step_fn: Callable[[StepBatch], torch.Tensor]) -> torch.Tensor:
        _patch_triton()
        self.calls += 1
        self.splits.setdefault(key, set()).add(batch.groups)
        entry = self.graphs.get(key)
        if entry is not None:
            static, captured = entry
            static.copy_(batch)
            loss, trace = self._traced("replay", static, step_fn)
            self.replays += 1
            self._compare(key, "capture", captured, trace)
            return loss.clone()
        loss, eager = self._traced("eager", batch, step_fn)
        loss = loss.clone()
        static = batch.clone()
        saved = [t.clone() for t in self.state]
        _, captured = self._traced("capture", static, step_fn)
        with torch.no_grad():
            for t, s in zip(self.state, saved):
                t.copy_(s)
        self._compare(key, "eager", eager, captured)
        self.graphs[key] = (static, captured)
        return loss

    def _compare(self, key: Hashable, against: str, first: list[Entry], later: list[Entry]) -> None:
        difference = first_difference(first, later)
        if difference is not None:
            self.divergences.append(Divergence(key, self.calls, against, difference))

    def report(self) -> str:
        """Divergences, reads of earlier steps' tensors and what the steps leave alive, as text."""
        split = sum(len(s) > 1 for s in self.splits.values())
        lines = [f"{self.calls} steps, {len(self.graphs)} keys ({split} of several row splits), {self.replays} "
                 f"replays, {len(self.divergences)} divergences, {len(self.foreign_reads)} reads of earlier steps' "
                 "tensors"]  # fmt: skip
        lines += [str(d) for d in self.divergences]
        lines += [f"step {step} {op} reads {where}" for step, op, where in self.foreign_reads[:20]]
        lines += [f"step {step} ({what}) leaves {len(alive)} tensors alive: {alive[:6]}"
                  for step, what, alive in self.survivors if alive]  # fmt: skip
        return "\n".join(lines)


@contextmanager
def cuda_paths() -> Iterator[None]:
    """Inside the block a CPU write takes the branches it would take on CUDA where they depend on the device
    only: the fused RMSNorm op and the Decoder's own attention with the rotary op (Qwen3's: with its q/k norms,
    one op), all with their Triton kernels (interpreted), and the head loss over formed logits below
    CHUNKED_HEAD_LOGITS (so a trace covers the ops a GPU step captures)."""
    from tmem_kernels import qknorm_rope, rmsnorm, rotary
    from tmem_runtime import fused_layers, write

    floats = (torch.float32, torch.float16, torch.bfloat16)
    saved = (fused_layers.FUSED_NORM_DEVICES, rmsnorm.use_triton, rotary.use_triton, qknorm_rope.use_triton,
             write.chunked_head)  # fmt: skip
    fused_layers.FUSED_NORM_DEVICES = ("cuda", "cpu")
    rmsnorm.use_triton = lambda x: x.dtype in floats
    rotary.use_triton = lambda q, k, c, s: q.dtype in floats and len({q.dtype, k.dtype, c.dtype, s.dtype}) == 1
    qknorm_rope.use_triton = lambda *ts: ts[0].dtype in floats and len({t.dtype for t in ts}) == 1
    write.chunked_head = lambda device, k, v: k * v >= write.CHUNKED_HEAD_LOGITS
    try:
        yield
    finally:
        (fused_layers.FUSED_NORM_DEVICES, rmsnorm.use_triton, rotary.use_triton, qknorm_rope.use_triton,
         write.chunked_head) = saved  # fmt: skip


class TracedStaticWrites(StaticWrites):
    """`StaticWrites` whose buckets run every step through a `TracedSteps` (the CPU's stand-in for graphs)."""

    def __init__(self, engine: FastWeightEngine) -> None:
        super().__init__(engine, graphs=False)

    def _new(self, rows: int, width: int, cache, sessions: int, train_a: bool) -> StaticWrite:  # noqa: ANN001
        bucket = super()._new(rows, width, cache, sessions, train_a)
        ws = bucket.workspace
        bucket.graphs = TracedSteps([ws.param, ws.compute, ws.grad, ws.exp_avg, ws.exp_avg_sq, bucket.step])
        return bucket

    def steps(self) -> list[TracedSteps]:
        return [b.graphs for b in self.buckets.values()]


def _main() -> None:  # pragma: no cover - a command-line report
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--cuda-paths", action="store_true", help="take the CUDA branches (see cuda_paths)")
    args = parser.parse_args()
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from benchmarks.common import prefixed_examples as examples
    from tmem_runtime import Recipe, SessionPool, load_model

    model, _ = load_model("tiny-llama")
    recipe = Recipe(optimizer=args.optimizer, lr=args.lr, epochs=3, batch_size=4)
    sessions = {"a": examples(5, 1), "b": examples(1, 2), "c": examples(11, 3), "d": examples(3, 4)}
    for label, written in (("batched", sessions), ("one session", {"c": sessions["c"]})):
        pool = SessionPool(model, capacity=4, backend="triton")
        pool._static = traced = TracedStaticWrites(pool.engine)
        for s in written:
            pool.open(s)
        with cuda_paths() if args.cuda_paths else contextlib.nullcontext():
            for seed in (7, 8):
                pool.write_examples_many(written, recipe, seed=seed)
        for steps in traced.steps():
            print(f"{label}:", steps.report())
        pool.detach()


if __name__ == "__main__":  # pragma: no cover
    _main()
