"""Which sessions hold one of the engine's B rows, and where the others wait.

More sessions can be open than the engine has rows. A session is *resident* when it holds a row;
using it (a write, a forward with it in the batch) makes it resident, evicting the least recently
used unpinned session: its B row is copied to host memory, or to a safetensors file under
`offload_dir` (written atomically; named per pool, so pools may share a directory), and copied back on
its next use. A session still in its initial state is evicted for free (nothing to keep). A copy
(copy.deepcopy of the model, pickling) holds the offloaded rows in host memory, never the original's
files. Sessions in use by a running batch are pinned and never evicted; when every row is pinned,
`acquire` raises `PoolFullError`. An acquire is all or nothing: one that cannot be done (a lost or
corrupt offload file, no row to be had, an eviction's offload file that cannot be written: a full disk)
is refused before any session moves, whichever of its sessions fails: no other session is evicted for it
(the files written for the evictions before the failed one are deleted). Not thread-safe by itself: the
pool calls it under its lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
import warnings
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from tmem_runtime.adapter_file import architecture, read_adapter, save_adapter
from tmem_runtime.engine import FastWeightEngine, FastWeightsError

OFFLOAD = ("host", "disk")


class UnknownSessionError(KeyError):
    """A session id that is not open in this pool."""

    def __str__(self) -> str:
        return str(self.args[0])


class PoolFullError(FastWeightsError):
    """Every B row is held by a session in use; nothing can be evicted to make room."""


@dataclass
class ResidencyCounters:
    evictions: int = 0  # sessions moved out of a row (host or disk)
    restores: int = 0  # sessions moved back into a row
    disk_writes: int = 0
    disk_reads: int = 0


class Residency:
    """Session id -> engine row, LRU order, pins, and the evicted sessions' B rows."""

    def __init__(self, engine: FastWeightEngine, offload: str = "host", offload_dir: str | Path | None = None) -> None:
        if offload not in OFFLOAD:
            raise ValueError(f"offload must be one of {OFFLOAD}, got {offload!r}")
        if offload == "disk" and offload_dir is None:
            raise ValueError("offload='disk' needs offload_dir")
        self.engine, self.offload = engine, offload
        # (absolute: a relative one names the same directory after the process changes its working directory)
        self.offload_dir = None if offload_dir is None else Path(offload_dir).absolute()
        self.resident: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self.away: dict[str, torch.Tensor | Path | None] = {}  # None: evicted in its initial state
        self.free = list(range(engine.capacity))[::-1]
        self.pins: Counter[str] = Counter()
        self.counters = ResidencyCounters()
        self.file_prefix = uuid.uuid4().hex  # this residency's offload files, apart from any other's

    def __getstate__(self) -> dict:
        """A copy reads the rows offloaded to disk into host memory: the files stay the original's."""
        state = dict(self.__dict__)
        state["away"] = {s: self._read(kept) if isinstance(kept, Path) else kept for s, kept in self.away.items()}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.file_prefix = uuid.uuid4().hex

    @property
    def ids(self) -> list[str]:
        return list(self.resident) + list(self.away)

    def __contains__(self, session: str) -> bool:
        return session in self.resident or session in self.away

    def check(self, session: object) -> str:
        if not isinstance(session, str):
            raise TypeError(f"session ids are strings, got {type(session).__name__}")
        if session not in self:
            raise UnknownSessionError(f"unknown session {session!r}: open it first (pool.open)")
        return session

    def open(self, session: str) -> None:
        if not isinstance(session, str) or not session:
            raise ValueError(f"a session id is a non-empty string, got {session!r}")
        if session in self:
            raise ValueError(f"session {session!r} is already open")
        self.away[session] = None  # made resident on first use

    def close(self, session: str) -> None:
        self.check(session)
        if self.pins[session]:
            raise FastWeightsError(f"session {session!r} is in use by a running batch; close it afterwards")
        if session in self.resident:
            slot = self.resident.pop(session)
            self.engine.reset_rows([slot])
            self.free.append(slot)
        else:
            self._delete(self.away.pop(session))

    def reset(self, session: str) -> None:
        """Back to B = B0: its row if resident, else its kept copy is dropped (it comes back at B0 on use,
        taking no row now)."""
        self.check(session)
        if session in self.resident:
            self.engine.reset_rows([self.resident[session]])
            return
        kept, self.away[session] = self.away[session], None
        self._delete(kept)

    def discard_files(self) -> None:
        """Delete every offload file of this residency (the pool is going away: nothing will read them). Files
        that cannot be deleted (a read-only directory) are left, with a warning: the pool goes away all the same."""
        for session, kept in self.away.items():
            if isinstance(kept, Path):
                self.away[session] = None
        if self.offload_dir is None or not self.offload_dir.is_dir():
            return
        left = []
        for path in self.offload_dir.glob(f"{self.file_prefix}-*.safetensors"):  # (with any a restore left)
            try:
                path.unlink(missing_ok=True)
            except OSError:
                left.append(path.name)
        if left:
            warnings.warn(f"{len(left)} offload file(s) in {self.offload_dir} could not be deleted: {left[:3]}",
                          stacklevel=3)

    def _delete(self, kept: torch.Tensor | Path | None) -> None:
        """Delete the offload file of a row no session needs any more (already restored, reset or closed). One
        that cannot be deleted (a read-only directory) is left for `discard_files`: the session is where it belongs."""
        if isinstance(kept, Path):
            with contextlib.suppress(OSError):
                kept.unlink(missing_ok=True)

    def acquire(self, sessions: Sequence[str]) -> list[int]:
        """Make `sessions` resident and pin them; returns their rows. Undo with `release`."""
        unique = list(dict.fromkeys(self.check(s) for s in sessions))
        if len(unique) > self.engine.capacity:  # (not "rows in use by running batches": there may be none)
            raise PoolFullError(
                f"{len(unique)} sessions at once (one batched write, or one batch's rows) need as many B rows, "
                f"and this pool has {self.engine.capacity}: use groups of at most {self.engine.capacity} "
                "sessions, or a pool of a larger capacity"
            )
        # Everything that can fail is done before any session moves: the kept rows are read (a lost or corrupt
        # offload file), the rows counted (PoolFullError) and every victim's row offloaded (a full disk), so a
        # refused acquire changes nothing at all.
        kept = {s: self._kept_row(s) for s in unique if s not in self.resident}
        victims = self._offload(len(kept) - len(self.free), unique)
        for s in unique:
            self.pins[s] += 1
        try:
            for victim, victim_kept in victims.items():  # (from here on only row copies on the device)
                self._move_out(victim, victim_kept)
            for s in unique:
                if s in kept:
                    self._restore(s, self.free.pop(), kept[s])
                self.resident.move_to_end(s)
        except BaseException:
            self.release(unique)
            raise
        return [self.resident[s] for s in sessions]

    def slot(self, session: str, restore: bool = True) -> int:
        """The row of `session`, made resident if it is away (no pin: the caller holds the pool's lock
        for as long as it uses the row). restore=False: for a caller that overwrites the whole row at once
        (a load): an away session's kept copy is not read, only dropped (a lost or corrupt file is no matter)."""
        slot = self.resident.get(session)
        if slot is None:
            self.check(session)
            if restore:
                kept = self._kept_row(session)  # (read before a row is taken: a bad file moves no other session)
                self._restore(session, self._take_row(), kept)
            else:
                slot = self._take_row()  # (PoolFullError: nothing changed)
                self._delete(self.away.pop(session))
                self.resident[session] = slot
            slot = self.resident[session]
        self.resident.move_to_end(session)
        return slot

    def take_free(self, n: int) -> list[int]:
        """Up to `n` rows that hold no session (none evicted for them), for the caller's own use until
        `give_free`."""
        taken = self.free[len(self.free) - min(n, len(self.free)) :]
        del self.free[len(self.free) - len(taken) :]
        return taken

    def give_free(self, slots: Sequence[int]) -> None:
        self.free.extend(slots)

    def release(self, sessions: Sequence[str]) -> None:
        for s in dict.fromkeys(sessions):
            self.pins[s] -= 1
            if self.pins[s] <= 0:
                del self.pins[s]

    def _take_row(self) -> int:
        if not self.free:
            ((victim, kept),) = self._offload(1, ()).items()  # a failed offload (disk full) changes nothing
            self._move_out(victim, kept)
        return self.free.pop()

    def _offload(self, n: int, keep: Sequence[str]) -> dict[str, torch.Tensor | Path | None]:
        """The `n` least recently used unpinned sessions not in `keep`, each with its row's kept copy (`_evict`),
        still resident: nothing has moved. PoolFullError if there are fewer; if an offload fails (a full disk, a
        bad offload_dir), the files written for the others are deleted and it raises, naming the session."""
        if n <= 0:
            return {}
        victims = [s for s in self.resident if not self.pins[s] and s not in keep][:n]
        if len(victims) < n:
            raise _all_rows_pinned(self.engine.capacity)
        offloaded: dict[str, torch.Tensor | Path | None] = {}
        try:
            for victim in victims:
                offloaded[victim] = self._evict(victim, self.resident[victim])
        except OSError as exc:
            for kept in offloaded.values():
                self._delete(kept)
            message = (f"cannot offload session {victim!r} to {self.offload_dir} to make room for another: {exc} "
                       "(no session was moved)")
            raise (OSError(message) if exc.errno is None else OSError(exc.errno, message)) from exc
        except BaseException:
            for kept in offloaded.values():
                self._delete(kept)
            raise
        return offloaded

    def _move_out(self, victim: str, kept: torch.Tensor | Path | None) -> None:
        """Resident `victim` away with `kept`, its row's copy (`_offload`); its row is free."""
        self.free.append(self.resident.pop(victim))
        self.away[victim] = kept
        self.counters.evictions += 1
        self.counters.disk_writes += isinstance(kept, Path)

    def _evict(self, session: str, slot: int) -> torch.Tensor | Path | None:
        """A copy of `session`'s row `slot` to keep while it is away: None (its initial state), a host copy, or
        its offload file (written atomically). Moves nothing."""
        if self.engine.initial[slot]:
            return None
        row = self.engine.b[slot].detach()
        if self.offload == "host":
            return row.to("cpu", copy=True)
        path = self.offload_dir / f"{self.file_prefix}-{_file_stem(session)}.safetensors"
        save_adapter(path, {"b": row}, self._file_meta())
        return path

    def _kept_row(self, session: str) -> torch.Tensor | None:
        """The B row kept for away `session` (on the host when it was offloaded to disk; None: its initial state),
        read and checked without moving anything (AdapterFileError for a lost or corrupt offload file)."""
        kept = self.away[session]
        return self._read(kept, "cpu") if isinstance(kept, Path) else kept

    def _restore(self, session: str, slot: int, kept_row: torch.Tensor | None) -> None:
        """`session`'s kept row (`_kept_row`, read before `slot` was taken for it) into `slot`. On any error the
        session stays away as it was and `slot` is free again."""
        kept = self.away[session]
        try:
            if kept_row is None:
                self.engine.reset_rows([slot])
            else:
                self.engine.set_rows([slot], kept_row[None].to(self.engine.device))
        except BaseException:
            self.free.append(slot)
            raise
        del self.away[session]
        self.resident[session] = slot
        if kept is not None:
            self.counters.restores += 1
            self.counters.disk_reads += isinstance(kept, Path)
            self._delete(kept)

    def _read(self, path: Path, device: torch.device | str | None = None) -> torch.Tensor:
        return read_adapter(path, self._file_meta(), self.engine.device if device is None else device)["b"]

    def _file_meta(self) -> dict[str, str]:
        """An offload file's header: a row of this residency (its file prefix stands where an adapter file has
        the base weights' hash) of this layout. Not the weights' hash: a row offloaded before the base weights
        changed in place (an optimizer step on the model) is still its session's, as a row kept in host memory is."""
        e = self.engine
        return {"format": "tmem-offloaded-row/1", "architecture": architecture(e.model), "init": e.init,
                "weights_sha256": f"offloaded-by-{self.file_prefix}", "scaling": repr(float(e.scaling)),
                **e.layout.describe()}


def _all_rows_pinned(capacity: int) -> PoolFullError:
    return PoolFullError(
        f"all {capacity} rows hold sessions in use by running batches; "
        "raise the pool's capacity or wait for a batch to finish"
    )


def _file_stem(session: str) -> str:
    """A file name for any session id (hex of its UTF-8 bytes: no path tricks, no collisions); a long id's
    SHA-256 instead (a file name has at most 255 bytes; "sha256-" is no hex, so the two never meet)."""
    stem = session.encode().hex()
    return stem if len(stem) <= 128 else "sha256-" + hashlib.sha256(session.encode()).hexdigest()
