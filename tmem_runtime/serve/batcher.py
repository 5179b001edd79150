"""Answers of many sessions in one batched forward: a decode thread that takes whatever is waiting.

A request is one or more rows: prompt token ids, the session whose fast weights the row reads (None:
the bare model), a token limit and a stop rule; a request of bare rows may name a prefix, token ids
all its rows start with (the flashcard prompt's instructions and examples), prefilled once and kept
(`prefix_cache` of them). The decode thread takes the oldest waiting request, then every other that
fits in `max_rows` rows of `max_sessions` sessions (answers before flashcard prompts, each in arrival
order), and runs them as one greedy `generate` inside `pool.rows(...)`, so row i reads its own
session's B. Each row is [its prefix, right-aligned to the longest][pad][its ids, right-aligned]: the
prefixes' keys and values come from the cache, only the ids are prefilled. Each row's text is handed
to its `on_text` as it grows (streaming); the request's future resolves with every row's result
when the batch ends.
`naive=True` takes one request per batch and holds `model_lock` around it: the baseline server,
one session at a time.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from tmem_runtime.pool import SessionPool
from tmem_runtime.residency import UnknownSessionError
from tmem_runtime.serve.conversation import SessionGoneError
from tmem_runtime.serve.metrics import Metrics
from tmem_runtime.serve.worker import Worker

# transformers >= 5.2x renames generate's `past_key_values` to `cache`; older 5.x only knows the former
warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*", category=FutureWarning)

ANSWER, CARDS = 0, 1  # request priorities: answers are batched before flashcard prompts


@dataclass
class Row:
    """One prompt of a batch. on_text: called on the decode thread with each new piece of text."""

    ids: list[int]
    session: str | None
    max_tokens: int
    stop_at_newline: bool = False
    on_text: Callable[[str], None] | None = None


@dataclass
class RowResult:
    text: str
    tokens: int
    finish_reason: str  # "stop" (end of turn, or the newline of a one-line row) | "length"


@dataclass
class Request:
    rows: list[Row]
    priority: int = ANSWER
    prefix: tuple[int, ...] = ()  # every row's ids follow these (bare rows only)
    future: Future = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)  # e.g. the client went away
    queued_at: float = field(default_factory=time.monotonic)


class RowProgress(StoppingCriteria):
    """Per-row decoding state, updated from each step's new tokens: text so far, stop rules, streaming."""

    def __init__(self, rows: Sequence[Row], owners: Sequence[Request], tokenizer: PreTrainedTokenizerBase,
                 eos_ids: set[int]) -> None:
        self.rows, self.owners, self.tokenizer, self.eos_ids = rows, owners, tokenizer, eos_ids
        n = len(rows)
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.text, self.sent = [""] * n, [0] * n
        self.done, self.reason = [False] * n, ["length"] * n

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None, **kwargs) -> torch.Tensor:
        for i, token in enumerate(input_ids[:, -1].tolist()):
            if not self.done[i]:
                self._step(i, token)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    def _step(self, i: int, token: int) -> None:
        row = self.rows[i]
        if token in self.eos_ids:
            self._finish(i, "stop")
            return
        self.ids[i].append(token)
        text = self.tokenizer.decode(self.ids[i], skip_special_tokens=True)
        if row.stop_at_newline and "\n" in text:  # a one-line row (a flashcard): its first line is final
            self.text[i] = text.split("\n")[0]
            self._finish(i, "stop")
            return
        self.text[i] = text
        if len(self.ids[i]) >= row.max_tokens or self.owners[i].cancelled.is_set():
            self._finish(i, "length")
        elif not text.endswith("\ufffd"):  # hold back a partial UTF-8 character
            self._emit(i)

    def _finish(self, i: int, reason: str) -> None:
        self.done[i], self.reason[i] = True, reason
        self._emit(i)

    def _emit(self, i: int) -> None:
        delta = self.text[i][self.sent[i] :]
        self.sent[i] = len(self.text[i])
        if delta and self.rows[i].on_text is not None:
            self.rows[i].on_text(delta)

    def result(self, i: int) -> RowResult:
        return RowResult(self.text[i], len(self.ids[i]), self.reason[i])


class AnswerBatcher(Worker):
    """The decode thread (see the module docstring). Call `start()`, then `submit`; `stop()` at exit."""

    def __init__(self, pool: SessionPool, tokenizer: PreTrainedTokenizerBase, eos_ids: Sequence[int],
                 metrics: Metrics, max_rows: int = 32, max_sessions: int = 32, naive: bool = False,
                 model_lock: threading.Lock | None = None, prefix_cache: int = 8) -> None:
        super().__init__("tmem-decode")
        self.pool, self.model, self.tokenizer = pool, pool.model, tokenizer
        self.eos_ids = set(eos_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.metrics, self.max_rows, self.max_sessions, self.naive = metrics, max_rows, max_sessions, naive
        self.model_lock = model_lock
        self.queue: list[Request] = []
        self.prefixes: OrderedDict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.prefix_cache = prefix_cache

    def submit(self, rows: list[Row], priority: int = ANSWER, prefix: Sequence[int] = ()) -> Request:
        if not rows:
            raise ValueError("a request needs at least one row")
        if prefix and any(row.session is not None for row in rows):
            raise ValueError("only bare-model rows share a cached prefix")
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
        forever), then answers before flashcard prompts."""
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
        return taken

    def _loop(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.queue or not self.running)
                if not self.running:
                    for r in self.queue:
                        r.future.set_exception(RuntimeError("the server is shutting down"))
                    return
                batch = self._take()
            self._run(batch)

    def _layout(self, batch: list[Request]) -> tuple[torch.Tensor, torch.Tensor, DynamicCache | None]:
        """input_ids and attention_mask [rows, P + S] (prefixes right-aligned in the first P columns, ids
        in the last S) and a cache holding the prefixes' keys/values (None when no request has one)."""
        rows = [(r.prefix, row.ids) for r in batch for row in r.rows]
        p, s = max(len(pre) for pre, _ in rows), max(len(ids) for _, ids in rows)
        ids = torch.full((len(rows), p + s), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (pre, row) in enumerate(rows):
            ids[i, p - len(pre) : p] = torch.tensor(pre, dtype=torch.long)
            ids[i, p + s - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, p - len(pre) : p] = 1
            mask[i, p + s - len(row) :] = 1
        if p == 0:
            return ids, mask, None
        kvs = {pre: self._prefix_kv(pre) for pre in {pre for pre, _ in rows if pre}}
        cache = DynamicCache(config=self.model.config)
        for layer, (k0, v0) in enumerate(next(iter(kvs.values()))):
            k = k0.new_zeros((len(rows), k0.shape[1], p, k0.shape[3]))
            v = v0.new_zeros((len(rows), v0.shape[1], p, v0.shape[3]))
            for i, (pre, _) in enumerate(rows):
                if pre:
                    k[i, :, p - len(pre) :] = kvs[pre][layer][0][0]
                    v[i, :, p - len(pre) :] = kvs[pre][layer][1][0]
            cache.update(k, v, layer)
        return ids, mask, cache

    def _prefix_kv(self, prefix: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (keys, values) [1, heads, len(prefix), dim] of the bare model over `prefix` (kept)."""
        if prefix in self.prefixes:
            self.prefixes.move_to_end(prefix)
            return self.prefixes[prefix]
        cache = DynamicCache(config=self.model.config)
        with self.pool.rows([None]), torch.inference_mode():
            self.model(input_ids=torch.tensor([prefix], device=self.pool.device), past_key_values=cache, use_cache=True)
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        self.prefixes[prefix] = kv
        while len(self.prefixes) > self.prefix_cache:
            self.prefixes.popitem(last=False)
        return kv

    def _run(self, batch: list[Request]) -> None:
        """Generate a batch; requests naming a session no longer in the pool fail alone (SessionGoneError)."""
        while batch:
            gone = [r for r in batch if any(row.session is not None and row.session not in self.pool for row in r.rows)]
            for r in gone:
                r.future.set_exception(SessionGoneError("the session was released or removed; retry the request"))
            batch = [r for r in batch if r not in gone]
            try:
                with self.model_lock or nullcontext():
                    results = self._generate(batch) if batch else []
            except UnknownSessionError:  # unloaded between the check and the batch: check again
                continue
            except Exception as exc:  # a failed batch fails its requests, never the thread
                for r in batch:
                    r.future.set_exception(exc)
                return
            for r, res in zip(batch, results):
                r.future.set_result(res)
            return

    def _generate(self, batch: list[Request]) -> list[list[RowResult]]:
        rows = [row for r in batch for row in r.rows]
        owners = [r for r in batch for _ in r.rows]
        t0 = time.perf_counter()
        with torch.inference_mode():
            ids, mask, cache = self._layout(batch)
        progress = RowProgress(rows, owners, self.tokenizer, self.eos_ids)
        device = self.pool.device
        extra = {} if cache is None else {"past_key_values": cache}
        with self.pool.rows([row.session for row in rows]), torch.inference_mode():
            self.model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                max_new_tokens=max(row.max_tokens for row in rows), pad_token_id=self.pad_id,
                eos_token_id=sorted(self.eos_ids), stopping_criteria=StoppingCriteriaList([progress]), **extra,
            )
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
