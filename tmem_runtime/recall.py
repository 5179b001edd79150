"""Recall of written facts: write a fact set into fast weights, ask each question bare, count the hits.

One scorer for the demo, the SmolLM2 recall test and the recipe study (benchmarks/recall_study.py):
each question is asked alone as one chat turn (no context), decoded greedily, and a fact counts as
recalled when the answer contains the expected one, normalised by `recalled`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tmem_runtime.chat import ask
from tmem_runtime.fact_sets import Fact
from tmem_runtime.fast_weights import FastWeights, StepCallback
from tmem_runtime.recipes import Recipe


def recalled(answer: str, expected: str) -> bool:
    """Whether a generated answer contains the expected one (case-insensitive, leading article dropped)."""
    key = expected.lower().removeprefix("the ").removeprefix("a ").strip()
    return key in answer.lower()


def ask_facts(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, facts: Sequence[Fact], paraphrase: bool = False
) -> tuple[list[str], list[bool]]:
    """Greedy answers to the facts' questions (or paraphrases) and whether each recalls its fact.

    Facts without a paraphrase are skipped when `paraphrase` is True.
    """
    asked = [f for f in facts if not paraphrase or f.paraphrase]
    if not asked:
        return [], []
    answers = ask(model, tokenizer, [f.paraphrase if paraphrase else f.question for f in asked])
    return answers, [recalled(a, f.answer) for a, f in zip(answers, asked)]


@dataclass
class RecallRun:
    """One write of a fact set and the answers after it.

    losses: per-step write losses. write_seconds / write_cpu_seconds: the write's wall and CPU time.
    answers/hits: the written questions. paraphrase_*: the rephrased questions (empty when the set has none).
    """

    losses: list[float]
    write_seconds: float
    answers: list[str]
    hits: list[bool]
    paraphrase_answers: list[str] = field(default_factory=list)
    paraphrase_hits: list[bool] = field(default_factory=list)
    write_cpu_seconds: float = 0.0

    @property
    def recalled(self) -> int:
        return sum(self.hits)


def write_and_recall(
    fast_weights: FastWeights,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[Fact],
    recipe: str | Recipe = "default",
    seed: int = 0,
    paraphrases: bool = True,
    on_step: StepCallback | None = None,
    train_a: bool = False,
) -> RecallRun:
    """Write `facts` (write_qa, loss on answers) on top of the adapter's state, then ask each question.

    The adapter keeps the write; call `fast_weights.reset()` first for a write from a fresh state.
    """
    start, cpu = time.perf_counter(), time.process_time()
    pairs = [(f.question, f.answer) for f in facts]
    losses = fast_weights.write_qa(tokenizer, pairs, recipe, seed, on_step=on_step, train_a=train_a)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    answers, hits = ask_facts(fast_weights.model, tokenizer, facts)
    run = RecallRun(losses, seconds, answers, hits, write_cpu_seconds=cpu_seconds)
    if paraphrases:
        run.paraphrase_answers, run.paraphrase_hits = ask_facts(fast_weights.model, tokenizer, facts, paraphrase=True)
    return run
