"""Host synchronisations a write would do on CUDA, counted on the CPU.

    python -m benchmarks.host_syncs                         # tiny-qwen3, 16 cards x 32 tokens, backend torch
    python -m benchmarks.host_syncs --cases 32x1024 --sessions 4 --stacks

Every read of device data by the host makes it wait for the device's queue to drain: `.item()` /
`int()` / `bool()` of a tensor (`aten._local_scalar_dense`), `nonzero`, boolean-mask indexing,
`repeat_interleave` without `output_size`, `unique`, `equal`, `bincount`, `.tolist()` / `.cpu()` of a
device tensor; and so does every host-to-device copy from pageable memory that is not `non_blocking`
(PyTorch's blocking CPU->CUDA copy is `cudaMemcpyAsync` + a stream synchronisation), `torch.tensor(list,
device=cuda)` included.

On the CPU there is one device, so `HostSyncCensus` keeps track of which tensors WOULD live on the device:
the model's and the fast-weight store's tensors, whatever an op computes from them, factories called with
an explicit `device=` (as `device=x.device` is written for device tensors), and `.to(device)` /
`torch.tensor(..., device=)` of host data (these are the host-to-device copies; `.cpu()`, `.to("cpu")` and
`.tolist()` of device data are the device-to-host reads). An op that reads device data on the host is one
synchronisation, recorded with the innermost frame in tmem_runtime / tmem_kernels / transformers (and the
innermost tmem frame that led there) and the write's phase (the runtime's `record_function` ranges:
trunk, load, steps, check, commit). Heuristic where code calls a factory with `device=` for host data, or
`.to(torch.device("cpu"))` meaning the host: `mismatch` rows (an op mixing host and device tensors that
CUDA would refuse) flag such places.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

# ops that read device data on the host whenever an input lives on the device
READS = {
    "aten._local_scalar_dense": "item",  # .item(), int(), float(), bool(), `if t:`
    "aten.nonzero": "nonzero",
    "aten.masked_select": "masked_select",
    "aten.unique": "unique",
    "aten._unique": "unique",
    "aten._unique2": "unique",
    "aten.unique_consecutive": "unique",
    "aten.unique_dim": "unique",
    "aten.equal": "equal",
    "aten.is_nonzero": "is_nonzero",
    "aten.bincount": "bincount",  # (its output size is the max value)
    "aten.histc": "histc",
    "aten.masked_scatter": "masked_scatter",
    "aten.masked_scatter_": "masked_scatter",
}
FACTORIES = ("arange", "zeros", "ones", "full", "empty", "rand", "randn", "randint", "linspace", "eye")
MIXED_OK = ("aten.copy_", "aten.copy", "aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_",
            "aten.set_")  # ops that take host and device tensors together (copies; indices, checked apart)  # fmt: skip
PACKAGES = ("tmem_runtime", "tmem_kernels", "transformers")
PHASE_MODULES = ("tmem_runtime.pool", "tmem_runtime.trainer")


@dataclass
class Sync:
    """One host synchronisation: its kind, the aten op or Python call, the write phase and where."""

    kind: str
    op: str
    phase: str
    site: str
    via: str


@dataclass
class Census:
    syncs: list[Sync] = field(default_factory=list)
    mismatches: list[Sync] = field(default_factory=list)

    def by_site(self) -> Counter[tuple[str, str, str, str]]:
        return Counter((s.phase, s.kind, s.site, s.via) for s in self.syncs)

    def by_phase(self) -> Counter[str]:
        return Counter(s.phase for s in self.syncs)

    def lines(self) -> list[str]:
        out = [f"  {len(self.syncs)} host syncs: " + ", ".join(f"{p} {n}" for p, n in sorted(self.by_phase().items()))]
        for (phase, kind, site, via), n in sorted(self.by_site().items()):
            out.append(f"    {n:4d}  {phase:8s} {kind:14s} {site}" + (f"  (via {via})" if via and via != site else ""))
        mismatches = Counter((s.phase, s.kind, s.site, s.via) for s in self.mismatches)
        for (phase, kind, site, via), n in sorted(mismatches.items()):
            out.append(f"    MISMATCH {n:3d} {phase:8s} {kind:14s} {site}  (via {via})")
        return out


def _where() -> tuple[str, str]:
    """(innermost frame in PACKAGES, innermost tmem frame) as 'package/file.py:line name'."""
    site = via = ""
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace(os.sep, "/")
        for pkg in PACKAGES:
            if f"/{pkg}/" in path:
                text = f"{pkg}/{path.rsplit(f'/{pkg}/', 1)[1]}:{frame.lineno} {frame.name}"
                site = site or text
                if pkg != "transformers" and not via:
                    via = text
        if site and via:
            break
    return site or "?", via


class HostSyncCensus(TorchDispatchMode):
    """Counts the host syncs of the code run inside it (see the module docstring). `device_objects`: what
    holds the device's tensors before the block (models, stores): every tensor reachable from them."""

    def __init__(self, *device_objects: object) -> None:
        super().__init__()
        self.device = WeakIdKeyDictionary()
        self.census = Census()
        self.phases: list[str] = []
        self._patches: contextlib.ExitStack | None = None
        for obj in device_objects:
            self._seed(obj, set())

    # ------------------------------------------------------------ what lives on the device
    def _seed(self, obj: object, seen: set[int]) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            self.device[obj] = True
        elif isinstance(obj, torch.nn.Module):
            for t in (*obj.parameters(), *obj.buffers()):
                self.device[t] = True
            for v in vars(obj).values():
                self._seed_plain(v, seen)
        else:
            self._seed_plain(obj, seen)

    def _seed_plain(self, obj: object, seen: set[int]) -> None:
        """Tensors in containers and in tmem objects (not modules' submodules: those are seeded whole)."""
        if isinstance(obj, (torch.Tensor, torch.nn.Module)):
            return self._seed(obj, seen)
        if isinstance(obj, dict):
            items = list(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            items = list(obj)
        elif type(obj).__module__.startswith("tmem_") and hasattr(obj, "__dict__"):
            # host-side bookkeeping of a binding (its segments are CPU tensors on every device)
            binding = type(obj).__name__ == "Binding"
            items = [v for k, v in vars(obj).items() if not (binding and k in ("indptr", "slots"))]
        else:
            return
        for v in items:
            self._seed(v, seen)

    def on_device(self, t: object) -> bool:
        return isinstance(t, torch.Tensor) and t in self.device

    def _mark(self, out: object, device: bool) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                if device:
                    self.device[t] = True
                else:
                    self.device.pop(t, None)

    def _record(self, kind: str, op: str, mismatch: bool = False) -> None:
        site, via = _where()
        sync = Sync(kind, op, self.phases[-1] if self.phases else "-", site, via)
        (self.census.mismatches if mismatch else self.census.syncs).append(sync)

    # ------------------------------------------------------------ aten ops
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        dev = [self.on_device(t) for t in flat]
        name = func._schema.name.replace("::", ".")
        if any(dev):
            if name in READS:
                self._record(READS[name], name)
            elif name in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"):
                indices = args[1]
                if any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices):
                    self._record("mask-index", name)  # a nonzero inside
                elif any(i is not None and not self.on_device(i) and i.numel() > 1 for i in indices):
                    self._record("h2d-implicit", name)  # CPU indices into a CUDA tensor: copied blocking
            elif name == "aten.repeat_interleave" and kwargs.get("output_size") is None and len(args) and flat:
                self._record("repeat_interleave", name)
            elif name in ("aten.copy_", "aten.copy"):
                dst, src = args[0], args[1]
                if self.on_device(dst) and not self.on_device(src) and src.dim() > 0:
                    nb = bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking", False))
                    if not nb:
                        self._record("h2d-blocking", name)
                elif not self.on_device(dst) and self.on_device(src):
                    self._record("d2h", name)
            if not all(dev) and not name.startswith("mkldnn.") and name not in MIXED_OK:  # (oneDNN: CPU only)
                host = [t for t, d in zip(flat, dev) if not d and t.dim() > 0]
                if host:
                    self._record("mismatch", name, mismatch=True)
        out = func(*args, **kwargs)
        if name in ("aten.copy_", "aten.set_") or (name.endswith("_") and flat):
            self._mark(out, dev[0] if dev else False)  # in place: the destination stays where it is
        else:
            self._mark(out, any(dev))
        return out

    # ------------------------------------------------------------ Python-level calls invisible to aten
    def __enter__(self):
        self._patches = stack = contextlib.ExitStack()
        census = self

        def patch(owner: object, name: str, make: Callable[[Callable], Callable]) -> None:
            original = getattr(owner, name)
            setattr(owner, name, functools.wraps(original)(make(original)))
            stack.callback(setattr, owner, name, original)

        def moved(src: torch.Tensor, out: torch.Tensor, device: bool) -> torch.Tensor:
            """`out`, the result of moving `src`, marked on the device or the host (a copy if it is `src`)."""
            out = out.clone() if out is src else out
            census._mark(out, device)
            return out

        def to(original):
            def wrapper(self, *args, **kwargs):
                target, nb = _to_target(args, kwargs)
                out = original(self, *args, **kwargs)
                if target is None:
                    return out
                device = target if isinstance(target, bool) else census.on_device(target)
                if device and not census.on_device(self):
                    if not nb:
                        census._record("h2d-blocking", "Tensor.to")
                    return moved(self, out, True)
                if not device and census.on_device(self):
                    census._record("d2h", "Tensor.to")
                    return moved(self, out, False)
                return out

            return wrapper

        def cpu(original):
            def wrapper(self, *args, **kwargs):
                out = original(self, *args, **kwargs)
                if census.on_device(self):
                    census._record("d2h", "Tensor.cpu")
                    return moved(self, out, False)
                return out

            return wrapper

        def reads(label):
            def make(original):
                def wrapper(self, *args, **kwargs):
                    if census.on_device(self):
                        census._record("d2h", label)
                    return original(self, *args, **kwargs)

                return wrapper

            return make

        def factory(original):
            def wrapper(*args, **kwargs):
                out = original(*args, **kwargs)
                target = kwargs.get("device")
                if target is not None and not (isinstance(target, str) and target == "cpu"):
                    census._mark(out, True)
                return out

            return wrapper

        def from_data(original):
            def wrapper(data, *args, **kwargs):
                target = kwargs.get("device")
                out = original(data, *args, **kwargs)
                if target is None or (isinstance(target, str) and target == "cpu"):
                    return out
                if isinstance(data, torch.Tensor) and census.on_device(data):
                    return out
                census._record("h2d-blocking", original.__name__)  # pageable data, a blocking copy
                out = out.clone() if isinstance(data, torch.Tensor) and out is data else out
                census._mark(out, True)
                return out

            return wrapper

        patch(torch.Tensor, "to", to)
        patch(torch.Tensor, "cpu", cpu)
        for method in ("tolist", "numpy", "__array__"):
            patch(torch.Tensor, method, reads(f"Tensor.{method}"))
        for fn in FACTORIES:
            patch(torch, fn, factory)
        for fn in ("tensor", "as_tensor"):
            patch(torch, fn, from_data)

        import importlib

        for module in PHASE_MODULES:
            patch(importlib.import_module(module), "record_function", self._phase)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._patches.close()

    def _phase(self, original):
        census = self

        @contextlib.contextmanager
        def wrapper(name: str, *args, **kwargs) -> Iterator[None]:
            census.phases.append(name.rsplit(".", 1)[-1])
            try:
                with original(name, *args, **kwargs):
                    yield
            finally:
                census.phases.pop()

        return wrapper


def _to_target(args: tuple, kwargs: dict) -> tuple[object, bool]:
    """What `Tensor.to(*args, **kwargs)` moves to: True (the device), False (the host), a tensor (its
    place), or None (a dtype change only); and its non_blocking flag."""
    nb = bool(kwargs.get("non_blocking", False))
    target = kwargs.get("device")
    rest = list(args)
    if rest and isinstance(rest[0], (torch.device, str, int)) and not isinstance(rest[0], bool):
        target = rest.pop(0)
    elif rest and isinstance(rest[0], torch.Tensor):
        target = rest.pop(0)
        nb = bool(rest[0]) if rest and isinstance(rest[0], bool) else nb
        return target, nb
    if rest and isinstance(rest[0], torch.dtype):
        rest.pop(0)
    if rest and isinstance(rest[0], bool):
        nb = rest[0]
    if target is None:
        return None, nb
    if isinstance(target, str):
        return target.split(":")[0] != "cpu", nb
    return True, nb  # a torch.device object: the code's compute device (see the module docstring)


def census_of(run: Callable[[], object], *device_objects: object) -> Census:
    """The host syncs of `run()` (see HostSyncCensus)."""
    with HostSyncCensus(*device_objects) as mode:
        run()
    return mode.census


def main(argv: list[str] | None = None) -> None:
    from tmem_runtime.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-qwen3")
    parser.add_argument("--cases", nargs="+", default=["16x512"], help="CxN: C cards, N tokens in all")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--sessions", type=int, default=3, help="sessions of the batched pool write")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = load_model(args.model, dtype=torch.float32, device=torch.device("cpu"))[0]
    print(f"host syncs of one write (benchmarks/host_syncs.py), {args.model}, on the CPU")
    for case in args.cases:
        cards, tokens = (int(x) for x in case.split("x"))
        for line in census_lines(model, cards, tokens, args.backend, args.sessions):
            print(line, flush=True)


def census_lines(model: torch.nn.Module, cards: int, tokens: int, backend: str, sessions: int) -> list[str]:
    """The census of a warm FastWeights write and of a warm batched write of `sessions` pool sessions."""
    from benchmarks.common import flashcard_examples
    from tmem_runtime import FastWeights, SessionPool
    from tmem_runtime.recipes import RECIPES

    recipe, vocab = RECIPES["paper"], model.config.vocab_size
    fw = FastWeights(model, backend=backend)
    fw.write_examples(flashcard_examples(tokens, vocab, cards, 24, 0), recipe)  # warm-up (buckets made)
    examples = flashcard_examples(tokens, vocab, cards, 24, 1)
    census = census_of(lambda: fw.write_examples(examples, recipe), model, fw.store)
    lines = [f"FastWeights.write_examples, {cards} cards x {tokens // cards} tokens, backend {backend} "
             f"(resolved {fw.backend}):", *census.lines()]  # fmt: skip
    fw.detach()
    pool = SessionPool(model, capacity=sessions, backend=backend)
    names = [f"s{i}" for i in range(sessions)]
    for s in names:
        pool.open(s)
    pool.write_examples_many({s: flashcard_examples(tokens, vocab, cards, 24, i) for i, s in enumerate(names)}, recipe)
    batch = {s: flashcard_examples(tokens, vocab, cards, 24, 100 + i) for i, s in enumerate(names)}
    census = census_of(lambda: pool.write_examples_many(batch, recipe), model, pool)
    lines += [f"SessionPool.write_examples_many, {sessions} sessions x {cards} cards x {tokens // cards} tokens, "
              f"backend {backend} (resolved {pool.engine.backend}):", *census.lines()]  # fmt: skip
    pool.detach()
    return lines


if __name__ == "__main__":
    main()
