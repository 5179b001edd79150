"""What a set of tensors is now, cheaply: compare two stamps to learn whether any of them changed.

Three caches key on it: the adapter files' weights hash (`adapter_file.WeightsFingerprint`), the kept
trunk outputs (`trunk_rows.TrunkRows`) and the kept CUDA-graph buffers (`static_write.StaticWrites`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def tensors_stamp(tensors: Iterable[torch.Tensor], values: bool = True) -> tuple:
    """Per tensor: its identity, storage address, dtype and device, and (values) its autograd version,
    which every in-place change through torch bumps (a write through `.data` goes unseen). Equal stamps:
    the same tensors, where they were, unchanged (values=False: their contents may have changed).
    An inference tensor (made inside torch.inference_mode()) has no version: its stamp never equals another,
    so what was computed from it is taken as stale."""
    return tuple((id(t), t.data_ptr(), t.dtype, t.device) + ((_version(t),) if values else ()) for t in tensors)


def _version(t: torch.Tensor) -> int | object:
    """The autograd version of `t`, or, for an inference tensor (which tracks none), an object equal to no other."""
    return object() if t.is_inference() else t._version
