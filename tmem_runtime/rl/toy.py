"""A toy environment for the GRPO machinery: cards that name a planted fact earn 1.

Token level, for tiny random models (no tokenizer): a context is a row of distractor tokens with a
few planted facts, each a token of FACT_TOKENS right after the marker MARK; the prompt ends with SEP.
The policy writes up to `card_tokens` cards (one token each; EOS ends the set). A sample's reward
is the share of its cards that name one of this context's planted facts; a sample with no card is
malformed (reward 0, counted). Contexts are seeded by their index (+ `offset`: held-out contexts
use another range), so any rank builds the same ones.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from tmem_runtime.rl.rollout import Rollout
from tmem_runtime.rl.sampling import rollout_seed, sample_completions

FACT_TOKENS = tuple(range(10, 26))
DISTRACTOR_TOKENS = tuple(range(100, 500))
BOS, EOS, MARK, SEP = 1, 2, 5, 6


class PlantedFactEnv:
    """num_tasks contexts (indices offset .. offset + num_tasks - 1) of `context_len` distractors and
    `facts` planted facts; cards of up to `card_tokens` tokens sampled at `temperature`."""

    def __init__(self, model: torch.nn.Module, num_tasks: int = 64, facts: int = 3, context_len: int = 16,
                 card_tokens: int = 4, temperature: float = 1.0, offset: int = 0) -> None:
        self.model, self.num_tasks, self.facts, self.context_len = model, num_tasks, facts, context_len
        self.card_tokens, self.temperature, self.offset = card_tokens, temperature, offset

    def context(self, task: int) -> tuple[list[int], set[int]]:
        """(prompt ids, planted fact tokens) of a task."""
        rng = random.Random(f"planted:{self.offset + task}")
        ids = [rng.choice(DISTRACTOR_TOKENS) for _ in range(self.context_len)]
        planted = rng.sample(FACT_TOKENS, self.facts)
        for fact in planted:
            at = rng.randrange(len(ids) + 1)
            ids[at:at] = [MARK, fact]
        return [BOS, *ids, SEP], set(planted)

    def score(self, tokens: Sequence[int], planted: set[int]) -> tuple[float, dict[str, float]]:
        cards = [t for t in tokens if t != EOS]
        hits = sum(t in planted for t in cards)
        counts = {"samples": 1, "empty": float(not cards), "cards": len(cards), "hits": hits}
        return (hits / len(cards) if cards else 0.0), counts

    def rollouts(self, tasks: Sequence[int], members: Sequence[tuple[int, int]], seed: int) -> list[Rollout]:
        contexts = [self.context(tasks[b]) for b, _ in members]
        seeds = [rollout_seed(seed, b, tasks[b], g) for b, g in members]
        samples = sample_completions(self.model, [c for c, _ in contexts], seeds, self.temperature,
                                     self.card_tokens, [EOS])
        out = []
        for (b, g), (_, planted), s in zip(members, contexts, samples):
            reward, counts = self.score(s.tokens, planted)
            counts["broken"] = float(s.broken)
            out.append(Rollout(f"{b}:{tasks[b]}", g, [s], 0.0 if s.broken else reward, counts))
        return out

    def metrics(self, counts: dict[str, float]) -> dict[str, float]:
        return {"valid_card_rate": counts.get("hits", 0) / max(counts.get("cards", 0), 1),
                "malformed": counts.get("empty", 0) / max(counts.get("samples", 0), 1)}

    def mean_reward(self, samples: int = 8, seed: int = 12345) -> float:
        """Expected reward over every task, `samples` seeded samples each (an evaluation, no training)."""
        tasks = list(range(self.num_tasks))
        with torch.no_grad():
            rollouts = self.rollouts(tasks, [(b, g) for b in range(len(tasks)) for g in range(samples)], seed)
        return sum(r.reward for r in rollouts) / len(rollouts)
