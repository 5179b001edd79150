"""Capacity bookkeeping: facts written in fixed-size writes, replay, and recall of each write over time.

A capacity run writes a shuffled list of facts `size` at a time (write w holds facts
w*size .. w*size + size - 1), each write with a replay of earlier facts (none, a seeded sample of 32
as the agent does, or all), and after every write asks every fact written so far. `recall[w][k]` is
then the recall of write k's facts after write w (k <= w).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tmem_runtime.agent.channels import replay_sample

REPLAY_MODES = ("none", "sample32", "all")


def write_plan(n_facts: int, size: int) -> list[list[int]]:
    """Fact indices of each write: consecutive chunks of `size`; a last partial chunk is dropped."""
    if size < 1:
        raise ValueError(f"write size must be >= 1, got {size}")
    return [list(range(start, start + size)) for start in range(0, n_facts - size + 1, size)]


def replay_for(mode: str, earlier: Sequence[int], write_index: int, seed: int) -> list[int]:
    """Earlier facts trained again with write `write_index`: none, all, or a seeded sample of up to 32
    (the agent's `--replay 32`, seeded the same way: Random(seed * 1000 + write index))."""
    if mode == "none":
        return []
    if mode == "all":
        return list(earlier)
    if mode == "sample32":
        return replay_sample(list(earlier), 32, seed, write_index)
    raise ValueError(f"replay mode must be one of {REPLAY_MODES}, got {mode!r}")


def recall_by_write(hits: dict[int, bool], plan: Sequence[Sequence[int]], upto: int) -> list[float]:
    """Recall (0..1) of each write 0..upto's facts, from `hits` (fact index -> recalled) after write `upto`."""
    return [sum(hits[i] for i in plan[k]) / len(plan[k]) for k in range(upto + 1)]


@dataclass(frozen=True)
class Capacity:
    """When recall of the first write first fell below the threshold.

    held: facts written while the first write was still at or above it (0 if the first write itself
    was below). fell_at: facts written when it first fell below, None if it never did (then `held` is
    every fact written: a lower bound, `censored`).
    """

    held: int
    fell_at: int | None

    @property
    def censored(self) -> bool:
        return self.fell_at is None

    def fmt(self) -> str:
        return f">= {self.held} (never fell)" if self.censored else f"{self.held} (below at {self.fell_at})"


def first_write_curve(recall: Sequence[Sequence[float]]) -> list[float]:
    """Recall of the first write after each write: recall[w][0] for w = 0, 1, ..."""
    return [row[0] for row in recall]


def capacity(recall: Sequence[Sequence[float]], size: int, threshold: float = 0.5) -> Capacity:
    """Capacity from a run's recall table (recall[w][k], see the module docstring) and its write size."""
    for w, value in enumerate(first_write_curve(recall)):
        if value < threshold:
            return Capacity(held=size * w, fell_at=size * (w + 1))
    return Capacity(held=size * len(recall), fell_at=None)
