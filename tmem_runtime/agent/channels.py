"""Memory channels behind one interface: none / summary / retrieval / tmem / tmem+summary.

A channel is told to `write` the working context when the agent's budget triggers (the agent then
clears the context), contributes `memory_text()` to every prompt (explicit memory that counts
against the budget: the summary) and `recall(question)` to each question's prompt (retrieved chunks).
`none` never writes: the agent keeps the whole conversation and cuts it to the model's window.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tmem_runtime.agent.card_selection import SalientTurns, make_selector
from tmem_runtime.agent.generation import Generator
from tmem_runtime.agent.pooled import PoolSession
from tmem_runtime.agent.retrieval import ChunkIndex
from tmem_runtime.agent.summary import merge_summaries, write_summary
from tmem_runtime.agent.write_formats import WRITE_FORMATS, WriteRecord, fast_weights_off, write_to_weights

if TYPE_CHECKING:
    from tmem_runtime.pool import SessionPool

CHANNELS = ("none", "summary", "retrieval", "tmem", "tmem+summary")


@dataclass
class WriteEvent:
    """What one trigger wrote: into weights (`weights`), into the summary, into the index."""

    weights: WriteRecord | None = None
    summary: str | None = None
    chunks_indexed: int = 0
    seconds: float = 0.0


class MemoryChannel:
    """The no-memory channel, and the base of the others."""

    name = "none"
    writes = False  # whether the budget triggers a write (and a context clear)
    answers_from_weights = False  # True: final write at the end of reading, bare questions at answer time

    def reset(self) -> None:
        """Forget everything (episode boundary)."""

    def memory_text(self) -> str:
        return ""

    def max_memory_tokens(self) -> int:
        """The most tokens `memory_text` can take in the working context (0: none)."""
        return 0

    def recall(self, question: str) -> str:
        return ""

    def write(self, context: str, trigger: int) -> WriteEvent:
        return WriteEvent()

    def pool_session(self) -> tuple[SessionPool, str] | None:
        """(pool, session id) when this channel's memory is a session of a SessionPool (its answers must
        read that session's rows); None: the model as it is (bare, or its FastWeights)."""
        return None


class SummaryChannel(MemoryChannel):
    """A rolling summary: at each trigger the model writes notes on the context, appended to the old
    notes; the notes are kept to the last `max_tokens` tokens and sit in every prompt."""

    name = "summary"
    writes = True
    heading = "Notes on the earlier conversation:\n"  # the notes' first line in `memory_text`

    def __init__(self, generator: Generator, max_tokens: int = 512, max_new_tokens: int = 128):
        self.generator, self.max_tokens, self.max_new_tokens = generator, max_tokens, max_new_tokens
        self.summary = ""

    def reset(self) -> None:
        self.summary = ""

    def memory_text(self) -> str:
        return f"{self.heading}{self.summary}" if self.summary else ""

    def max_memory_tokens(self) -> int:
        """The notes' cap plus their heading: what `memory_text` can take in the working context."""
        return self.max_tokens + self.generator.count_tokens(self.heading)

    def write(self, context: str, trigger: int) -> WriteEvent:
        notes = write_summary(self.generator, self.summary, context, self.max_new_tokens)
        self.summary = merge_summaries(self.summary, notes, self.max_tokens, self.generator)
        return WriteEvent(summary=notes)


def context_chunks(context: str, turns_per_chunk: int = 3) -> list[str]:
    """Cut a rendered context into chunks of `turns_per_chunk` lines, each under its DATE line."""
    chunks, header, lines = [], "", []

    def flush() -> None:
        if lines:
            chunks.append("\n".join(([header] if header else []) + lines))
            lines.clear()

    for line in context.splitlines():
        if not line.strip():
            continue
        if line.startswith("DATE:") or line.startswith("SESSION "):
            flush()
            header = line
            continue
        lines.append(line)
        if len(lines) >= turns_per_chunk:
            flush()
    flush()
    return chunks


class RetrievalChannel(MemoryChannel):
    """Past context as embedded chunks; each question's prompt gets its `top_k` chunks."""

    name = "retrieval"
    writes = True

    def __init__(self, index: ChunkIndex, top_k: int = 5, turns_per_chunk: int = 3):
        self.index, self.top_k, self.turns_per_chunk = index, top_k, turns_per_chunk

    def reset(self) -> None:
        self.index.clear()

    def recall(self, question: str) -> str:
        hits = self.index.search(question, self.top_k)
        return "Retrieved from the earlier conversation:\n" + "\n\n".join(hits) if hits else ""

    def write(self, context: str, trigger: int) -> WriteEvent:
        chunks = context_chunks(context, self.turns_per_chunk)
        self.index.add(chunks)
        return WriteEvent(chunks_indexed=len(chunks))


def replay_sample(items: list, n: int, seed: int, index: int) -> list:
    """Up to `n` of `items`, a sample seeded by (seed, index): Random(seed * 1000 + index), the agent's
    replay of earlier cards with write `index` (and the capacity study's, which must match it)."""
    return random.Random(seed * 1000 + index).sample(items, min(n, len(items)))


class FastWeightChannel(MemoryChannel):
    """TMEM: each trigger trains the context (as `write_format`) into the fast weights.

    fast_weights: a FastWeights attached to the model, or a `pooled.PoolSession` (one session of a
    SessionPool; answers then read that session's rows).

    It answers from the weights alone: the end of the conversation is one more write, and questions
    are asked bare, in the chat layout the flashcards were trained in (on SmolLM2-135M any context
    in front of the question stops the adapter from recalling; benchmarks/RESULTS.md).

    replay: how many earlier items of this episode (a seeded sample) are trained again with each
    write's new ones; 0 is the paper's protocol (only the new pairs). On SmolLM2-135M, 0 means each
    write erases the previous ones (benchmarks/RESULTS.md). replay_per_item: if > 0, at most this
    many replayed per new item (a write of 2 new cards replays at most 2 x replay_per_item).
    selector: which turns get a flashcard (card_selection.SalientTurns, reset with the episode);
    None: every turn of MIN_TURN_WORDS words or more. named: turns shown to the card writer in
    the third person (flashcards.third_person).
    """

    name = "tmem"
    writes = True
    answers_from_weights = True

    def __init__(self, fast_weights, generator: Generator, write_format: str = "qa", recipe: str = "agent",
                 seed: int = 0, max_new_tokens: int = 192, writer: Callable[[str], str] | None = None,
                 flashcard_mode: str = "per-turn", replay: int = 32, replay_per_item: int = 0,
                 selector: SalientTurns | None = None, named: bool = False):
        if write_format not in WRITE_FORMATS:
            raise ValueError(f"write_format must be one of {WRITE_FORMATS}, got {write_format!r}")
        self.fast_weights, self.generator = fast_weights, generator
        self.write_format, self.recipe, self.seed, self.max_new_tokens = write_format, recipe, seed, max_new_tokens
        self.writer = writer  # None: the model writes its own flashcards
        self.flashcard_mode, self.replay, self.replay_per_item = flashcard_mode, replay, replay_per_item
        self.selector, self.named = selector, named
        self.written: list = []  # every pair (qa) or text written this episode

    def reset(self) -> None:
        self.fast_weights.reset()
        self.written = []
        if self.selector is not None:
            self.selector.reset()

    def replayed(self, trigger: int, n_new: int) -> list:
        """The earlier items trained again with a write of `n_new` new ones (seeded by the trigger)."""
        n = min(self.replay, n_new * self.replay_per_item) if self.replay_per_item > 0 else self.replay
        return replay_sample(self.written, n, self.seed, trigger)

    def write(self, context: str, trigger: int) -> WriteEvent:
        record = write_to_weights(
            self.fast_weights, self.generator, context, self.write_format, self.recipe,
            seed=self.seed + trigger, max_new_tokens=self.max_new_tokens, writer=self.writer,
            flashcard_mode=self.flashcard_mode, replay=lambda n_new: self.replayed(trigger, n_new),
            select=self.selector, named=self.named,
        )
        self.written += record.pairs if record.format == "qa" else record.texts
        return WriteEvent(weights=record)

    def pool_session(self) -> tuple[SessionPool, str] | None:
        fw = self.fast_weights
        return (fw.pool, fw.session) if isinstance(fw, PoolSession) else None


class HybridChannel(MemoryChannel):
    """tmem+summary: the context is written into the weights and into the rolling summary."""

    name = "tmem+summary"
    writes = True

    def __init__(self, weights: FastWeightChannel, summary: SummaryChannel):
        self.weights, self.summary = weights, summary

    def reset(self) -> None:
        self.weights.reset()
        self.summary.reset()

    def memory_text(self) -> str:
        return self.summary.memory_text()

    def max_memory_tokens(self) -> int:
        return self.summary.max_memory_tokens()

    def write(self, context: str, trigger: int) -> WriteEvent:
        event = self.weights.write(context, trigger)
        with fast_weights_off(self.weights.fast_weights):  # notes written by the base model, as in `summary`
            event.summary = self.summary.write(context, trigger).summary
        return event

    def pool_session(self) -> tuple[SessionPool, str] | None:
        return self.weights.pool_session()


def make_channel(
    name: str,
    generator: Generator,
    fast_weights=None,
    write_format: str = "qa",
    recipe: str = "agent",
    seed: int = 0,
    top_k: int = 5,
    summary_tokens: int = 512,
    device: str = "cpu",
    flashcard_tokens: int = 192,
    flashcard_mode: str = "per-turn",
    replay: int = 32,
    replay_per_item: int = 0,
    cards: str = "all",
    card_min_score: int = 4,
    max_cards: int | None = None,
    named: bool = False,
) -> MemoryChannel:
    """The channel called `name` (one of CHANNELS); tmem channels need `fast_weights` attached to the model.

    cards: "all" or "salient" (card_selection), with its `card_min_score` and `max_cards` per write.
    named: the card writer sees turns in the third person.
    """
    if name not in CHANNELS:
        raise ValueError(f"memory must be one of {CHANNELS}, got {name!r}")
    if name.startswith("tmem") and fast_weights is None:
        raise ValueError(f"memory {name!r} needs fast weights attached to the model")
    if name == "none":
        return MemoryChannel()
    if name == "summary":
        return SummaryChannel(generator, summary_tokens)
    if name == "retrieval":
        return RetrievalChannel(ChunkIndex(device), top_k)
    weights = FastWeightChannel(fast_weights, generator, write_format, recipe, seed, flashcard_tokens,
                                flashcard_mode=flashcard_mode, replay=replay, replay_per_item=replay_per_item,
                                selector=make_selector(cards, card_min_score, max_cards), named=named)
    if name == "tmem":
        return weights
    return HybridChannel(weights, SummaryChannel(generator, summary_tokens))
