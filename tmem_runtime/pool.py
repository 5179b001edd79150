"""SessionPool: many sessions' fast weights on one model, trained and served in batched passes.

    pool = SessionPool(model, capacity=64)           # A0 once per model; B rows for 64 sessions
    pool.open("alice"); pool.open("bob")
    pool.write_qa_many(tok, {"alice": cards_a, "bob": cards_b})   # one batched write, each as if alone
    with pool.rows(["alice", "bob", None]):          # row i of the batch reads session i (None: bare)
        model.generate(...)
    pool.save("alice", path); pool.close("bob")

Every session shares A0 = S_r V_r^T and differs only in its B row, so a batch mixing sessions runs
the base products and the shrink once and only the small expand per session (see `engine.py`), and
a batched write runs the frozen trunk once for every session's cards (see `trainer.py`).

More open sessions than `capacity` are kept off the engine, in host memory or on disk, and moved
back on use (see `residency.py`). Thread safety: every method may be called from any thread.
Forwards run concurrently (`pool_reads.py`); a write's commit (and a swap, a reset) waits until no
open `rows` block, `reading` block, `model.generate(...)` call or plain forward reads a session it
changes, and new ones that read them wait for the commit (`session_locks.py`), so every forward,
every token of a generate and every forward inside a `reading` block sees each session entirely
before or entirely after a write. Blocks reading other sessions go on meanwhile, and so do `reading`
blocks that read copies of the session's row (`row_snapshots.py`). Writes run one at a time. A
thread inside a `rows` or `reading` block or a generate must not write (it would wait for itself):
that raises an error.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict

import torch
from torch.profiler import record_function
from transformers import PreTrainedModel

from tmem_runtime.engine import FastWeightEngine, FastWeightsError, row_bytes
from tmem_runtime.hot_swap import SwapChecker
from tmem_runtime.layout import AdapterLayout
from tmem_runtime.pool_reads import PoolReads
from tmem_runtime.recipes import Recipe
from tmem_runtime.residency import Residency
from tmem_runtime.session_locks import SessionLocks
from tmem_runtime.sessions import Schedules, SessionStats, SessionStore, SessionVersions, WriteError, check_batch
from tmem_runtime.static_write import StaticWrites
from tmem_runtime.trainer import StepCallback, WriteRun
from tmem_runtime.trunk_rows import TrunkRows
from tmem_runtime.write import encode_trunk, right_padded_lengths


class SessionPool(SessionStore):
    """Fast weights for many named sessions of one model (see the module docstring).

    capacity: B rows on the model's device (ValueError, nothing allocated, where they cannot fit in its
    available memory: `device_memory.py`). offload: "host" | "disk" (with offload_dir) for sessions
    beyond capacity. trunk_cache_bytes: examples' trunk outputs kept on the device for writes that
    train them again (replayed flashcards), and the shared prefixes' (the chat preamble every card
    starts with; `trunk_rows.py`), 0: none. The other arguments are those of `FastWeightEngine`.
    `train_a` writes need a pool of capacity 1 (A is shared).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        capacity: int = 16,
        rank: int = 6,
        num_layers: int | Sequence[int] = 4,
        init: str = "svd",
        backend: str = "auto",
        svd: str = "randomized",
        scaling: float = 1.0,
        seed: int = 0,
        cuda_graphs: bool = True,
        offload: str = "host",
        offload_dir: str | os.PathLike | None = None,
        trunk_cache_bytes: int = 256 << 20,
    ) -> None:
        self.engine = FastWeightEngine(model, capacity, rank, num_layers, init, backend, svd, scaling, seed)
        try:
            self._init_parts(model, cuda_graphs, offload, offload_dir, trunk_cache_bytes)
        except BaseException:  # (e.g. a bad offload argument): the model is left as it was, free to attach again
            self.engine.detach()
            raise
        model._tmem_fast_weights = self

    def _init_parts(self, model: PreTrainedModel, cuda_graphs: bool, offload: str,
                    offload_dir: str | os.PathLike | None, trunk_cache_bytes: int) -> None:  # fmt: skip
        """Everything of the pool beside its engine (see __init__)."""
        self.residency = Residency(self.engine, offload, offload_dir)
        decoder = self.engine.decoder
        self.trunk_rows = None  # examples' trunk outputs, for writes that train them again (replayed cards)
        if decoder is not None and trunk_cache_bytes:
            self.trunk_rows = TrunkRows(decoder.trunk_modules(self.engine.first_layer), trunk_cache_bytes)
        self.cuda_graphs = cuda_graphs
        self._init_static()
        self.stats: dict[str, SessionStats] = {}
        self._versions = SessionVersions()  # see version()
        self._swap = SwapChecker(self.engine)
        self._write_lock = threading.Lock()  # one write at a time
        self._reads = PoolReads(self.engine, self.residency, self.version)  # forwards, rows(), reading()
        self._reads.attach(model)  # generate() and plain forwards are read blocks too (the last part: nothing
        # after it can fail, so a model is never left with these hooks)

    def _init_static(self) -> None:
        # on CUDA, writes run on buffers kept per shape bucket and replay the CUDA graphs captured on them
        on_cuda = self.cuda_graphs and self.engine.device.type == "cuda"
        self._static = StaticWrites(self.engine) if on_cuda else None

    def __getstate__(self) -> dict:
        """Copies (copy.deepcopy of the model, pickling) carry every session but no lock, open block or
        CUDA graph (a copy captures its own, on its own buffers; `PoolReads` drops its own)."""
        state = dict(self.__dict__)
        for k in ("_write_lock", "_static"):
            state.pop(k)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._write_lock = threading.Lock()
        self._init_static()

    @property
    def _lock(self) -> threading.RLock:
        """The lock of the session table and the engine's rows (commits hold it)."""
        return self._reads.lock

    @property
    def _locks(self) -> SessionLocks:
        """Open read blocks and waiting commits of the sessions."""
        return self._reads.locks

    # ---------------------------------------------------------------- sessions
    @property
    def model(self) -> PreTrainedModel:
        return self.engine.model

    @property
    def layout(self) -> AdapterLayout:
        return self.engine.layout

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def metadata(self) -> dict[str, str]:
        """What this pool's adapter files fit: architecture, base-weight hash, init, layout."""
        return self.engine.metadata()

    @property
    def sessions(self) -> list[str]:
        with self._lock:
            return self.residency.ids

    def __contains__(self, session: str) -> bool:
        with self._lock:
            return session in self.residency

    def version(self, session: str) -> int:
        """A number that changes whenever `session`'s fast weights may have changed (open, write, reset,
        load; every session on a write of A) and is never reused, e.g. to key what was computed from them."""
        with self._lock:
            self.residency.check(session)  # UnknownSessionError
            return self._versions.of(session)

    def open(self, session: str) -> None:
        """A new session in the initial state (B = B0). ValueError if the id is taken."""
        self._check_attached()
        with self._lock:
            self.residency.open(session)
            self.stats[session] = SessionStats()
            self._versions.bump([session])

    def close(self, session: str, wait: bool = True) -> None:
        """Forget a session: its row (or offloaded copy) is freed. A write of the session running on another
        thread commits first, then the session is closed (as `reset` waits); called from that write's own
        `on_step` callback: FastWeightsError, nothing changed. wait=False: FastWeightsError instead of waiting
        (for a caller holding a lock it must not hold for a write). A session a running batch reads (an open
        rows() block): FastWeightsError, nothing changed."""
        self._check_attached()
        with self._locks.writes_committed([session], wait=wait):  # (holds the lock)
            self.residency.close(session)
            del self.stats[session]
            self._versions.forget(session)

    def reset(self, session: str) -> None:
        """Back to the initial state (B = B0): the episode boundary. A write of the session running on
        another thread commits first (its result, trained from the state before, would overwrite this)."""
        self._check_attached()
        with self._locks.commit([session], after_writes=True), torch.inference_mode(False):
            self.residency.reset(session)  # (an offloaded session is not brought back for it)
            self.stats[session] = SessionStats()
            self._versions.bump([session])

    def _check_attached(self) -> None:
        """FastWeightsError once `detach()` ran (a rows() block would read nothing: the bare model)."""
        if self.engine.detached:
            raise FastWeightsError("this pool was detached from its model (pool.detach()); attach a new one")

    def counters(self) -> dict[str, int | float]:
        """Residency counters and sizes: evictions, restores, resident and open sessions, bytes (the engine's
        buffers: see `FastWeightEngine.buffer_bytes`); the kept trunk outputs' bytes and hits/misses
        (examples, and shared prefixes, whose trunk a write read back / ran); commits (writes, swaps,
        resets) that waited for read blocks of their sessions to end, and their seconds waited in all."""
        kept = self.trunk_rows
        trunk = dict.fromkeys(TrunkRows.COUNTERS, 0) if kept is None else kept.counters()
        with self._lock:
            return {
                "capacity": self.engine.capacity,
                "open": len(self.residency.ids),
                "resident": len(self.residency.resident),
                **asdict(self.residency.counters),  # evictions, restores, disk_writes, disk_reads
                "bytes_per_session": self.bytes_per_session(),
                "bytes_resident_total": self.engine.buffer_bytes(),
                **{f"trunk_{k}": v for k, v in trunk.items()},
                "commit_waits": self._locks.waits,
                "commit_wait_seconds": self._locks.wait_seconds,
            }

    def bytes_per_session(self, writing: bool = False) -> int:
        """Bytes one resident session takes on the device: its B row (`engine.row_bytes`: the float32 master
        and, for a model not in float32, the compute-dtype copy the forwards read). writing: and, while it is
        written, its workspace besides (a float32 master, its gradient and AdamW's two moments, and the
        compute copy)."""
        e = self.engine
        row = row_bytes(e.layout, e.dtype)
        return row + (row + 3 * 4 * e.layout.b_numel if writing else 0)

    # ---------------------------------------------------------------- forwards
    def rows(self, sessions: Sequence[str | None]) -> AbstractContextManager[None]:
        """Forwards on this thread inside the block read session sessions[i] for batch row i (None:
        the bare model). The list's length must be the batch's (generate(): the prompts'; their beams and
        return sequences read their prompt's session); generate() keeps it for every step. Each forward
        sees each session whole; to see them unchanged across the forwards of several blocks (e.g. a
        decode loop that binds its rows per step), open a `reading` block around them."""
        self._check_attached()
        _not_one_string("rows", sessions)
        return self._reads.rows(sessions)

    def reading(self, sessions: Iterable[str] | None = None) -> AbstractContextManager[dict[str, int] | None]:
        """A block in which every forward of this thread sees each of `sessions` as it was when the block
        began; yields {session: version()} as the block sees them. The rows() blocks inside read copies
        of the sessions' rows (`row_snapshots.py`), so a write, swap or reset of them commits at once;
        without a free row for its copy, a session is read in place and its commits wait for the block
        to end (new blocks reading it, on other threads, wait for them).
        None: what a forward outside rows() reads (a FastWeights' one session; a pool's bare model),
        in place; yields None."""
        self._check_attached()
        _not_one_string("reading", sessions)
        return self._reads.reading(sessions)

    # ---------------------------------------------------------------- writes
    def _write(
        self,
        names: list[str],
        data: dict[str, torch.Tensor] | None,
        schedules: Schedules,
        recipe: Recipe,
        train_a: bool,
        on_step: StepCallback | None,
    ) -> dict[str, list[float]]:
        if len(set(names)) != len(names):
            raise ValueError("a session appears twice in one batched write")
        if train_a and self.engine.capacity > 1:
            raise ValueError("A is shared by every session of a pool: train_a needs a pool of capacity 1")
        if self._locks.reading_here:
            raise FastWeightsError("a write inside a pool.rows() block, a reading() block or generate() "
                                   "would wait for itself")
        self._check_attached()
        with self._lock:
            for s in names:
                self.residency.check(s)  # (UnknownSessionError for an id with no card too)
        # a session with nothing to train (no card) is written as alone: no row taken, no write counted
        everyone, idle = names, {s: [] for s, steps in zip(names, schedules) if not steps}
        names, schedules = [s for s in names if s not in idle], [steps for steps in schedules if steps]
        if not names:
            return idle
        # (`writing` outermost: a close or reset of these sessions waits until their rows are unpinned and
        # their stats counted, so a close that waited never finds them in use, nor the stats gone)
        with self._write_lock, self._locks.writing(names), self._reads.resident(names) as slots:
            with torch.inference_mode(False), record_function("tmem.write.trunk"):
                encoded = self._encode(data)
            run = WriteRun(self.engine, encoded, schedules, slots, recipe, train_a, self._static)
            outcome = run.train(on_step)
            with self._locks.commit(None if train_a else names), record_function("tmem.write.commit"):
                run.commit(outcome)
                committed = [s for s, e in zip(names, outcome.errors) if e is None]  # (rolled back: unchanged)
                self._versions.bump(None if train_a and committed else committed)
                losses, errors = self._count(names, outcome.losses, outcome.errors, train_a)
        if errors:
            if len(everyone) == 1:
                raise errors[names[0]]
            raise WriteError(errors, idle | losses)
        return {s: idle[s] if s in idle else losses[s] for s in everyone}

    def _count(self, names: list[str], losses: list[list[float]], errors: list[FastWeightsError | None],
               train_a: bool) -> tuple[dict[str, list[float]], dict[str, FastWeightsError]]:
        """A committed write's stats (under the lock): ({session: step losses}, {session: its error})."""
        for s, steps, e in zip(names, losses, errors):
            self.stats[s].count_write(len(steps), failed=e is not None)
        done = {s: steps for s, steps, e in zip(names, losses, errors) if e is None}
        failed = {s: e for s, e in zip(names, errors) if e is not None}
        if train_a:
            self._swap.a_snapshot = None  # A changed: hand out (and check) a new snapshot
        return done, failed

    def _encode(self, batch: dict[str, torch.Tensor]) -> object:
        """The frozen trunk over a right-padded batch (the fast path), or the batch itself (generic path)."""
        ids, mask, labels = (t.cpu().clone() for t in check_batch(batch))
        lengths = right_padded_lengths(mask)
        e = self.engine
        if e.decoder is None or lengths is None or not e.decoder.full_attention_covers(ids.shape[1]):
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}
        return encode_trunk(e.decoder, e.first_layer, ids, lengths, labels, e.device, kept=self.trunk_rows)

    # ---------------------------------------------------------------- state
    def state_dict(self, session: str) -> dict[str, torch.Tensor]:
        """A snapshot {"layers.L.mlp.T.lora_A": [r, in], "...lora_B": [out, r]}: B copied, A shared
        (one snapshot of A0 for every state dict while A is unchanged; treat it as read-only)."""
        self._check_attached()
        resident = self._reads.resident([session])
        with resident as (slot,), torch.inference_mode(False), self._lock:  # (commits hold it)
            b_row = self.engine.b[slot].detach().clone()
            lay = self.engine.layout
            return {**self._a_state(), **{lay.b_name(i): lay.b_view(b_row, i) for i in range(len(lay.slots))}}

    def _a_state(self) -> dict[str, torch.Tensor]:
        if self._swap.a_snapshot is None:
            a = self.engine.a.detach().clone()
            lay = self.engine.layout
            self._swap.remember_a({lay.a_name(i): lay.a_view(a, i) for i in range(len(lay.slots))})
        return dict(self._swap.a_snapshot)

    def load_state_dict(self, session: str, state: Mapping[str, torch.Tensor], own_a: bool = False) -> None:
        """Hot swap: validate (see hot_swap), then copy B into the session's row; nothing changes on
        a mismatch (ValueError). A must equal the pool's shared A, unless own_a: the state's A (e.g. trained
        by a `train_a` write) then replaces it where it differs, for a session that is the pool's only one
        (FastWeights' loads); ValueError where other sessions are open (every session reads A)."""
        self._check_attached()
        # (own_a: A may change, which every read block reads, copies of B rows included)
        with self._locks.commit(None if own_a else [session], after_writes=True), _outside_inference_mode():
            self.residency.check(session)
            a_row = self._swap.a_row(state) if own_a else None  # (checked first: a mismatch moves no session)
            if a_row is not None and self.residency.ids != [session]:
                raise ValueError(f"the state's A is not this pool's, which its {len(self.residency.ids)} open "
                                 "sessions share: its own A loads only into a pool's only session")
            b_row = self._swap.b_row(state, check_a=not own_a)
            self.engine.set_row(self.residency.slot(session, restore=False), b_row)  # (its old copy is not read)
            if a_row is None:
                self._versions.bump([session])
                return
            self.engine.set_a(a_row)
            self._swap.a_snapshot = None  # A changed: hand out (and check) a new snapshot
            self._versions.bump()

    def detach(self) -> PreTrainedModel:
        """Remove the fast weights from the model (exactly as it was); the pool is unusable after, and its
        offload files are deleted (save sessions first to keep them)."""
        with self._locks.commit(None):
            self._reads.detach(self.model)
            if self.trunk_rows is not None:
                self.trunk_rows.clear()  # the kept trunk outputs' memory goes with the pool
            model = self.engine.detach()
            self.residency.discard_files()  # (the model first: nothing about files keeps it half attached)
            return model


def _not_one_string(call: str, sessions: object) -> None:
    """TypeError for one session id where a list of them is taken (its characters were read as ids)."""
    if isinstance(sessions, str):
        raise TypeError(f"{call}() takes a list of session ids, got one string: {call}([{sessions!r}])")


def _outside_inference_mode() -> AbstractContextManager:
    """inference_mode(False) where it is on (the engine's buffers are not inference tensors), else nothing."""
    return torch.inference_mode(False) if torch.is_inference_mode_enabled() else nullcontext()
