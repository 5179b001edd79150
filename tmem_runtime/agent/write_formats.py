"""What a memory write trains on: `qa` flashcards, the model's `summary`, or the raw text (`ntp`).

All three go through the runtime's one trainer (`FastWeights.write_qa` / `write_text`) with the
same recipe; only the training material differs (the paper's write-format ablation).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace

from transformers import PreTrainedTokenizerBase

from tmem_runtime.agent.flashcards import (
    FLASHCARD_MODES,
    FLASHCARD_PREFILL,
    TURN_PREFILL,
    dated_turns,
    flashcard_messages,
    parse_flashcards,
    turn_flashcard_messages,
)
from tmem_runtime.agent.generation import Generator, chat_prompt
from tmem_runtime.agent.summary import write_summary
from tmem_runtime.examples import qa_example, text_examples
from tmem_runtime.recipes import Recipe, get_recipe

WRITE_FORMATS = ("qa", "summary", "ntp")
# The agent's write recipe on small models: AdamW at lr 3e-3, 10 epochs (1e-2 makes every answer the
# last write's on SmolLM2-135M). The runtime's "default" is the same with 15 epochs, chosen for recall of
# one write (benchmarks/recall_study.py); the agent's replayed writes were not re-tuned with it (the demo
# scored the same F1 with either: benchmarks/RESULTS.md).
AGENT_RECIPE = Recipe(optimizer="adamw", lr=3e-3, epochs=10, batch_size=16)


def resolve_recipe(name: str) -> Recipe:
    """"agent" -> AGENT_RECIPE; any other name is the runtime's ("default", "paper")."""
    return AGENT_RECIPE if name == "agent" else get_recipe(name)


def recipe_name(name: str) -> str:
    """An argparse `type`: a name `resolve_recipe` knows, returned as given (else a usage error)."""
    try:
        resolve_recipe(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f'{exc} (or "agent")') from None
    return name


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
    generate_tokens: int = 0  # the generator's tokens (prefilled and decoded) while writing the material
    train_s: float = 0.0
    train_tokens: int = 0  # tokens of the rows trained on, times the recipe's epochs

    @property
    def n_written(self) -> int:
        return len(self.pairs) if self.format == "qa" else len(self.texts)

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())


@contextmanager
def fast_weights_off(fast_weights) -> Iterator[None]:
    """Run a block on the base model: snapshot the fast weights, reset them (B = 0), restore after. Not an
    episode boundary: the session's `stats` (writes, steps, cards, rollbacks so far) are restored too."""
    saved, stats = fast_weights.state_dict(), replace(fast_weights.stats)
    fast_weights.reset()
    try:
        yield
    finally:
        fast_weights.load_state_dict(saved)
        vars(fast_weights.stats).update(vars(stats))


_MARK = "\u241f"


def writing_prompts(
    generator: Generator, context: str, mode: str, named: bool = False, turns: list[tuple[str, str]] | None = None
) -> tuple[list[str], str]:
    """(chat prompts, their fixed shared part) of memory-writing mode for `context`: one prompt in
    "array" mode (the JSON opening prefilled), one per (DATE line, turn) in "per-turn" mode (`turns`,
    default every dated turn of `context`; named: turns in the third person)."""
    if mode == "array":
        shared = generator.split_chat_prompt(flashcard_messages(_MARK), _MARK)[0]
    else:
        shared = generator.split_chat_prompt(turn_flashcard_messages("", _MARK, named), _MARK)[0]
    return card_prompts(generator.tokenizer, context, mode, named, turns), shared


def card_prompts(
    tokenizer: PreTrainedTokenizerBase, context: str, mode: str, named: bool = False,
    turns: list[tuple[str, str]] | None = None,
) -> list[str]:
    """The chat prompts of `writing_prompts`, rendered with the tokenizer alone (no model needed: e.g. to check
    their length against a model's window before it loads)."""
    if mode == "array":
        return [chat_prompt(tokenizer, flashcard_messages(context), prefill=FLASHCARD_PREFILL)]
    turns = dated_turns(context) if turns is None else turns
    return [chat_prompt(tokenizer, turn_flashcard_messages(h, t, named), prefill=TURN_PREFILL) for h, t in turns]


def card_texts(mode: str, completions: list[str]) -> str | list[str]:
    """What `parse_flashcards` reads from the completions of `writing_prompts`: the array (its prefill
    and the one completion), or each turn's card (its prefill and the completion's first line)."""
    if mode == "array":
        return FLASHCARD_PREFILL + completions[0]
    return [TURN_PREFILL + c.split("\n")[0] for c in completions]


def write_flashcards(
    generator: Generator,
    context: str,
    max_new_tokens: int = 192,
    writer: Callable[[str], str] | None = None,
    mode: str = "per-turn",
    weights: str | None = None,
    select: Callable[[list[tuple[str, str]]], list[tuple[str, str]]] | None = None,
    named: bool = False,
) -> tuple[str, list, dict]:
    """Memory-writing mode: (raw text, valid pairs, drops by reason) for `context`.

    mode: "per-turn" (one card per turn, batches of 64, at most 48 new tokens each, first line kept) or
    "array" (one JSON array for the whole context, `max_new_tokens`). writer: who writes the
    flashcard text for a context (default: the model); whatever it returns goes through the
    salvaging parser. The prompt's fixed part (system text, worked examples) is prefilled once and
    shared by every card; weights: a name for the model's current weights under which that prefill
    is kept for later writes (e.g. "base" when cards are always written with the fast weights off).
    select: per-turn mode, which (DATE line, turn) pairs get a card (None: every turn of
    MIN_TURN_WORDS words or more); a write with no turn chosen generates nothing. named: per-turn
    mode, turns shown in the third person (flashcards.third_person).
    """
    if mode not in FLASHCARD_MODES:
        raise ValueError(f"flashcard mode must be one of {FLASHCARD_MODES}, got {mode!r}")
    if writer is not None:
        texts = raw = writer(context)
    elif mode == "array":
        prompts, shared = writing_prompts(generator, context, mode)
        texts = raw = card_texts(mode, generator.generate(prompts, max_new_tokens, shared=shared, weights=weights))
    else:
        turns = dated_turns(context)
        turns = select(turns) if select is not None else turns
        prompts, shared = writing_prompts(generator, context, mode, named, turns)
        cards = generator.generate(prompts, min(max_new_tokens, 48), batch_size=64, shared=shared, weights=weights,
                                   stop="line")
        texts = card_texts(mode, cards)
        raw = "\n".join(texts)
    parsed = parse_flashcards(texts, context=context)
    return raw, parsed.pairs, dict(parsed.dropped)


def trainable_cards(tokenizer, pairs: Sequence[tuple[str, str]], max_length: int) -> tuple[list, int]:
    """(the cards `write_qa` can train in `max_length` tokens, how many were left out): a card whose answer
    alone does not fit (a long unbroken "word": a URL, text in a script without spaces) is refused there,
    and would end the whole write."""
    kept = []
    for q, a in pairs:
        try:
            qa_example(tokenizer, q, a, "answer", max_length)
        except ValueError:
            continue
        kept.append((q, a))
    return kept, len(pairs) - len(kept)


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
    replay: Sequence | Callable[[int], Sequence] = (),
    select: Callable[[list[tuple[str, str]]], list[tuple[str, str]]] | None = None,
    named: bool = False,
) -> WriteRecord:
    """Turn `context` into training material of `write_format` and train it into `fast_weights`.

    `fast_weights`: a tmem_runtime FastWeights attached to generator.model (or a `pooled.PoolSession`).
    Zero valid items means zero steps (losses == []); a card too long for the recipe's max_length is
    dropped ("too_long", see `trainable_cards`). writer: see `write_flashcards` (qa only).
    write_with_base: the model writes its flashcards/summary with the fast weights switched off
    (snapshot, reset, restore), so earlier writes cannot degrade later memory writing; the writes
    still accumulate.
    replay: earlier items of the same format (pairs for qa, texts otherwise) trained again with the
    new ones, or a function of the number of new items returning them; nothing new means no write
    at all, replay or not. select, named: which turns get a flashcard and how they are shown (see
    `write_flashcards`).
    """
    if write_format not in WRITE_FORMATS:
        raise ValueError(f"write_format must be one of {WRITE_FORMATS}, got {write_format!r}")
    record = WriteRecord(format=write_format)
    t0, stats0 = time.perf_counter(), generator.stats.copy()
    with fast_weights_off(fast_weights) if write_with_base else nullcontext():
        if write_format == "qa":
            record.raw, record.pairs, record.dropped = write_flashcards(
                generator, context, max_new_tokens, writer, flashcard_mode, "base" if write_with_base else None, select,
                named,
            )
        elif write_format == "summary":
            record.raw = write_summary(generator, "", context, max_new_tokens)
            record.texts = [record.raw] if record.raw else []
    if write_format == "ntp":
        record.raw = context
        record.texts = [context] if context.strip() else []
    record.generate_s = time.perf_counter() - t0
    record.generate_tokens = generator.stats.since(stats0).tokens
    t0 = time.perf_counter()
    tokenizer = generator.tokenizer
    recipe = resolve_recipe(recipe) if isinstance(recipe, str) else recipe
    record.pairs, too_long = trainable_cards(tokenizer, record.pairs, recipe.max_length)
    if too_long:
        record.dropped["too_long"] = record.dropped.get("too_long", 0) + too_long
    replay = replay(record.n_written) if callable(replay) else replay
    if record.pairs:
        pairs = record.pairs + list(replay)
        record.losses = fast_weights.write_qa(tokenizer, pairs, recipe=recipe, seed=seed, loss_on="answer")
        rows = [qa_example(tokenizer, q, a, "answer", recipe.max_length)[0] for q, a in pairs]
    elif record.texts:
        texts = record.texts + list(replay)
        record.losses = fast_weights.write_text(tokenizer, texts, recipe=recipe, seed=seed)
        rows = [ids for t in texts for ids, _ in text_examples(tokenizer, t, recipe.max_length)]
    else:
        rows = []
    record.train_s = time.perf_counter() - t0
    record.replayed = len(replay) if rows else 0
    record.train_tokens = recipe.epochs * sum(len(r) for r in rows)
    return record
