"""On a CPU, the write thread borrows the decode thread's cores while the decode thread has nothing to do.

The server's two busy threads each run `threads` torch threads: on a 2-core box, a core each. Once
every answer is out and writes are still training, the decode thread's core sits idle. Before each
training step the write thread asks: if no batch is waiting or decoding, that step runs on both
threads' shares (2 x `threads`); a batch that arrives meanwhile waits for that one step to end (the
bound the server keeps: an answer is never held up longer than one write step), and the next step
runs on the write thread's own share again.

`torch.set_num_threads` is not per thread everywhere (MKL's count is the process's), so the two
threads never run at the same time while the wide count is set: a batch waits while a wide step
runs, and the write thread sets its own count back before the batch goes on. The wide count never
exceeds the cores this process may run on (a server given them all already has nothing to borrow).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class CoreLoan:
    """The decode thread's torch threads, lent to the write thread between its batches (see the module).

    threads: each server thread's own torch threads; a wide step runs 2 x threads, at most `cores` (default:
    the cores this process may run on). enabled: False (e.g. on a GPU) makes every method a no-op.
    """

    def __init__(self, threads: int, enabled: bool = True, cores: int | None = None) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, not {threads}")
        self.threads = threads
        self.wide_threads = min(2 * threads, cores or usable_cores())
        self.enabled = enabled and self.wide_threads > threads
        self.cond = threading.Condition()
        self.decoding_batches = 0  # batches waiting to decode or decoding
        self.wide = False  # a write step is running on both shares
        self.steps = {"own": 0, "both": 0}  # training steps run, by the cores they ran on

    @contextmanager
    def decoding(self) -> Iterator[None]:
        """Around a batch on the decode thread: waits for a wide write step to end; no step goes wide meanwhile."""
        if not self.enabled:
            yield
            return
        with self.cond:
            self.decoding_batches += 1
            self.cond.wait_for(lambda: not self.wide)
        try:
            yield
        finally:
            with self.cond:
                self.decoding_batches -= 1

    def before_training(self) -> None:
        """On the write thread, before its first training step: wide if no batch is waiting or decoding."""
        if self.enabled:
            with self.cond:
                self._set_wide(self.decoding_batches == 0)

    def after_step(self, step: int, steps: int, loss: float) -> None:
        """The trainer's `on_step` callback: counts step `step` of `steps`, then sets the next one's share."""
        with self.cond:
            self.steps["both" if self.wide else "own"] += 1
            if step < steps:
                self._set_wide(self.decoding_batches == 0)

    def training_done(self) -> None:
        """On the write thread, after its training (also when it failed): its own share again."""
        if self.enabled:
            with self.cond:
                self._set_wide(False)

    def _set_wide(self, wide: bool) -> None:
        if wide != self.wide:
            torch.set_num_threads(self.wide_threads if wide else self.threads)
            self.wide = wide
            self.cond.notify_all()


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
