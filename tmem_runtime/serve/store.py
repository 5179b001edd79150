"""The store: every served session's files, in one directory that several server processes share.

    STORE/tenants/<hex tenant>/<hex session>/
        state.json                 working context, pending writes, written flashcards, counters
        turns-<generation>.log     the changes since state.json was written, one line each (turn_log.py):
                                   turns appended, writes queued, writes trained (`SessionRecord.delta`)
        weights-<seq>.safetensors  the fast weights after the session's write number <seq> (pool.save)
        lease.json                 which server serves the session, in which of its epochs (leases.py)
        .lock                      flock'd while the lease changes hands
    STORE/servers/                 each server's lease record: until when its sessions' leases last (leases.py)
    STORE/format.json              {"format": N}: the store's format (STORE_FORMAT), written at its first use
    STORE/model.json               {"name", "identity"}: the model whose sessions the store holds (`bind_model`)

Every file is replaced atomically (temp file, fsync, rename, directory fsync); the log is only appended
to (one fsynced line a change; a torn last line is ignored). A change is committed either by appending
its delta to the log (O(change): a remember or a write costs the same whatever the session has learnt)
or whole, by the rename of a new state.json that starts the next log generation (`commit`; the service
compacts so when the log outgrows the state). A write's commit point is the fsync of the log line, or
the rename of state.json, naming its new weights file: a server killed before it restarts from the
previous state and weights file, one killed after it from the new ones. Weights files that the state
does not name (left by such a kill) are removed when the session is next loaded, a killed
claim's temp file by the next claim. Each session has files of its own: a commit touches no other
session's, so its cost does not grow with the number of sessions, and a failure in it leaves theirs as
they were. Ids are
checked against ID_PATTERN and stored hex-encoded, so no id can name a path outside its tenant; an id
is at most MAX_ID_LENGTH characters, so its hex name fits a file name (255 bytes on common filesystems).

Models: a session's weights file fits one model (and adapter layout) alone (`adapter_file`), so a store
holds the sessions of one model. The first server to use it records that model (model.json: its name, and
the identity its weights files' headers carry, `adapter_file.model_identity`), created once; a server of
another model refuses the store (`StoreModelError`) before it changes anything there. A store from before
the record gets it at its next start, from the header of one of its weights files if it has any (so a
server of another model refuses it too), else from the server. The record changes how no other file is
read, so it needs no new format: a server from before it serves the store as it is, without the check.

Formats: a server opens a store of its format or an older one (marking an older one as its own: the
older layouts are read as they are), and refuses one of a newer format (`StoreFormatError`), whose files
it may misread. Opening an existing store only reads it: it is marked (and its directories made) once
its model is checked (`bind_model`) or before this server first writes in it, so a server that refuses it
(another model's) leaves every file as it was; a new (missing or empty) store is marked at once. Servers
from before the marker (format 1) cannot refuse; the lease files of format 2 on are written so that they
read them as held (leases.py), so they never take a session a newer server serves.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tmem_runtime.adapter_file import MODEL_KEYS, AdapterFileError, atomic_write, model_identity, read_header
from tmem_runtime.serve.leases import EPOCH_MARKS, ServerLeases, epoch_mark
from tmem_runtime.serve.turn_log import PREFIX, append_entry, log_name, read_entries

MAX_ID_LENGTH = 127  # hex-encoded: 254 bytes, under NAME_MAX (255)
ID_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.:@-]{{0,{MAX_ID_LENGTH - 1}}}")
STATE_VERSION = 1
# 1: no marker; session leases {"owner", "url", "expires"}, then {"owner", "epoch"} (read as free by the
#    servers before them). 2: this marker; session leases {"owner", "url", "expires": the epoch's mark}.
# 3: log entries carry remembers and writes too (`SessionRecord.delta`: keep, done, queued, written,
#    triggers, seq, weights), which a format 2 server would drop; format 2's entries (turns) read as they are.
STORE_FORMAT = 3
FORMAT_FILE = "format.json"
MODEL_FILE = "model.json"


class StoreFormatError(RuntimeError):
    """The store was written in a format this server does not know (a newer one), or its marker is unreadable."""


class StoreModelError(RuntimeError):
    """The store holds the sessions of another model than this server's (or its model record is unreadable)."""


class SessionExistsError(ValueError):
    """A session id that is already taken in its tenant."""


class CorruptSessionError(RuntimeError):
    """A session's stored files cannot be read (a truncated or garbled state.json or weights file); the
    store keeps them as they are, and every other session is served."""

    def __init__(self, session: str, detail: str) -> None:
        self.session = session
        super().__init__(f"session {session!r}: {detail}")


class LeaseHeldError(RuntimeError):
    """Another live server holds the session's lease (`owner`: its id, `url`: where it answers)."""

    def __init__(self, owner: str, url: str, expires: float) -> None:
        self.owner, self.url, self.expires = owner, url, expires
        super().__init__(f"session is served by {owner} ({url}) until its lease expires or it is released")


class LeaseLostError(RuntimeError):
    """A commit by a server whose lease the session no longer names: nothing was committed."""


def check_id(kind: str, value: str) -> str:
    """`value` if it is a valid tenant or session id, else a ValueError saying what is allowed."""
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ValueError(
            f"invalid {kind} id {value!r}: 1-{MAX_ID_LENGTH} characters of letters, digits and _ . : @ -, "
            "starting with a letter or digit"
        )
    return value


@dataclass
class SessionRecord:
    """What state.json holds: everything of a session but its weights (see the module docstring)."""

    lines: list[str] = field(default_factory=list)  # the working context, one turn (or DATE line) each
    header: str | None = None  # the current DATE line
    context_tokens: int = 0
    triggers: int = 0  # memory writes triggered so far (seeds each write's replay sample)
    pending: list[dict] = field(default_factory=list)  # acknowledged writes not yet trained, in order
    written: list[list[str]] = field(default_factory=list)  # every (question, answer) trained, in order
    stats: dict[str, int] = field(default_factory=dict)
    seq: int = 0  # weights files written so far
    weights: str | None = None  # the current weights file (None: the initial state)
    log: int = 0  # the generation of its turns log (turn_log.py)
    version: int = STATE_VERSION

    def extend(self, entry: dict) -> bool:
        """Apply a log entry (`delta`'s; a turns entry is one) if it was written after this context's
        `entry["at"]` lines: its context keeps `keep` lines (all of them if absent) and takes `lines`;
        `done` pending writes (ids) leave, `queued` ones join, `written` cards are added, and the other
        fields it names are replaced."""
        if entry["at"] != len(self.lines):
            return False
        self.lines = self.lines[: entry.get("keep", entry["at"])] + list(entry["lines"])
        self.header, self.context_tokens = entry.get("header"), int(entry.get("context_tokens", 0))
        self.stats = dict(entry.get("stats", self.stats))
        if entry.get("done"):
            done = set(entry["done"])
            self.pending = [job for job in self.pending if job["id"] not in done]
        self.pending = self.pending + list(entry.get("queued", ()))
        self.written = self.written + [list(card) for card in entry.get("written", ())]
        for name in _REPLACED:
            if name in entry:
                setattr(self, name, entry[name])
        return True

    def delta(self, base: SessionRecord) -> dict | None:
        """The log entry that turns `base` (the state as stored) into this record (`extend`), O(change):
        None if it cannot say it (memories forgotten, pending writes reordered, another log generation):
        the record is then to be committed whole."""
        learnt = len(base.written)
        if self.log != base.log or len(self.written) < learnt or self.written[:learnt] != base.written:
            return None
        ids = {job["id"] for job in self.pending}
        kept = [job for job in base.pending if job["id"] in ids]
        if self.pending[: len(kept)] != kept:
            return None
        keep = _common_prefix(base.lines, self.lines)
        entry = {"at": len(base.lines), "lines": self.lines[keep:], "header": self.header,
                 "context_tokens": self.context_tokens, "stats": dict(self.stats)}  # (a turns entry's keys)
        if keep != len(base.lines):
            entry["keep"] = keep
        if len(kept) != len(base.pending):
            entry["done"] = [job["id"] for job in base.pending if job["id"] not in ids]
        if len(self.pending) > len(kept):
            entry["queued"] = self.pending[len(kept) :]
        if len(self.written) > len(base.written):
            entry["written"] = self.written[len(base.written) :]
        entry.update({name: getattr(self, name) for name in _REPLACED if getattr(self, name) != getattr(base, name)})
        return entry


_REPLACED = ("triggers", "seq", "weights")  # the scalars a log entry carries when they change


def _common_prefix(a: list, b: list) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i])


@dataclass(frozen=True)
class Commit:
    """What `Store.commit` did: logged (the change appended to the log) or the state written whole; bytes written."""

    logged: bool
    bytes: int


@dataclass(frozen=True)
class Lease:
    """A session's lease: the server holding it, where it answers, until when, in which of its epochs."""

    owner: str
    url: str
    expires: float
    epoch: str = ""


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` by `data` atomically (`adapter_file.atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


class Store:
    """The session files under `root` (created if missing); safe to share between processes."""

    def __init__(self, root: str | os.PathLike) -> None:
        """StoreFormatError for a store of a newer format or with an unreadable marker. `format`: the store's
        (1: no marker), STORE_FORMAT once this server has marked it as its own (`_mark`)."""
        self.root = Path(root)
        new = not self.root.exists() or (self.root.is_dir() and not any(self.root.iterdir()))
        self.root.mkdir(parents=True, exist_ok=True)
        self.format = _check_format(self.root)  # (reads only)
        self.servers = ServerLeases(self.root / "servers")
        self._marked = False
        if new:
            self._mark()

    def _mark(self) -> None:
        """Mark the store as of this server's format (an older store's files read as they are) and make its
        directories, once: before this server first writes in it, after `bind_model`'s check."""
        if self._marked:
            return
        self.format = _check_format(self.root)  # (read again: a newer server may have marked it since it opened)
        if self.format < STORE_FORMAT:  # (two writers write the same bytes)
            _write_atomically(self.root / FORMAT_FILE, json.dumps({"format": STORE_FORMAT}).encode())
        (self.root / "tenants").mkdir(exist_ok=True)
        self.format, self._marked = STORE_FORMAT, True

    def bind_model(self, name: str, metadata: Mapping[str, str]) -> None:
        """Check that the store holds the sessions of this model, recording it if the store has no record
        (see the module docstring). name: what the server calls the model (said in messages, not compared);
        metadata: the header its adapter files carry (`SessionPool.metadata()`). StoreModelError, naming
        both models, if the record (or, in a store without one, a weights file) is of another model or
        adapter: nothing in the store is changed then (not even its format marker). The store is then
        marked as of this server's format."""
        ours = {"name": name, "identity": model_identity(metadata)}
        path = self.root / MODEL_FILE
        while True:
            try:
                theirs = json.loads(path.read_bytes())
                break
            except FileNotFoundError:
                pass
            except ValueError as exc:  # (JSON and UTF-8 decode errors)
                raise StoreModelError(f"store {self.root}: unreadable model record {path} ({exc})") from None
            found = self._sessions_model()
            if found is not None:
                _check_model(self.root, found, ours)
            if _create_once(path, json.dumps(ours, ensure_ascii=False).encode()):
                self._mark()
                return
        if not isinstance(theirs, dict) or not isinstance(theirs.get("identity"), dict):
            raise StoreModelError(f"store {self.root}: unreadable model record {path} (no identity)")
        _check_model(self.root, theirs, ours)
        self._mark()

    def _sessions_model(self) -> dict | None:
        """In a store without a model record: the model of the first readable weights file (None: none)."""
        for path in self.root.glob("tenants/*/*/weights-*.safetensors"):
            try:
                header = read_header(path)
            except AdapterFileError:
                continue
            return {"name": "", "identity": model_identity(header), "file": str(path.relative_to(self.root))}
        return None

    # ---------------------------------------------------------------- paths
    def tenant_dir(self, tenant: str) -> Path:
        return self.root / "tenants" / check_id("tenant", tenant).encode().hex()

    def session_dir(self, tenant: str, session: str) -> Path:
        return self.tenant_dir(tenant) / check_id("session", session).encode().hex()

    def exists(self, tenant: str, session: str) -> bool:
        return (self.session_dir(tenant, session) / "state.json").is_file()

    def sessions(self, tenant: str) -> list[str]:
        """The tenant's session ids, sorted."""
        return sorted(session for session, d in _id_dirs(self.tenant_dir(tenant)) if (d / "state.json").is_file())

    # ---------------------------------------------------------------- state
    def create(self, tenant: str, session: str) -> SessionRecord:
        """A new session in its initial state; SessionExistsError if the id is taken in the tenant."""
        self._mark()
        d = self.session_dir(tenant, session)
        d.parent.mkdir(parents=True, exist_ok=True)
        with self._locked(d, create=True):
            if (d / "state.json").is_file():
                raise SessionExistsError(f"session {session!r} already exists")
            record = SessionRecord()
            _write_atomically(d / "state.json", _encode(record))
        return record

    def read(self, tenant: str, session: str) -> tuple[SessionRecord, Path | None]:
        """The session's state (with the turns its log adds) and its weights file (None: initial state).
        KeyError if it does not exist; CorruptSessionError if state.json cannot be read (nothing removed).
        Leftovers of a killed commit (weights files and turns logs state.json does not name, temp files) are
        removed."""
        d = self.session_dir(tenant, session)
        try:
            raw = json.loads((d / "state.json").read_bytes())
        except FileNotFoundError:
            raise KeyError(session) from None
        except ValueError as exc:  # (JSON and UTF-8 decode errors)
            raise CorruptSessionError(session, f"its state.json is unreadable ({exc})") from exc
        try:
            record = SessionRecord(**raw)
            _check_record(record)
        except (TypeError, ValueError) as exc:  # not an object, other fields than a state's, or values of other types
            raise CorruptSessionError(session, f"its state.json is not a session's state ({exc})") from exc
        try:
            for entry in read_entries(d / log_name(record.log)):
                record.extend(entry)
            _check_record(record)
        except (TypeError, ValueError, KeyError) as exc:  # a whole line that is no change a server wrote
            raise CorruptSessionError(session, f"its {log_name(record.log)} holds an entry that is not a "
                                      f"session's change ({exc!r})") from exc
        _remove_leftovers(d, record)
        return record, (d / record.weights if record.weights else None)

    def commit(self, tenant: str, session: str, record: SessionRecord,
               save_weights: Callable[[Path], None] | None = None, owner: str | None = None,
               base: SessionRecord | None = None) -> Commit:
        """Persist `record`; with `save_weights`, first a new weights file (written by it) that the
        committed state names. base: the session's state as stored (state.json and its log): the change
        from it is appended to the log (`SessionRecord.delta`; its fsync is the commit point), unless it
        cannot be said so. Else (or without base) the state is written whole, starting the next log
        generation (the rename of state.json is the commit point). Weights files and logs the committed
        state does not name are removed. owner: commit only if the session's lease names it (else
        LeaseLostError), holding the lease's lock to the commit point, so no other server claims the
        session (and reads it) in between. `record` takes the weights file, count and log generation."""
        self._mark()
        d = self.session_dir(tenant, session)
        with self._leased(d, session, owner):
            if save_weights is not None:
                record.seq += 1
                record.weights = f"weights-{record.seq:08d}.safetensors"
                save_weights(d / record.weights)
            entry = None if base is None else record.delta(base)
            if entry is not None:
                written = append_entry(d / log_name(record.log), entry)
            else:
                record.log += 1
                data = _encode(record)
                _write_atomically(d / "state.json", data)
                written = len(data)
            _remove_leftovers(d, record)
        return Commit(entry is not None, written)

    def append_turns(self, tenant: str, session: str, log: int, entry: dict, owner: str | None = None) -> int:
        """Append a turns-log entry (`turn_log`) to the session's log of generation `log` (its state's),
        durably; owner: as `commit`'s (LeaseLostError, nothing appended). Returns the bytes appended."""
        self._mark()
        d = self.session_dir(tenant, session)
        with self._leased(d, session, owner):
            return append_entry(d / log_name(log), entry)

    def state_sizes(self, tenant: str, session: str, log: int) -> tuple[int, int]:
        """The bytes of the session's state.json and of its log of generation `log` (0 for a missing file)."""
        d = self.session_dir(tenant, session)
        return _file_size(d / "state.json"), _file_size(d / log_name(log))

    @contextmanager
    def _leased(self, d: Path, session: str, owner: str | None) -> Iterator[None]:
        """owner: hold the session's lock while its lease names `owner` (else LeaseLostError); None: no check."""
        with self._locked(d) if owner is not None else nullcontext():
            if owner is not None:
                held = _read_lease_file(d / "lease.json")
                if held is None or held["owner"] != owner:
                    raise LeaseLostError(f"session {session!r} is no longer leased to {owner}")
            yield

    def size(self, tenant: str, session: str) -> int:
        """Bytes of the session's files (a file a commit removes meanwhile counts as gone)."""
        d = self.session_dir(tenant, session)
        if not d.is_dir():
            return 0
        total = 0
        with os.scandir(d) as entries:
            for f in entries:
                try:
                    total += f.stat().st_size if f.is_file() else 0
                except FileNotFoundError:  # an old weights file or a temp file, removed by a commit
                    pass
        return total

    def remove(self, tenant: str, session: str) -> None:
        shutil.rmtree(self.session_dir(tenant, session), ignore_errors=True)

    # ---------------------------------------------------------------- leases
    def claim(self, tenant: str, session: str, owner: str, url: str, ttl: float) -> Lease:
        """Take the session's lease for `owner` in its server lease's current epoch (the server lease
        renewed for `ttl` seconds if it had expired): the session's lease must be free, expired or
        `owner`'s, else LeaseHeldError. The lease lasts while the server's does (`renew`). KeyError if the
        session does not exist."""
        d = self.session_dir(tenant, session)
        if not (d / "state.json").is_file():
            raise KeyError(session)
        self._mark()
        server = self.servers.live(owner, url, ttl)
        with self._locked(d):
            now = time.time()  # (before the server lease is read: see leases.py)
            held = self.lease(tenant, session)
            if held is not None and held.owner != owner and held.expires > now:
                raise LeaseHeldError(held.owner, held.url, held.expires)
            for f in d.glob("lease.json.*"):  # a temp file of a claim killed before its rename (claims hold the lock)
                f.unlink(missing_ok=True)
            lease = {"owner": owner, "url": server.url, "expires": epoch_mark(server.epoch)}  # (leases.py)
            if _read_lease_file(d / "lease.json") != lease:
                _write_atomically(d / "lease.json", json.dumps(lease).encode())
        return Lease(owner, server.url, server.expires, server.epoch)

    def renew(self, owner: str, url: str, ttl: float) -> Lease:
        """Renew the leases of every session `owner` holds in its current epoch, by `ttl` seconds: one
        write. Sessions whose lease names another epoch (the returned one changed: a late renewal) must
        be claimed again; a claim refused means another server has taken the session."""
        self._mark()
        server = self.servers.renew(owner, url, ttl)
        return Lease(owner, server.url, server.expires, server.epoch)

    def lease(self, tenant: str, session: str) -> Lease | None:
        """The session's lease (expires: 0 if its server's lease has since moved to another epoch; epoch:
        "" for a lease of a server from before epochs, or one whose epoch has ended)."""
        held = _read_lease_file(self.session_dir(tenant, session) / "lease.json")
        if held is None:
            return None
        expires = held.get("expires")
        expires = float(expires) if isinstance(expires, (int, float)) and math.isfinite(expires) else 0.0
        if "epoch" not in held and expires < EPOCH_MARKS:  # a server's from before epochs: its own expiry
            return Lease(held["owner"], str(held.get("url", "")), expires)
        server = self.servers.read(held["owner"])
        if "epoch" in held:  # {"owner", "epoch"}: format 1's last lease files
            live = server is not None and server.epoch == held["epoch"]
        else:
            live = server is not None and epoch_mark(server.epoch) == expires
        if not live:
            return Lease(held["owner"], server.url if server else str(held.get("url", "")), 0.0)
        return Lease(held["owner"], server.url, server.expires, server.epoch)

    def release(self, tenant: str, session: str, owner: str) -> None:
        """Give the lease up (only if `owner` holds it)."""
        d = self.session_dir(tenant, session)
        if not d.is_dir():
            return
        with self._locked(d):
            held = _read_lease_file(d / "lease.json")
            if held is not None and held["owner"] == owner:
                (d / "lease.json").unlink(missing_ok=True)

    def leased_to(self, owner: str) -> Iterator[tuple[str, str]]:
        """(tenant, session) of every session whose lease names `owner` (expired or not)."""
        for tenant, t in _id_dirs(self.root / "tenants"):
            for session, s in _id_dirs(t):
                held = _read_lease_file(s / "lease.json")
                if held is not None and held["owner"] == owner and (s / "state.json").is_file():
                    yield tenant, session

    @contextmanager
    def _locked(self, d: Path, create: bool = False) -> Iterator[None]:
        if create:
            d.mkdir(exist_ok=True)
        with open(d / ".lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _check_record(record: SessionRecord) -> None:
    """ValueError naming the first field of `record` (read from a session's files) whose value is not of the
    type a server writes there: such a state (a hand edit, a foreign file) failed in the server's threads
    (a 500, and a server holding it could not start) where an unreadable one is a CorruptSessionError."""
    def ints(*values) -> bool:
        return all(isinstance(v, int) and not isinstance(v, bool) for v in values)

    def texts(values, n: int | None = None) -> bool:
        return isinstance(values, list) and all(isinstance(v, str) for v in values) and n in (None, len(values))

    def job(j) -> bool:
        return (isinstance(j, dict) and isinstance(j.get("id"), str) and ints(j.get("trigger"))
                and isinstance(j.get("context", ""), str)
                and (j.get("cards") is None or isinstance(j["cards"], list) and all(texts(c, 2) for c in j["cards"])))

    r = record
    checks = {
        "lines": texts(r.lines), "header": r.header is None or isinstance(r.header, str),
        "context_tokens, triggers, seq, log, version": ints(r.context_tokens, r.triggers, r.seq, r.log, r.version),
        "pending": isinstance(r.pending, list) and all(job(j) for j in r.pending),
        "written": isinstance(r.written, list) and all(texts(c, 2) for c in r.written),
        "stats": isinstance(r.stats, dict) and ints(*r.stats.values()),
        "weights": r.weights is None or isinstance(r.weights, str) and r.weights == Path(r.weights).name != "",
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        raise ValueError(f"{bad[0]}: not of the type a server writes")


def _id_dirs(parent: Path) -> Iterator[tuple[str, Path]]:
    """(id, directory) of each directory under `parent` named as the store names an id (hex; none if `parent`
    is missing). Anything else there is not the store's and is passed over: a file (.DS_Store, a note) made
    a server's start-up fail (NotADirectoryError), and a directory of another name holding a state.json (a
    session copied in by hand) the session list a 400."""
    if not parent.is_dir():
        return
    for d in parent.iterdir():
        try:
            name = bytes.fromhex(d.name).decode()
        except ValueError:  # (not hex, or not UTF-8)
            continue
        if ID_PATTERN.fullmatch(name) and d.is_dir():
            yield name, d


def _remove_leftovers(d: Path, record: SessionRecord) -> None:
    """Weights files and turns logs `record` does not name, and temp files: what a killed commit leaves behind."""
    keep = (record.weights, log_name(record.log))
    for f in d.iterdir():
        if f.name.startswith(("weights-", PREFIX, "state.json.")) and f.name not in keep:
            f.unlink(missing_ok=True)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _read_lease_file(path: Path) -> dict | None:
    """A session's lease.json ({"owner", "url", "expires": an epoch's mark}; {"owner", "epoch"} or
    {"owner", "url", "expires": a time} from older servers), None if there is none (or a torn one: claims
    write it atomically, so only a foreign file can be)."""
    try:
        held = json.loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    return held if isinstance(held, dict) and isinstance(held.get("owner"), str) else None


def _check_format(root: Path) -> int:
    """The store's format, read (1: no marker, an older store's or a new one's); StoreFormatError if it is
    newer than STORE_FORMAT or its marker is unreadable. Writes nothing (`Store._mark` does)."""
    path = root / FORMAT_FILE
    try:
        found = json.loads(path.read_bytes())["format"]
    except FileNotFoundError:
        return 1
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreFormatError(f"store {root}: unreadable format marker {path} ({exc!r})") from None
    if not isinstance(found, int) or isinstance(found, bool):
        raise StoreFormatError(f"store {root}: unreadable format marker {path} (format {found!r})")
    if found > STORE_FORMAT:
        raise StoreFormatError(
            f"store {root} is in format {found!r}, newer than this server knows ({STORE_FORMAT}): upgrade tmem "
            "to serve it (every server sharing a store must know its format)"
        )
    return found


def _check_model(root: Path, theirs: dict, ours: dict) -> None:
    """StoreModelError if the model records differ in a key both have (`adapter_file.MODEL_KEYS`)."""
    a, b = theirs["identity"], ours["identity"]
    differ = [key for key in MODEL_KEYS if key in a and key in b and a[key] != b[key]]
    if not differ:
        return
    said = "; ".join(f"{key} {a[key]!r} there, {b[key]!r} here" for key in differ
                     if key not in ("architecture", "weights_sha256"))
    raise StoreModelError(
        f"store {root} holds the sessions of model {_model(theirs)}, not of this server's model {_model(ours)}"
        f"{f' ({said})' if said else ''}: serve it with that model, or give this one a store of its own (--store)"
    )


def _model(record: dict) -> str:
    """A model record as said in messages: its name, architecture and base weights' hash (and the weights
    file it was read from, for a store from before the record)."""
    identity, name = record["identity"], str(record.get("name") or "")
    source = f", as its {record['file']} says" if record.get("file") else ""
    return (f"{name + ' ' if name else ''}({identity.get('architecture', '?')}, base weights SHA-256 "
            f"{str(identity.get('weights_sha256', '?'))[:12]}...{source})")


def _create_once(path: Path, data: bytes) -> bool:
    """Create `path` holding `data`, durably, unless it exists (False then): a fsynced temp file linked to
    its name, so two processes creating it at once leave one whole file, the first's."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: a rename (two first servers at once: the last's stays)
            if path.exists():
                return False
            os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


def _encode(record: SessionRecord) -> bytes:
    return json.dumps(asdict(record), ensure_ascii=False).encode()
