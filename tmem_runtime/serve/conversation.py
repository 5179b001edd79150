"""One served session: its working context, its queued memory writes, its counters.

The working context is kept by the memory agent (`MemoryAgent`, its budget trigger): when appending
a turn would cross l_max, the agent hands the context to its channel and clears it. Here the channel
(`QueuedChannel`) only queues the context as a `WriteJob`; the server's writer turns it into
flashcards and trains them later, in a batch with other sessions' writes. Explicit flashcards are
jobs whose cards are given. Jobs of one session are trained in the order they were queued.

`Conversation` is plain state guarded by its `lock`; `to_record` / the constructor convert to and
from the store's `SessionRecord`, so a restarted server resumes every pending job. Of the agent's
trigger records it keeps the count alone (`TriggerCount`): a session may live for years of writes.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from tmem_runtime.agent.agent import MemoryAgent, Trigger
from tmem_runtime.agent.channels import MemoryChannel, WriteEvent
from tmem_runtime.agent.generation import Generator
from tmem_runtime.serve.store import Commit, SessionRecord

Card = tuple[str, str]
STAT_KEYS = ("turns", "writes", "cards", "steps", "empty_writes", "rollbacks")


class SessionGoneError(RuntimeError):
    """The session was reset, released or removed (or moved to another server) under a request (HTTP 409)."""


@dataclass
class WriteJob:
    """One acknowledged memory write: a context to write flashcards from, or the flashcards themselves.

    cards: None until written from `context`. done: resolved with the job's outcome (a dict) once it
    is trained and persisted, or with the error that rolled it back.
    """

    trigger: int
    context: str = ""
    cards: list[Card] | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    queued_at: float = field(default_factory=time.monotonic)
    done: Future = field(default_factory=Future, repr=False)

    def settle(self, outcome: dict | None = None, error: BaseException | None = None) -> None:
        """Resolve `done` once (later calls, e.g. a reset racing a commit, are ignored)."""
        try:
            if error is None:
                self.done.set_result(outcome)
            else:
                self.done.set_exception(error)
        except InvalidStateError:
            pass

    def to_json(self) -> dict:
        explicit = self.cards if not self.context else None  # cards written from a context are redone
        return {"id": self.id, "trigger": self.trigger, "context": self.context,
                "cards": None if explicit is None else [list(c) for c in explicit]}

    @classmethod
    def from_json(cls, d: dict) -> WriteJob:
        cards = None if d.get("cards") is None else [(q, a) for q, a in d["cards"]]
        return cls(trigger=d["trigger"], context=d.get("context", ""), cards=cards, id=d["id"])


class TriggerCount:
    """The agent's `triggers` in a served session: how many writes it has triggered, and no record of
    them (the agent only appends and counts: `len` is the next trigger's index, which seeds its write's
    replay sample). So a session holds O(1) of them however many writes it lives through."""

    __slots__ = ("count",)

    def __init__(self, count: int = 0) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def append(self, trigger: Trigger) -> None:
        self.count += 1


class QueuedChannel(MemoryChannel):
    """The agent's fast-weight channel, deferred: `write` queues the context instead of training it."""

    name = "tmem"
    writes = True
    answers_from_weights = True

    def __init__(self, queue: list[WriteJob]) -> None:
        self.queue = queue

    def write(self, context: str, trigger: int) -> WriteEvent:
        self.queue.append(WriteJob(trigger=trigger, context=context))
        return WriteEvent()


class Conversation:
    """A served session (see the module docstring). `pool_id`: its name in the SessionPool (unique per load)."""

    def __init__(self, tenant: str, session: str, pool_id: str, generator: Generator, l_max: int,
                 record: SessionRecord) -> None:
        self.tenant, self.session, self.pool_id = tenant, session, pool_id
        self.lock = threading.RLock()  # everything below
        self.busy = threading.Lock()  # held while one of its writes trains and commits
        self.active = True  # False once released, purged or dropped: queued work for it is abandoned
        self.uses = 0  # requests using it now, and when it was last used (guarded by its LoadedSessions' lock)
        self.last_used = time.monotonic()
        self.lease_epoch = ""  # the epoch of this server's lease its store lease names (store.claim)
        self.jobs = [WriteJob.from_json(j) for j in record.pending]
        self.agent = MemoryAgent(generator, QueuedChannel(self.jobs), l_max=l_max)
        self.written: list[Card] = [(q, a) for q, a in record.written]
        self.stats = {k: int(record.stats.get(k, 0)) for k in STAT_KEYS}
        self.seq, self.weights, self.log = record.seq, record.weights, record.log
        self.stored: SessionRecord | None = record  # the state as stored (None after a failed persist: unknown)
        self.logged = 0  # log entries appended since the state was last committed whole, and their bytes
        self.log_bytes = 0
        self.state_bytes = 0  # the size of the state.json they follow
        self.agent.lines, self.agent.header = list(record.lines), record.header
        self.agent.context_tokens = record.context_tokens
        self.agent.triggers = TriggerCount(record.triggers)

    def to_record(self) -> SessionRecord:
        a = self.agent
        return SessionRecord(
            lines=list(a.lines), header=a.header, context_tokens=a.context_tokens, triggers=len(a.triggers),
            pending=[j.to_json() for j in self.jobs], written=[list(c) for c in self.written],
            stats=dict(self.stats), seq=self.seq, weights=self.weights, log=self.log,
        )

    def committed(self, record: SessionRecord, commit: Commit) -> None:
        """`record` (this session's `to_record`) is stored now: take the weights file name, count and log
        generation the store commit assigned, and count the log's growth (or its new start)."""
        self.seq, self.weights, self.log = record.seq, record.weights, record.log
        self.stored = record
        if commit.logged:
            self.logged, self.log_bytes = self.logged + 1, self.log_bytes + commit.bytes
        else:
            self.logged, self.log_bytes, self.state_bytes = 0, 0, commit.bytes

    # ---------------------------------------------------------------- what clients add
    def append(self, turns: list[str], date: str | None = None,
               write: bool = False) -> tuple[list[WriteJob], dict | None]:
        """Add turns (one line each) under an optional DATE line; write: then write what the working
        context holds (the agent's end-of-conversation write; nothing if it holds no turn). Returns the
        writes this triggered, and the turns-log entry of the change (`SessionRecord.extend`) if it only
        extended the working context (None: it triggered a write; the whole state is to be committed)."""
        before, a = len(self.jobs), self.agent
        context, start = a.lines, len(a.lines)  # (a write clears the context: the agent starts a new list)
        if date is not None and f"DATE: {date}" != a.header:
            a.header = f"DATE: {date}"
            a.observe(a.header)
        for line in turns:
            a.observe(line)
        if write:
            a.finish()
        self.stats["turns"] += len(turns)
        jobs = self.jobs[before:]
        if jobs or a.lines is not context:
            return jobs, None
        return jobs, {"at": start, "lines": a.lines[start:], "header": a.header, "context_tokens": a.context_tokens,
                      "stats": dict(self.stats)}

    def remember(self, cards: list[Card]) -> WriteJob:
        job = WriteJob(trigger=len(self.agent.triggers), cards=list(cards))
        self.jobs.append(job)
        return job

    def reset(self) -> list[WriteJob]:
        """Back to the initial state (empty context, no memory); returns the abandoned pending jobs."""
        dropped = list(self.jobs)
        self.jobs.clear()
        self.agent.reset()
        self.agent.triggers = TriggerCount()
        self.written.clear()
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        return dropped

    # ---------------------------------------------------------------- what the writer takes
    def ready_job(self) -> WriteJob | None:
        """The oldest pending job if its cards are known (jobs train in order), else None."""
        return self.jobs[0] if self.jobs and self.jobs[0].cards is not None else None

    def finish(self, job: WriteJob, trained: list[Card], steps: int, error: Exception | None) -> dict:
        """Record a trained (or rolled back) job; returns its outcome for the client."""
        self.jobs.remove(job)
        self.last_used = time.monotonic()  # (idle time counts from its last write too)
        if error is not None:
            self.stats["rollbacks"] += 1
        elif not job.cards:
            self.stats["empty_writes"] += 1
        else:
            self.written += job.cards
            self.stats["writes"] += 1
            self.stats["cards"] += len(job.cards)
            self.stats["steps"] += steps
        new = job.cards or []
        return {"id": job.id, "cards": [list(c) for c in new], "replayed": max(0, len(trained) - len(new)),
                "steps": steps, "error": None if error is None else str(error)}

    def summary(self) -> dict:
        """Counters for the stats endpoint."""
        return {**self.stats, "pending_writes": len(self.jobs), "context_tokens": self.agent.context_tokens,
                "context_turns": len(self.agent.lines), "memories": len(self.written)}
