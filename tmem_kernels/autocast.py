"""Autocast off, for code that sets its own precision (the SVD init, a write's steps): it computes in it
whatever torch.autocast region the caller has open."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def autocast_off(device_type: str) -> AbstractContextManager:
    """A context in which autocast is off for `device_type` ("cpu", "cuda", ...); for a device type autocast
    does not know (e.g. "meta"), nothing."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()
