"""A write step's attention in float32 on the CPU, for bfloat16 and float16 models.

torch's CPU flash attention is fast forward in bf16 but slow backward: at a write step's shapes (16 rows,
9 heads of 64, 40 queries over 64 keys with a mask, one thread, torch 2.13) forward + backward took 32.6 ms
in bf16, 9.4 ms in fp32, and 10.8 ms with the bf16 inputs cast to fp32 and the output cast back. So while a
step's adapted layers run on the CPU in reduced precision, `Float32Attention` casts the inputs of every
`scaled_dot_product_attention` call to float32 and its output back to the inputs' dtype. The attention is
then computed more precisely, not less; nothing else changes. It applies only to the call sites inside
its `with` block, in its own thread (torch function modes are per thread), and the backward follows
autograd as usual.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

REDUCED = (torch.bfloat16, torch.float16)
_TENSOR_ARGS = ("query", "key", "value", "attn_mask")


class Float32Attention(TorchFunctionMode):
    """Within the block, `F.scaled_dot_product_attention` on reduced-precision tensors runs in float32."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        query = args[0] if args else kwargs["query"]
        if query.dtype not in REDUCED:
            return func(*args, **kwargs)
        args = tuple(_float32(a) if i < len(_TENSOR_ARGS) else a for i, a in enumerate(args))
        kwargs = {k: _float32(v) if k in _TENSOR_ARGS else v for k, v in kwargs.items()}
        return func(*args, **kwargs).to(query.dtype)


def _float32(t: object) -> object:
    return t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def write_step_attention(hidden: torch.Tensor) -> contextlib.AbstractContextManager:
    """The context a write step's adapted layers run in, given their input hidden [..., H]: Float32Attention
    on the CPU in bf16/fp16 while autograd records, else nothing."""
    if hidden.device.type == "cpu" and hidden.dtype in REDUCED and torch.is_grad_enabled():
        return Float32Attention()
    return contextlib.nullcontext()
