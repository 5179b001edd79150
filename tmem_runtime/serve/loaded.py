"""The sessions loaded in one server: each loaded once, counted while in use, taken out when idle.

    table = LoadedSessions(load, unload)            # load(tenant, session) -> Conversation (from the store)
    conv, new = table.get("acme", "alice", hold=True, max_loaded=1024, wait=10)   # loaded on first use
    ...; table.let_go(conv)                         # held until then: never taken as idle
    for conv, gate, reason in table.take_idle(600, 1024): ...; table.unloaded(conv, gate)   # unload, reopen the id

A session is idle once nobody holds it (a request of it in progress: appending, an answer queued or
decoding) and it has no pending write (queued, writing flashcards or training: `Conversation.jobs`,
its `busy` lock). `take_idle` takes the idle sessions last used `idle` seconds ago, and, while more
than `max_loaded` are loaded, the least recently used idle ones, out of the table in one step with
that check, so no request finds one of them afterwards: a request for it waits
(on the session's gate, the lock a load holds) until the caller has unloaded it (`unloaded`), then
loads it again from the store, as a session moved from another server.

A load within `max_loaded` makes its room first: with `max_loaded` sessions loaded or loading, it takes
the least recently used idle one in the same step (unloaded by `unload` once the load has succeeded; put
back as it was if the load fails). With none idle it waits, up to `wait` seconds, for one to be; then
`ServerBusyError`, nothing loaded or unloaded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from tmem_runtime.serve.conversation import Conversation

Key = tuple[str, str]
Taken = tuple[Conversation, threading.Lock, str]  # a session taken out of the table, its gate (held), why
POLL = 0.05  # seconds between checks of a load waiting for room (a write ending is not signalled; a request is)


class ServerBusyError(RuntimeError):
    """`max_loaded` sessions are loaded and none became idle within the wait: a session that is not loaded
    cannot be loaded now (HTTP 503; nothing was loaded or unloaded)."""

    def __init__(self, max_loaded: int, waited: float) -> None:
        self.max_loaded, self.waited = max_loaded, waited
        super().__init__(
            f"the server holds its limit of {max_loaded} loaded sessions and every one of them is in "
            f"use (a request or a memory write) after {waited:g} s of waiting: retry later"
        )


class LoadedSessions:
    """The table of loaded sessions (see the module docstring). `convs` is read under `lock`."""

    def __init__(self, load: Callable[[str, str], Conversation], unload: Callable[[list[Taken]], None]) -> None:
        self.load, self.unload = load, unload  # unload: unloads taken sessions, calling `unloaded` for each
        self.convs: dict[Key, Conversation] = {}
        self.lock = threading.Lock()  # convs, the gates, every Conversation's `uses` and `last_used`
        self._changed = threading.Condition(self.lock)  # notified when a session is let go or leaves the table
        self._gates: dict[Key, threading.Lock] = {}  # held while the session is loaded or unloaded
        self._loading: set[Key] = set()  # loads that have their room (within max_loaded) and are in progress

    def get(
        self, tenant: str, session: str, hold: bool = False, max_loaded: int | None = None, wait: float = 0.0
    ) -> tuple[Conversation, bool]:
        """(the loaded session, whether this call loaded it), loading it once however many ask at once
        (load's errors are raised to every caller that waited for it). hold: count the caller as a user
        until `let_go`. max_loaded: load it within that many (see the module docstring: ServerBusyError
        after `wait` seconds, counted from this call); None: load it whatever is loaded."""
        key, deadline = (tenant, session), time.monotonic() + wait
        while True:
            with self.lock:
                conv = self.convs.get(key)
                if conv is not None:
                    return self._used(conv, hold), False
                gate = self._gates.setdefault(key, threading.Lock())
            with gate:
                with self.lock:
                    if key in self.convs:
                        return self._used(self.convs[key], hold), False
                    if self._gates.get(key) is not gate:  # a failed load or an unload let it go: a newer
                        continue  # gate may guard a load in progress now
                try:
                    taken = self._room(key, max_loaded, wait, deadline) if max_loaded is not None else []
                    try:
                        conv = self.load(tenant, session)
                    except BaseException:
                        with self.lock:
                            self._loading.discard(key)
                            self._put_back(taken)
                        raise
                    with self.lock:
                        self._loading.discard(key)
                        self.convs[key] = self._used(conv, hold)
                        self._changed.notify_all()
                    self.unload(taken)
                    return conv, True
                finally:
                    with self.lock:
                        self._gates.pop(key, None)

    def _room(self, key: Key, max_loaded: int, wait: float, deadline: float) -> list[Taken]:
        """Room for `key` within max_loaded, counted in `_loading` from then on: the least recently used
        idle sessions taken for it (none if there was room), waiting for them until `deadline` (then
        ServerBusyError, nothing taken)."""
        with self.lock:
            while True:
                over = len(self.convs) + len(self._loading) + 1 - max_loaded
                taken = self._take(0, over) if over > 0 else []
                if len(taken) >= over:
                    self._loading.add(key)
                    return taken
                self._put_back(taken)  # (too few: only if max_loaded was lowered under loaded sessions)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServerBusyError(max_loaded, wait)
                self._changed.wait(min(POLL, left))

    def _put_back(self, taken: list[Taken]) -> None:
        """Sessions taken by `_take` back in the table as they were (self.lock held): the requests waiting
        on their gates get them."""
        for conv, gate, _ in taken:
            conv.active = True  # (nobody else reads or writes it while it is out of the table)
            key = (conv.tenant, conv.session)
            self.convs[key] = conv
            if self._gates.get(key) is gate:
                del self._gates[key]
            gate.release()
        if taken:
            self._changed.notify_all()

    def _used(self, conv: Conversation, hold: bool) -> Conversation:
        conv.last_used = time.monotonic()
        conv.uses += hold
        return conv

    def let_go(self, conv: Conversation) -> None:
        """The end of a use `get(..., hold=True)` counted; the session's idle time starts now."""
        with self.lock:
            conv.uses -= 1
            conv.last_used = time.monotonic()
            self._changed.notify_all()

    def remove(self, conv: Conversation) -> None:
        """Take `conv` out of the table (if it is still the loaded one of its id)."""
        key = (conv.tenant, conv.session)
        with self.lock:
            if self.convs.get(key) is conv:
                del self.convs[key]
                self._changed.notify_all()

    def loaded(self) -> list[Conversation]:
        with self.lock:
            return list(self.convs.values())

    def take_idle(self, idle: float, max_loaded: int | None = None) -> list[Taken]:
        """The idle sessions last used `idle` seconds ago (0: none for its time), and while more than
        `max_loaded` are loaded (None: no bound) the least recently used idle ones (see the module
        docstring), taken out of the table and marked inactive, each with its gate, held, and why it was
        taken ("idle": unused for `idle` seconds, else "max_loaded"): call `unloaded(conv, gate)` once it
        is unloaded."""
        with self.lock:
            return self._take(idle, len(self.convs) - max_loaded if max_loaded is not None else 0)

    def _take(self, idle: float, excess: int) -> list[Taken]:
        """take_idle's step (self.lock held): the idle sessions unused for `idle` seconds, and up to
        `excess` more of the least recently used idle ones."""
        now, taken = time.monotonic(), []
        for key, conv in sorted(self.convs.items(), key=lambda kv: kv[1].last_used):
            stale = bool(idle) and now - conv.last_used >= idle
            if not (stale or excess > 0):
                continue
            if conv.uses or key in self._gates or not _deactivate_if_idle(conv):
                continue
            excess -= 1
            del self.convs[key]
            gate = self._gates[key] = threading.Lock()
            gate.acquire()
            taken.append((conv, gate, "idle" if stale else "max_loaded"))
        return taken

    def unloaded(self, conv: Conversation, gate: threading.Lock) -> None:
        """`conv` (taken by `take_idle`) is unloaded: requests for its id load it again."""
        with self.lock:
            if self._gates.get((conv.tenant, conv.session)) is gate:
                del self._gates[(conv.tenant, conv.session)]
            self._changed.notify_all()
        gate.release()


def _deactivate_if_idle(conv: Conversation) -> bool:
    """Mark `conv` inactive if no write of it is pending or training (without waiting for its locks:
    one held means it is busy)."""
    if not conv.busy.acquire(blocking=False):
        return False
    try:
        if not conv.lock.acquire(blocking=False):
            return False
        try:
            if conv.jobs or not conv.active:
                return False
            conv.active = False
            return True
        finally:
            conv.lock.release()
    finally:
        conv.busy.release()
