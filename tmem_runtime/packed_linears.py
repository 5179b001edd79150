"""Frozen linear layers computed from oneDNN-packed weights on the CPU.

A decode step multiplies a few rows by every weight of the model, and on a CPU those weights no
longer sit in cache: MKL's GEMM on a plain row-major weight then runs far below the core (SmolLM2,
one thread, a 16-row step: ~5 GB/s of weights, 36 GFLOP/s). oneDNN reorders a weight once into its
blocked layout, after which the same products run 1.5-2x faster at 4 to 32 rows and ~1.1x at one row
or at a write's hundreds (`benchmarks/test_bench_decoding.py::test_decode_step_packed_linears`).

`pack_linears(model)` replaces every `nn.Linear` of the model by a `PackedLinear` that shares its
parameters: state_dict keys, tied weights and `isinstance(m, nn.Linear)` checks are unchanged. A
PackedLinear packs its weight the first time it runs on the CPU with autograd not recording, and
keeps that copy (as much memory again as the weight; only layers that run are packed) until the
weight changes in place or is moved or cast. Otherwise (autograd recording, a CUDA tensor, float16,
`torch.compile` tracing, no oneDNN in this torch, a weight made inside torch.inference_mode(), whose changes
cannot be seen) it is an ordinary nn.Linear. Results equal
`F.linear`'s to float rounding (oneDNN sums in another order). `unpack_linears` undoes it.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

AVAILABLE = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)
PACK_ROWS = 16  # the row count oneDNN is told to expect; the packed weight serves any count


def packable_dtypes() -> tuple[torch.dtype, ...]:
    """Weight dtypes packed on this CPU (bfloat16 where oneDNN has a bf16 path for it)."""
    if not AVAILABLE:
        return ()
    bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return (torch.float32, torch.bfloat16) if bf16 is not None and bf16() else (torch.float32,)


_PACKABLE = packable_dtypes()
# weight -> (its data_ptr, its version, the packed copy); keyed by identity, so that a deep copy of a
# model (new weights) packs its own and a freed weight takes its packed copy with it
_packed: WeakIdKeyDictionary = WeakIdKeyDictionary()
_lock = threading.Lock()


def _packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """The oneDNN-packed copy of `weight` [N, K], made once per value of the weight."""
    stamp = (weight.data_ptr(), weight._version)
    entry = _packed.get(weight)
    if entry is None or entry[:2] != stamp:
        with _lock:
            entry = _packed.get(weight)
            if entry is None or entry[:2] != stamp:
                entry = (*stamp, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS))
                _packed[weight] = entry
    return entry[2]


class PackedLinear(nn.Linear):
    """nn.Linear whose no-grad CPU forward uses a oneDNN-packed copy of its weight (module docstring).

    x [..., in_features] -> [..., out_features], as nn.Linear.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._uses_packed(x):
            return torch.ops.mkldnn._linear_pointwise(x, _packed_weight(self.weight), self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def _uses_packed(self, x: torch.Tensor) -> bool:
        w = self.weight
        recording = torch.is_grad_enabled() and (
            x.requires_grad or w.requires_grad or (self.bias is not None and self.bias.requires_grad)
        )
        return (
            not torch.compiler.is_compiling()  # first: dynamo cannot trace is_inference()
            and not recording
            and x.device.type == "cpu" == w.device.type
            and x.dtype == w.dtype
            and w.dtype in _PACKABLE
            and not w.is_inference()  # (made inside inference_mode: no version counter tells when it changes)
            and x.dim() >= 2
        )

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        """A PackedLinear holding `linear`'s own parameters (no copy)."""
        return _rebuilt(linear, cls)


def _rebuilt(linear: nn.Linear, cls: type[nn.Linear]) -> nn.Linear:
    """A `cls` module holding `linear`'s parameters (built on the meta device, so nothing is allocated)."""
    module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    module.weight, module.bias = linear.weight, linear.bias
    return module.train(linear.training)


def _swap(model: nn.Module, old: type[nn.Linear], new: type[nn.Linear]) -> int:
    """Replace every module of exactly type `old` by a `new` one with the same parameters; a module
    registered under several names is replaced by one module. Returns how many were replaced."""
    made: dict[int, nn.Linear] = {}
    for parent in list(model.modules()):
        # `_modules`, not named_children(), which yields a module once per parent: a second name it is
        # registered under in the same parent would keep the old module
        for name, child in list(parent._modules.items()):
            if type(child) is old:
                if id(child) not in made:
                    made[id(child)] = _rebuilt(child, new)
                setattr(parent, name, made[id(child)])
    return len(made)


def pack_linears(model: nn.Module) -> int:
    """Make every plain nn.Linear of `model` a PackedLinear (same parameters); returns how many.

    A no-op (0) where this torch has no oneDNN. Hooks registered on the replaced modules are not carried over.
    """
    return _swap(model, nn.Linear, PackedLinear) if AVAILABLE else 0


def unpack_linears(model: nn.Module) -> int:
    """Undo `pack_linears`: plain nn.Linear modules again, same parameters, their packed copies freed;
    returns how many."""
    for m in model.modules():
        if type(m) is PackedLinear:
            _packed.pop(m.weight, None)
    return _swap(model, PackedLinear, nn.Linear)
