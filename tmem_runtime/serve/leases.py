"""Server leases: one record per server, renewed by one write whatever the number of sessions it serves.

    STORE/servers/<hex server id>.json   {"owner", "url", "expires", "epoch"}: the server's lease
    STORE/servers/<hex server id>.lock   flock'd while the record changes

A session's lease file names a server and one of its epochs (`Store.claim`); the session's lease is
live while that server's record has the same epoch and has not expired. An epoch lasts while the
record is renewed before it expires: a renewal that finds it expired, or whose write lands after it
expired (the process was paused meanwhile), starts a new epoch. The server's sessions of the old epoch
are then free (another server may have claimed some of them) until it claims each again, which tells
it which ones it lost. So a round of renewals is one write while no renewal is late, and a claim by
another server never sees a live lease of a server that believes its own expired (times: a reader takes
the time before reading the record; a renewal, after its write landed).

A session's lease file names the epoch by its mark (`epoch_mark`), in the field `expires` of the
lease format of servers from before epochs ({"owner", "url", "expires"}, each session renewed on its
own): a number past any real time, so such a server reads the lease as held by its server for good
and never takes the session (it would otherwise read a file of another form as no lease at all).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from tmem_runtime.adapter_file import atomic_write

EPOCH_MARKS = 2**52  # epoch marks lie in [2**52, 2**53): integers exact as JSON numbers, some 140 million years away


def epoch_mark(epoch: str) -> float:
    """The number that stands for `epoch` in a session's lease file (its `expires` field; see the module
    docstring): in [EPOCH_MARKS, 2 * EPOCH_MARKS), from a hash of the epoch (two epochs of one server share
    a mark with odds of 2**-52)."""
    digest = hashlib.sha256(epoch.encode()).digest()
    return float(EPOCH_MARKS + int.from_bytes(digest[:8], "big") % EPOCH_MARKS)


@dataclass(frozen=True)
class ServerLease:
    owner: str
    url: str
    expires: float
    epoch: str


class ServerLeases:
    """The servers' lease records under `root` (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root  # (made by the first renewal: a store only read is left as it was)

    def _path(self, owner: str, suffix: str) -> Path:
        return self.root / (owner.encode().hex() + suffix)

    def read(self, owner: str) -> ServerLease | None:
        try:
            return ServerLease(**json.loads(self._path(owner, ".json").read_bytes()))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def renew(self, owner: str, url: str, ttl: float) -> ServerLease:
        """Extend the server's lease by `ttl` seconds from now, in the same epoch if it has not expired
        (a new epoch if it had, or if this write landed after it had)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self._path(owner, ".lock"), "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            held = self.read(owner)
            if held is not None and held.expires > time.time():
                lease = self._write(ServerLease(owner, url, time.time() + ttl, held.epoch))
                if time.time() < held.expires:
                    return lease
            return self._write(ServerLease(owner, url, time.time() + ttl, uuid.uuid4().hex))

    def live(self, owner: str, url: str, ttl: float) -> ServerLease:
        """The server's lease as it is while it has not expired, else renewed (a new epoch)."""
        held = self.read(owner)
        return held if held is not None and held.expires > time.time() else self.renew(owner, url, ttl)

    def _write(self, lease: ServerLease) -> ServerLease:
        data = json.dumps(asdict(lease)).encode()
        atomic_write(self._path(lease.owner, ".json"), lambda tmp: Path(tmp).write_bytes(data))
        return lease
