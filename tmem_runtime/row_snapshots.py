"""Snapshots of sessions' B rows for a block of forwards: a batch reads copies, so writes commit meanwhile.

`SessionPool.reading(sessions)` copies each session's B row into a row of the engine that holds no
session (a scratch row), under the pool's lock, and the `rows(...)` blocks its thread opens inside
read those copies. A write, swap or reset of those sessions then commits into their own rows at once,
and the block goes on reading the state it began with: a decode batch that binds its rows per step
sees one state of every session for all its tokens, and a write of one of them never waits for the
batch. A session that finds no free row is read in place (pinned), and a commit of it waits for the
block to end (`session_locks.py`). Scratch rows go back to the free rows when the block ends.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tmem_runtime.engine import FastWeightEngine
from tmem_runtime.residency import Residency


@dataclass
class RowSnapshot:
    """slots: the row each session is read from. scratch: the copies' rows. in_place: the sessions read
    from their own rows (pinned). versions: each session's `SessionPool.version` when it was taken."""

    slots: dict[str, int]
    scratch: list[int]
    in_place: list[str]
    versions: dict[str, int]


class RowSnapshots:
    """The snapshots open on each thread (innermost last) of one engine and residency."""

    def __init__(self, engine: FastWeightEngine, residency: Residency) -> None:
        self.engine, self.residency = engine, residency
        self._local = threading.local()

    def take(self, sessions: Sequence[str], version: Callable[[str], int]) -> RowSnapshot:
        """Copies of `sessions`' rows, as many as there are free rows (call it under the pool's lock)."""
        names = list(dict.fromkeys(sessions))
        live = self.residency.acquire(names)  # resident (UnknownSessionError, PoolFullError) and pinned
        scratch = self.residency.take_free(len(names))
        copied, in_place = names[: len(scratch)], names[len(scratch) :]
        try:
            if scratch:
                self.engine.copy_rows(scratch, live[: len(scratch)])
        except BaseException:
            self.residency.give_free(scratch)
            self.residency.release(names)
            raise
        self.residency.release(copied)  # (the copies are read, not their rows)
        slots = dict(zip(copied, scratch)) | dict(zip(in_place, live[len(scratch) :]))
        return RowSnapshot(slots, scratch, in_place, {s: version(s) for s in names})

    def give_back(self, snapshot: RowSnapshot) -> None:
        """The block ended: its scratch rows are free again, its in-place sessions unpinned (under the lock)."""
        self.residency.give_free(snapshot.scratch)
        self.residency.release(snapshot.in_place)

    def push(self, snapshot: RowSnapshot) -> None:
        self._stack().append(snapshot)

    def pop(self) -> None:
        self._stack().pop()

    def slots_here(self) -> dict[str, int]:
        """The rows this thread's open snapshots read their sessions from (the innermost wins)."""
        out: dict[str, int] = {}
        for snapshot in self._stack():
            out |= snapshot.slots
        return out

    def _stack(self) -> list[RowSnapshot]:
        return self._local.__dict__.setdefault("stack", [])
