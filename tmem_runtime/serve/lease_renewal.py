"""LeaseKeeper: this server's side of the leases (`leases` is the store's): renewed, and its sessions claimed
again after a late renewal.

One store write renews the server's lease, and with it every session loaded here (a session's claim names
the epoch of the server lease it was made under). A renewal that came late (the lease had lapsed: a new
epoch) means another server may have claimed a session meanwhile: each loaded session is claimed again,
and one that another server now holds is dropped here (its next request goes to that server).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from tmem_runtime.serve.store import LeaseHeldError, Store

if TYPE_CHECKING:
    from tmem_runtime.serve.conversation import Conversation
    from tmem_runtime.serve.loaded import LoadedSessions
    from tmem_runtime.serve.service import ServeConfig

logger = logging.getLogger("tmem.serve")


class LeaseKeeper:
    """Renews `config.server_id`'s lease in `store` (its url and ttl as the config says at each renewal) and
    claims `loaded`'s sessions again after a late one, calling `drop` on those another server took."""

    def __init__(self, store: Store, config: ServeConfig, loaded: LoadedSessions,
                 drop: Callable[[Conversation], None]) -> None:  # fmt: skip
        self.store, self.config, self.loaded, self.drop = store, config, loaded, drop

    def renew(self) -> None:
        """Renew the server's lease (one store write); after a late renewal (a new epoch), claim each loaded
        session again, dropping those another server took. A failed store write is logged: the next
        renewal retries it."""
        cfg = self.config
        try:
            epoch = self.store.renew(cfg.server_id, cfg.url, cfg.lease_ttl).epoch
        except Exception:  # e.g. a full disk: the next period retries
            logger.exception("renewing this server's lease failed")
            return
        for conv in self.loaded.loaded():
            if conv.lease_epoch == epoch:
                continue
            with conv.lock:  # an unload marks the session inactive under its lock before it gives the lease up:
                if not conv.active:  # no claim lands after that (the lease would stay this server's with the
                    continue  # session loaded nowhere, refused to every other server)
                try:
                    conv.lease_epoch = self.store.claim(conv.tenant, conv.session, cfg.server_id, cfg.url,
                                                        cfg.lease_ttl).epoch
                    taken = False
                except (LeaseHeldError, KeyError):
                    taken = True
                except Exception:  # e.g. a full disk, or a session removed under the claim: the next period retries
                    logger.exception("claiming a session again after a late lease renewal failed")
                    taken = False
            if taken:  # by another server
                self.drop(conv)
