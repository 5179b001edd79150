"""What a memory write trains on: `qa` flashcards, the model's `summary`, or the raw text (`ntp`).

All three go through the runtime's one trainer (`FastWeights.write_qa` / `write_text`) with the
same recipe; only the training material differs (the paper's write-format ablation).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

from tmem_runtime.agent.flashcards import (
    FLASHCARD_MODES,
    FLASHCARD_PREFILL,
    TURN_PREFILL,
    dated_turns,
    flashcard_messages,
    parse_flashcards,
    turn_flashcard_messages,
)
from tmem_runtime.agent.generation import Generator
from tmem_runtime.agent.summary import write_summary
from tmem_runtime.recipes import Recipe

WRITE_FORMATS = ("qa", "summary", "ntp")
# The agent's write recipe on small models: AdamW at lr 3e-3, 10 epochs (1e-2 makes every answer the
# last write's on SmolLM2-135M). The runtime's "default" is the same with 15 epochs, chosen for recall of
# one write (benchmarks/recall_study.py); the agent's replayed writes were not re-tuned with it (the demo
# scored the same F1 with either: benchmarks/RESULTS.md).
AGENT_RECIPE = Recipe(optimizer="adamw", lr=3e-3, epochs=10, batch_size=16)


def resolve_recipe(name: str) -> str | Recipe:
    """"agent" -> AGENT_RECIPE; any other name is passed to the runtime ("default", "paper")."""
    return AGENT_RECIPE if name == "agent" else name


@dataclass
class WriteRecord:
    """One write into the fast weights: what the model wrote, what was trained on, the step losses."""

    format: str
    raw: str = ""
    pairs: list[tuple[str, str]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    replayed: int = 0
    generate_s: float = 0.0
    train_s: float = 0.0

    @property
    def n_written(self) -> int:
        return len(self.pairs) if self.format == "qa" else len(self.texts)

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())


@contextmanager
def fast_weights_off(fast_weights) -> Iterator[None]:
    """Run a block on the base model: snapshot the fast weights, reset them (B = 0), restore after."""
    saved = fast_weights.state_dict()
    fast_weights.reset()
    try:
        yield
    finally:
        fast_weights.load_state_dict(saved)


def write_flashcards(
    generator: Generator,
    context: str,
    max_new_tokens: int = 192,
    writer: Callable[[str], str] | None = None,
    mode: str = "per-turn",
) -> tuple[str, list, dict]:
    """Memory-writing mode: (raw text, valid pairs, drops by reason) for `context`.

    mode: "per-turn" (one card per turn, batched, at most 48 new tokens each) or "array" (one JSON
    array for the whole context, `max_new_tokens`). writer: who writes the flashcard text for a
    context (default: the model); whatever it returns goes through the salvaging parser.
    """
    if mode not in FLASHCARD_MODES:
        raise ValueError(f"flashcard mode must be one of {FLASHCARD_MODES}, got {mode!r}")
    if writer is not None:
        raw = writer(context)
    elif mode == "array":
        prompt = generator.chat_prompt(flashcard_messages(context), prefill=FLASHCARD_PREFILL)
        raw = FLASHCARD_PREFILL + generator.generate([prompt], max_new_tokens)[0]
    else:
        turns = dated_turns(context)
        prompts = [generator.chat_prompt(turn_flashcard_messages(h, t), prefill=TURN_PREFILL) for h, t in turns]
        cards = generator.generate(prompts, min(max_new_tokens, 48), batch_size=16)
        replies = [TURN_PREFILL + c.split("\n")[0] for c in cards]
        raw = "\n".join(replies)
    parsed = parse_flashcards(replies if writer is None and mode == "per-turn" else raw, context=context)
    return raw, parsed.pairs, dict(parsed.dropped)


def write_to_weights(
    fast_weights,
    generator: Generator,
    context: str,
    write_format: str = "qa",
    recipe: str | Recipe = "agent",
    seed: int = 0,
    max_new_tokens: int = 192,
    writer: Callable[[str], str] | None = None,
    flashcard_mode: str = "per-turn",
    write_with_base: bool = True,
    replay: Sequence = (),
) -> WriteRecord:
    """Turn `context` into training material of `write_format` and train it into `fast_weights`.

    `fast_weights`: a tmem_runtime FastWeights attached to generator.model. Zero valid items means
    zero steps (losses == []). writer: see `write_flashcards` (qa only). write_with_base: the model
    writes its flashcards/summary with the fast weights switched off (snapshot, reset, restore), so
    earlier writes cannot degrade later memory writing; the writes still accumulate.
    replay: earlier items of the same format (pairs for qa, texts otherwise) trained again with the
    new ones; nothing new means no write at all, replay or not.
    """
    if write_format not in WRITE_FORMATS:
        raise ValueError(f"write_format must be one of {WRITE_FORMATS}, got {write_format!r}")
    record = WriteRecord(format=write_format)
    t0 = time.perf_counter()
    with fast_weights_off(fast_weights) if write_with_base else nullcontext():
        if write_format == "qa":
            record.raw, record.pairs, record.dropped = write_flashcards(
                generator, context, max_new_tokens, writer, flashcard_mode
            )
        elif write_format == "summary":
            record.raw = write_summary(generator, "", context, max_new_tokens)
            record.texts = [record.raw] if record.raw else []
    if write_format == "ntp":
        record.raw = context
        record.texts = [context] if context.strip() else []
    record.generate_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokenizer = generator.tokenizer
    recipe = resolve_recipe(recipe) if isinstance(recipe, str) else recipe
    if record.pairs:
        pairs = record.pairs + list(replay)
        record.losses = fast_weights.write_qa(tokenizer, pairs, recipe=recipe, seed=seed, loss_on="answer")
        record.replayed = len(replay)
    elif record.texts:
        record.losses = fast_weights.write_text(tokenizer, record.texts + list(replay), recipe=recipe, seed=seed)
        record.replayed = len(replay)
    record.train_s = time.perf_counter() - t0
    return record
