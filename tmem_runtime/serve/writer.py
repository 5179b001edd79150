"""Memory writes of many sessions, batched, each persisted before it is acknowledged.

Stage 1, flashcards (a small thread pool): a job queued from a context gets its cards from the
agent's flashcard writer (`write_flashcards`) on a `DecodeThreadGenerator`, whose generation runs as
bare-model rows on the decode thread (or from `card_writer(context)`, text the
flashcard parser reads, as the agent's `writer` option); so the cards of several sessions, and the answers, share
batches. Stage 2, training (the write thread): the oldest ready job of up to `max_sessions` sessions,
each with its replay sample (earlier cards, seeded by the trigger, as the agent's fast-weight
channel does), trained in one `pool.write_qa_many`; then, per session, the new weights file and
state are committed to the store (`persist`) and only then does the job's future resolve. While a
write trains, the decode thread keeps answering: the pool holds new batches back only for the
commit's copy of the B rows. A server stopping stops a CPU write at its next step, uncommitted: its
jobs stay pending in the store and resume on restart (a GPU write is over in moments; its steps are
never synced to check).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tmem_runtime.agent.generation import Generator
from tmem_runtime.agent.write_formats import write_flashcards
from tmem_runtime.examples import qa_example
from tmem_runtime.pool import SessionPool
from tmem_runtime.recipes import Recipe
from tmem_runtime.serve.batcher import CARDS, AnswerBatcher, Row
from tmem_runtime.serve.conversation import Card, Conversation, SessionGoneError, WriteJob
from tmem_runtime.serve.cores import CoreLoan
from tmem_runtime.serve.metrics import Metrics
from tmem_runtime.serve.worker import Worker
from tmem_runtime.sessions import WriteError

logger = logging.getLogger("tmem.serve")


class WriteStopped(Exception):
    """The server is stopping: the write ended at a step boundary, nothing committed."""


def check_cards(tokenizer: PreTrainedTokenizerBase, cards: Sequence[Card], recipe: Recipe) -> None:
    """ValueError naming the first card that cannot be trained: its answer alone does not fit
    `recipe.max_length` tokens (a longer question is cut to fit, as the write does)."""
    for question, answer in cards:
        qa_example(tokenizer, question, answer, max_length=recipe.max_length)


class DecodeThreadGenerator(Generator):
    """A Generator whose `generate` runs on the decode thread as bare-model rows, batched with other work.

    batcher: the decode thread; it may be set after construction (it reads its ids from this generator),
    before the first `generate`.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 batcher: AnswerBatcher | None = None) -> None:
        super().__init__(model, tokenizer)
        self.batcher = batcher

    def generate(self, prompts: list[str], max_new_tokens: int, batch_size: int = 16, shared: str | None = None,
                 weights: str | None = None, stop: str | None = None) -> list[str]:
        """Greedy continuations (see `Generator.generate`): `shared` (text every prompt starts with, e.g. the
        flashcard prompt's fixed part) is the request's prefix, prefilled once and cached by the decode
        thread (always under the bare model, so `weights` adds nothing); stop="line": each row ends at its
        first newline. batch_size is the decode thread's to choose. A prompt that does not fit the model's
        window with max_new_tokens (e.g. a card prompt of a very long turn) gets "" (and a warning)."""
        if self.batcher is None:
            raise RuntimeError("DecodeThreadGenerator.generate needs its batcher (the decode thread)")
        ids = [self.encode(p) for p in prompts]
        fits = [i for i, x in enumerate(ids) if len(x) + max_new_tokens <= self.window]
        if len(fits) < len(ids):
            logger.warning("%d prompt(s) too long for the model's window of %d tokens: no text for them",
                           len(ids) - len(fits), self.window)
        if not fits:
            return [""] * len(prompts)
        prefix = self.encode(shared) if shared else []
        if not all(len(ids[i]) > len(prefix) and ids[i][: len(prefix)] == prefix for i in fits):
            prefix = []  # the prompts do not all start with its tokens: no shared prefill
        rows = [Row(ids[i][len(prefix) :], None, max_new_tokens, stop == "line") for i in fits]
        request = self.batcher.submit(rows, CARDS, prefix)
        results = request.future.result()
        self.counts.prefilled += request.prefilled
        self.counts.generated += sum(r.tokens for r in results)
        texts = [""] * len(prompts)
        for i, r in zip(fits, results):
            texts[i] = r.text
        return texts


class MemoryWriter(Worker):
    """The two write stages (see the module docstring). `persist(conv, weights)` commits a session to
    the store (called with conv.lock held). Call `start()`, then `submit`; `stop()` at exit."""

    def __init__(self, pool: SessionPool, tokenizer: PreTrainedTokenizerBase, generator: Generator,
                 metrics: Metrics, persist: Callable[[Conversation, bool], None], recipe: Recipe,
                 max_sessions: int = 16, replay: int = 32, card_tokens: int = 48, card_threads: int = 8,
                 model_lock: threading.Lock | None = None, card_writer: Callable[[str], str] | None = None,
                 cores: CoreLoan | None = None) -> None:
        super().__init__("tmem-write")
        self.pool, self.tokenizer, self.generator, self.metrics = pool, tokenizer, generator, metrics
        self.persist, self.recipe = persist, recipe
        self.max_sessions, self.replay, self.card_tokens = max_sessions, replay, card_tokens
        self.model_lock, self.card_writer = model_lock, card_writer
        self.cores = cores or CoreLoan(1, enabled=False)
        self.cards = ThreadPoolExecutor(card_threads, thread_name_prefix="tmem-cards")
        self.waiting: dict[Conversation, None] = {}  # sessions with pending jobs, oldest first
        self.dirty = False

    def stop(self, timeout: float = 60) -> None:
        super().stop(timeout)
        self.cards.shutdown(wait=False, cancel_futures=True)

    def submit(self, conv: Conversation, jobs: Sequence[WriteJob]) -> None:
        """Queue `conv`'s new (or resumed) jobs: flashcards are written for those without cards."""
        for job in jobs:
            if job.cards is None:
                self.cards.submit(self._write_cards, conv, job)
        with self.cond:
            self.waiting[conv] = None
        self.wake()

    def wake(self) -> None:
        with self.cond:
            self.dirty = True
            self.cond.notify_all()

    def _write_cards(self, conv: Conversation, job: WriteJob) -> None:
        try:
            _, pairs, _ = write_flashcards(self.generator, job.context, max_new_tokens=self.card_tokens,
                                           writer=self.card_writer, mode="per-turn")
        except Exception:  # the server is stopping (the job stays pending in the store), or a failed batch
            if not self.running:
                return
            logger.exception("writing flashcards failed; the write goes on with none")
            pairs = []
        with conv.lock:
            job.cards = pairs
        self.wake()

    # ---------------------------------------------------------------- the write thread
    def _loop(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.dirty or not self.running)
                if not self.running:
                    return
                self.dirty = False
            try:
                picks = self._take()
                if picks:
                    self._write(picks)
                    self.wake()
            except Exception:  # never lose the write thread; the jobs stay pending in the store
                logger.exception("memory write failed")

    def _take(self) -> list[tuple[Conversation, WriteJob]]:
        """The ready head job of up to max_sessions waiting sessions (each session's busy lock taken)."""
        picks = []
        with self.cond:
            waiting = list(self.waiting)
        for conv in waiting:
            if len(picks) >= self.max_sessions:
                break
            with conv.lock:
                job = conv.ready_job() if conv.active else None
                if not conv.jobs or not conv.active:
                    with self.cond:
                        self.waiting.pop(conv, None)
            if job is not None and conv.busy.acquire(blocking=False):
                picks.append((conv, job))
        return picks

    def _write(self, picks: list[tuple[Conversation, WriteJob]]) -> None:
        with self.model_lock or nullcontext():  # naive: the whole write is the model's one job
            self._train_and_commit(picks)

    def _train_and_commit(self, picks: list[tuple[Conversation, WriteJob]]) -> None:
        pairs, errors = {}, {}
        for conv, job in picks:
            with conv.lock:
                replayed = random.Random(job.trigger).sample(conv.written, min(self.replay, len(conv.written)))
            pairs[conv.pool_id] = list(job.cards) + replayed if job.cards else []
            try:  # a card that cannot be trained fails its own write, not the batch's other sessions'
                check_cards(self.tokenizer, job.cards or [], self.recipe)
            except ValueError as exc:
                errors[conv.pool_id] = exc
        train = {pid: p for pid, p in pairs.items() if p and pid not in errors}
        losses = {}
        t0 = time.perf_counter()
        self.metrics.set_gauge("writes_training", len(train))
        steps_before = dict(self.cores.steps)
        stopped = False
        try:
            if train:
                self.cores.before_training()
                on_step = self._after_step if self.pool.device.type == "cpu" else None  # (it reads each loss)
                losses = self.pool.write_qa_many(self.tokenizer, train, recipe=self.recipe, on_step=on_step)
        except WriteStopped:
            stopped = True
        except WriteError as exc:
            losses = exc.losses
            errors.update(exc.errors)
        except Exception as exc:  # e.g. a session closed under the write: every job of this batch fails
            errors.update(dict.fromkeys(train, exc))
        finally:
            self.cores.training_done()
        if train:
            self.metrics.observe("write_train_seconds", time.perf_counter() - t0)
            self.metrics.observe("write_batch_sessions", len(train))
            for cores, n in self.cores.steps.items():
                self.metrics.inc("write_steps_total", n - steps_before[cores], cores=cores)
        for conv, job in picks:
            try:
                if not stopped:  # (stopped: the jobs stay pending, in the store as they were)
                    self._finish(conv, job, pairs[conv.pool_id], losses.get(conv.pool_id, []),
                                 errors.get(conv.pool_id))  # fmt: skip
            finally:
                conv.busy.release()
        self.metrics.set_gauge("writes_training", 0)

    def _after_step(self, step: int, steps: int, loss: float) -> None:
        """Each step of a CPU write: the core loan's turn, then WriteStopped if the server is stopping."""
        if self.cores.enabled:
            self.cores.after_step(step, steps, loss)
        if not self.running:
            raise WriteStopped

    def _finish(self, conv: Conversation, job: WriteJob, trained: list, losses: list[float],
                error: Exception | None) -> None:
        try:
            with conv.lock:
                if not conv.active or job not in conv.jobs:
                    raise SessionGoneError("the session was reset, released or removed before this write committed")
                outcome = conv.finish(job, trained, len(losses), error)
                self.persist(conv, bool(losses) and error is None)
        except Exception as exc:
            job.settle(error=exc)
            self.metrics.inc("writes_total", outcome="lost")
            return
        kind = "rolled_back" if error is not None else ("empty" if not job.cards else "committed")
        self.metrics.inc("writes_total", outcome=kind)
        self.metrics.inc("flashcards_total", len(job.cards or []) if error is None else 0)
        self.metrics.observe("write_seconds", time.monotonic() - job.queued_at)
        job.settle(outcome)
