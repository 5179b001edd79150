"""The sessions loaded in one server: each loaded once, counted while in use, taken out when idle.

    table = LoadedSessions(load)                    # load(tenant, session) -> Conversation (from the store)
    conv, new = table.get("acme", "alice", hold=True)   # loaded on first use; held: never taken as idle
    ...; table.let_go(conv)
    for conv, gate, reason in table.take_idle(600, 1024): ...; table.unloaded(conv, gate)   # unload, reopen the id

A session is idle once nobody holds it (a request of it in progress: appending, an answer queued or
decoding) and it has no pending write (queued, writing flashcards or training: `Conversation.jobs`,
its `busy` lock). `take_idle` takes the idle sessions last used `idle` seconds ago, and, while more
than `max_loaded` are loaded, the least recently used idle ones, out of the table in one step with
that check, so no request finds one of them afterwards: a request for it waits
(on the session's gate, the lock a load holds) until the caller has unloaded it (`unloaded`), then
loads it again from the store, as a session moved from another server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from tmem_runtime.serve.conversation import Conversation

Key = tuple[str, str]


class LoadedSessions:
    """The table of loaded sessions (see the module docstring). `convs` is read under `lock`."""

    def __init__(self, load: Callable[[str, str], Conversation]) -> None:
        self.load = load
        self.convs: dict[Key, Conversation] = {}
        self.lock = threading.Lock()  # convs, the gates, every Conversation's `uses` and `last_used`
        self._gates: dict[Key, threading.Lock] = {}  # held while the session is loaded or unloaded

    def get(self, tenant: str, session: str, hold: bool = False) -> tuple[Conversation, bool]:
        """(the loaded session, whether this call loaded it), loading it once however many ask at once
        (load's errors are raised to every caller that waited for it). hold: count the caller as a user
        until `let_go`."""
        key = (tenant, session)
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
                    conv = self.load(tenant, session)
                    with self.lock:
                        self.convs[key] = self._used(conv, hold)
                    return conv, True
                finally:
                    with self.lock:
                        self._gates.pop(key, None)

    def _used(self, conv: Conversation, hold: bool) -> Conversation:
        conv.last_used = time.monotonic()
        conv.uses += hold
        return conv

    def let_go(self, conv: Conversation) -> None:
        """The end of a use `get(..., hold=True)` counted; the session's idle time starts now."""
        with self.lock:
            conv.uses -= 1
            conv.last_used = time.monotonic()

    def remove(self, conv: Conversation) -> None:
        """Take `conv` out of the table (if it is still the loaded one of its id)."""
        key = (conv.tenant, conv.session)
        with self.lock:
            if self.convs.get(key) is conv:
                del self.convs[key]

    def loaded(self) -> list[Conversation]:
        with self.lock:
            return list(self.convs.values())

    def take_idle(self, idle: float, max_loaded: int | None = None) -> list[tuple[Conversation, threading.Lock, str]]:
        """The idle sessions last used `idle` seconds ago (0: none for its time), and while more than
        `max_loaded` are loaded (None: no bound) the least recently used idle ones (see the module
        docstring), taken out of the table and marked inactive, each with its gate, held, and why it was
        taken ("idle": unused for `idle` seconds, else "max_loaded"): call `unloaded(conv, gate)` once it
        is unloaded."""
        now, taken = time.monotonic(), []
        with self.lock:
            excess = len(self.convs) - max_loaded if max_loaded is not None else 0
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
