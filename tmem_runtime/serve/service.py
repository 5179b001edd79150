"""MemoryService: the server without HTTP. Sessions of tenants, on one SessionPool, backed by the store.

    service = MemoryService(model, tokenizer, Store(dir), ServeConfig(...)); service.start()
    service.create("acme", "alice"); service.append("acme", "alice", ["Nina: I moved to Porto."])
    request = service.answer("acme", "alice", [{"role": "user", "content": "Where does Nina live?"}], 32)
    request.future.result()[0].text

A session is loaded into this server on first use: its lease is claimed in the store (another live server's
lease refuses it: `LeaseHeldError`), its weights file loaded into a pool session, and its pending writes
resumed. An upkeep thread renews this server's lease (`LeaseKeeper`: one store write keeps every loaded
session's; after a late renewal each is claimed again, and one found taken over is dropped), and unloads the
sessions unused for `idle_unload` seconds (`upkeep.py`): their next request loads them again. `release` hands
a session over: it is persisted with its pending writes and unloaded, and the lease freed, so that any server
sharing the store serves it next. Every change a client is told of (turns appended, a write queued or
committed, a reset) is in the store first, as a line appended to the session's log (O(change):
`SessionRecord.delta`); the state is written whole (compacting the log) when the log outgrows it, or after a
failed persist.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jinja2 import TemplateError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tmem_runtime import residency
from tmem_runtime.adapter_file import AdapterFileError
from tmem_runtime.agent.write_formats import AGENT_RECIPE
from tmem_runtime.engine import FastWeightsError
from tmem_runtime.pool import SessionPool
from tmem_runtime.recipes import Recipe
from tmem_runtime.serve.batcher import AnswerBatcher, Request, Row
from tmem_runtime.serve.conversation import Card, Conversation, SessionGoneError, WriteJob
from tmem_runtime.serve.cores import CoreLoan
from tmem_runtime.serve.lease_renewal import LeaseKeeper
from tmem_runtime.serve.loaded import LoadedSessions, ServerBusyError
from tmem_runtime.serve.metrics import Metrics
from tmem_runtime.serve.store import CorruptSessionError, LeaseHeldError, LeaseLostError, SessionExistsError, Store
from tmem_runtime.serve.upkeep import Upkeep
from tmem_runtime.serve.writer import DecodeThreadGenerator, MemoryWriter, check_cards

logger = logging.getLogger("tmem.serve")
MIN_CACHED_PREFIX = 8  # an answer's chat preamble shorter than this is prefilled with the rest of its prompt
MAX_LOGGED = 1024  # log entries after which a session's next persist commits its state whole
MIN_LOG_BYTES = 64 << 10  # ... or once its log holds more bytes than this and than its state.json
DEFAULT_MAX_TOKENS = 128  # an answer's token limit when the client gives none (within --max-tokens and the window)


class ContextLengthError(ValueError):
    """The prompt, with the answer's max_tokens, does not fit the model's window (HTTP 400,
    code context_length_exceeded, as OpenAI's)."""


class UnknownSessionError(KeyError):
    """No such session in this tenant (HTTP 404)."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class ServeConfig:
    """What a server does. capacity: the pool's B rows; the decode thread batches at most `max_rows`
    rows of at most capacity - max_write_sessions - 1 sessions (the rest of the rows are for writes)."""

    server_id: str = "local"
    url: str = ""
    capacity: int = 64
    l_max: int = 1024
    max_rows: int = 32
    max_write_sessions: int = 16
    max_tokens: int = 256
    replay: int = 32
    card_tokens: int = 48
    lease_ttl: float = 30.0
    idle_unload: float = 600.0  # seconds unused before a session is unloaded from this server (0: never)
    naive: bool = False
    backend: str = "auto"
    recipe: Recipe = AGENT_RECIPE
    card_writer: Callable[[str], str] | None = None  # flashcard text for a context (None: the model writes it)
    lend_cores: bool = True  # CPU: training steps borrow the decode thread's torch threads while it is idle
    max_loaded: int = 1024  # sessions loaded at once; past it the least recently used idle ones are released
    max_loaded_wait: float = 10.0  # seconds a load waits, max_loaded all busy, for one to be idle (then 503)
    model_name: str = ""  # the model's name, recorded in the store with its identity (Store.bind_model)

    def __post_init__(self) -> None:
        if self.naive:
            self.capacity, self.max_rows, self.max_write_sessions = 1, 1, 1
        elif self.capacity < self.max_write_sessions + 2:
            raise ValueError(f"capacity {self.capacity} must be at least max_write_sessions + 2 "
                             f"({self.max_write_sessions + 2}): writes, a save and an answer need rows at once")
        bad = [f"{name}={getattr(self, name)!r} (must be {rule})" for name, rule, ok in (
            ("l_max", ">= 1", self.l_max >= 1), ("max_rows", ">= 1", self.max_rows >= 1),
            ("max_tokens", ">= 1", self.max_tokens >= 1), ("max_write_sessions", ">= 1", self.max_write_sessions >= 1),
            ("replay", ">= 0", self.replay >= 0), ("card_tokens", ">= 1", self.card_tokens >= 1),
            ("max_loaded", ">= 1", self.max_loaded >= 1), ("lease_ttl", "> 0", self.lease_ttl > 0),
            ("idle_unload", ">= 0", self.idle_unload >= 0), ("max_loaded_wait", ">= 0", self.max_loaded_wait >= 0),
        ) if not ok]  # fmt: skip
        if bad:
            raise ValueError(f"invalid serve config: {', '.join(bad)}")


class MemoryService:
    """Tenants' sessions on one model (see the module docstring)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, store: Store,
                 config: ServeConfig) -> None:
        self.model, self.tokenizer, self.store, self.config = model, tokenizer, store, config
        self.pool = SessionPool(model, capacity=config.capacity, backend=config.backend)
        try:
            store.bind_model(config.model_name, self.pool.metadata())  # (StoreModelError: another model's store)
        except BaseException:
            self.pool.detach()  # (the model is left as it was)
            raise
        self.metrics = Metrics()
        model_lock = threading.Lock() if config.naive else None
        cores = CoreLoan(torch.get_num_threads(), enabled=config.lend_cores and self.pool.device.type == "cpu")
        answer_sessions = max(1, config.capacity - config.max_write_sessions - 1)
        self.generator = DecodeThreadGenerator(model, tokenizer)  # cards, token counts and the batcher's ids
        self.batcher = self.generator.batcher = AnswerBatcher(self.pool, self.generator, self.metrics, config.max_rows,
                                                              answer_sessions, config.naive, model_lock,
                                                              cores=cores)
        self.writer = MemoryWriter(self.pool, tokenizer, self.generator, self.metrics, self._persist, config.recipe,
                                   config.max_write_sessions, config.replay, config.card_tokens, model_lock=model_lock,
                                   card_writer=config.card_writer, cores=cores)
        self.preamble = self.generator.chat_preamble()  # answers' shared prefix, cached per session version
        # (a load past max_loaded unloads idle sessions as the upkeep does: through it, made just below)
        self.loaded = LoadedSessions(self._load, lambda taken: self.upkeep.unload_taken(taken))
        self.convs = self.loaded.convs  # (read under self.loaded.lock)
        self.leases = LeaseKeeper(store, config, self.loaded, self._drop)
        self.upkeep = Upkeep(config, store, self.loaded, self.leases, self._drop, self.metrics)
        self._load_ids = itertools.count(1)  # pool ids are unique per load, so a late unload never closes a newer load

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the threads, then load the sessions this server held before a restart (their pending
        writes resume)."""
        self.batcher.start()
        self.writer.start()
        self.leases.renew()  # (this server's lease record names its url now)
        self.upkeep.start()
        for tenant, session in list(self.store.leased_to(self.config.server_id)):
            try:  # (past max_loaded if those are busy: their pending writes resume; the upkeep unloads the rest)
                self.get(tenant, session, bounded=False)
            except (LeaseHeldError, UnknownSessionError):
                pass
            except CorruptSessionError as exc:  # one unreadable session does not keep the others from serving
                logger.error("not loaded at start: %s", exc)

    def stop(self) -> None:
        self.upkeep.stop()
        self.writer.stop()
        self.batcher.stop()

    # ---------------------------------------------------------------- sessions
    def create(self, tenant: str, session: str) -> Conversation:
        """A new session (SessionExistsError if the id is taken in the tenant), loaded here (ServerBusyError:
        not created)."""
        self.store.create(tenant, session)
        try:
            return self.get(tenant, session)
        except ServerBusyError:
            if (tenant, session) not in self.convs:  # (nobody was told of it yet)
                self.store.remove(tenant, session)
            raise

    def get(self, tenant: str, session: str, hold: bool = False, bounded: bool = True) -> Conversation:
        """The loaded session, loading it from the store if needed (UnknownSessionError, LeaseHeldError;
        ServerBusyError: `max_loaded` are loaded and none became idle within `max_loaded_wait` seconds,
        nothing loaded or unloaded; bounded=False: loaded past max_loaded then). hold: the caller uses it
        until `self.loaded.let_go(conv)` (it is not unloaded as idle meanwhile)."""
        cfg = self.config
        if (tenant, session) not in self.convs and not self.store.exists(tenant, session):
            raise UnknownSessionError(f"no session {session!r}")  # (a 404, not a wait for room, for no session)
        conv, loaded_now = self.loaded.get(tenant, session, hold, cfg.max_loaded if bounded else None,
                                           cfg.max_loaded_wait)
        if loaded_now:
            self.writer.submit(conv, list(conv.jobs))
            if len(self.loaded.convs) > self.config.max_loaded:  # (a racy read: the bound is checked again)
                self.upkeep.unload_idle()
            self._gauges()
        return conv

    @contextmanager
    def _using(self, tenant: str, session: str) -> Iterator[Conversation]:
        conv = self.get(tenant, session, hold=True)
        try:
            yield conv
        finally:
            self.loaded.let_go(conv)

    def _load(self, tenant: str, session: str) -> Conversation:
        if not self.store.exists(tenant, session):
            raise UnknownSessionError(f"no session {session!r}")
        lease = self.store.claim(tenant, session, self.config.server_id, self.config.url, self.config.lease_ttl)
        record, weights = self.store.read(tenant, session)
        conv = Conversation(tenant, session, f"{tenant}/{session}#{next(self._load_ids)}", self.generator,
                            self.config.l_max, record)
        conv.lease_epoch = lease.epoch
        conv.state_bytes, conv.log_bytes = self.store.state_sizes(tenant, session, record.log)
        self.pool.open(conv.pool_id)
        try:
            if weights is not None:
                self.pool.load(conv.pool_id, weights)
        except BaseException as exc:  # the row goes back to the pool: a session that fails to load holds none
            self.pool.close(conv.pool_id)
            if isinstance(exc, AdapterFileError):  # (the file is kept as it is: nothing stored is lost)
                raise CorruptSessionError(session, f"its weights file cannot be loaded ({exc})") from exc
            raise
        return conv

    def sessions(self, tenant: str) -> list[dict]:
        """The tenant's sessions in the store, with the server whose lease each has."""
        out = []
        for s in self.store.sessions(tenant):
            lease = self.store.lease(tenant, s)
            live = lease is not None and lease.expires > time.time()
            out.append({"id": s, "server": lease.owner if live else None})
        return out

    def append(self, tenant: str, session: str, turns: list[str], date: str | None = None,
               write: bool = False) -> tuple[dict, list[WriteJob]]:
        """Append turns (persisted before this returns); write: then write the working context into
        memory whatever its length. Returns the session's counters and the writes this triggered."""
        with self._using(tenant, session) as conv, conv.lock:
            self._check_active(conv)
            jobs, entry = conv.append(turns, date, write)
            self._persist(conv, weights=False, turns=entry)
            summary = conv.summary()
        self.writer.submit(conv, jobs)
        return summary, jobs

    def remember(self, tenant: str, session: str, cards: list[Card]) -> WriteJob:
        """Queue explicit flashcards as one write (persisted as pending before this returns); ValueError
        if a card cannot be trained (its answer alone is longer than the recipe's max_length tokens)."""
        check_cards(self.tokenizer, cards, self.config.recipe)
        with self._using(tenant, session) as conv, conv.lock:
            self._check_active(conv)
            job = conv.remember(cards)
            self._persist(conv, weights=False)
        self.writer.submit(conv, [job])
        return job

    def stats(self, tenant: str, session: str) -> dict:
        with self._using(tenant, session) as conv, conv.lock:
            summary = conv.summary()
        return {"id": session, **summary, "weights_bytes": self.pool.bytes_per_session(),
                "store_bytes": self.store.size(tenant, session), "server": self.config.server_id}

    def memories(self, tenant: str, session: str) -> list[Card]:
        with self._using(tenant, session) as conv, conv.lock:
            return list(conv.written)

    def reset(self, tenant: str, session: str) -> dict:
        """Back to the initial state: no memory, empty context; pending writes are abandoned."""
        with self._using(tenant, session) as conv, conv.busy, conv.lock:  # no write of it is training or committing
            self._check_active(conv)
            dropped = conv.reset()
            conv.weights = None
            self.pool.reset(conv.pool_id)
            self._persist(conv, weights=False)
            summary = conv.summary()
        _abandon(dropped, "the session was reset")
        return summary

    def release(self, tenant: str, session: str) -> None:
        """Unload the session and free its lease (its pending writes stay in the store for the next server)."""
        with self._using(tenant, session) as conv:
            self._unload(conv, lambda conv: self.store.release(tenant, session, self.config.server_id))

    def remove(self, tenant: str, session: str) -> None:
        """Forget the session: unloaded and its files deleted."""
        with self._using(tenant, session) as conv:
            self._unload(conv, lambda conv: self.store.remove(tenant, session))

    def _unload(self, conv: Conversation, then: Callable[[Conversation], None]) -> None:
        """Mark `conv` inactive, call `then` (give its lease up, or remove its files), then drop it. `then` runs
        while the session is still in the table (a request meanwhile finds it inactive: 409, retry), so no
        request loads it again before its lease is given up (the release then deleted the new load's lease,
        and its commits failed; a removal deleted its files)."""
        with conv.busy, conv.lock:
            self._check_active(conv)
            conv.active = False
        try:
            then(conv)
        finally:
            self._drop(conv)

    def _drop(self, conv: Conversation) -> None:
        """Forget a loaded session here (the store keeps it): unload its pool row once no batch uses it."""
        conv.active = False
        self.loaded.remove(conv)
        _abandon(list(conv.jobs), "the session moved to another server or was removed")
        while conv.pool_id in self.pool:
            try:  # once no answer batch reads it (its rows there stop and fail), so no other row's batch is redone
                # (wait=False: a write of it training is waited for here, not holding the batcher, which no new
                # batch or request could pass meanwhile)
                self.batcher.unload(conv.pool_id, lambda: self.pool.close(conv.pool_id, wait=False))
            except residency.UnknownSessionError:  # another drop (renewer, persist, unload) closed it first
                break
            except FastWeightsError:  # a running batch reads it, or a write of it trains: wait for it to end
                time.sleep(0.02)
        self._gauges()

    def _check_active(self, conv: Conversation) -> None:
        if not conv.active:
            raise SessionGoneError("the session was released or removed; retry the request")

    def _persist(self, conv: Conversation, weights: bool, turns: dict | None = None) -> None:
        """Commit the session to the store (conv.lock held) if this server still holds its lease (checked
        by the commit, under the lease's lock; if not, the session is dropped here and SessionGoneError raised).
        weights: with a new weights file. The change is appended to the session's log (O(change)): turns:
        `Conversation.append`'s entry, else the delta from the stored state. The state is committed whole
        instead when the log is due for compaction (over MAX_LOGGED entries, or more bytes than the state
        and MIN_LOG_BYTES: so the log costs at most about the state's size to read, and a compaction's
        bytes are at most about those appended since the last) or a persist failed since the last whole commit."""
        owner = self.config.server_id
        base, conv.stored = conv.stored, None  # (until this persist succeeds: after a failure, only a whole commit)
        due = base is None or conv.logged >= MAX_LOGGED or conv.log_bytes > max(conv.state_bytes, MIN_LOG_BYTES)
        try:
            if turns is not None and not due:
                appended = self.store.append_turns(conv.tenant, conv.session, conv.log, turns, owner=owner)
                conv.logged, conv.log_bytes = conv.logged + 1, conv.log_bytes + appended
                conv.stored = base if base.extend(turns) else None
            else:
                record = conv.to_record()
                save = (lambda path: self.pool.save(conv.pool_id, path)) if weights else None
                commit = self.store.commit(conv.tenant, conv.session, record, save, owner=owner,
                                           base=None if due else base)
                conv.committed(record, commit)
        except LeaseLostError:
            threading.Thread(target=self._drop, args=(conv,), daemon=True).start()
            raise SessionGoneError("this server no longer holds the session's lease; retry the request") from None

    # ---------------------------------------------------------------- answers
    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat-templated prompt's token ids (the layout flashcards are trained in). ValueError if the
        model's chat template refuses the messages (e.g. Gemma's: roles must alternate user/assistant)."""
        try:
            prompt = self.generator.chat_prompt(messages)
        except TemplateError as exc:  # the template's raise_exception: the client's messages to fix (a 400)
            raise ValueError(f"the model's chat template refuses these messages: {exc}") from None
        return self.generator.encode(prompt)

    def answer(self, tenant: str, session: str | None, messages: list[dict[str, str]], max_tokens: int | None,
               on_text: Callable[[str], None] | None = None, stop: Sequence[str] = ()) -> Request:
        """Queue a chat completion reading `session`'s fast weights (None: the bare model), ending where
        the first of the `stop` texts begins, after at most `max_tokens` tokens (None: DEFAULT_MAX_TOKENS,
        within the config's max_tokens and the room the prompt leaves in the model's window).
        ContextLengthError if the prompt and max_tokens do not fit the window. The session is held (never
        unloaded as idle) until the answer ends."""
        conv = self.get(tenant, session, hold=True) if session is not None else None
        try:
            ids, window = self.prompt_ids(messages), self.generator.window
            if max_tokens is None and len(ids) < window:
                max_tokens = min(DEFAULT_MAX_TOKENS, self.config.max_tokens, window - len(ids))
            if max_tokens is None:
                raise ContextLengthError(f"the prompt has {len(ids)} tokens: it leaves no room for an answer in "
                                         f"the model's window of {window} tokens")
            if len(ids) + max_tokens > window:
                raise ContextLengthError(f"the prompt has {len(ids)} tokens; with max_tokens={max_tokens} it exceeds "
                                         f"the model's window of {window} tokens")
            if conv is not None:
                self._check_active(conv)
            p = self.preamble
            prefix = p if len(p) >= MIN_CACHED_PREFIX and len(ids) > len(p) and ids[: len(p)] == p else []
            row = Row(ids[len(prefix) :], None if conv is None else conv.pool_id, max_tokens, on_text=on_text,
                      stop=tuple(stop))
            request = self.batcher.submit([row], prefix=prefix)
        except BaseException:
            if conv is not None:
                self.loaded.let_go(conv)
            raise
        if conv is not None:
            request.future.add_done_callback(lambda _: self.loaded.let_go(conv))
        return request

    # ---------------------------------------------------------------- metrics
    def _gauges(self) -> None:
        c = self.pool.counters()
        self.metrics.set_gauge("resident_sessions", c["resident"])
        self.metrics.set_gauge("open_sessions", c["open"])
        self.metrics.set_gauge("pool_capacity", c["capacity"])
        self.metrics.set_gauge("trunk_rows_bytes", c["trunk_rows_bytes"])
        for outcome in ("hits", "misses"):
            self.metrics.set_total("trunk_rows_examples_total", c[f"trunk_rows_{outcome}"], outcome=outcome)
        self.metrics.set_total("commit_waits_total", c["commit_waits"])
        self.metrics.set_total("commit_wait_seconds_total", c["commit_wait_seconds"])
        self.metrics.set_gauge("queue_depth", sum(len(conv.jobs) for conv in self.loaded.loaded()), queue="write")

    def metrics_text(self) -> str:
        self._gauges()
        return self.metrics.render()


def _abandon(jobs: list[WriteJob], why: str) -> None:
    for job in jobs:
        job.settle(error=SessionGoneError(why))


__all__ = ["ContextLengthError", "CorruptSessionError", "LeaseHeldError", "MemoryService", "ServeConfig",
           "ServerBusyError", "SessionExistsError", "SessionGoneError", "UnknownSessionError"]
