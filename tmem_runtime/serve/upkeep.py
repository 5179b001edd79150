"""Upkeep: a server's background thread. It renews the server's leases and unloads idle sessions.

Every lease_ttl / 3 seconds it renews the leases (`LeaseKeeper`: one store write keeps every loaded
session's). As often (every idle_unload / 2 seconds for a shorter idle_unload) it unloads the sessions
unused for `idle_unload` seconds, and, while more than `max_loaded` are loaded, the least recently used idle
ones (`LoadedSessions.take_idle`), and gives their leases up: the store has them already, and their next
request loads them again.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from tmem_runtime.serve.conversation import Conversation
from tmem_runtime.serve.lease_renewal import LeaseKeeper
from tmem_runtime.serve.loaded import LoadedSessions, Taken
from tmem_runtime.serve.metrics import Metrics
from tmem_runtime.serve.store import Store

if TYPE_CHECKING:
    from tmem_runtime.serve.service import ServeConfig

logger = logging.getLogger("tmem.serve")


class Upkeep:
    """The upkeep of a server's `loaded` sessions (see the module docstring). drop(conv) forgets a loaded
    session here (unloads its pool row); `unloaded` counts the sessions unloaded for being idle."""

    def __init__(self, config: ServeConfig, store: Store, loaded: LoadedSessions, leases: LeaseKeeper,
                 drop: Callable[[Conversation], None], metrics: Metrics) -> None:  # fmt: skip
        self.config, self.store, self.loaded, self.leases, self.drop, self.metrics = (
            config, store, loaded, leases, drop, metrics)  # fmt: skip
        self.unloaded = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tmem-upkeep", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        idle, renew_every = self.config.idle_unload, self.config.lease_ttl / 3
        period = min(renew_every, idle / 2 if idle else math.inf)
        renew_at = 0.0
        while not self._stop.wait(period):
            if time.monotonic() >= renew_at:  # (not at every idle check: a short idle_unload is no reason to
                renew_at = time.monotonic() + renew_every  # write the lease file more often)
                self.leases.renew()
            if idle or len(self.loaded.convs) > self.config.max_loaded:
                try:
                    self.unload_idle()
                except Exception:  # e.g. a full disk under a release: the next period retries the others
                    logger.exception("unloading an idle session failed")

    def unload_idle(self) -> int:
        """Unload the sessions unused for `idle_unload` seconds, and while more than `max_loaded` are
        loaded the least recently used ones, with no write pending and no request in progress
        (`LoadedSessions.take_idle`), and give their leases up. Bounds what a long-running server holds (host
        copies of B rows, contexts, cards, lease renewals) whatever the number of sessions it ever served. A
        request for one of them meanwhile waits for its unload, then loads it again (`LoadedSessions.get`).
        One whose lease cannot be given up (logged) stays leased here, the others are unloaded all the same;
        it loads here again on its next request. Returns how many."""
        taken = self.loaded.take_idle(self.config.idle_unload, self.config.max_loaded)
        self.unload_taken(taken)
        return len(taken)

    def unload_taken(self, taken: list[Taken]) -> None:
        """Unload sessions `LoadedSessions` took as idle and give their leases up (see `unload_idle`)."""
        for conv, gate, reason in taken:  # each taken session's gate is let go, whatever befalls the others
            try:
                self.drop(conv)
                self.store.release(conv.tenant, conv.session, self.config.server_id)
            except Exception:  # e.g. a full disk: its lease stays this server's, which loads it on its next request
                logger.exception("unloading session %s/%s failed", conv.tenant, conv.session)
            finally:
                self.loaded.unloaded(conv, gate)
            self.unloaded += 1
            self.metrics.inc("sessions_unloaded_total", reason=reason)
