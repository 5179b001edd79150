"""Host tensors to the device in one copy that does not make the host wait.

A plain `t.to(cuda)` of a host tensor is a blocking copy from pageable memory: PyTorch follows the
`cudaMemcpyAsync` with a stream synchronisation, so the host waits until the device has run everything
queued before it. A write that moved each planned tensor of each step so (a dozen per step) waited for
the device a hundred times. `upload` packs many host tensors into one byte buffer in pinned memory and
copies it with `non_blocking=True`: one copy, queued behind the device's work, no wait (the caching host
allocator keeps the pinned buffer until the copy has run). The tensors come back as views of that one
device buffer, bit for bit what they were.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

ALIGN = 16  # bytes: every tensor starts at a multiple (any dtype's view of the buffer is aligned)


def upload(tensors: Sequence[torch.Tensor | None], device: torch.device) -> list[torch.Tensor | None]:
    """The host `tensors` (any dtypes and shapes; None passes through) on `device`, with one host-to-device
    copy that never waits for the device. Each result is a view into one shared buffer: treat it as its own
    tensor (in-place ops change only its bytes). On the CPU the copy is an ordinary (cheap) one."""
    device = torch.device(device)
    parts, spans, offset = [], [], 0
    for t in tensors:
        if t is None:
            spans.append(None)
            continue
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        pad = -offset % ALIGN
        if pad:
            parts.append(raw.new_zeros(pad))
        offset += pad
        parts.append(raw)
        spans.append((offset, raw.numel(), t.dtype, t.shape))
        offset += raw.numel()
    if not parts:
        return [None] * len(spans)
    if device.type == "cuda":
        buf = torch.empty(offset, dtype=torch.uint8, pin_memory=True)
        torch.cat(parts, out=buf)
    else:
        buf = torch.cat(parts)
    on_device = buf.to(device, non_blocking=True)
    return [None if s is None else on_device[s[0] : s[0] + s[1]].view(s[2]).view(s[3]) for s in spans]


def upload_one(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`upload([t], device)[0]`: one host tensor on `device`, copied without waiting for the device."""
    return upload([t], device)[0]
