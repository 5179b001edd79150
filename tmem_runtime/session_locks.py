"""Read blocks and commits of sessions' fast weights: what lets a forward, or a whole answer, see a session whole.

A read block names the sessions its forwards read (None: every session, e.g. a plain forward of a
one-session model). A commit (a write's, a swap, a reset) names the sessions it changes (None: every
one, e.g. a write of the shared A); it waits until no open read block reads any of them, and while it
waits, new blocks that read any of them wait for it, so a stream of readers cannot starve it. Blocks
that read other sessions, or only the bare model, go on meanwhile. A commit runs holding the lock it
was given (the pool's), so nothing else changes the table or the rows inside it. A reset or a swap
(`after_writes`) also waits for a running write of its sessions to commit: that write trained from the
state before, and its commit would undo it. A close (`writes_committed`) waits for that commit too (the
write's result goes with the session), but not for read blocks.

Read blocks nest on a thread: an inner block never waits for a waiting commit (the thread's outer block
may be what that commit waits for), but it registers what it reads under the lock, so a commit that
needs it runs entirely before or entirely after the inner block.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import TypeVar

from tmem_runtime.engine import FastWeightsError

T = TypeVar("T")


def _overlap(a: frozenset[str] | None, b: frozenset[str] | None) -> bool:
    """Whether a block reading `a` and a commit of `b` touch a common session (None: every session)."""
    if a is None or b is None:
        return True
    return not a.isdisjoint(b)


class SessionLocks:
    """Open read blocks and waiting commits of a table of sessions (see the module docstring).

    lock: the re-entrant lock that guards the table; commits run holding it.
    """

    def __init__(self, lock: threading.RLock) -> None:
        self.lock = lock
        self._changed = threading.Condition(lock)
        self._reads: dict[int, frozenset[str] | None] = {}  # open read blocks, by a number of their own
        self._waiting: dict[int, frozenset[str] | None] = {}  # commits waiting for read blocks to end
        self._writing: Counter[str] = Counter()  # sessions running writes train (their commits still to come)
        self._next = 0
        self._local = threading.local()
        self.waits, self.wait_seconds = 0, 0.0  # commits that waited for read blocks, and how long in all

    @property
    def reading_here(self) -> bool:
        """Whether this thread is inside a read block (a commit from it would wait for itself)."""
        return getattr(self._local, "depth", 0) > 0

    @property
    def commits_waiting(self) -> int:
        """Commits waiting for read blocks to end."""
        with self.lock:
            return len(self._waiting)

    def _ticket(self) -> int:
        self._next += 1
        return self._next

    @contextmanager
    def reading(self, sessions: Collection[str] | None, acquire: Callable[[], T] = lambda: None,
                in_place: Callable[[T], Collection[str]] | None = None) -> Iterator[T]:
        """A block in which no commit of `sessions` (None: of any session) runs; yields acquire(), called
        under the lock once no commit of them is waiting. in_place(acquire()): the sessions of `sessions`
        the block reads where commits write them (default: all): only those hold commits back."""
        names = None if sessions is None else frozenset(sessions)
        with self.lock:
            if not self.reading_here:
                self._changed.wait_for(lambda: not any(_overlap(names, c) for c in self._waiting.values()))
            held = acquire()
            ticket = self._ticket()
            self._reads[ticket] = names if in_place is None else frozenset(in_place(held))
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield held
        finally:
            self._local.depth -= 1
            with self.lock:
                del self._reads[ticket]
                self._changed.notify_all()

    def forward_begins(self, sessions: Collection[str] | None) -> None:
        """For a model's forward pre-hook: the forward reads `sessions` inside a read block of its own,
        ended by `forward_ends` (none if this thread is inside a read block already)."""
        block = None if self.reading_here else self.reading(sessions)
        if block is not None:
            block.__enter__()
        self._local.__dict__.setdefault("forwards", []).append(block)

    def forward_ends(self) -> None:
        """For the model's forward hook (called also when the forward raised): ends `forward_begins`' block."""
        forwards = self._local.__dict__.get("forwards")
        block = forwards.pop() if forwards else None
        if block is not None:
            block.__exit__(None, None, None)

    @contextmanager
    def writing(self, sessions: Collection[str]) -> Iterator[None]:
        """The block of a write of `sessions`, from reading their rows to its commit: a commit of them with
        `after_writes` (a reset, a swap) waits for it, since the write's commit would undo it."""
        with self.lock:
            self._writing.update(sessions)
        self._local.writing = frozenset(sessions)  # (writes do not nest)
        try:
            yield
        finally:
            self._local.writing = frozenset()
            with self.lock:
                self._writing.subtract(sessions)
                self._writing = +self._writing  # (drops the zero counts)
                self._changed.notify_all()

    def _written(self, names: frozenset[str] | None) -> bool:
        return any(self._writing.values()) if names is None else any(self._writing[s] for s in names)

    def _not_in_own_write(self, names: frozenset[str] | None, what: str) -> None:
        """FastWeightsError if this thread runs a write of any of `names` (`what` is called from its on_step
        callback): waiting for that write to commit would wait for itself."""
        writing = getattr(self._local, "writing", frozenset())
        if writing and _overlap(names, writing):
            raise FastWeightsError(f"{what} of a session inside a write of it (its on_step callback) would wait "
                                   "for itself")

    @contextmanager
    def writes_committed(self, sessions: Collection[str], wait: bool = True) -> Iterator[None]:
        """Holds the lock once no write of `sessions` is training (see `writing`), whatever read blocks are open:
        a close, which frees the session's row, waits for a running write of it to commit first (the write holds
        the row until then). FastWeightsError from that write's own thread (its on_step callback), from a thread
        inside a read block while a write of them trains (that write's commit may wait for the block), and,
        with wait=False, whenever a write of them trains (for a caller holding a lock it must not hold that long)."""
        names = frozenset(sessions)
        self._not_in_own_write(names, "a close")
        with self.lock:
            if not wait and self._written(names):
                raise FastWeightsError("a close of a session a write is training would wait for its commit "
                                       "(wait=False)")
            if self.reading_here and self._written(names):
                raise FastWeightsError("a close of a session a write is training, inside a pool.rows() block, a "
                                       "reading() block or generate(), would wait for itself")
            self._changed.wait_for(lambda: not self._written(names))
            yield

    @contextmanager
    def commit(self, sessions: Collection[str] | None, after_writes: bool = False) -> Iterator[None]:
        """Holds the lock once no read block reads any of `sessions` (None: once none is open at all);
        new read blocks of them wait meanwhile. after_writes: also once no write of them is training
        (see `writing`). FastWeightsError on a thread inside a read block."""
        if self.reading_here:
            raise FastWeightsError("a write, swap or reset inside a pool.rows() block, a reading() block or "
                               "generate() would wait for itself")
        names = None if sessions is None else frozenset(sessions)
        if after_writes:
            self._not_in_own_write(names, "a swap or reset")
        with self.lock:
            while True:
                if after_writes:  # (new read blocks go on meanwhile: this waits for a write, not for them)
                    self._changed.wait_for(lambda: not self._written(names))
                if any(_overlap(r, names) for r in self._reads.values()):
                    ticket, t0 = self._ticket(), time.perf_counter()
                    self._waiting[ticket] = names
                    try:
                        self._changed.wait_for(lambda: not any(_overlap(r, names) for r in self._reads.values()))
                    finally:
                        del self._waiting[ticket]
                        self._changed.notify_all()
                        self.waits += 1
                        self.wait_seconds += time.perf_counter() - t0
                if not (after_writes and self._written(names)):  # (a write may have begun while it waited)
                    break
            yield
