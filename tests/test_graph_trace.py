"""Steps that share a CUDA-graph key issue identical traces (benchmarks/graph_trace.py), checked on the CPU.

A captured write step replays what the host decided at capture: ops, non-tensor arguments, launch grids and
the addresses of what it reads. `TracedSteps` stands in for `GraphedSteps` with the same calls (first step
of a key eager, the "capture" on a clone of its batch, later steps on that static batch after `copy_`) and
compares every later step's trace with its key's capture: a difference is what a replay would get wrong.
Written with the Triton backend (interpreted) and the CUDA-only branches taken (`cuda_paths`), as on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.common import prefixed_examples
from benchmarks.graph_trace import TracedStaticWrites, cuda_paths, first_difference
from tmem_runtime import Recipe, SessionPool, load_model
from tmem_runtime.write import StepBatch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton interpreter on CPU tensors")


examples = prefixed_examples


# 1 to 3 steps per epoch: the sessions with fewer cards drop out of the later steps
SESSIONS = {"a": examples(5, 1), "b": examples(1, 2), "c": examples(9, 3), "d": examples(3, 4)}


def _traced_writes(written: dict, optimizer: str, lr: float, seeds: tuple[int, ...] = (7, 8),
                   ) -> tuple[TracedStaticWrites, dict, dict]:  # fmt: skip
    # one session: the torch composition (what `auto` runs on CUDA for it; graphs take it for one session
    # only); several: the Triton kernels (the only ones whose segments stay on the device), interpreted here
    """Writes of `written` (one per seed) through traced buckets; (buckets, losses, final B per session)."""
    model, _ = load_model("tiny-llama")
    pool = SessionPool(model, capacity=4, backend="torch" if len(written) == 1 else "triton")
    pool._static = traced = TracedStaticWrites(pool.engine)
    for s in written:
        pool.open(s)
    recipe = Recipe(optimizer=optimizer, lr=lr, epochs=2, batch_size=4)
    with cuda_paths():
        losses = {seed: pool.write_examples_many(written, recipe, seed=seed) for seed in seeds}
    states = {s: pool.state_dict(s) for s in written}
    pool.detach()
    return traced, losses, states


@pytest.mark.parametrize(
    "written,optimizer,lr,keys,split_keys",
    [(SESSIONS, "adamw", 1e-2, 5, [{(1, 4), (4, 1)}]), ({"c": SESSIONS["c"]}, "sgd", 0.5, 2, [])],
    ids=["batched-adamw", "one-session-sgd"],
)
def test_steps_sharing_a_graph_key_issue_identical_traces(written, optimizer, lr, keys, split_keys):
    """Every step of a key (within a write and across the two writes) traces as its key's capture, and the
    capture as its eager first run; no step reads a tensor an earlier step made. The batched write has
    several sessions, a shared prefix and sessions dropping out (Triton kernels, which read the segments on
    the device): its steps of 5 rows split 1 + 4 and 4 + 1 between two sessions share one key (the split
    lives in the step's tensors), so the second replays the first's capture. The one-session SGD write runs
    the torch composition, as `auto` does on CUDA for one session (the Triton in-backward SGD step, which
    only an explicit backend="triton" takes there, is left to the CUDA graph tests of test_write_steps.py)."""
    traced, _, _ = _traced_writes(written, optimizer, lr)
    (steps,) = traced.steps()
    assert len(steps.graphs) == keys, steps.report()
    assert [s for s in steps.splits.values() if len(s) > 1] == split_keys, steps.splits
    assert steps.replays >= 4, steps.report()  # (the second write replays what the first captured)
    assert not steps.divergences, steps.report()
    assert not steps.foreign_reads, steps.report()


def test_the_checker_flags_steps_that_a_key_wrongly_groups(monkeypatch):
    """A key that leaves out the step's shape (here: one key for every step) groups steps of 4 and of 1 row:
    their traces differ and the checker says so (its divergences are what a replay would get wrong)."""
    monkeypatch.setattr(StepBatch, "signature", property(lambda self: ()))
    monkeypatch.setattr(StepBatch, "copy_", _copy_by_shape)
    traced, _, _ = _traced_writes({"a": SESSIONS["a"]}, "sgd", 0.5, seeds=(7,))  # (steps of 4 rows and 1)
    (steps,) = traced.steps()
    assert steps.divergences, steps.report()
    assert "differ" in steps.divergences[0].difference


def _copy_by_shape(self: StepBatch, other: StepBatch) -> None:
    """StepBatch.copy_ for batches whose tensors may differ in length: resized, as a careless cache would."""
    for dst, src in zip(self.tensors(), other.tensors()):
        dst.resize_(src.shape).copy_(src)


def test_first_difference_names_the_first_differing_entry():
    assert first_difference([("op", "a")], [("op", "a")]) is None
    assert "#1" in first_difference([("op", "a"), ("op", "b")], [("op", "a"), ("op", "c")])
    assert "lengths 1 != 2" in first_difference([("op", "a")], [("op", "a"), ("op", "b")])
