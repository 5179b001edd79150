"""The memory agent: reads a conversation turn by turn, writes memory when over budget, answers.

Working context plus explicit memory (the channel's `memory_text`) is counted with the model's
tokenizer. When adding the next turn would cross `l_max`, the agent enters memory-writing mode:
the channel writes the working context (flashcards into fast weights, notes into a summary, chunks
into an index), then the working context is cleared (later turns re-open it under the current session's DATE
line, so they stay dated). The `none` channel never writes; at answer time its context is cut to the
model's window, keeping the most recent part.

Answer prompts are one user turn: [explicit memory][working context] + [retrieved chunks] + LoCoMo's
answer prompt around the question, identical for every prompt-space channel. A channel that answers
from its weights (tmem) gets the bare question, the chat layout the runtime trains flashcards in.
The shared part is prefilled once and its keys/values reused by every question, all questions batched.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tmem_runtime.agent.channels import MemoryChannel, WriteEvent
from tmem_runtime.agent.generation import Generator
from tmem_runtime.agent.locomo import Conversation, Session

_QUESTION_SLOT = "\u241f"
# LoCoMo's own answer prompt (task_eval/evaluate_gpts.py), used whenever there is context to read
QA_PROMPT = (
    "Based on the above context, write an answer in the form of a short phrase for the following question. "
    "Answer with exact words from the context whenever possible.\n\nQuestion: {question} Short answer:"
)


@dataclass
class Trigger:
    """One memory write: when it fired, how full the budget was, what the channel wrote."""

    index: int
    session: int
    context_tokens: int
    memory_tokens: int
    event: WriteEvent = field(default_factory=WriteEvent)
    seconds: float = 0.0
    reason: str = "budget"  # or "end": what was left in the context when reading finished


def clean_answer(text: str) -> str:
    """The first non-empty line of a generated answer, without a leading "Name:" and quotes."""
    for line in text.splitlines():
        if line.strip():
            line = re.sub(r"^\s*[A-Z][\w.'-]{0,30}:\s+", "", line)  # "Leo: Lisbon." (dialogue habit)
            return line.strip().strip("\"'").strip()
    return ""


class MemoryAgent:
    """An agent with a working context of at most `l_max` tokens (with explicit memory) and a channel.

    generator: the model's Generator. channel: a MemoryChannel from `make_channel`.
    answer_tokens: max new tokens per answer. reserve: tokens kept free in the window for the
    question and the answer when the `none` context is cut. window: the prompt's token limit
    (default: the model's), e.g. l_max + reserve for a no-memory agent held to the same budget.
    """

    def __init__(self, generator: Generator, channel: MemoryChannel, l_max: int = 1024, answer_tokens: int = 24,
                 reserve: int = 160, window: int | None = None):
        if channel.writes and channel.max_memory_tokens() >= l_max:
            raise ValueError(
                f"l_max {l_max} leaves no room for the context beside the {channel.name} memory of up to "
                f"{channel.max_memory_tokens()} tokens, which sits in it: every turn would trigger a write. "
                "Raise l_max above it, or lower the summary's tokens (--summary-tokens)"
            )
        self.generator, self.channel, self.l_max = generator, channel, l_max
        self.answer_tokens, self.reserve = answer_tokens, reserve
        self.window = window or generator.window
        self.reset()

    def reset(self) -> None:
        """New episode: empty context, channel forgotten (fast weights back to B = 0)."""
        self.lines: list[str] = []
        self.context_tokens = 0
        self.tokens_read = 0  # every line observed this episode (DATE lines included)
        self.header: str | None = None
        self.session = 0
        self.triggers: list[Trigger] = []
        self.channel.reset()
        self.memory_tokens = 0

    @property
    def context(self) -> str:
        return "\n".join(self.lines)

    def _append(self, line: str, tokens: int | None = None) -> None:
        self.lines.append(line)
        self.context_tokens += (self.generator.count_tokens(line) if tokens is None else tokens) + 1

    def clear_context(self) -> None:
        """Empty the working context (the next turn re-opens it under the current DATE line)."""
        self.lines, self.context_tokens = [], 0

    def write_memory(self, on_trigger: Callable[[Trigger], None] | None = None, reason: str = "budget") -> Trigger:
        """Memory-writing mode now: the channel writes the working context, then it is cleared."""
        t0 = time.perf_counter()
        trigger = Trigger(len(self.triggers), self.session, self.context_tokens, self.memory_tokens, reason=reason)
        trigger.event = self.channel.write(self.context, trigger.index)
        self.clear_context()
        self.memory_tokens = self.generator.count_tokens(self.channel.memory_text())
        trigger.seconds = time.perf_counter() - t0
        self.triggers.append(trigger)
        if on_trigger is not None:
            on_trigger(trigger)
        return trigger

    def observe(self, line: str, on_trigger: Callable[[Trigger], None] | None = None) -> None:
        """Add one line to the working context, writing memory first if it would cross l_max.

        A context holding no turn (empty, or only the current DATE line) never triggers a write.
        """
        tokens = self.generator.count_tokens(line)
        self.tokens_read += tokens + 1
        has_content = bool(self.lines) and self.lines != [self.header]
        if self.channel.writes and has_content and self.context_tokens + tokens + 1 + self.memory_tokens > self.l_max:
            self.write_memory(on_trigger)
        if not self.lines and self.header and line != self.header:
            self._append(self.header)  # a cleared context re-opens under the session's DATE line
        self._append(line, tokens)

    def read_session(self, session: Session, on_trigger: Callable[[Trigger], None] | None = None) -> None:
        """Read one session: its DATE line, then each turn. A session with no turn adds nothing (as `load_locomo`
        drops one): its DATE line alone would be a context holding no turn that the next DATE line writes."""
        if not session.turns:
            return
        self.session, self.header = session.index, session.header()
        self.observe(self.header, on_trigger)
        for turn in session.turns:
            self.observe(turn.render(), on_trigger)

    def read(self, conversation: Conversation, on_trigger: Callable[[Trigger], None] | None = None,
             max_sessions: int | None = None) -> list[Trigger]:
        """Read a conversation's sessions in order (the first `max_sessions` if given), then `finish`."""
        for session in conversation.sessions[:max_sessions]:
            self.read_session(session, on_trigger)
        self.finish(on_trigger)
        return self.triggers

    def finish(self, on_trigger: Callable[[Trigger], None] | None = None) -> None:
        """End of reading: a channel that answers from its weights writes what is left in the context."""
        if self.channel.answers_from_weights and self.lines and self.lines != [self.header]:
            self.write_memory(on_trigger, reason="end")

    def prompt_context(self) -> str:
        """The shared part of every answer prompt: explicit memory, then the working context (cut to fit)."""
        memory = self.channel.memory_text()
        context = self.context
        room = self.window - self.reserve - self.generator.count_tokens(memory)
        if self.generator.count_tokens(context) > room:
            context = self.generator.keep_last_tokens(context, max(room, 0))
        return "\n\n".join(p for p in (memory, context) if p.strip())

    def answer_prompts(self, questions: list[str], queries: list[str] | None = None) -> tuple[str, list[str]]:
        """(shared prefix, one suffix per question): the answer prompts, as text.

        queries: what retrieval searches with, one per question (default: the questions themselves);
        ValueError if there are not as many.
        """
        if queries is not None and len(queries) != len(questions):
            raise ValueError(f"{len(questions)} questions need as many retrieval queries, got {len(queries)}")
        shared = "" if self.channel.answers_from_weights else self.prompt_context()
        content = f"{shared}\n\n{_QUESTION_SLOT}" if shared else _QUESTION_SLOT
        prefix, suffix = self.generator.split_chat_prompt([{"role": "user", "content": content}], _QUESTION_SLOT)
        suffixes = []
        for q, query in zip(questions, questions if queries is None else queries):
            recalled = self.channel.recall(query)
            asked = QA_PROMPT.format(question=q) if shared or recalled else q
            suffixes.append((f"{recalled}\n\n" if recalled else "") + asked + suffix)
        return prefix, suffixes

    def answer(self, questions: list[str], queries: list[str] | None = None) -> list[str]:
        """Answers to `questions` with everything the agent has now (context, memory, fast weights).

        queries: what retrieval searches with, one per question (default: the questions themselves).
        All questions are answered in batches that share the prompt's fixed part (prefilled once);
        each answer stops once its first non-blank line is complete (the part `clean_answer` keeps).
        A channel whose memory is a session of a SessionPool answers with that session's rows.
        """
        prefix, suffixes = self.answer_prompts(questions, queries)
        pooled = self.channel.pool_session()
        if pooled is None:
            raw = self.generator.generate_after_prefix(prefix, suffixes, self.answer_tokens, stop="answer")
        else:
            raw = self.generator.generate_for_sessions(pooled[0], [(pooled[1], prefix, suffixes)], self.answer_tokens,
                                                       stop="answer")[0]
        return [clean_answer(r) for r in raw]
