"""Fused optimizer steps over one flat adapter buffer: SGD and AdamW, each in ONE Triton launch.

Same semantics as `tmem_kernels.reference.sgd_step_` / `adamw_step_` (which match torch.optim.SGD and
torch.optim.AdamW: no momentum, no amsgrad, maximize=False). Arithmetic is fp32 whatever the storage
dtype; param, grad and the two moment buffers share one dtype.

`lr` and `step` may be Python numbers or 1-element tensors on the param's device. Numbers are folded on
the host (bias corrections in float64, as torch.optim.AdamW does for a Python step); tensors are read
inside the kernel (bias corrections in fp32, as torch's `capturable=True` AdamW does), so a CUDA graph
can capture the step once and replay it while the caller bumps the `step` / `lr` tensors in place.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from tmem_kernels.lora_mlp import _cast  # RTNE fp32 -> bf16 also under the interpreter

__all__ = ["BLOCK", "adamw_step_", "launch_config", "sgd_step_"]

BLOCK = 1024
NUM_WARPS = 4
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _scalar(ptr, value, IS_PTR: tl.constexpr):
    """A runtime scalar, from a 1-element device tensor (IS_PTR) or passed by value."""
    if IS_PTR:
        return tl.load(ptr).to(tl.float32)
    else:
        return value


@triton.jit
def _sgd_kernel(
    p_ptr,
    g_ptr,
    lr_ptr,
    lr_val,
    weight_decay,
    numel,
    LR_IS_PTR: tl.constexpr,
    HAS_WD: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """p -= lr * (g + weight_decay * p) over one flat block of BLOCK elements."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lr = _scalar(lr_ptr, lr_val, LR_IS_PTR)
    if HAS_WD:
        g = g + weight_decay * p
    tl.store(p_ptr + offs, _cast(p - lr * g, p_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _adamw_kernel(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    lr_ptr,
    lr_val,
    decay_val,
    step_ptr,
    step_size_val,
    bc2_sqrt_val,
    beta1,
    beta2,
    eps,
    weight_decay,
    numel,
    LR_IS_PTR: tl.constexpr,
    STEP_IS_PTR: tl.constexpr,
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """One AdamW step over one flat block, in the order torch.optim.AdamW (single-tensor) applies it."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lr = _scalar(lr_ptr, lr_val, LR_IS_PTR)
    if STEP_IS_PTR:
        step = tl.maximum(tl.load(step_ptr).to(tl.float32), 1.0)  # steps count from 1 (see adamw_step_)
        bc1 = 1.0 - tl.exp2(step * tl.log2(beta1))
        bc2 = 1.0 - tl.exp2(step * tl.log2(beta2))
        step_size = tl.math.div_rn(lr, bc1)
        bc2_sqrt = tl.sqrt_rn(bc2)
    else:
        step_size = step_size_val
        bc2_sqrt = bc2_sqrt_val
        if LR_IS_PTR:  # step_size_val holds 1 / bias_correction1
            step_size = lr * step_size_val
    if LR_IS_PTR:
        decay = 1.0 - lr * weight_decay
    else:
        decay = decay_val  # folded on the host in float64, as torch does
    # IEEE-rounded sqrt and division (the GPU defaults are approximate), to track torch closely
    p = p * decay
    m = m + (1.0 - beta1) * (g - m)  # torch.lerp with weight < 0.5
    v = v * beta2 + (1.0 - beta2) * g * g
    denom = tl.math.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - step_size * tl.math.div_rn(m, denom)
    dt = p_ptr.dtype.element_ty
    tl.store(p_ptr + offs, _cast(p, dt, INTERPRET), mask=mask)
    tl.store(m_ptr + offs, _cast(m, dt, INTERPRET), mask=mask)
    tl.store(v_ptr + offs, _cast(v, dt, INTERPRET), mask=mask)


def launch_config(numel: int) -> dict:
    """The one launch either step makes for a buffer of `numel` elements: grid, BLOCK, num_warps."""
    return {"grid": (triton.cdiv(numel, BLOCK),), "constexprs": {"BLOCK": BLOCK}, "num_warps": NUM_WARPS}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check(op: str, param: torch.Tensor, **bufs: torch.Tensor) -> None:
    """Clear errors before any launch: same numel, dtype and device; contiguous; a supported dtype."""
    for name, t in {"param": param, **bufs}.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous (one flat buffer), got strides {t.stride()}")
        if t.dtype != param.dtype:
            raise TypeError(f"{op}: mixed dtypes: param is {param.dtype} but {name} is {t.dtype}")
        if t.device != param.device:
            raise ValueError(f"{op}: mixed devices: param is on {param.device} but {name} is on {t.device}")
        if t.shape != param.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, param has {tuple(param.shape)}")
    if param.dtype not in _DTYPES:
        raise TypeError(f"{op}: dtype {param.dtype} not supported (float32, float16 or bfloat16)")
    if param.device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"{op} (triton): tensors are on {param.device}; Triton needs CUDA tensors, "
            "or TRITON_INTERPRET=1 set before importing tmem_kernels for CPU tensors"
        )


def _scalar_arg(op: str, name: str, value, param: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """(device tensor or None, host value) for a scalar that may be a 1-element tensor."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{op}: {name} as a tensor must have exactly 1 element, got {value.numel()}")
        if value.device != param.device:
            raise ValueError(f"{op}: {name} is on {value.device} but param is on {param.device}")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{op}: {name} must be a real number, got a {value.dtype} tensor")
        return value, 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a number or a 1-element tensor, got {type(value).__name__}")
    return None, float(value)


def sgd_step_(
    param: torch.Tensor, grad: torch.Tensor, lr: float | torch.Tensor, weight_decay: float = 0.0
) -> None:
    """param -= lr * (grad + weight_decay * param), in place, in one launch.

    param, grad: same shape, dtype and device, contiguous (the flat buffer, any shape). lr: a number or a
    1-element tensor on param's device (read in the kernel: no host sync, CUDA-graph capturable).
    """
    _check("sgd_step_", param, grad=grad)
    lr_t, lr_v = _scalar_arg("sgd_step_", "lr", lr, param)
    numel = param.numel()
    if numel == 0:
        return
    c = launch_config(numel)
    _sgd_kernel[c["grid"]](
        param,
        grad,
        lr_t if lr_t is not None else param,
        lr_v,
        float(weight_decay),
        numel,
        LR_IS_PTR=lr_t is not None,
        HAS_WD=weight_decay != 0,
        INTERPRET=_interpreting(),
        num_warps=c["num_warps"],
        **c["constexprs"],
    )


def adamw_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int | torch.Tensor,
    lr: float | torch.Tensor,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> None:
    """One AdamW step in place (param, exp_avg, exp_avg_sq updated), as torch.optim.AdamW, in one launch.

    param, grad, exp_avg, exp_avg_sq: same shape, dtype and device, contiguous. `step` counts from 1 (this
    step). `step` and `lr`: numbers, or 1-element tensors on param's device read inside the kernel (no
    host sync; bias corrections then computed in fp32 on the device, like torch's capturable AdamW). A
    number below 1 is refused; a step tensor below 1 is taken as 1 (checking it would need a host sync;
    at 0 the bias correction 1 - beta**0 = 0 made the update inf), as `reference.adamw_step_`.
    """
    _check("adamw_step_", param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    lr_t, lr_v = _scalar_arg("adamw_step_", "lr", lr, param)
    step_t, step_v = _scalar_arg("adamw_step_", "step", step, param)
    if step_t is None and step_v < 1:
        raise ValueError(f"adamw_step_: step counts from 1, got {step}")
    for name, b in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"adamw_step_: {name} must be in [0, 1), got {b}")
    numel = param.numel()
    if numel == 0:
        return
    step_size = bc2_sqrt = 1.0
    if step_t is None:
        bc1 = 1.0 - beta1**step_v
        step_size = (lr_v if lr_t is None else 1.0) / bc1
        bc2_sqrt = math.sqrt(1.0 - beta2**step_v)
    c = launch_config(numel)
    _adamw_kernel[c["grid"]](
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        lr_t if lr_t is not None else param,
        lr_v,
        1.0 - lr_v * weight_decay,
        step_t if step_t is not None else param,
        step_size,
        bc2_sqrt,
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        numel,
        LR_IS_PTR=lr_t is not None,
        STEP_IS_PTR=step_t is not None,
        INTERPRET=_interpreting(),
        num_warps=c["num_warps"],
        **c["constexprs"],
    )
