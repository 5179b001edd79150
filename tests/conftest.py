"""Test-wide setup: one suite for both machines.

The `device` fixture is where the kernel and runtime tests run: the CUDA device when there is one (the
real Triton kernels, compiled), else the CPU, where the Triton kernels run under their interpreter.
TRITON_INTERPRET must be set before any Triton kernel module is imported, so it is set here, at
collection time, before the test modules import tmem_kernels (and only without CUDA).

`@pytest.mark.cuda`: a test that needs a CUDA device (CUDA graphs, streams, sizes only a GPU holds);
skipped elsewhere with that reason.
"""

import json
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread: the suite is many small ops, and on a shared 2-core box OpenMP
# oversubscription makes them 10-40x slower (measured); one thread is fast and deterministic.
torch.set_num_threads(1)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def sm90_compile() -> Callable[[str], dict]:
    """run(script) -> the JSON object `script` prints last: the script runs in a fresh interpreter without
    TRITON_INTERPRET, with `from compile_sm90 import compile_for_sm90` (tools/compile_sm90.py: compile a Triton
    kernel for an H100 on this machine, registers and spills from ptxas) importable. Skips where Triton has no
    NVIDIA backend."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    path = os.pathsep.join([ROOT, os.path.join(ROOT, "tools"), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=path)

    def run(script: str) -> dict:
        proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return run


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device the kernel and runtime tests run on: CUDA (real kernels) or CPU (the Triton interpreter)."""
    return torch.device("cuda" if CUDA else "cpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (runs in `make gpu-check` / `make test` on a GPU)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
