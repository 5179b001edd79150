"""Peak memory while a block runs: process RSS sampled on CPU, max allocated on CUDA."""

from __future__ import annotations

import threading
import time

import psutil
import torch


class MemoryMonitor:
    """Context manager sampling RSS every `interval` s; `peak_mb`, `trace` [(seconds, MB)], `cuda_peak_mb`.

    On CUDA devices the allocator's max_memory_allocated is reset on entry and read on exit.
    """

    def __init__(self, device: str | torch.device = "cpu", interval: float = 0.25):
        self.device = torch.device(device)
        self.interval = interval
        self.trace: list[tuple[float, float]] = []
        self.peak_mb = 0.0
        self.cuda_peak_mb: float | None = None
        self._stop = threading.Event()
        self._proc = psutil.Process()

    def sample(self) -> float:
        mb = self._proc.memory_info().rss / 2**20
        self.trace.append((time.perf_counter() - self._t0, mb))
        self.peak_mb = max(self.peak_mb, mb)
        return mb

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemoryMonitor:
        self._t0 = time.perf_counter()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        if self.device.type == "cuda":
            self.cuda_peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
