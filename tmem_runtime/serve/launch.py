"""`tmem serve` in a subprocess, for scripts, tests and benchmarks: start, wait until healthy, kill; or
in this process, in a thread.

    server = ServerProcess(["--model", "tiny-llama", "--store", "st"], port=8100, log="serve.log").wait_ready()
    httpx.get(server.url + "/health"); server.kill()     # SIGKILL: the store must survive it

    with serve_in_thread(service, "tiny-llama", api_keys) as url:   # uvicorn on a free port, stopped after
        httpx.get(url + "/health")
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from tmem_runtime.serve.service import MemoryService

ROOT = Path(__file__).resolve().parents[2]


class ServerProcess:
    """`python -m tmem_runtime.cli serve --port PORT ARGS` (one torch thread unless ARGS say otherwise).
    Restarting on the same port gives the same server id, so it reclaims its sessions' leases.
    cpus: the CPU cores the server (every thread of it) may run on; None: any."""

    def __init__(self, args: Sequence[str], port: int, log: str | os.PathLike | None = None,
                 cpus: Sequence[int] | None = None) -> None:
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "tmem_runtime.cli", "serve", "--port", str(port), *args]
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
        self.log = open(log, "ab") if log is not None else subprocess.DEVNULL
        pin = None if cpus is None else (lambda: os.sched_setaffinity(0, cpus))  # inherited by every thread
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=pin)
        self.client = httpx.Client(base_url=self.url, timeout=300)

    def wait_ready(self, timeout: float = 300) -> ServerProcess:
        """Block until GET /health answers (RuntimeError if the process exits, TimeoutError)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tmem serve exited with status {self.proc.returncode} during start-up")
            try:
                if self.client.get("/health").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"tmem serve on port {self.port} did not start in {timeout} s")

    def metrics(self) -> dict[str, float]:
        """Every sample of one GET /metrics: {name with its labels (e.g. 'tmem_x{a="b"}'): value}."""
        samples = {}
        for line in self.client.get("/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples.setdefault(name, float(value))
        return samples

    def metric(self, name: str) -> float:
        """The value of one sample of GET /metrics (`name` with its labels, e.g. 'tmem_x{a="b"}'); 0 if absent."""
        return self.metrics().get(name, 0.0)

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing is flushed or closed by the server."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)
        self.client.close()
        if self.log is not subprocess.DEVNULL:
            self.log.close()


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_thread(service: MemoryService, model_name: str, api_keys: Mapping[str, str] | None = None,
                    max_body: int = 1 << 20) -> Iterator[str]:
    """`service`'s HTTP app on uvicorn in a daemon thread of this process, on a free loopback port; yields
    its base URL. The app's start-up starts the service, and leaving the block shuts both down."""
    import uvicorn

    from tmem_runtime.serve.app import create_app

    app = create_app(service, model_name, api_keys, max_body=max_body)
    app.router.on_startup.append(service.start)
    app.router.on_shutdown.append(service.stop)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the in-process server exited during start-up")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)
