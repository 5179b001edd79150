"""Replay a write's training steps as CUDA graphs: one capture per step shape, then replays.

A write is a few identical steps (zero grad, adapted forward, backward, optimizer update) on
different rows. Each step is hundreds of small kernel launches, so on a GPU the launches, not the
arithmetic, can bound it. `GraphedSteps` runs the first step of each shape eagerly on a side stream
(a real step, which also warms up autograd, the allocator and Triton's JIT), captures the next one,
and replays that graph for every later step of the shape with the step's inputs copied into the
graph's static `StepBatch`. Nothing in a replayed step reads the device from the host. The graphs
live as long as the buffers they read (`static_write.StaticWrite`): across writes. A key is the step's
`StepBatch.signature`: its row, target and token counts and its sessions. How a batched write's rows
split among its sessions is not part of it where the kernels read the segments on the device (Triton):
the split is then in the step's tensors, which a replay copies in, and the host uses only the session
count. Keys still vary with the row and session counts and with each write's target and token counts,
so at most MAX_GRAPHS are kept per bucket, the least recently replayed dropped first. The keys a long run
meets level off: a CPU count of planned batched writes of 4 sessions of 1 to 12 cards (keyed by the session
count: 212 keys in the largest bucket after 300 writes keyed by the splits) found 59, 70 and 77 keys in the
largest bucket after 120, 300 and 600 writes, 6 of them new in the last 100 (/work/notes/graph_keys_long.py;
tests/test_write_steps.py counts 120 writes). MAX_GRAPHS holds them all, so such a run captures each key
once; the graphs share one memory pool per bucket (a graph keeps only its static step batch and loss).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch

from tmem_runtime.write import StepBatch

StepFn = Callable[[StepBatch], torch.Tensor]
MAX_GRAPHS = 128


class GraphedSteps:
    """Calls with a key replay that key's graph of one whole training step.

    step_fn(batch) -> loss [] runs the step; it is called (eagerly, then captured) only the first time
    a key is seen. Steps that share a key must have the same StepBatch signature (then the host decides
    nothing differently for them: benchmarks/graph_trace.py checks it on the CPU) and read the same
    tensors otherwise (the graph bakes in their addresses). Returns each step's loss as a fresh
    device tensor. Keeps at most `max_graphs` graphs (default MAX_GRAPHS; the least recently replayed go first).
    """

    def __init__(self, max_graphs: int | None = None) -> None:
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()  # warm-up and capture on one stream (library handles are per stream)
        self.graphs: OrderedDict[Hashable, tuple[torch.cuda.CUDAGraph, StepBatch, torch.Tensor]] = OrderedDict()
        self.max_graphs = MAX_GRAPHS if max_graphs is None else max_graphs

    def __call__(self, key: Hashable, batch: StepBatch, step_fn: StepFn) -> torch.Tensor:
        entry = self.graphs.get(key)
        if entry is not None:
            self.graphs.move_to_end(key)
            graph, static, loss = entry
            static.copy_(batch)
            graph.replay()
            return loss.clone()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            loss = step_fn(batch).clone()
        torch.cuda.current_stream().wait_stream(self.stream)
        static = batch.clone()
        graph = torch.cuda.CUDAGraph()
        # records and runs nothing: the eager step above was this shape's real first step
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            static_loss = step_fn(static)
        self.graphs[key] = (graph, static, static_loss)
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)  # (its memory stays in the pool, for the next capture)
        return loss
