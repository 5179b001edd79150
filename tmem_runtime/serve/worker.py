"""A daemon thread that runs its `_loop` and is woken through one Condition (the decode and write threads)."""

from __future__ import annotations

import threading


class Worker:
    """Subclasses implement `_loop`, which returns once `running` is False (`stop` sets it and notifies)."""

    def __init__(self, name: str) -> None:
        self.cond = threading.Condition()
        self.running = False
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self.running = True
        self.thread.start()

    def stop(self, timeout: float = 60) -> None:
        with self.cond:
            self.running = False
            self.cond.notify_all()
        self.thread.join(timeout=timeout)

    def _loop(self) -> None:
        raise NotImplementedError
