"""Answers of many sessions in one batched forward: a decode thread that takes whatever is waiting.

A request is one or more rows: prompt token ids, the session whose fast weights the row reads (None:
the bare model), a token limit and a stop rule; a request whose rows read one session (or none) may
name a prefix, token ids all its rows start with (the flashcard prompt's instructions and examples;
the chat template's system preamble of an answer), prefilled once under that session's weights and
kept (`prefix_cache` of them, keyed by the ids, the session and `pool.version(session)`, so a write
makes the next request prefill it again). The decode thread takes the oldest waiting request, then
every other that fits in `max_rows` rows of `max_sessions` sessions (answers before flashcard
prompts, each in arrival order), and decodes them together with the runtime's batched greedy decoder
(`tmem_runtime.decoding.greedy_generate`), every forward bound to its rows' sessions by
`pool.rows(...)`, so row i reads its own session's B, inside one `pool.reading` block for the whole
batch, so each answer reads one state of its session: copies of the sessions' rows taken when the
batch begins, so a write of one of them commits meanwhile without waiting (a session with no free
row for its copy is read in place, and its write's commit waits for the batch); cached prefixes are
copied in, only the ids are prefilled. Each row's text is handed to its `on_text` as it grows
(streaming); the request's future resolves with every row's result when the batch ends.
`naive=True` takes one request per batch and holds `model_lock` around it: the baseline server,
one session at a time.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from tmem_runtime.agent.generation import Generator
from tmem_runtime.decoder import supports_piecewise
from tmem_runtime.decoding import Prefix, greedy_generate, prefill
from tmem_runtime.pool import SessionPool
from tmem_runtime.residency import UnknownSessionError
from tmem_runtime.serve.conversation import SessionGoneError
from tmem_runtime.serve.cores import CoreLoan
from tmem_runtime.serve.metrics import Metrics
from tmem_runtime.serve.worker import Worker

ANSWER, CARDS = 0, 1  # request priorities: answers are batched before flashcard prompts
GONE = "the session was released or removed; retry the request"


@dataclass
class Row:
    """One prompt of a batch. on_text: called on the decode thread with each new piece of text."""

    ids: list[int]
    session: str | None
    max_tokens: int
    stop_at_newline: bool = False
    on_text: Callable[[str], None] | None = None
    stop: tuple[str, ...] = ()  # the row ends where the first of these begins in its text (OpenAI's `stop`)


@dataclass
class RowResult:
    text: str
    tokens: int
    finish_reason: str  # "stop" (end of turn, or the newline of a one-line row) | "length"


@dataclass
class Request:
    rows: list[Row]
    priority: int = ANSWER
    prefix: tuple[int, ...] = ()  # every row's ids follow these (rows of one session, or bare rows)
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)  # e.g. the client went away
    gone: bool = False  # a session it reads was unloaded while it ran: it fails (SessionGoneError)
    queued_at: float = field(default_factory=time.monotonic)
    prefilled: int = 0  # prompt tokens run through the model for it: its prefix only when not found cached


class RowProgress:
    """Per-row decoding state: text so far, the rows' own stop rules, streaming.

    `stop(i)` is row i's stop function for `greedy_generate` (called with the row's new tokens after
    each token): it ends the row at its newline (one-line rows: the new token is one of `line_ids`,
    the tokens whose text holds a newline), at one of its stop texts (its text is cut where that
    begins), its token limit, or a cancelled request, and hands a streaming row's new text to its
    `on_text` (holding back an end that may still become a stop text). `close(i, tokens)` settles a
    row the decoder ended itself (an end-of-turn token, or the batch's token limit). Only streaming
    rows and rows with stop texts are decoded at every step; the others once, when they end.
    """

    def __init__(self, rows: Sequence[Row], owners: Sequence[Request], tokenizer: PreTrainedTokenizerBase,
                 eos_ids: set[int], line_ids: set[int]) -> None:
        self.rows, self.owners, self.tokenizer = rows, owners, tokenizer
        self.eos_ids, self.line_ids = eos_ids, line_ids
        n = len(rows)
        self.tokens, self.text, self.sent = [0] * n, [""] * n, [0] * n
        self.done, self.reason = [False] * n, ["length"] * n

    def stop(self, i: int) -> Callable[[list[int]], bool]:
        return lambda tokens: self._step(i, tokens)

    def _step(self, i: int, tokens: list[int]) -> bool:
        row = self.rows[i]
        self.tokens[i] = len(tokens)
        text = self._decode(i, tokens) if row.stop or row.on_text is not None else None
        end = _stop_index(text, row.stop) if row.stop else None
        if row.stop_at_newline and tokens and tokens[-1] in self.line_ids:  # a one-line row: its first line is final
            self._finish(i, "stop", tokens)
        elif end is not None:
            self._finish(i, "stop", tokens, text[:end])
        elif len(tokens) >= row.max_tokens or self.owners[i].cancelled.is_set():
            self._finish(i, "length", tokens, text)
        elif row.on_text is not None:
            self.text[i] = text
            if not text.endswith("\ufffd"):  # hold back a partial UTF-8 character
                self._emit(i, held=_stop_overlap(text, row.stop))
        return self.done[i]

    def close(self, i: int, tokens: list[int]) -> None:
        """Settle row i from the tokens the decoder returned, unless its own rule ended it already."""
        if self.done[i]:
            return
        ended = bool(tokens) and tokens[-1] in self.eos_ids  # the end-of-turn token is not text
        if not self._step(i, tokens[:-1] if ended else tokens):
            self._finish(i, "stop" if ended else "length", tokens[:-1] if ended else tokens)

    def _decode(self, i: int, tokens: list[int]) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return text.split("\n")[0] if self.rows[i].stop_at_newline else text

    def _finish(self, i: int, reason: str, tokens: list[int], text: str | None = None) -> None:
        """End row i with `text` (None: its tokens' text)."""
        self.text[i] = self._decode(i, tokens) if text is None else text
        self.done[i], self.reason[i] = True, reason
        self._emit(i)

    def _emit(self, i: int, held: int = 0) -> None:
        """Hand row i's text not yet sent, but for its last `held` characters, to its `on_text`."""
        end = max(self.sent[i], len(self.text[i]) - held)
        delta = self.text[i][self.sent[i] : end]
        self.sent[i] = end
        if delta and self.rows[i].on_text is not None:
            self.rows[i].on_text(delta)

    def result(self, i: int) -> RowResult:
        return RowResult(self.text[i], self.tokens[i], self.reason[i])


def _stale(cached: tuple, new: tuple, pool: SessionPool) -> bool:
    """Whether a cached prefix's key (ids, session, version) can no longer be asked for once `new` is
    prefilled: `new` is its session's newer version of the same ids, or its session left the pool."""
    ids, session, _ = cached
    return (ids, session) == new[:2] or (session is not None and session not in pool)


def _stop_index(text: str, stops: Sequence[str]) -> int | None:
    """Where the first of `stops` to occur in `text` begins (None: none occurs)."""
    found = [k for k in (text.find(s) for s in stops) if k >= 0]
    return min(found) if found else None


def _stop_overlap(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of `text` begin one of `stops` (the next tokens may complete it)."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


class AnswerBatcher(Worker):
    """The decode thread (see the module docstring). Call `start()`, then `submit`; `stop()` at exit.

    generator: the model's tokenizer, end-of-turn ids, pad id and line-token ids are read from it.
    """

    def __init__(self, pool: SessionPool, generator: Generator, metrics: Metrics, max_rows: int = 32,
                 max_sessions: int = 32, naive: bool = False, model_lock: threading.Lock | None = None,
                 prefix_cache: int = 64, cores: CoreLoan | None = None) -> None:
        super().__init__("tmem-decode")
        self.pool, self.model, self.tokenizer = pool, pool.model, generator.tokenizer
        self.eos_ids, self.line_ids, self.pad_id = set(generator.eos_ids), set(generator.line_ids()), generator.pad_id
        self.window = generator.window
        self.metrics, self.max_rows, self.max_sessions, self.naive = metrics, max_rows, max_sessions, naive
        self.model_lock = model_lock
        self.queue: list[Request] = []
        self.generating: list[Request] = []  # the batch being generated (guarded by cond)
        self.prefixes: OrderedDict[tuple, Prefix] = OrderedDict()  # (ids, session, version) -> keys/values
        self.prefix_cache = prefix_cache
        self.cores = cores or CoreLoan(1, enabled=False)

    def submit(self, rows: list[Row], priority: int = ANSWER, prefix: Sequence[int] = ()) -> Request:
        if not rows:
            raise ValueError("a request needs at least one row")
        if prefix and len({row.session for row in rows}) > 1:
            raise ValueError("a cached prefix is shared by rows of one session (or bare rows) only")
        longest = max(len(prefix) + len(row.ids) + row.max_tokens for row in rows)
        if longest > self.window:  # refused here: in a batch it would fail every request batched with it
            raise ValueError(f"a row of {longest} tokens (prompt + max_tokens) passes the model's window of "
                             f"{self.window} tokens")
        request = Request(rows, priority, tuple(prefix))
        with self.cond:
            self.queue.append(request)
            self.metrics.set_gauge("queue_depth", self.depth(), queue="answer")
            self.cond.notify_all()
        return request

    def depth(self) -> int:
        return sum(len(r.rows) for r in self.queue)

    def _take(self) -> list[Request]:
        """Waiting requests for one batch (called with the condition held): the oldest (nothing waits
        forever), then answers before flashcard prompts. Those whose future was cancelled while they
        waited are dropped; the others' futures are marked running (cancel() no longer takes)."""
        oldest = min(self.queue, key=lambda r: r.queued_at)
        order = [oldest] + sorted((r for r in self.queue if r is not oldest), key=lambda r: (r.priority, r.queued_at))
        taken, rows, sessions = [], 0, set()
        for r in order:
            more = {row.session for row in r.rows if row.session is not None} | sessions
            if taken and (self.naive or rows + len(r.rows) > self.max_rows or len(more) > self.max_sessions):
                break
            taken.append(r)
            rows, sessions = rows + len(r.rows), more
        for r in taken:
            self.queue.remove(r)
        self.metrics.set_gauge("queue_depth", self.depth(), queue="answer")
        return [r for r in taken if r.future.set_running_or_notify_cancel()]  # a cancelled one is never run

    def _loop(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.queue or not self.running)
                if not self.running:
                    for r in self.queue:
                        if r.future.set_running_or_notify_cancel():
                            r.future.set_exception(RuntimeError("the server is shutting down"))
                    return
                batch = self._take()
            self._run(batch)

    def _prefix_key(self, r: Request, versions: dict[str, int]) -> tuple | None:
        """What `r`'s prefix keys/values depend on: its ids, its rows' session and that session's version
        (as the batch reads it: `versions`)."""
        if not r.prefix or not supports_piecewise(self.model):
            return None
        session = r.rows[0].session
        return r.prefix, session, 0 if session is None else versions[session]

    def _prefix(self, key: tuple | None) -> Prefix | None:
        """The keys/values over a request's prefix under its session's weights (`_prefix_key`), prefilled
        once and kept (`prefix_cache` of them, the least recently used out; an entry goes as soon as a new
        version of its session's prefills, or once its session is unloaded); called under `_generate`'s
        inference mode."""
        if key is None:
            return None
        if key in self.prefixes:
            self.prefixes.move_to_end(key)
            return self.prefixes[key]
        ids, session, _ = key
        for old in [k for k in self.prefixes if _stale(k, key, self.pool)]:
            del self.prefixes[old]
        with self.pool.rows([session]):
            self.prefixes[key] = prefill(self.model, ids)
        while len(self.prefixes) > self.prefix_cache:
            self.prefixes.popitem(last=False)
        return self.prefixes[key]

    def unload(self, session: str, close: Callable[[], None]) -> None:
        """Call `close` (which unloads `session` from the pool) once no batch reads it: rows of the running
        batch that read it stop at their next token and their requests fail (SessionGoneError); no new
        batch starts until `close` returns. Never call it on the decode thread."""
        with self.cond:
            reading = [r for r in self.generating if any(row.session == session for row in r.rows)]
            for r in reading:
                r.gone = True
                r.cancelled.set()
            self.cond.wait_for(lambda: not any(r in self.generating for r in reading))
            close()

    def _run(self, batch: list[Request]) -> None:
        """Generate a batch (`generating` meanwhile: see `unload`); requests naming a session no longer in
        the pool fail alone (SessionGoneError)."""
        with self.cond:
            self.generating = batch
        try:
            self._run_batch(batch)
        finally:
            with self.cond:
                self.generating = []
                self.cond.notify_all()

    def _run_batch(self, batch: list[Request]) -> None:
        while batch:
            gone = [r for r in batch if any(row.session is not None and row.session not in self.pool for row in r.rows)]
            for r in gone:
                r.future.set_exception(SessionGoneError(GONE))
            batch = [r for r in batch if r not in gone]
            try:
                with self.cores.decoding(), self.model_lock or nullcontext():
                    results = self._generate(batch) if batch else []
            except UnknownSessionError:  # unloaded other than by `unload`: check again
                continue
            except Exception as exc:  # a failed batch fails its requests, never the thread
                for r in batch:
                    r.future.set_exception(exc)
                return
            for r, res in zip(batch, results):
                if r.gone:
                    r.future.set_exception(SessionGoneError(GONE))
                else:
                    r.future.set_result(res)
            return

    def _generate(self, batch: list[Request]) -> list[list[RowResult]]:
        rows = [row for r in batch for row in r.rows]
        owners = [r for r in batch for _ in r.rows]
        sessions = [row.session for row in rows]
        t0 = time.perf_counter()
        progress = RowProgress(rows, owners, self.tokenizer, self.eos_ids, self.line_ids)
        # the whole batch reads one state of each session (copies of their rows): a write commits meanwhile
        with self.pool.reading(dict.fromkeys(s for s in sessions if s is not None)) as versions, \
                torch.inference_mode():
            prefixes = []
            for r in batch:
                key = self._prefix_key(r, versions)
                cached = key in self.prefixes
                pre = self._prefix(key)
                prefix_runs = (0 if cached else 1) if pre is not None else len(r.rows)  # None: in every row
                r.prefilled = sum(len(row.ids) for row in r.rows) + len(r.prefix) * prefix_runs
                prefixes += [pre] * len(r.rows)
            tokens = greedy_generate(
                self.model, [[*r.prefix, *row.ids] for r in batch for row in r.rows],
                max(row.max_tokens for row in rows), sorted(self.eos_ids), prefixes, batch_size=len(rows),
                stop=[progress.stop(i) for i in range(len(rows))], pad_id=self.pad_id,
                bind=lambda members: self.pool.rows([sessions[i] for i in members]),
            )
        for i, row_tokens in enumerate(tokens):
            progress.close(i, row_tokens)
        results = [progress.result(i) for i in range(len(rows))]
        m = self.metrics
        m.observe("batch_rows", len(rows))
        m.observe("batch_sessions", len({row.session for row in rows if row.session is not None}))
        m.observe("batch_seconds", time.perf_counter() - t0)
        m.inc("generated_tokens_total", sum(res.tokens for res in results))
        out, k = [], 0
        for r in batch:
            out.append(results[k : k + len(r.rows)])
            k += len(r.rows)
        return out
