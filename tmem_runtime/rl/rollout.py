"""What an environment hands the GRPO trainer: rollouts, one per sampled action, grouped.

A rollout is one member's action for one group (the G actions sampled for the same situation: a
memory write of one episode's context, a toy context): the sampled segments (a per-turn flashcard
set is several prompts, each with its sampled card), its reward, and counters the trainer sums over
the whole batch for the log (cards kept, dropped by reason, malformed samples, ...).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tmem_runtime.rl.sampling import Completion


@dataclass
class Rollout:
    """group: the group's key (unique in the step, the same on every rank). member: 0..G-1.
    segments: the sampled completions that make up the action. reward: its outcome reward.
    counts: counters summed over the batch for the log."""

    group: str
    member: int
    segments: list[Completion]
    reward: float
    counts: dict[str, float] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        """Written tokens: what the policy gradient flows through."""
        return sum(len(s.tokens) for s in self.segments)


def sum_counts(counts: Iterable[dict[str, float]]) -> dict[str, float]:
    """Rollouts' counters summed key by key (a key missing from a rollout counts 0)."""
    total: dict[str, float] = {}
    for c in counts:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


class Environment(Protocol):
    """Tasks indexed 0..num_tasks-1 (training conversations or contexts); `rollouts` samples the actions
    of the given members ((position in `tasks`, member index) pairs: this rank's share) and scores them.
    Every sample is seeded by (seed, task, ..., member), so any rank produces the same rollout. `temperature`:
    what its samples are drawn at (the trainer's log-probabilities must be of the same distribution)."""

    num_tasks: int
    temperature: float

    def rollouts(self, tasks: Sequence[int], members: Sequence[tuple[int, int]], seed: int) -> list[Rollout]: ...
