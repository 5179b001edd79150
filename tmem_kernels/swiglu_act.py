"""SwiGLU's gated activation as one op (`tmem::swiglu`): the torch composition, its backward, the dispatch.

    gate [..., I], up [..., I] (one shape, dtype and device) -> h [..., I] in their dtype, contiguous
    h = silu(gate) * up                                           (`reference.swiglu` is the spec)
    backward: dh -> dgate = dh * up * sig * (1 + gate * (1 - sig)), dup = dh * gate * sig   (sig = sigmoid(gate))

What a gated MLP computes between its projections (`down_proj(act_fn(gate_proj(x)) * up_proj(x))`, act_fn SiLU):
torch runs it as two kernels forward (silu, mul) and three backward (two products, silu_backward), saving silu's
output besides gate and up; the fused op is one kernel each way and saves gate and up only (the sigmoid is
recomputed in the backward).

On CUDA (float32/float16/bfloat16) the forward and the backward are one Triton launch each (`swiglu_act_triton`):
every input is read as float32 and each output rounded once, on its store. In 16-bit that is not bit for bit
torch's composition, which rounds silu(gate) to the dtype before the product (and in its backward dh * up before
silu_backward, and uses the rounded silu(gate) for dup): against float64 the kernels' h, dgate and dup are within
1 ulp of the dtype (correctly rounded, 0.5 ulp, but where float32 cancels in dgate's 1 + gate * (1 - sig);
measured 0.5 in bf16, 0.52 in fp16) where torch's composition is up to 1.4 ulp off (tests/test_swiglu.py). In
float32 both are within 1e-5 relative of float64 and differ in the last bits (another exp: h 3.6 ulp off, torch's
2.3). Elsewhere (the CPU, float64, no Triton) the op runs torch's composition itself: bit for bit
`F.silu(gate) * up` and its autograd, in every dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tmem_kernels.triton_dispatch import triton_runs

__all__ = ["backward", "backward_torch", "check_inputs", "forward", "forward_torch", "use_triton"]


def check_inputs(gate: torch.Tensor, up: torch.Tensor) -> None:
    """Clear errors for what the op would get wrong: gate and up float tensors of one shape, dtype and device."""
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"swiglu: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"swiglu: {name} must be a float tensor, got {t.dtype}")
    if up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device:
        raise ValueError(f"swiglu: up must match gate (shape, dtype, device): gate {tuple(gate.shape)} {gate.dtype} "
                         f"{gate.device}, up {tuple(up.shape)} {up.dtype} {up.device}")  # fmt: skip


def use_triton(gate: torch.Tensor) -> bool:
    """Whether the Triton kernels run for gate: CUDA, a float32/16-bit dtype, Triton installed."""
    return triton_runs("swiglu_act_triton", gate)


def forward_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """h = F.silu(gate) * up [..., I] (contiguous): torch's composition, op for op."""
    return (F.silu(gate) * up).contiguous()


def backward_torch(
    dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, need_gate: bool = True, need_up: bool = True
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dgate, dup) [..., I] in gate's dtype (None where not needed) from dh [..., I]: what autograd through
    `forward_torch` computes, bit for bit (the product's two gradients, then silu_backward; silu(gate)
    recomputed)."""
    dgate = torch.ops.aten.silu_backward(dh * up, gate) if need_gate else None
    dup = dh * F.silu(gate) if need_up else None
    return dgate, dup


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t [..., I] as [N, I] with unit stride along I (a view where one exists; rows may be strided)."""
    rows = t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """h [..., I] (contiguous): Triton on CUDA (`use_triton`), else `forward_torch`. Inputs checked."""
    check_inputs(gate, up)
    if not use_triton(gate):
        return forward_torch(gate, up)
    from tmem_kernels import swiglu_act_triton

    return swiglu_act_triton.forward(_rows(gate), _rows(up)).view(gate.shape)


def backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup) [..., I] in gate's dtype (contiguous): Triton on CUDA (`use_triton`, dh in gate's dtype), else
    `backward_torch`."""
    if not use_triton(gate) or dh.dtype != gate.dtype:
        dgate, dup = backward_torch(dh, gate, up)
        return dgate.contiguous(), dup.contiguous()
    from tmem_kernels import swiglu_act_triton

    dgate, dup = swiglu_act_triton.backward(_rows(dh), _rows(gate), _rows(up))
    return dgate.view(gate.shape), dup.view(gate.shape)
