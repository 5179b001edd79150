"""The server's counters, gauges and histograms, rendered as Prometheus text (`GET /metrics`).

Every name gets the `tmem_` prefix. Nothing here names a tenant or a session.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
HISTOGRAMS = {
    "batch_rows": (SIZE_BUCKETS, "rows per batched generate (answers and flashcard prompts)"),
    "batch_sessions": (SIZE_BUCKETS, "distinct sessions (fast weights) per batched generate"),
    "batch_seconds": (SECONDS_BUCKETS, "seconds per batched generate"),
    "answer_seconds": (SECONDS_BUCKETS, "seconds from a chat completion's arrival to its last token"),
    "write_batch_sessions": (SIZE_BUCKETS, "sessions per batched memory write"),
    "write_seconds": (SECONDS_BUCKETS, "seconds from a memory write's acknowledgement to its commit"),
    "write_train_seconds": (SECONDS_BUCKETS, "seconds of training per batched memory write"),
}
HELP = {
    "queue_depth": "rows waiting for the decode thread (answer) or writes waiting for training (write)",
    "resident_sessions": "sessions holding a B row of the engine",
    "open_sessions": "sessions loaded in this server (resident or offloaded)",
    "sessions_unloaded_total": "sessions unloaded from this server, by reason (idle: unused for --idle-unload-seconds; "
                               "max_loaded: the least recently used past --max-loaded)",
    "pool_capacity": "B rows of the engine",
    "trunk_rows_bytes": "bytes of examples' trunk outputs kept for later writes (replayed flashcards)",
    "trunk_rows_examples_total": "examples whose trunk output a write read back (hits) or ran (misses)",
    "writes_training": "sessions whose memory write is training or being persisted now",
    "commit_waits_total": "memory writes (and resets) whose commit waited for a batch answering their session",
    "commit_wait_seconds_total": "seconds commits waited for batches answering their sessions",
    "requests_total": "HTTP requests by route template and status code",
    "generated_tokens_total": "tokens generated (answers and flashcards)",
    "answer_tokens_total": "tokens generated in chat completions",
    "writes_total": "memory writes committed and persisted, by outcome",
    "flashcards_total": "new flashcards trained",
    "write_steps_total": "training steps, by the cores they ran on (own: the write thread's; both: the decode "
                         "thread's too, lent while it had nothing to do; CPU only)",
}


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.buckets):
            self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for b, c in zip(self.buckets, self.counts):
            running += c
            out.append(f'{name}_bucket{{le="{b}"}} {running}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """Thread-safe counters (`inc`, `set_total`), gauges (`set_gauge`) and histograms (`observe`), with labels."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        self.gauges: dict[str, dict[tuple, float]] = defaultdict(dict)
        self.histograms = {name: Histogram(buckets) for name, (buckets, _) in HISTOGRAMS.items()}

    def inc(self, name: str, value: float = 1, **labels: str) -> None:
        with self._lock:
            self.counters[name][tuple(sorted(labels.items()))] += value

    def set_total(self, name: str, value: float, **labels: str) -> None:
        """A counter whose running total is kept elsewhere (e.g. the pool's): its value now."""
        with self._lock:
            self.counters[name][tuple(sorted(labels.items()))] = value

    def set_gauge(self, name: str, value: float, **labels: str) -> None:
        with self._lock:
            self.gauges[name][tuple(sorted(labels.items()))] = value

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self.histograms[name].observe(value)

    def render(self) -> str:
        """Prometheus text exposition format (version 0.0.4)."""
        lines = []
        with self._lock:
            for kind, table in (("counter", self.counters), ("gauge", self.gauges)):
                for name in sorted(table):
                    full = f"tmem_{name}"
                    lines += [f"# HELP {full} {HELP.get(name, name)}", f"# TYPE {full} {kind}"]
                    for labels, value in sorted(table[name].items()):
                        lines.append(f"{full}{_labels(labels)} {_number(value)}")
            for name, h in self.histograms.items():
                full = f"tmem_{name}"
                lines += [f"# HELP {full} {HISTOGRAMS[name][1]}", f"# TYPE {full} histogram", *h.lines(full)]
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    """A sample's value, exact: an integral value in full (never 6 digits and an exponent), else repr."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _labels(labels: tuple) -> str:
    """{k="v",...} with each value escaped as the text format wants (backslash, double quote, newline)."""
    if not labels:
        return ""
    escape = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n"})
    return "{" + ",".join(f'{k}="{str(v).translate(escape)}"' for k, v in labels) + "}"
