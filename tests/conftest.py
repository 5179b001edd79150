"""Test-wide setup: Triton runs under its interpreter on machines without CUDA.

TRITON_INTERPRET must be set before any Triton kernel module is imported, so it is set here, at
collection time, before the test modules import tmem_kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread: the suite is many small ops, and on a shared 2-core box OpenMP
# oversubscription makes them 10-40x slower (measured); one thread is fast and deterministic.
torch.set_num_threads(1)
