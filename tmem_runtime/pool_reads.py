"""The read side of a SessionPool: which sessions a forward reads, and what holds their commits back.

A `SessionPool` composes one `PoolReads` and hands it its `rows(...)` and `reading(...)` blocks, the
model's `generate()` and its plain forwards (hooks installed by `attach`). Each of them is a read block
of `session_locks.py`: a write's commit, a swap or a reset of a session it reads waits for it to end,
unless the block reads copies of the session's row (`row_snapshots.py`). The pool's lock (the session
table and the engine's rows) lives here, with the read blocks and snapshots that share it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from functools import partial

import torch
from torch.utils.hooks import RemovableHandle
from transformers import PreTrainedModel

from tmem_runtime.engine import FastWeightEngine
from tmem_runtime.residency import Residency
from tmem_runtime.row_snapshots import RowSnapshots
from tmem_runtime.session_locks import SessionLocks


class PoolReads:
    """Forwards over the sessions of one engine and residency (see the module docstring).

    version: the pool's `SessionPool.version`, for the versions a `reading` block yields. Copies
    (copy.deepcopy, pickling) carry no lock, open block or snapshot: a copy makes its own.
    """

    def __init__(self, engine: FastWeightEngine, residency: Residency, version: Callable[[str], int]) -> None:
        self.engine, self.residency, self.version = engine, residency, version
        self._hooks: tuple[RemovableHandle, ...] = ()
        self._init_threading()

    def _init_threading(self) -> None:
        self.lock = threading.RLock()  # the session table and the engine's rows
        self.locks = SessionLocks(self.lock)  # read blocks and commits
        self.snapshots = RowSnapshots(self.engine, self.residency)  # reading() blocks' copies of rows

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for k in ("lock", "locks", "snapshots"):
            state.pop(k)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_threading()

    # ---------------------------------------------------------------- the model
    def attach(self, model: PreTrainedModel) -> None:
        """Make the model's generate() one read block, and each plain forward another (see `generate`)."""
        if hasattr(model, "generate"):  # a whole generate() reads one state of the rows
            model.generate = partial(self.generate, model)
        self._hooks = (  # so does each plain forward
            model.register_forward_pre_hook(self.forward_begins),
            model.register_forward_hook(self.forward_ends, always_call=True),
        )

    def detach(self, model: PreTrainedModel) -> None:
        """Undo `attach`: the model's own generate() and no hooks."""
        for hook in self._hooks:
            hook.remove()
        model.__dict__.pop("generate", None)

    # ---------------------------------------------------------------- blocks
    @contextmanager
    def resident(self, sessions: Sequence[str]) -> Iterator[list[int]]:
        """`sessions`' rows on the engine, pinned there for the block; yields their slots."""
        with self.lock:
            slots = self.residency.acquire(sessions)
        try:
            yield slots
        finally:
            with self.lock:
                self.residency.release(sessions)

    @contextmanager
    def rows(self, sessions: Sequence[str | None]) -> Iterator[None]:
        """See `SessionPool.rows`: this thread's forwards read session sessions[i] for batch row i."""
        copies = self.snapshots.slots_here()  # sessions an open reading() block on this thread copied
        names = [s for s in sessions if s is not None and s not in copies]
        with self.locks.reading(names, lambda: self.residency.acquire(names)) as slots:
            try:
                it = iter(slots)
                rows = [None if s is None else copies[s] if s in copies else next(it) for s in sessions]
                with self.engine.bindings.bind(self.engine.bindings.for_rows(rows)):
                    yield
            finally:
                with self.lock:
                    self.residency.release(names)

    def reading(self, sessions: Iterable[str] | None = None) -> AbstractContextManager[dict[str, int] | None]:
        """See `SessionPool.reading`: a block whose forwards see `sessions` as they were when it began."""
        if sessions is None:
            return self.locks.reading(self._plain_reads())
        return self._reading_copies(list(sessions))

    @contextmanager
    def _reading_copies(self, sessions: list[str]) -> Iterator[dict[str, int]]:
        take = partial(self.snapshots.take, sessions, self.version)
        with self.locks.reading(sessions, take, in_place=lambda snapshot: snapshot.in_place) as snapshot:
            self.snapshots.push(snapshot)
            try:
                yield dict(snapshot.versions)
            finally:
                self.snapshots.pop()
                with self.lock:
                    self.snapshots.give_back(snapshot)

    def _plain_reads(self) -> list[str] | None:
        """The sessions a forward outside rows() reads: every one under a default binding, else none."""
        return None if self.engine.bindings.default is not None else []

    # ---------------------------------------------------------------- the model's calls
    def generate(self, model: PreTrainedModel, *args, **kwargs):
        """The model's own generate(), run as one read block: a write's commit, a swap or a reset from
        another thread waits for it to end, so every token of it reads the same fast weights."""
        with self.reading():
            return type(model).generate(model, *args, **kwargs)

    def forward_begins(self, model: PreTrainedModel, args: tuple) -> None:
        """The model's forward pre-hook: a forward outside any read block is one (see `reading()`);
        nothing under torch.compile, which traces the forward rather than runs it."""
        if not torch.compiler.is_compiling():
            self.locks.forward_begins(self._plain_reads())

    def forward_ends(self, model: PreTrainedModel, args: tuple, output: object) -> None:
        """The model's forward hook (called also when the forward raised): ends `forward_begins`' block."""
        if not torch.compiler.is_compiling():
            self.locks.forward_ends()
