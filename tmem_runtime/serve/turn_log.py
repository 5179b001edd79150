"""A session's log: the changes since its state.json was written (turns, writes queued and trained), one
JSON line each (its name, from when it held turns alone, stays).

    <session dir>/turns-<generation>.log    one entry a line (`SessionRecord.extend`, `SessionRecord.delta`):
        {"at": n, "lines": [...], "header": ..., "context_tokens": ..., "stats": {...}}   turns appended
        + "keep", "done", "queued", "written", "triggers", "seq", "weights"             other changes (format 3)

Appending a change writes and fsyncs one line (O(change)); writing state.json is O(context + memories).
state.json names its log's generation (`SessionRecord.log`); a commit that writes state.json starts
the next generation (the state holds the log's changes then), and the old log is removed with the other
leftovers. An entry applies to the working context it was written after: only where the
context holds `at` lines, so no entry is applied out of place. A line without its
newline (an append killed mid-write) is ignored, and the next append starts on a new line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

PREFIX = "turns-"


def log_name(generation: int) -> str:
    return f"{PREFIX}{generation:08d}.log"


def append_entry(path: Path, entry: dict) -> int:
    """Append `entry` as one line to the log at `path` (created if missing), durably: fsynced (and the
    directory too when the file is new) before this returns. Returns the bytes appended."""
    line = json.dumps(entry, ensure_ascii=False).encode() + b"\n"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn line: this one starts on its own line
            line = b"\n" + line
        view = memoryview(line)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    if size == 0:  # (the file may be new: its directory entry must survive a power loss too)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return len(line)


def read_entries(path: Path) -> Iterator[dict]:
    """The log's whole entries, in order (none if there is no log); torn or foreign lines are skipped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    for line in data.split(b"\n")[:-1]:  # (what follows the last newline is a torn line, or nothing)
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("at"), int) and isinstance(entry.get("lines"), list):
            yield entry
