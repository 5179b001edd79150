"""How much memory a device has free for new buffers, to refuse an allocation that cannot fit before it is made.

A buffer sized by an argument (a pool's capacity: one B row per session) can ask for more than the machine
has: on the CPU the allocation may succeed (overcommit) and the first writes to it bring the OOM killer, on
CUDA it fails deep inside torch. `check_fits` turns that into a clear ValueError before anything is allocated.
"""

from __future__ import annotations

import os

import torch


def available_bytes(device: torch.device) -> int | None:
    """Bytes free for new allocations on `device`: CUDA, the driver's free memory (torch.cuda.mem_get_info);
    CPU, MemAvailable of /proc/meminfo (where there is none: the physical memory, os.sysconf); None for
    another device (nothing is checked)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # (kB)
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # (a platform without these names)
        return None


def check_fits(what: str, nbytes: int, device: torch.device, hint: str = "") -> None:
    """ValueError "`what` needs N bytes (x GB) on DEVICE, which has M bytes (y GB) available[: hint]" where
    `nbytes` exceed `available_bytes(device)`; nothing is allocated either way."""
    free = available_bytes(device)
    if free is not None and nbytes > free:
        raise ValueError(f"{what} needs {nbytes} bytes ({nbytes / 1e9:.3g} GB) on {device}, which has {free} bytes "
                         f"({free / 1e9:.3g} GB) available" + (f": {hint}" if hint else ""))
