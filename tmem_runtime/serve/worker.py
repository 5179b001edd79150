"""A daemon thread that runs its `_loop` and is woken through one Condition (the decode and write threads)."""

from __future__ import annotations

import threading

import torch


class Worker:
    """Subclasses implement `_loop`, which returns once `running` is False (`stop` sets it and notifies).

    The thread runs `torch.get_num_threads()` of the thread that built it (the server's `--threads`):
    a new thread would otherwise get OpenMP's default (OMP_NUM_THREADS, else every core), whatever
    `torch.set_num_threads` said, since OpenMP keeps that count per thread.
    """

    def __init__(self, name: str) -> None:
        self.cond = threading.Condition()
        self.running = False
        self.threads = torch.get_num_threads()
        self.thread = threading.Thread(target=self._thread_main, name=name, daemon=True)

    def start(self) -> None:
        self.running = True
        self.thread.start()

    def stop(self, timeout: float = 60) -> None:
        with self.cond:
            self.running = False
            self.cond.notify_all()
        self.thread.join(timeout=timeout)

    def _thread_main(self) -> None:
        torch.set_num_threads(self.threads)
        self._loop()

    def _loop(self) -> None:
        raise NotImplementedError
