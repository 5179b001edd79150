"""Static write buffers: what a graphed write step reads, kept from one write to the next.

A CUDA graph bakes in the address of every tensor its step reads: the trunk cache, the workspace (B,
its gradient, the AdamW moments), the step counter. Captured on a write's own fresh tensors, a graph
dies with the write, and every write pays a capture (a sync, the recording, an instantiation) to
replay it two or three times. So a graphed write copies its trunk cache and its sessions' rows into
buffers kept per shape bucket, and its steps replay the graphs that earlier writes of the bucket
captured:

    key = (cache rows N and suffix width S rounded up to ROW_BUCKET / WIDTH_BUCKET, the shared prefix
           length P, the sessions written W, whether A trains, the recipe's optimizer, lr and weight
           decay and whether SGD runs inside the backward: they are constants in the captured kernels)

The padding is inert: rows past N are never selected, tokens past a row's length are masked in
attention and carry no target, so they add exactly zero to every gradient; the adapted MLPs run the
real tokens only, padded to a fixed count (`write.plan_steps`) by repeating one padding position.
Within a bucket, a step's graph is keyed by its `StepBatch.signature` (`cuda_graphs`): with the Triton
kernels, which read the segments on the device, steps that split their rows differently among the
sessions share one graph.
At most MAX_BUCKETS buckets are kept (least recently used first out), each with its own CUDA graph
memory pool.
A graph also bakes in the model's own weights' addresses: when any of the model's parameters or
buffers lives elsewhere than at the last write (the model cast or moved and back, a weight replaced,
`load_state_dict(assign=True)`), every bucket is dropped and the next write captures anew. Buffers are
made outside inference mode, whatever the caller's (a write may be called inside it).
Off CUDA the same buffers run eager steps (how the CPU tests prove this path).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from tmem_runtime.engine import FastWeightEngine
from tmem_runtime.recipes import Recipe
from tmem_runtime.tensor_stamp import tensors_stamp
from tmem_runtime.trainer import Workspace
from tmem_runtime.write import IGNORE_INDEX, StepBatch, TrunkCache, round_up

ROW_BUCKET = 16
WIDTH_BUCKET = 32
MAX_BUCKETS = 8


@dataclass
class StaticWrite:
    """One bucket's buffers: the trunk cache [N_b, S_b, H] (+ prefix [1, P, H]), a workspace of W
    sessions, AdamW's step counter [] and, on CUDA, the graphs captured on them."""

    hidden: torch.Tensor
    prefix_hidden: torch.Tensor | None
    workspace: Workspace
    step: torch.Tensor
    graphs: object | None  # cuda_graphs.GraphedSteps on CUDA

    def load(self, cache: TrunkCache, slots: Sequence[int]) -> TrunkCache:
        """Copy a write's trunk cache and its sessions' rows in (zeros past the cache, fresh moments,
        step 0). Returns the cache the steps read: these buffers, with `cache`'s host-side lengths and
        its labels padded to the bucket's width."""
        n, s = cache.hidden.shape[:2]
        self.hidden.zero_()
        self.hidden[:n, :s].copy_(cache.hidden)
        if self.prefix_hidden is not None:
            self.prefix_hidden.copy_(cache.prefix_hidden)
        self.workspace.load(slots)
        self.step.zero_()
        labels = cache.labels.new_full((n, cache.prefix_len + self.hidden.shape[1]), IGNORE_INDEX)
        labels[:, : cache.labels.shape[1]] = cache.labels
        return replace(cache, prefix_hidden=self.prefix_hidden, hidden=self.hidden, labels=labels)

    def run_step(self, plan: StepBatch, step_fn: Callable[[StepBatch, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One step, counted on the device: a replay of its signature's graph where there is one."""
        if self.graphs is None:
            return step_fn(plan, self.step)
        return self.graphs(plan.signature, plan, lambda batch: step_fn(batch, self.step))


class StaticWrites:
    """The buckets of one engine (see the module docstring). `graphs`: capture CUDA graphs (CUDA only).

    Construction reads nothing of the model (a pool builds one in `__setstate__`, while copy.deepcopy may
    still be rebuilding the model): the weights' stamp is taken at the first `get`."""

    def __init__(self, engine: FastWeightEngine, graphs: bool = True) -> None:
        self.engine = engine
        self.graphs = graphs and engine.device.type == "cuda"
        self.buckets: OrderedDict[tuple, StaticWrite] = OrderedDict()
        self._stamp: tuple | None = None  # where the weights lived at the last `get`; None: no get yet

    def _weights_stamp(self) -> tuple:
        """Where the model's parameters and buffers live now (what a captured graph reads)."""
        model = self.engine.model
        return tensors_stamp((*model.parameters(), *model.buffers()), values=False)

    def get(self, cache: TrunkCache, sessions: int, train_a: bool, recipe: Recipe, sgd_lr: float | None) -> StaticWrite:
        """The bucket for a write of `sessions` sessions over `cache` (made, and the oldest dropped, if new).
        Every bucket is dropped first if a model weight moved since the last call (none is kept before the
        first)."""
        stamp = self._weights_stamp()
        if stamp != self._stamp:
            self.buckets.clear()
            self._stamp = stamp
        n, s = cache.hidden.shape[:2]
        rows, width = round_up(n, ROW_BUCKET), round_up(s, WIDTH_BUCKET)
        key = (rows, width, cache.prefix_len, sessions, train_a, recipe.optimizer, recipe.lr, recipe.weight_decay,
               sgd_lr)  # fmt: skip
        found = self.buckets.pop(key, None)
        if found is None:
            with torch.inference_mode(False):
                found = self._new(rows, width, cache, sessions, train_a)
            while len(self.buckets) >= MAX_BUCKETS:
                self.buckets.popitem(last=False)
        self.buckets[key] = found
        return found

    def _new(self, rows: int, width: int, cache: TrunkCache, sessions: int, train_a: bool) -> StaticWrite:
        h = cache.hidden
        prefix = None if cache.prefix_hidden is None else torch.zeros_like(cache.prefix_hidden)
        workspace = Workspace(self.engine, range(sessions), train_a)
        step = torch.zeros((), dtype=torch.float32, device=h.device)
        graphs = None
        if self.graphs:
            from tmem_runtime.cuda_graphs import GraphedSteps

            graphs = GraphedSteps()
        return StaticWrite(h.new_zeros(rows, width, h.shape[-1]), prefix, workspace, step, graphs)
