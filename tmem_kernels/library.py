"""tmem's ops as torch custom ops (`torch.ops.tmem.*`): traceable by torch.compile and torch.export.

The kernels stay where they are (`reference`, `native`, `lora_mlp` + `update` for Triton, `rsvd`,
`cross_entropy`); this module declares each op's schema, its fake (meta) implementation (shapes
only, for tracing) and its autograd formula, and the Python functions that call them. A custom op is
opaque to the compiler: it never sees the data pointers the native extension reads or the Triton launch,
only the schema, so `torch.compile(fullgraph=True)` does not break around them and `torch.export` can
trace a model that calls them.

    torch    lora_mlp_torch, sgd_step_torch, adamw_step_torch: the reference compositions, registered as
             CompositeImplicitAutograd (they decompose into aten ops when traced; autograd comes from that);
             lora_mlp_composed: the same products with a hand-written backward (fewer kernels: write steps)
    native   lora_mlp_native (+ lora_mlp_native_backward), sgd_step_native, adamw_step_native: CPU, float32
    triton   lora_mlp_triton (+ lora_mlp_triton_backward, and lora_mlp_triton_backward_sgd_ which updates
             the B's in place inside the backward), sgd_step_triton, adamw_step_triton: CUDA, or CPU tensors
             under TRITON_INTERPRET=1 (`torch.library.triton_op` would let the compiler see the kernels, but
             under the interpreter it launches them on fake tensors and fails; `custom_op` works on both)
    any      randomized_svd_top_r (not differentiable), linear_cross_entropy (differentiable w.r.t. hidden),
             rms_norm (+ rms_norm_backward; Triton on CUDA, the torch composition elsewhere), rope (+
             rope_backward; likewise), add_rms_norm (+ add_rms_norm_backward; likewise), swiglu (+
             swiglu_backward; likewise)

The LoRA MLP ops return the tensors their backward reads as extra outputs (marked non-differentiable); the
Python functions here return y only. A backend that is not installed (no Triton, native extension not
built) registers no ops, and its functions raise ImportError when called.
"""

import torch
from torch import Tensor

from tmem_kernels import addrmsnorm as _add_rms
from tmem_kernels import composed_lora_mlp as _composed
from tmem_kernels import cross_entropy as _lce
from tmem_kernels import qknorm_rope as _qkr
from tmem_kernels import reference, rsvd
from tmem_kernels import rmsnorm as _rms
from tmem_kernels import rotary as _rotary
from tmem_kernels import swiglu_act as _swiglu

_MISSING: dict[str, ImportError] = {}  # backend -> why it is not available here
try:
    from tmem_kernels import native as _native
except ImportError as exc:  # pragma: no cover - depends on the build
    _native, _MISSING["native"] = None, exc
try:
    from tmem_kernels import lora_mlp as _triton_mlp
    from tmem_kernels import update as _triton_update
except ImportError as exc:  # pragma: no cover - depends on the install
    _triton_mlp = _triton_update = None
    _MISSING["triton"] = exc

__all__ = [
    "OPS",
    "add_rms_norm",
    "adamw_step_native",
    "adamw_step_torch",
    "adamw_step_triton",
    "linear_cross_entropy",
    "linear_cross_entropy_rows",
    "lora_mlp_composed",
    "lora_mlp_native",
    "lora_mlp_torch",
    "lora_mlp_triton",
    "qk_norm_rope",
    "randomized_svd_lora_init",
    "randomized_svd_top_r",
    "require_backend",
    "rms_norm",
    "rope",
    "sgd_step_native",
    "sgd_step_torch",
    "sgd_step_triton",
    "swiglu",
]

_LORA_ARGS = (
    "Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down, Tensor a_gate, Tensor b_gate, Tensor a_up, Tensor b_up, "
    "Tensor a_down, Tensor b_down"
)
_SGD_SCHEMA = "(Tensor(a!) param, Tensor grad, float lr, float weight_decay=0.0) -> ()"
_ADAMW_SCHEMA = (
    "(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor? step_tensor, float step, "
    "float lr, float beta1=0.9, float beta2=0.999, float eps=1e-08, float weight_decay=0.01) -> ()"
)
_lib = torch.library.Library("tmem", "FRAGMENT")


def require_backend(name: str) -> None:
    """Raise ImportError (with the reason) unless backend `name`'s ops are registered here."""
    if name in _MISSING:
        raise ImportError(f"the {name} backend is not available here: {_MISSING[name]}")


def _empty(like: Tensor) -> Tensor:
    """The placeholder an op returns for an output it did not compute (ops cannot return None)."""
    return like.new_empty(0)


def _or_none(t: Tensor, wanted: bool) -> Tensor | None:
    return t if wanted else None


def _check_frozen(op: str, *weights: Tensor) -> None:
    """The base weights get no gradient from any backend: refuse them when they would need one."""
    if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
        raise ValueError(
            f"{op}: a base weight (w_gate, w_up, w_down) requires grad, but the base weights are frozen here "
            "(no kernel computes their gradient); call .requires_grad_(False) on them"
        )


def _flat(x: Tensor) -> Tensor:
    if x.dim() < 1:
        raise ValueError("lora_mlp: x must have at least one dimension [..., H]")
    return x.reshape(-1, x.shape[-1])


def _check_scaling(scaling: object) -> None:
    """TypeError unless `scaling` is a Python number (a LoRA MLP op's schema takes a float, not a tensor)."""
    if isinstance(scaling, Tensor) or not isinstance(scaling, (int, float)):
        raise TypeError(f"scaling must be a Python number, got {type(scaling).__name__}")


def _step_args(step: int | Tensor) -> tuple[Tensor | None, float]:
    """AdamW's step as the ops take it: (1-element device tensor, 0.0) or (None, the number)."""
    if isinstance(step, Tensor):
        return step, 0.0
    if isinstance(step, bool) or not isinstance(step, (int, float)):
        raise TypeError(f"adamw_step_: step must be a number or a 1-element tensor, got {type(step).__name__}")
    return None, float(step)


def _lora_shapes(x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, contiguous=True):  # noqa: ANN001
    """Check x [N, H] and the nine MLP tensors (2-D, one dtype and device, contiguous unless not asked,
    shapes consistent with w_gate [I, H] and a_gate [r, H]); returns (N, H, I, r). Symbolic shapes welcome
    (the fakes use it)."""
    tensors = dict(x=x, w_gate=w_gate, w_up=w_up, w_down=w_down, a_gate=a_gate, b_gate=b_gate, a_up=a_up,
                   b_up=b_up, a_down=a_down, b_down=b_down)  # fmt: skip
    for name, t in tensors.items():
        if t.dim() != 2:
            raise ValueError(f"lora_mlp: {name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"lora_mlp: {name} is {t.dtype} on {t.device}, x is {x.dtype} on {x.device}")
        if contiguous and not t.is_contiguous():
            raise ValueError(f"lora_mlp: {name} must be contiguous (call .contiguous() first)")
    (n, h), i, r = x.shape, w_gate.shape[0], a_gate.shape[0]
    expected = dict(w_gate=(i, h), w_up=(i, h), w_down=(h, i), a_gate=(r, h), b_gate=(i, r), a_up=(r, h),
                    b_up=(i, r), a_down=(r, i), b_down=(h, r))  # fmt: skip
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"lora_mlp: {name} has shape {tuple(tensors[name].shape)}, expected {shape} for x "
                             f"[{n}, {h}], w_gate [{i}, {h}] and a_gate [{r}, {h}]")  # fmt: skip
    return n, h, i, r


def _differentiable_grads(ctx, dy: Tensor, tensors: tuple[Tensor, ...], scaling: float) -> list[Tensor | None]:  # noqa: ANN001
    """A kernel op's backward under create_graph=True (a double backward will follow): the gradients of x
    and the nine MLP tensors (None where not needed) through the torch composition, recomputed from the
    saved inputs, so they are differentiable again (the kernels' gradients are not). Slower than the
    kernels' backward, and only taken when a graph of the backward is asked for."""
    inputs, needed = tensors[:10], ctx.needs_input_grad[:10]
    with torch.enable_grad(), torch.autocast(dy.device.type, enabled=False):
        y = reference.lora_mlp(*inputs, scaling)
        grads = iter(torch.autograd.grad(y, [t for t, need in zip(inputs, needed) if need], dy.to(y.dtype),
                                         create_graph=True))  # fmt: skip
    return [next(grads) if need else None for need in needed]


def _grads_without_kernels(ctx, dy: Tensor | None) -> tuple | None:  # noqa: ANN001
    """A LoRA MLP op's gradients where its backward kernels do not run (native, composed; ctx from
    `_save_lora_inputs`): every None when y took no part (dy None), through the reference under create_graph=True
    (a double backward may follow); else None (the kernels run)."""
    if dy is None:
        return (None,) * len(ctx.needs_input_grad)
    if torch.is_grad_enabled():
        return *_differentiable_grads(ctx, dy, ctx.saved_tensors, ctx.scaling), None
    return None


def _save_lora_inputs(ctx, inputs, output) -> None:  # noqa: ANN001
    """A LoRA MLP op's autograd setup (native, composed): its inputs (x, the nine MLP tensors, scaling) and the
    outputs after y, which its backward reads (not differentiable), saved."""
    *tensors, scaling = inputs
    saved = output[1:]
    ctx.mark_non_differentiable(*saved)
    ctx.set_materialize_grads(False)  # no zeros kernels for the saved outputs' (unused) gradients
    ctx.save_for_backward(*tensors, *saved)
    ctx.scaling = scaling


# ------------------------------------------------------------------------------------------------
# torch: the reference compositions
# ------------------------------------------------------------------------------------------------


def _check_step_buffers(op: str, param: Tensor, **bufs: Tensor) -> None:
    """The reference steps' input rules, checked before anything is written: every buffer param's shape
    (no broadcasting), dtype and device, as the native and Triton steps require (a buffer of another dtype
    failed half-way, after param was decayed; one on the meta device made the step a silent no-op)."""
    for name, t in bufs.items():
        if t.shape != param.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, param has {tuple(param.shape)}")
        if t.dtype != param.dtype:
            raise TypeError(f"{op}: mixed dtypes: param is {param.dtype} but {name} is {t.dtype}")
        if t.device != param.device:
            raise ValueError(f"{op}: mixed devices: param is on {param.device} but {name} is on {t.device}")


# Both steps run outside autograd, as torch.optim's do: param may be a leaf that requires grad (an
# nn.Parameter), and a grad that requires grad records no graph into param.
@torch.no_grad()
def _reference_sgd(param, grad, lr, weight_decay=0.0):  # noqa: ANN001
    _check_step_buffers("sgd_step_", param, grad=grad)
    reference.sgd_step_(param, grad, lr, weight_decay)


@torch.no_grad()
def _reference_adamw(param, grad, exp_avg, exp_avg_sq, step_tensor, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,  # noqa: ANN001
                     weight_decay=0.01):  # fmt: skip
    _check_step_buffers("adamw_step_", param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    if step_tensor is None and step < 1:
        raise ValueError(f"adamw_step_: step counts from 1, got {step}")
    if step_tensor is not None and (step_tensor.numel() != 1 or step_tensor.device != param.device):
        raise ValueError(f"adamw_step_: step_tensor must have 1 element on param's device ({param.device}), got "
                         f"shape {tuple(step_tensor.shape)} on {step_tensor.device}")  # fmt: skip
    reference.adamw_step_(param, grad, exp_avg, exp_avg_sq, step if step_tensor is None else step_tensor, lr,
                          beta1, beta2, eps, weight_decay)  # fmt: skip


def _reference_lora_mlp(x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, scaling=1.0):  # noqa: ANN001
    _lora_shapes(_flat(x), w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, contiguous=False)
    if not x.is_floating_point():
        raise TypeError(f"lora_mlp: x is {x.dtype}; the torch backend takes floating-point tensors")
    return reference.lora_mlp(x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, scaling)


_lib.define(f"lora_mlp_torch({_LORA_ARGS}, float scaling=1.0) -> Tensor")
_lib.impl("lora_mlp_torch", _reference_lora_mlp, "CompositeImplicitAutograd")
_lib.define("sgd_step_torch" + _SGD_SCHEMA)
_lib.impl("sgd_step_torch", _reference_sgd, "CompositeImplicitAutograd")
_lib.define("adamw_step_torch" + _ADAMW_SCHEMA)
_lib.impl("adamw_step_torch", _reference_adamw, "CompositeImplicitAutograd")


def lora_mlp_torch(
    x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, a_gate: Tensor, b_gate: Tensor, a_up: Tensor,
    b_up: Tensor, a_down: Tensor, b_down: Tensor, scaling: float = 1.0,
) -> Tensor:  # fmt: skip
    """`tmem::lora_mlp_torch`: the reference LoRA SwiGLU MLP, x [..., H] -> [..., H] (shapes in `reference`)."""
    _check_frozen("lora_mlp", w_gate, w_up, w_down)
    return torch.ops.tmem.lora_mlp_torch(x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down,
                                         float(scaling))  # fmt: skip


def sgd_step_torch(param: Tensor, grad: Tensor, lr: float, weight_decay: float = 0.0) -> None:
    """`tmem::sgd_step_torch`: param -= lr * (grad + weight_decay * param), in place (the torch composition);
    param, grad [...] of one shape, dtype and device."""
    torch.ops.tmem.sgd_step_torch(param, grad, float(lr), float(weight_decay))


def adamw_step_torch(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int | Tensor, lr: float,
    beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.01,
) -> None:  # fmt: skip
    """`tmem::adamw_step_torch`: one AdamW step in place, as torch.optim.AdamW; param, grad, exp_avg, exp_avg_sq
    [...] of one shape, dtype and device. `step` counts from 1: a number, or a 1-element tensor on param's
    device (read there, no host sync; below 1 taken as 1)."""
    torch.ops.tmem.adamw_step_torch(param, grad, exp_avg, exp_avg_sq, *_step_args(step), float(lr), beta1, beta2,
                                    eps, weight_decay)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# native: the C++ extension (CPU, float32)
# ------------------------------------------------------------------------------------------------


def _native_validate(*tensors: Tensor) -> tuple[int, int, int, int]:
    """The native kernels' rules on top of `_lora_shapes`: float32, CPU, 1 <= r <= MAX_RANK."""
    n, h, i, r = _lora_shapes(*tensors)
    _native._check(tensors[0], "x")
    _native._check_rank(r)
    return n, h, i, r


if _native is not None:

    @torch.library.custom_op("tmem::lora_mlp_native", mutates_args=(), device_types="cpu")
    def _lora_mlp_native(
        x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, a_gate: Tensor, b_gate: Tensor, a_up: Tensor,
        b_up: Tensor, a_down: Tensor, b_down: Tensor, scaling: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        """(y [N, H], gu [2, N, I], xa [N, 2r], ha [N, r]): the forward and what its backward reads."""
        args = (x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down)
        _native_validate(*args)
        return _native.lora_mlp_forward(*args, scaling)

    @_lora_mlp_native.register_fake
    def _(x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, scaling):  # noqa: ANN001
        n, h, i, r = _native_validate(x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down)
        return x.new_empty(n, h), x.new_empty(2, n, i), x.new_empty(n, 2 * r), x.new_empty(n, r)

    @torch.library.custom_op("tmem::lora_mlp_native_backward", mutates_args=(), device_types="cpu")
    def _lora_mlp_native_backward(
        dy: Tensor, x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, a_gate: Tensor, b_gate: Tensor,
        a_up: Tensor, b_up: Tensor, a_down: Tensor, b_down: Tensor, gu: Tensor, xa: Tensor, ha: Tensor,
        scaling: float, need_dx: bool, need_da: bool, need_db_down: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        """(dx, da_gate, db_gate, da_up, db_up, da_down, db_down); the ones not asked for are empty."""
        n, h, i, r = _native_validate(x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down)
        _native._check(dy, "dy", (n, h))
        grads = _native.lora_mlp_backward(dy, x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down,
                                          gu, xa, ha, scaling, need_dx, need_da, need_db_down)  # fmt: skip
        # da_gate / da_up are row slices of one [2r, H] product: outputs must not alias each other
        return tuple(_empty(x) if g is None else g.clone() if k in (1, 3) else g for k, g in enumerate(grads))

    @_lora_mlp_native_backward.register_fake
    def _(dy, x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, gu, xa, ha, scaling,  # noqa: ANN001
          need_dx, need_da, need_db_down):  # fmt: skip
        _native_validate(x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down)
        shaped = [(x, need_dx), (a_gate, need_da), (b_gate, True), (a_up, need_da), (b_up, True),
                  (a_down, need_da), (b_down, need_db_down)]  # fmt: skip
        return tuple(torch.empty_like(t) if wanted else _empty(x) for t, wanted in shaped)

    def _native_backward(ctx, dy, *_):  # noqa: ANN001
        if (done := _grads_without_kernels(ctx, dy)) is not None:
            return done
        need = ctx.needs_input_grad
        grads = torch.ops.tmem.lora_mlp_native_backward(
            dy.contiguous(), *ctx.saved_tensors, ctx.scaling, need[0], need[4] or need[6] or need[8], need[9]
        )
        dx, *factors = (_or_none(g, need[k]) for g, k in zip(grads, (0, 4, 5, 6, 7, 8, 9)))
        return dx, None, None, None, *factors, None

    _lora_mlp_native.register_autograd(_native_backward, setup_context=_save_lora_inputs)
    # In a CPU autocast region the kernels' torch products were cast to bf16 beside float32 operands (an
    # error); the native kernels are float32: their inputs are cast to it and they run outside autocast.
    torch.library.register_autocast("tmem::lora_mlp_native", "cpu", torch.float32)
    torch.library.register_autocast("tmem::lora_mlp_native_backward", "cpu", torch.float32)

    @torch.library.custom_op("tmem::sgd_step_native", mutates_args=("param",), device_types="cpu")
    def _sgd_step_native(param: Tensor, grad: Tensor, lr: float, weight_decay: float = 0.0) -> None:
        _native.sgd_step_(param, grad, lr, weight_decay)

    # The steps' fakes check what the kernels check: a buffer on the meta device beside CPU ones dispatches
    # to the fake, which must refuse it (torch's default fake for a mutating op did nothing: a silent no-op).
    @_sgd_step_native.register_fake
    def _(param, grad, lr, weight_decay=0.0):  # noqa: ANN001
        _native._check(param, "param")
        _native._check_same(param, "param", grad=grad)

    @torch.library.custom_op("tmem::adamw_step_native", mutates_args=("param", "exp_avg", "exp_avg_sq"),
                             device_types="cpu")  # fmt: skip
    def _adamw_step_native(
        param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step_tensor: Tensor | None, step: float,
        lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.01,
    ) -> None:  # fmt: skip
        _native_adamw_check(param, grad, exp_avg, exp_avg_sq, step_tensor, step)
        _native.adamw_step_(param, grad, exp_avg, exp_avg_sq, int(step), lr, beta1, beta2, eps, weight_decay)

    @_adamw_step_native.register_fake
    def _(param, grad, exp_avg, exp_avg_sq, step_tensor, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,  # noqa: ANN001
          weight_decay=0.01):  # fmt: skip
        _native_adamw_check(param, grad, exp_avg, exp_avg_sq, step_tensor, step)

    def _native_adamw_check(param, grad, exp_avg, exp_avg_sq, step_tensor, step) -> None:  # noqa: ANN001
        """The native AdamW step's rules: four float32 CPU buffers of one shape, a whole step from 1."""
        if step_tensor is not None:
            raise ValueError("adamw_step_ (native): step must be a Python number (the native kernel reads it on "
                             "the host); device-tensor steps are for the torch and triton backends")  # fmt: skip
        if step != int(step):
            raise ValueError(f"adamw_step_ (native): step must be a whole number, got {step}")
        if step < 1:
            raise ValueError(f"step counts from 1, got {step}")
        _native._check(param, "param")
        _native._check_same(param, "param", grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)


def lora_mlp_native(
    x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, a_gate: Tensor, b_gate: Tensor, a_up: Tensor,
    b_up: Tensor, a_down: Tensor, b_down: Tensor, scaling: float = 1.0,
) -> Tensor:  # fmt: skip
    """`tmem::lora_mlp_native`: the fused LoRA SwiGLU MLP on the C++ extension, x [..., H] -> [..., H];
    float32, CPU, contiguous (shapes in `reference`). Differentiable w.r.t. x, the b_* and the a_*."""
    require_backend("native")
    _check_frozen("lora_mlp", w_gate, w_up, w_down)
    _check_scaling(scaling)
    y = torch.ops.tmem.lora_mlp_native(_flat(x), w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down,
                                       float(scaling))[0]  # fmt: skip
    return y.view(x.shape)


def sgd_step_native(param: Tensor, grad: Tensor, lr: float, weight_decay: float = 0.0) -> None:
    """`tmem::sgd_step_native`: param -= lr * (grad + weight_decay * param), in place; param, grad [...] of one
    shape, float32, CPU, contiguous."""
    require_backend("native")
    torch.ops.tmem.sgd_step_native(param, grad, float(lr), float(weight_decay))


def adamw_step_native(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, lr: float,
    beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.01,
) -> None:  # fmt: skip
    """`tmem::adamw_step_native`: one AdamW step in place, as torch.optim.AdamW; param, grad, exp_avg,
    exp_avg_sq [...] of one shape, float32, CPU, contiguous; `step` a Python number from 1."""
    require_backend("native")
    torch.ops.tmem.adamw_step_native(param, grad, exp_avg, exp_avg_sq, *_step_args(step), float(lr), beta1, beta2,
                                     eps, weight_decay)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# triton: the Triton kernels (CUDA; CPU tensors under TRITON_INTERPRET=1)
# ------------------------------------------------------------------------------------------------


def _triton_validate(*tensors: Tensor, fake: bool = False) -> tuple[int, int, int, int]:
    """The Triton kernels' checks on x [N, H] and the nine MLP tensors; (N, H, I, r). `fake`: on fake
    tensors, whose shapes may be symbolic (`lora_mlp._check_inputs` counts them, which needs numbers)."""
    if not fake:
        names = ("w_gate", "w_up", "w_down", "a_gate", "b_gate", "a_up", "b_up", "a_down", "b_down")
        return _triton_mlp._check_inputs(tensors[0], dict(zip(names, tensors[1:])))
    n, h, i, r = _lora_shapes(*tensors)
    if tensors[0].dtype not in _triton_mlp._DTYPES:
        raise TypeError(f"lora_mlp: dtype {tensors[0].dtype} not supported (float32, float16 or bfloat16)")
    if not 1 <= r <= _triton_mlp.MAX_RANK:
        raise ValueError(f"lora_mlp: LoRA rank {r} is outside 1..{_triton_mlp.MAX_RANK}")
    return n, h, i, r


def _triton_config(x: Tensor, w_gate: Tensor):  # noqa: ANN202
    """The tiles `lora_mlp` would pick for x [N, H] on its device (tiles.select_config)."""
    n, h = x.shape
    return _triton_mlp.select_config(n, h, w_gate.shape[0], x.dtype, _triton_mlp.num_sms(x.device))


if _triton_mlp is not None:

    @torch.library.custom_op("tmem::lora_mlp_triton", mutates_args=())
    def _lora_mlp_triton(
        x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, a_gate: Tensor, b_gate: Tensor, a_up: Tensor,
        b_up: Tensor, a_down: Tensor, b_down: Tensor, scaling: float, sgd_lr: float | None, save: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        """(y [N, H], gate [N, I], up [N, I], xa [N, 2r], ha [N, r]); the last four only with `save` (else
        empty). `sgd_lr` is read by the backward only (see `lora_mlp_triton`).

        Without `save` (inference), a few rows on CUDA run the torch composition instead (cuBLAS base
        products + the small LoRA terms; `lora_mlp.forward_path`, which `lora_mlp.lora_mlp` asks too). The
        choice is made here, on real shapes, so a traced graph (torch.export, torch.compile with dynamic
        rows) keeps one op for every row count."""
        args = (x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down)
        _triton_validate(*args)
        cfg = _triton_config(x, w_gate)
        if _triton_mlp.forward_path(x, cfg, save) == "cublas":
            with torch.autocast(x.device.type, enabled=False):  # in x's dtype, as the fake promises
                y = reference.lora_mlp(*args, scaling)
            return y, _empty(x), _empty(x), _empty(x), _empty(x)
        y, *saved = _triton_mlp._forward(*args, scaling, save, cfg)
        return (y, *saved) if save else (y, _empty(x), _empty(x), _empty(x), _empty(x))

    @_lora_mlp_triton.register_fake
    def _(x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, scaling, sgd_lr, save):  # noqa: ANN001
        n, h, i, r = _triton_validate(x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, fake=True)
        if not save:
            return x.new_empty(n, h), _empty(x), _empty(x), _empty(x), _empty(x)
        return x.new_empty(n, h), x.new_empty(n, i), x.new_empty(n, i), x.new_empty(n, 2 * r), x.new_empty(n, r)

    def _factor_grads(grads: list[Tensor] | None, x: Tensor) -> list[Tensor]:
        """The kernels' fp32 factor gradients (views of one workspace) as separate tensors in x's dtype."""
        return [_empty(x) for _ in range(3)] if grads is None else [g.to(x.dtype, copy=True) for g in grads]

    def _triton_grads(dy, x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, gate, up, xa, ha,  # noqa: ANN001
                      scaling, need_dx, need_db, need_da):  # fmt: skip
        """The backward kernels: (dx | None, [dB_gate, dB_up, dB_down] fp32 | None, [dA_*] fp32 | None)."""
        args = (x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down)
        n, h, _, _ = _triton_validate(*args)
        if gate.shape != (n, w_gate.shape[0]):
            raise RuntimeError("lora_mlp_triton backward: the forward ran with save=False (no saved tensors)")
        return _triton_mlp._backward(dy.contiguous(), *args, gate, up, xa, ha, scaling, need_dx, need_db, need_da,
                                     _triton_config(x, w_gate))  # fmt: skip

    @torch.library.custom_op("tmem::lora_mlp_triton_backward", mutates_args=())
    def _lora_mlp_triton_backward(
        dy: Tensor, x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, a_gate: Tensor, b_gate: Tensor,
        a_up: Tensor, b_up: Tensor, a_down: Tensor, b_down: Tensor, gate: Tensor, up: Tensor, xa: Tensor,
        ha: Tensor, scaling: float, need_dx: bool, need_db: bool, need_da: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        """(dx, da_gate, db_gate, da_up, db_up, da_down, db_down) in the factors' dtypes; empty if not asked."""
        dx, db, da = _triton_grads(dy, x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, gate,
                                   up, xa, ha, scaling, need_dx, need_db, need_da)  # fmt: skip
        db = _factor_grads(db, x)
        da = _factor_grads(da, x)
        return (_empty(x) if dx is None else dx), da[0], db[0], da[1], db[1], da[2], db[2]

    @_lora_mlp_triton_backward.register_fake
    def _(dy, x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, gate, up, xa, ha, scaling,  # noqa: ANN001
          need_dx, need_db, need_da):  # fmt: skip
        _triton_validate(x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, fake=True)
        shaped = [(x, need_dx), (a_gate, need_da), (b_gate, need_db), (a_up, need_da), (b_up, need_db),
                  (a_down, need_da), (b_down, need_db)]  # fmt: skip
        return tuple(torch.empty_like(t) if wanted else _empty(x) for t, wanted in shaped)

    @torch.library.custom_op("tmem::lora_mlp_triton_backward_sgd_", mutates_args=("b_gate", "b_up", "b_down"))
    def _lora_mlp_triton_backward_sgd_(
        dy: Tensor, x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, a_gate: Tensor, b_gate: Tensor,
        a_up: Tensor, b_up: Tensor, a_down: Tensor, b_down: Tensor, gate: Tensor, up: Tensor, xa: Tensor,
        ha: Tensor, scaling: float, lr: float, need_dx: bool, need_da: bool, step_gate: bool, step_up: bool,
        step_down: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
        """The backward with plain SGD on the B's applied in place, B -= lr * dB (the B's flagged step_*),
        after dx and the dA's were computed with the old B's: (dx, da_gate, da_up, da_down), empty if not asked."""
        dx, db, da = _triton_grads(dy, x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, gate,
                                   up, xa, ha, scaling, need_dx, True, need_da)  # fmt: skip
        steps = (step_gate, step_up, step_down)
        _triton_mlp._sgd_apply_([b_gate, b_up, b_down], [g if s else torch.zeros_like(g) for g, s in zip(db, steps)],
                                lr)  # fmt: skip
        da = _factor_grads(da, x)
        return (_empty(x) if dx is None else dx), *da

    @_lora_mlp_triton_backward_sgd_.register_fake
    def _(dy, x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, gate, up, xa, ha, scaling, lr,  # noqa: ANN001
          need_dx, need_da, step_gate, step_up, step_down):  # fmt: skip
        _triton_validate(x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, fake=True)
        shaped = [(x, need_dx), (a_gate, need_da), (a_up, need_da), (a_down, need_da)]
        return tuple(torch.empty_like(t) if wanted else _empty(x) for t, wanted in shaped)

    def _triton_setup(ctx, inputs, output) -> None:  # noqa: ANN001
        *tensors, scaling, sgd_lr, _ = inputs
        _, *saved = output
        ctx.mark_non_differentiable(*saved)
        ctx.set_materialize_grads(False)  # no zeros kernels for the saved outputs' (unused) gradients
        ctx.save_for_backward(*tensors, *saved)
        ctx.scaling, ctx.sgd_lr = scaling, sgd_lr

    def _triton_backward(ctx, dy, *_):  # noqa: ANN001
        need = ctx.needs_input_grad
        if dy is None:  # y took no part in what was differentiated
            return (None,) * len(need)
        need_dx, need_da, need_b = need[0], need[4] or need[6] or need[8], (need[5], need[7], need[9])
        tensors = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a double backward may follow
            if ctx.sgd_lr is not None and any(need_b):
                raise RuntimeError("lora_mlp_triton: double backward (create_graph=True) is not supported with "
                                   "sgd_lr (the backward steps the B's in place and returns no dB); drop sgd_lr")
            return *_differentiable_grads(ctx, dy, tensors, ctx.scaling), None, None, None
        dy = dy.to(tensors[0].dtype)
        if ctx.sgd_lr is not None and any(need_b):
            dx, da_gate, da_up, da_down = torch.ops.tmem.lora_mlp_triton_backward_sgd_(
                dy, *tensors, ctx.scaling, ctx.sgd_lr, need_dx, need_da, *need_b
            )
            grads = (dx, da_gate, None, da_up, None, da_down, None)  # the B's were stepped: no gradient
        else:
            grads = torch.ops.tmem.lora_mlp_triton_backward(dy, *tensors, ctx.scaling, need_dx, any(need_b), need_da)
        dx, *factors = (_or_none(g, need[k]) for g, k in zip(grads, (0, 4, 5, 6, 7, 8, 9)))
        return dx, None, None, None, *factors, None, None, None

    _lora_mlp_triton.register_autograd(_triton_backward, setup_context=_triton_setup)

    @torch.library.custom_op("tmem::sgd_step_triton", mutates_args=("param",))
    def _sgd_step_triton(param: Tensor, grad: Tensor, lr: float, weight_decay: float = 0.0) -> None:
        _triton_update.sgd_step_(param, grad, lr, weight_decay)

    @torch.library.custom_op("tmem::adamw_step_triton", mutates_args=("param", "exp_avg", "exp_avg_sq"))
    def _adamw_step_triton(
        param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step_tensor: Tensor | None, step: float,
        lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.01,
    ) -> None:  # fmt: skip
        _triton_update.adamw_step_(param, grad, exp_avg, exp_avg_sq, step if step_tensor is None else step_tensor,
                                   lr, beta1, beta2, eps, weight_decay)  # fmt: skip

    @_sgd_step_triton.register_fake
    def _(param, grad, lr, weight_decay=0.0):  # noqa: ANN001
        _triton_update._check("sgd_step_", param, grad=grad)

    @_adamw_step_triton.register_fake
    def _(param, grad, exp_avg, exp_avg_sq, step_tensor, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,  # noqa: ANN001
          weight_decay=0.01):  # fmt: skip
        _triton_update._check("adamw_step_", param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
        if step_tensor is not None:
            _triton_update._scalar_arg("adamw_step_", "step", step_tensor, param)


def lora_mlp_triton(
    x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, a_gate: Tensor, b_gate: Tensor, a_up: Tensor,
    b_up: Tensor, a_down: Tensor, b_down: Tensor, scaling: float = 1.0, sgd_lr: float | None = None,
) -> Tensor:  # fmt: skip
    """`tmem::lora_mlp_triton`: the fused Triton LoRA SwiGLU MLP, x [..., H] -> [..., H] (shapes in
    `reference`; float32/float16/bfloat16, contiguous; rank <= 16). Differentiable w.r.t. x, the b_* and the
    a_*. With `sgd_lr`, the backward updates every b_* that requires grad in place, B -= sgd_lr * dB
    (`tmem::lora_mlp_triton_backward_sgd_`), and hands autograd no gradient for it."""
    require_backend("triton")
    _check_frozen("lora_mlp", w_gate, w_up, w_down)
    if sgd_lr is not None and (isinstance(sgd_lr, bool) or not isinstance(sgd_lr, (int, float))):
        raise TypeError(f"lora_mlp: sgd_lr must be a float or None, got {type(sgd_lr).__name__}")
    trainable = (x, a_gate, b_gate, a_up, b_up, a_down, b_down)
    save = torch.is_grad_enabled() and any(t.requires_grad for t in trainable)
    # no Python branch on the row count here (a few rows in inference run cuBLAS inside the op): a graph
    # traced with dynamic rows does not specialise on them
    y = torch.ops.tmem.lora_mlp_triton(_flat(x), w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down,
                                       float(scaling), None if sgd_lr is None else float(sgd_lr), save)[0]  # fmt: skip
    return y.view(x.shape)


def sgd_step_triton(param: Tensor, grad: Tensor, lr: float, weight_decay: float = 0.0) -> None:
    """`tmem::sgd_step_triton`: param -= lr * (grad + weight_decay * param), in place, one launch; param, grad
    [...] of one shape, dtype (fp32, fp16, bf16) and device, contiguous."""
    require_backend("triton")
    torch.ops.tmem.sgd_step_triton(param, grad, float(lr), float(weight_decay))


def adamw_step_triton(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int | Tensor, lr: float,
    beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.01,
) -> None:  # fmt: skip
    """`tmem::adamw_step_triton`: one AdamW step in place, as torch.optim.AdamW, one launch; param, grad,
    exp_avg, exp_avg_sq [...] of one shape, dtype (fp32, fp16, bf16) and device, contiguous. `step` counts
    from 1: a number, or a 1-element tensor on param's device (read in the kernel: no host sync, CUDA-graph
    capturable; below 1 taken as 1)."""
    require_backend("triton")
    torch.ops.tmem.adamw_step_triton(param, grad, exp_avg, exp_avg_sq, *_step_args(step), float(lr), beta1, beta2,
                                     eps, weight_decay)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# any device: randomized SVD, linear cross-entropy
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("tmem::randomized_svd_top_r", mutates_args=())
def _randomized_svd_top_r(
    w: Tensor, r: int, oversample: int = rsvd.DEFAULT_OVERSAMPLE, n_iter: int = rsvd.DEFAULT_N_ITER, seed: int = 0,
    gram: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    with torch.autocast(w.device.type, enabled=False):  # float32 (float64) products, as the fake promises
        u, s, vh = rsvd.randomized_svd_top_r(w, r, oversample=oversample, n_iter=n_iter, seed=seed, gram=gram)
    return u.contiguous(), s.contiguous(), vh.contiguous()


@_randomized_svd_top_r.register_fake
def _(w, r, oversample=rsvd.DEFAULT_OVERSAMPLE, n_iter=rsvd.DEFAULT_N_ITER, seed=0, gram=None):  # noqa: ANN001
    rsvd._check(w, r, oversample, n_iter)
    lead, m, k = w.shape
    dtype = rsvd._work_dtype(w.dtype)
    return w.new_empty(lead, m, r, dtype=dtype), w.new_empty(lead, r, dtype=dtype), w.new_empty(lead, r, k, dtype=dtype)


def randomized_svd_top_r(
    w: Tensor, r: int, *, oversample: int = rsvd.DEFAULT_OVERSAMPLE, n_iter: int = rsvd.DEFAULT_N_ITER,
    seed: int = 0, gram: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """`tmem::randomized_svd_top_r`: w [L, M, K] -> U [L, M, r], S [L, r], Vh [L, r, K] (float32; float64 for
    float64 input), as `rsvd.randomized_svd_top_r`. Not differentiable."""
    return torch.ops.tmem.randomized_svd_top_r(w, r, oversample, n_iter, seed, gram)


def randomized_svd_lora_init(
    w: Tensor, r: int, *, oversample: int = rsvd.DEFAULT_OVERSAMPLE, n_iter: int = rsvd.DEFAULT_N_ITER,
    seed: int = 0, gram: bool | None = None,
) -> Tensor:  # fmt: skip
    """TMEM's A0 = S_r V_r^T through `tmem::randomized_svd_top_r`: w [L, M, K] -> A0 [L, r, K]."""
    _, s, vh = randomized_svd_top_r(w, r, oversample=oversample, n_iter=n_iter, seed=seed, gram=gram)
    return s.unsqueeze(-1) * vh


@torch.library.custom_op("tmem::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk_size: int, with_grad: bool
) -> tuple[Tensor, Tensor]:
    """(loss 0-d float32 (float64 for float64 input), d loss / d hidden [K, H], empty without `with_grad`)."""
    with torch.autocast(hidden.device.type, enabled=False):  # products in the inputs' dtype, as documented
        loss, grad = _lce.loss_and_grad(hidden, weight, targets, ignore_index, chunk_size, with_grad)
    return loss, _empty(hidden) if grad is None else grad


@_linear_cross_entropy.register_fake
def _(hidden, weight, targets, ignore_index, chunk_size, with_grad):  # noqa: ANN001
    _lce.check_inputs(hidden, weight, targets, chunk_size)
    loss = hidden.new_empty((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    return loss, torch.empty_like(hidden) if with_grad else _empty(hidden)


def _lce_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)  # no zeros kernel for the saved gradient's (unused) gradient
    ctx.save_for_backward(grad)


def _lce_backward(ctx, dloss, _):  # noqa: ANN001
    (grad,) = ctx.saved_tensors
    if dloss is None:  # the loss took no part in what was differentiated
        return None, None, None, None, None, None
    if grad.dim() != 2:
        raise RuntimeError("linear_cross_entropy backward: the forward ran with with_grad=False")
    if torch.is_grad_enabled() and ctx.needs_input_grad[0]:  # create_graph=True
        # the gradient was computed in the forward, detached from hidden: differentiating it again would
        # silently drop the loss's Hessian term (a gradient penalty came out wrong), so refuse it
        raise RuntimeError("linear_cross_entropy: double backward (create_graph=True) is not supported; its "
                           "gradient w.r.t. hidden is not differentiable (use reference.linear_cross_entropy)")
    return grad * dloss.to(grad.dtype), None, None, None, None, None


_linear_cross_entropy.register_autograd(_lce_backward, setup_context=_lce_setup)


@torch.library.custom_op("tmem::linear_cross_entropy_rows", mutates_args=())
def _linear_cross_entropy_rows(
    hidden: Tensor, weight: Tensor, targets: Tensor, row_weight: Tensor, ignore_index: int, chunk_size: int,
    with_grad: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(row_weight x each row's loss [K] float32 (float64 for float64 input), d (their sum) / d hidden [K, H],
    empty without `with_grad`)."""
    with torch.autocast(hidden.device.type, enabled=False):  # products in the inputs' dtype, as documented
        losses, grad = _lce.weighted_rows_and_grad(
            hidden, weight, targets, row_weight, ignore_index, chunk_size, with_grad
        )
    return losses, _empty(hidden) if grad is None else grad


@_linear_cross_entropy_rows.register_fake
def _(hidden, weight, targets, row_weight, ignore_index, chunk_size, with_grad):  # noqa: ANN001
    _lce.check_inputs(hidden, weight, targets, chunk_size)
    _lce.check_row_weight(row_weight, targets)
    losses = hidden.new_empty(targets.shape, dtype=torch.promote_types(hidden.dtype, torch.float32))
    return losses, torch.empty_like(hidden) if with_grad else _empty(hidden)


def _lce_rows_backward(ctx, dlosses, _):  # noqa: ANN001
    (grad,) = ctx.saved_tensors
    if dlosses is None:  # the losses took no part in what was differentiated
        return None, None, None, None, None, None, None
    if grad.dim() != 2:
        raise RuntimeError("linear_cross_entropy_rows backward: the forward ran with with_grad=False")
    if torch.is_grad_enabled() and ctx.needs_input_grad[0]:  # create_graph=True (see _lce_backward)
        raise RuntimeError("linear_cross_entropy_rows: double backward (create_graph=True) is not supported")
    # each row's loss depends on its own hidden row only: scale each row of the gradient by its upstream
    return grad * dlosses.to(grad.dtype)[:, None], None, None, None, None, None, None


_linear_cross_entropy_rows.register_autograd(_lce_rows_backward, setup_context=_lce_setup)


def _head_loss_args(name: str, hidden: Tensor, weight: Tensor, chunk_size: int | None) -> tuple[int, bool]:
    """(chunk_size, with_grad) of a head-loss op call; ValueError for a head that requires grad."""
    if torch.is_grad_enabled() and weight.requires_grad:
        raise ValueError(f"{name}: weight requires grad, but the head is frozen here "
                         "(no gradient is computed for it); call .requires_grad_(False) on it")  # fmt: skip
    if chunk_size is None:
        chunk_size = _lce.chunk_rows(hidden.shape[0], weight.shape[0])
    return chunk_size, torch.is_grad_enabled() and hidden.requires_grad


def linear_cross_entropy_rows(
    hidden: Tensor, weight: Tensor, targets: Tensor, row_weight: Tensor, ignore_index: int = _lce.IGNORE_INDEX,
    chunk_size: int | None = None,
) -> Tensor:  # fmt: skip
    """`tmem::linear_cross_entropy_rows`: each row's cross-entropy of hidden @ weight.T against its target,
    times row_weight, without the [K, V] logits (chunks of `chunk_size` rows, default `cross_entropy.chunk_rows`).

    hidden [K, H], weight [V, H] (one float dtype), targets [K] int64, row_weight [K] -> [K] float32 (float64
    for float64 input), 0 on rows whose target is `ignore_index`, as `reference.linear_cross_entropy_rows`.
    E.g. row_weight 1 / (the targets of the row's group), summed per group: each group's mean loss.
    Differentiable w.r.t. hidden only (the head is frozen). Graph-safe: no host sync, shapes fixed by K.
    """
    chunk_size, with_grad = _head_loss_args("linear_cross_entropy_rows", hidden, weight, chunk_size)
    return torch.ops.tmem.linear_cross_entropy_rows(
        hidden, weight, targets, row_weight, ignore_index, chunk_size, with_grad
    )[0]


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = _lce.IGNORE_INDEX,
    chunk_size: int | None = None,
) -> Tensor:  # fmt: skip
    """`tmem::linear_cross_entropy`: mean cross-entropy of hidden @ weight.T against targets without the
    [K, V] logits (chunks of `chunk_size` rows, default `cross_entropy.chunk_rows`).

    hidden [K, H], weight [V, H] (one float dtype), targets [K] int64 -> 0-d float32 (float64 input: float64), as
    `reference.linear_cross_entropy`. Differentiable w.r.t. hidden only: the head is frozen (a weight that
    requires grad is an error). Graph-safe: no host sync, shapes fixed by K.
    """
    chunk_size, with_grad = _head_loss_args("linear_cross_entropy", hidden, weight, chunk_size)
    return torch.ops.tmem.linear_cross_entropy(hidden, weight, targets, ignore_index, chunk_size, with_grad)[0]


@torch.library.custom_op("tmem::rms_norm", mutates_args=())
def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(y [..., H] in promote(x, weight) dtype, rstd [...] float32: what the backward reads). No autocast
    context: none of its ops is one autocast recasts (a norm called per layer pays for every microsecond)."""
    return _rms.forward(x, weight, eps)


@_rms_norm.register_fake
def _(x, weight, eps):  # noqa: ANN001
    _rms.check_inputs(x, weight, eps)
    y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    return y, x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("tmem::rms_norm_backward", mutates_args=())
def _rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> Tensor:
    """dx [..., H] in x's dtype, from the forward's rstd (the Triton kernel; the autograd formula calls
    `rmsnorm.backward_torch` itself where that runs, without this op's dispatch)."""
    return _rms.backward(dy, x, weight, rstd)


@_rms_norm_backward.register_fake
def _(dy, x, weight, rstd):  # noqa: ANN001
    return torch.empty_like(x)


def _rms_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight, ctx.eps = inputs
    _, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)  # no zeros kernel for rstd's (unused) gradient
    ctx.save_for_backward(x, weight, rstd)


def _rms_backward(ctx, dy, _):  # noqa: ANN001
    x, weight, rstd = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[:2]
    if dy is None:  # y took no part in what was differentiated
        return None, None, None
    if torch.is_grad_enabled():  # create_graph=True: autograd through the reference, differentiable again
        wanted = [t for t, need in ((x, need_dx), (weight, need_dw)) if need]
        found = iter(torch.autograd.grad(reference.rms_norm(x, weight, ctx.eps), wanted, dy, create_graph=True))
        return (next(found) if need_dx else None), (next(found) if need_dw else None), None
    dx = None
    if need_dx:  # the Triton kernel inside an op (traceable); the torch composition as it is (cheaper on the host)
        backward = torch.ops.tmem.rms_norm_backward if _rms.use_triton(x) else _rms.backward_torch
        dx = backward(dy, x, weight, rstd)
    dw = _rms.weight_grad(dy, x, rstd, weight.dtype) if need_dw else None
    return dx, dw, None


_rms_norm.register_autograd(_rms_backward, setup_context=_rms_setup)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """`tmem::rms_norm`: HF's LlamaRMSNorm forward (Qwen2/Qwen3/Mistral's too), rounding included, in one
    kernel forward and one backward on CUDA (Triton), the same torch composition elsewhere.

    x [..., H], weight [H] -> [..., H] in promote(x.dtype, weight.dtype), as `reference.rms_norm`:
    weight * (x.float() * rsqrt(mean(x.float()^2, -1) + eps)).to(x.dtype). Differentiable w.r.t. x and
    weight (d weight in torch from the saved rstd). Graph-safe: no host sync.
    """
    _rms.check_inputs(x, weight, eps)
    return torch.ops.tmem.rms_norm(x, weight, float(eps))[0]


@torch.library.custom_op("tmem::add_rms_norm", mutates_args=())
def _add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """(y [..., H] in promote(x, weight) dtype, s = x + residual [..., H] in x's dtype, rstd [...] float32: what
    the backward reads)."""
    return _add_rms.forward(x, residual, weight, eps)


@_add_rms_norm.register_fake
def _(x, residual, weight, eps):  # noqa: ANN001
    _add_rms.check_inputs(x, residual, weight, eps)
    y = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    return y, torch.empty_like(x), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("tmem::add_rms_norm_backward", mutates_args=())
def _add_rms_norm_backward(dy: Tensor, ds: Tensor | None, s: Tensor, weight: Tensor, rstd: Tensor) -> Tensor:
    """d [..., H] in s's dtype (the gradient w.r.t. x and residual), from the forward's s and rstd (the Triton
    kernel; the autograd formula calls `addrmsnorm.backward_torch` itself where that runs)."""
    return _add_rms.backward(dy, ds, s, weight, rstd)


@_add_rms_norm_backward.register_fake
def _(dy, ds, s, weight, rstd):  # noqa: ANN001
    return torch.empty_like(s)


def _add_rms_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    _, _, weight, ctx.eps = inputs
    _, s, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.set_materialize_grads(False)  # no zeros kernels for an output that took no part
    ctx.save_for_backward(s, weight, rstd)


def _add_rms_backward(ctx, dy, ds, _):  # noqa: ANN001
    s, weight, rstd = ctx.saved_tensors
    need_x, need_residual, need_dw = ctx.needs_input_grad[:3]
    if dy is None and ds is None:
        return None, None, None, None
    dw = None
    if dy is None:  # only s took part: its gradient passes to x and residual as it is
        d = ds
    elif torch.is_grad_enabled():  # create_graph=True: autograd through the reference on s, differentiable again
        wanted = [s, weight] if need_dw else [s]
        found = torch.autograd.grad(reference.rms_norm(s, weight, ctx.eps), wanted, dy, create_graph=True)
        d = found[0] if ds is None else found[0] + ds
        dw = found[1] if need_dw else None
    else:
        d = None
        if need_x or need_residual:  # the Triton kernel inside an op (traceable); the torch composition as it is
            if _add_rms.use_triton(s):
                d = torch.ops.tmem.add_rms_norm_backward(dy, ds, s, weight, rstd)
            else:
                d = _add_rms.backward_torch(dy, ds, s, weight, rstd)
        dw = _rms.weight_grad(dy, s, rstd, weight.dtype) if need_dw else None
    return (d if need_x else None), (d if need_residual else None), dw, None


_add_rms_norm.register_autograd(_add_rms_backward, setup_context=_add_rms_setup)


def add_rms_norm(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """`tmem::add_rms_norm`: a pre-norm decoder's residual add and the next RMSNorm (HF's LlamaRMSNorm, rounding
    included) in one kernel forward and one backward on CUDA (Triton), the same torch composition elsewhere.

    x [..., H], residual [..., H] (x's dtype), weight [H] -> (y [..., H] in promote(x.dtype, weight.dtype),
    s [..., H] in x's dtype), as `reference.add_rms_norm`: s = x + residual, y = rms_norm(s, weight, eps).
    Differentiable w.r.t. x, residual and weight, through y and s. Graph-safe: no host sync.
    """
    _add_rms.check_inputs(x, residual, weight, eps)
    y, s, _ = torch.ops.tmem.add_rms_norm(x, residual, weight, float(eps))
    return y, s


@torch.library.custom_op("tmem::swiglu", mutates_args=())
def _swiglu_op(gate: Tensor, up: Tensor) -> Tensor:
    """h = silu(gate) * up [..., I] in their dtype, contiguous."""
    return _swiglu.forward(gate, up)


@_swiglu_op.register_fake
def _(gate, up):  # noqa: ANN001
    _swiglu.check_inputs(gate, up)
    return gate.new_empty(gate.shape)


@torch.library.custom_op("tmem::swiglu_backward", mutates_args=())
def _swiglu_backward_op(dh: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """(dgate, dup) [..., I] in gate's dtype, contiguous (the Triton kernel; the autograd formula calls
    `swiglu_act.backward_torch` itself where that runs, without this op's dispatch)."""
    return _swiglu.backward(dh, gate, up)


@_swiglu_backward_op.register_fake
def _(dh, gate, up):  # noqa: ANN001
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _swiglu_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.save_for_backward(*inputs)  # gate and up only: the sigmoid is recomputed


def _swiglu_backward(ctx, dh):  # noqa: ANN001
    gate, up = ctx.saved_tensors
    need_gate, need_up = ctx.needs_input_grad
    if torch.is_grad_enabled():  # create_graph=True: autograd through the reference, differentiable again
        wanted = [t for t, need in ((gate, need_gate), (up, need_up)) if need]
        found = iter(torch.autograd.grad(reference.swiglu(gate, up), wanted, dh, create_graph=True))
        return (next(found) if need_gate else None), (next(found) if need_up else None)
    if _swiglu.use_triton(gate) and dh.dtype == gate.dtype:  # the kernel inside an op (traceable): both in one
        dgate, dup = torch.ops.tmem.swiglu_backward(dh, gate, up)
        return (dgate if need_gate else None), (dup if need_up else None)
    return _swiglu.backward_torch(dh, gate, up, need_gate, need_up)  # (the composition as it is: the ones asked)


_swiglu_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """`tmem::swiglu`: a gated MLP's SiLU activation, h = silu(gate) * up, in one kernel forward and one backward
    on CUDA (Triton; float32 inside, one rounding per output: see `swiglu_act` for how that relates to torch's
    composition bit for bit), torch's composition `F.silu(gate) * up` elsewhere (bit for bit, and its autograd).

    gate [..., I], up [..., I] (one shape, dtype and device) -> h [..., I] in their dtype, contiguous, as
    `reference.swiglu`. Differentiable w.r.t. gate and up (`reference.swiglu_backward`'s formula, the sigmoid
    recomputed: only gate and up are saved). Graph-safe: no host sync.
    """
    _swiglu.check_inputs(gate, up)
    return torch.ops.tmem.swiglu(gate, up)


def _rope_like(x: Tensor, dtype: torch.dtype) -> Tensor:
    """The layout of the op's outputs: x's (strides too, where x is dense), in `dtype`."""
    return torch.empty_like(x, dtype=dtype)


def _in_layout(y: Tensor, x: Tensor) -> Tensor:
    """y in `_rope_like(x, y.dtype)`'s layout (a copy only where the composition left another)."""
    if y.stride() == x.stride() or y.numel() == 0:
        return y
    return _rope_like(x, y.dtype).copy_(y)


@torch.library.custom_op("tmem::rope", mutates_args=())
def _rope_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """(q_rot [B, Hq, T, D], k_rot [B, Hk, T, D]) in promote(x, cos) dtypes, laid out as q and k."""
    q_rot, k_rot = _rotary.forward(q, k, cos, sin)
    return _in_layout(q_rot, q), _in_layout(k_rot, k)


@_rope_op.register_fake
def _(q, k, cos, sin):  # noqa: ANN001
    _rotary.check_inputs(q, k, cos, sin)
    dtype = torch.promote_types(cos.dtype, sin.dtype)
    return _rope_like(q, torch.promote_types(q.dtype, dtype)), _rope_like(k, torch.promote_types(k.dtype, dtype))


@torch.library.custom_op("tmem::rope_backward", mutates_args=())
def _rope_backward_op(dq: Tensor, dk: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """The gradients of q and k from those of q_rot and k_rot, all of one dtype (the Triton kernel; the
    autograd formula calls `rotary.backward_torch` itself where that runs, without this op's dispatch)."""
    dq_in, dk_in = _rotary.backward(dq, dk, cos, sin, dq.dtype, dk.dtype)
    return _in_layout(dq_in, dq), _in_layout(dk_in, dk)


@_rope_backward_op.register_fake
def _(dq, dk, cos, sin):  # noqa: ANN001
    return _rope_like(dq, dq.dtype), _rope_like(dk, dk.dtype)


def _rope_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    q, k, cos, sin = inputs
    ctx.dtypes = q.dtype, k.dtype, cos.dtype, sin.dtype
    ctx.cos_batch = cos.shape[0]
    # q and k only for the gradients of cos / sin (rotary tables are constants in a model: none saved then)
    trig_grad = cos.requires_grad or sin.requires_grad
    ctx.save_for_backward(cos, sin, *((q, k) if trig_grad else ()))


def _trig_grads(ctx, dq: Tensor, dk: Tensor) -> tuple[Tensor | None, Tensor | None]:  # noqa: ANN001
    """d cos, d sin [B or 1, T, D] as asked for: autograd through `reference.rope` (they are constants in a
    model; this is for completeness)."""
    cos, sin, q, k = ctx.saved_tensors
    need = ctx.needs_input_grad[2:]
    with torch.enable_grad():
        c, s = cos.detach().requires_grad_(need[0]), sin.detach().requires_grad_(need[1])
        wanted = [t for t, n in zip((c, s), need) if n]
        found = iter(torch.autograd.grad(reference.rope(q.detach(), k.detach(), c, s), wanted, (dq, dk)))
    return (next(found) if need[0] else None), (next(found) if need[1] else None)


def _rope_backward(ctx, dq, dk):  # noqa: ANN001
    cos, sin = ctx.saved_tensors[:2]
    q_dtype, k_dtype = ctx.dtypes[:2]
    need_q, need_k, need_cos, need_sin = ctx.needs_input_grad
    dq_in = dk_in = None
    if need_q or need_k:
        # the Triton kernel inside an op (traceable); the torch composition as it is, also under create_graph=True
        # (it is differentiable: the gradient is linear in dq, dk)
        triton = not torch.is_grad_enabled() and _rotary.use_triton(dq, dk, cos, sin)
        if triton and (dq.dtype, dk.dtype) == (q_dtype, k_dtype):
            dq_in, dk_in = torch.ops.tmem.rope_backward(dq, dk, cos, sin)
        else:
            dq_in, dk_in = _rotary.backward_torch(dq, dk, cos, sin, q_dtype, k_dtype)
    dcos = dsin = None
    if need_cos or need_sin:
        dcos, dsin = _trig_grads(ctx, dq, dk)
    return (dq_in if need_q else None), (dk_in if need_k else None), dcos, dsin


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup)


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """`tmem::rope`: HF's `apply_rotary_pos_emb` (Llama / Qwen2 / Qwen3 / Mistral: rotate_half, full-head
    rotary), rounding included, for q and k in one kernel forward and one backward on CUDA (Triton), the same
    torch composition elsewhere.

    q [B, Hq, T, D], k [B, Hk, T, D], cos / sin [B or 1, T, D] -> (q * cos + rotate_half(q) * sin, the same
    for k) in promote(x.dtype, cos.dtype), laid out as q and k, as `reference.rope`. Differentiable w.r.t. q
    and k (the rotation's transpose) and cos / sin (torch). Graph-safe: no host sync.
    """
    _rotary.check_inputs(q, k, cos, sin)
    return tuple(torch.ops.tmem.rope(q, k, cos, sin))


def _heads_first_as(y: Tensor, x: Tensor) -> Tensor:
    """y [B, H, T, D] laid out `qknorm_rope.heads_first(x)` (a copy only where the composition left another)."""
    like = _qkr.heads_first(x, y.dtype)
    return y if y.stride() == like.stride() or y.numel() == 0 else like.copy_(y)


@torch.library.custom_op("tmem::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(
    q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, eps_q: float, eps_k: float, cos: Tensor, sin: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(q_rot [B, Hq, T, D], k_rot [B, Hk, T, D] laid out `heads_first`, rstd_q [B, T, Hq], rstd_k [B, T, Hk]
    float32: what the backward reads)."""
    q_rot, k_rot, rstd_q, rstd_k = _qkr.forward(q, k, q_weight, k_weight, eps_q, eps_k, cos, sin)
    return _heads_first_as(q_rot, q), _heads_first_as(k_rot, k), rstd_q, rstd_k


@_qk_norm_rope_op.register_fake
def _(q, k, q_weight, k_weight, eps_q, eps_k, cos, sin):  # noqa: ANN001
    _qkr.check_inputs(q, k, q_weight, k_weight, eps_q, eps_k, cos, sin)
    trig = torch.promote_types(cos.dtype, sin.dtype)
    q_dtype = torch.promote_types(torch.promote_types(q.dtype, q_weight.dtype), trig)
    k_dtype = torch.promote_types(torch.promote_types(k.dtype, k_weight.dtype), trig)
    rstds = (x.new_empty(x.shape[:3], dtype=torch.float32) for x in (q, k))
    return _qkr.heads_first(q, q_dtype), _qkr.heads_first(k, k_dtype), *rstds


@torch.library.custom_op("tmem::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_backward_op(
    dq: Tensor, dk: Tensor, q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, rstd_q: Tensor,
    rstd_k: Tensor, cos: Tensor, sin: Tensor,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The gradients of q [B, T, Hq, D] and k (contiguous, their dtypes) from those of q_rot and k_rot (the Triton
    kernel; the autograd formula calls `qknorm_rope.backward_torch` itself where that runs, without this op's
    dispatch)."""
    dq_in, dk_in = _qkr.backward(dq, dk, q, k, q_weight, k_weight, rstd_q, rstd_k, cos, sin)
    return dq_in.contiguous(), dk_in.contiguous()


@_qk_norm_rope_backward_op.register_fake
def _(dq, dk, q, k, q_weight, k_weight, rstd_q, rstd_k, cos, sin):  # noqa: ANN001
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _qkr_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    q, k, q_weight, k_weight, eps_q, eps_k, cos, sin = inputs
    q_rot, k_rot, rstd_q, rstd_k = output
    ctx.eps = eps_q, eps_k
    ctx.out = (q_rot.shape, q_rot.dtype), (k_rot.shape, k_rot.dtype)
    ctx.mark_non_differentiable(rstd_q, rstd_k)
    ctx.set_materialize_grads(False)  # no zeros kernels for the rstds' (unused) gradients
    ctx.save_for_backward(q, k, q_weight, k_weight, rstd_q, rstd_k, cos, sin)


def _qkr_trig_grads(ctx, dq: Tensor, dk: Tensor) -> tuple[Tensor | None, Tensor | None]:  # noqa: ANN001
    """d cos, d sin as asked for: autograd through `reference.rope` of the normed q and k (as `tmem::rope`'s)."""
    q, k, q_weight, k_weight, _, _, cos, sin = ctx.saved_tensors
    need = ctx.needs_input_grad[6:]
    qn = reference.rms_norm(q, q_weight, ctx.eps[0]).transpose(1, 2)
    kn = reference.rms_norm(k, k_weight, ctx.eps[1]).transpose(1, 2)
    with torch.enable_grad():
        c, s = cos.detach().requires_grad_(need[0]), sin.detach().requires_grad_(need[1])
        wanted = [t for t, n in zip((c, s), need) if n]
        found = iter(torch.autograd.grad(reference.rope(qn, kn, c, s), wanted, (dq, dk)))
    return (next(found) if need[0] else None), (next(found) if need[1] else None)


def _qkr_backward(ctx, dq, dk, *_):  # noqa: ANN001
    q, k, q_weight, k_weight, rstd_q, rstd_k, cos, sin = ctx.saved_tensors
    need = ctx.needs_input_grad
    if dq is None and dk is None:  # neither output took part in what was differentiated
        return (None,) * 8
    # one output unused: its gradient zeros (the kernel takes both)
    dq, dk = (g if g is not None else torch.zeros(shape, dtype=dtype, device=q.device)
              for g, (shape, dtype) in zip((dq, dk), ctx.out))  # fmt: skip
    if torch.is_grad_enabled():  # create_graph=True: autograd through the reference, differentiable again
        inputs = (q, k, q_weight, k_weight, cos, sin)
        needed = need[:4] + need[6:]
        wanted = [t for t, n in zip(inputs, needed) if n]
        out = reference.qk_norm_rope(q, k, q_weight, k_weight, *ctx.eps, cos, sin)
        found = iter(torch.autograd.grad(out, wanted, (dq, dk), create_graph=True))
        grads = [next(found) if n else None for n in needed]
        return (*grads[:4], None, None, *grads[4:])
    dq_in = dk_in = dqw = dkw = dcos = dsin = None
    if need[0] or need[1]:
        # the Triton kernel inside an op (traceable); the torch composition as it is (cheaper on the host)
        triton = _qkr.use_triton(q, k, q_weight, k_weight, cos, sin) and dq.dtype == dk.dtype == q.dtype
        backward = torch.ops.tmem.qk_norm_rope_backward if triton else _qkr.backward_torch
        dq_in, dk_in = backward(dq, dk, q, k, q_weight, k_weight, rstd_q, rstd_k, cos, sin)
    if need[2] or need[3]:  # the weights' gradients (frozen in a write: none asked), as `tmem::rms_norm`'s
        gq, gk = _qkr.normed_grads(dq, dk, cos, sin, *(dtype for _, dtype in ctx.out))
        dqw = _rms.weight_grad(gq, q, rstd_q, q_weight.dtype) if need[2] else None
        dkw = _rms.weight_grad(gk, k, rstd_k, k_weight.dtype) if need[3] else None
    if need[6] or need[7]:
        dcos, dsin = _qkr_trig_grads(ctx, dq, dk)
    return (dq_in if need[0] else None), (dk_in if need[1] else None), dqw, dkw, None, None, dcos, dsin


_qk_norm_rope_op.register_autograd(_qkr_backward, setup_context=_qkr_setup)


def qk_norm_rope(
    q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, eps_q: float, eps_k: float, cos: Tensor, sin: Tensor
) -> tuple[Tensor, Tensor]:
    """`tmem::qk_norm_rope`: Qwen3's per-head q_norm / k_norm (HF's RMSNorm), the transpose to heads first and
    the rotary (`apply_rotary_pos_emb`), rounding included, for q and k in one kernel forward and one backward
    on CUDA (Triton) where `rms_norm` then `rope` take two each, the same torch composition elsewhere.

    q [B, T, Hq, D], k [B, T, Hk, D] (projections viewed to heads), q_weight / k_weight [D], cos / sin
    [B or 1, T, D] -> (q_rot [B, Hq, T, D], k_rot [B, Hk, T, D]) = rope(rms_norm(q, q_weight, eps_q).transpose(1, 2),
    rms_norm(k, ...).transpose(1, 2), cos, sin), as `reference.qk_norm_rope`, laid out [B, T, H, D] dense (as
    those two ops leave a projection's heads). Differentiable w.r.t. q, k, the weights (torch, from the saved
    rstds) and cos / sin (torch). Graph-safe: no host sync.
    """
    _qkr.check_inputs(q, k, q_weight, k_weight, eps_q, eps_k, cos, sin)
    q_rot, k_rot, _, _ = torch.ops.tmem.qk_norm_rope(q, k, q_weight, k_weight, float(eps_q), float(eps_k), cos, sin)
    return q_rot, k_rot


# op name -> the Python function that calls it (every op registered here, for tests and the README's table)
@torch.library.custom_op("tmem::lora_mlp_composed", mutates_args=())
def _lora_mlp_composed(
    x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, a_gate: Tensor, b_gate: Tensor, a_up: Tensor,
    b_up: Tensor, a_down: Tensor, b_down: Tensor, scaling: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(y [N, H], gate [N, I], up [N, I], xa_g [N, r], xa_u [N, r], ha [N, r]): the forward and what its backward
    reads (`composed_lora_mlp.forward`)."""
    _lora_shapes(x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, contiguous=False)
    return _composed.forward(x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, scaling)


@_lora_mlp_composed.register_fake
def _(x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, scaling):  # noqa: ANN001
    n, h, i, r = _lora_shapes(x, w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down, contiguous=False)
    return (x.new_empty(n, h), x.new_empty(n, i), x.new_empty(n, i), x.new_empty(n, r), x.new_empty(n, r),
            x.new_empty(n, r))  # fmt: skip


def _composed_backward(ctx, dy, *_):  # noqa: ANN001
    if (done := _grads_without_kernels(ctx, dy)) is not None:
        return done
    need = ctx.needs_input_grad
    wanted = tuple(need[k] for k in (0, 4, 5, 6, 7, 8, 9))  # x, a_gate, b_gate, a_up, b_up, a_down, b_down
    dx, *factors = _composed.backward(dy, *ctx.saved_tensors, ctx.scaling, wanted)
    return dx, None, None, None, *factors, None


_lora_mlp_composed.register_autograd(_composed_backward, setup_context=_save_lora_inputs)


def lora_mlp_composed(
    x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor, a_gate: Tensor, b_gate: Tensor, a_up: Tensor,
    b_up: Tensor, a_down: Tensor, b_down: Tensor, scaling: float = 1.0,
) -> Tensor:  # fmt: skip
    """`tmem::lora_mlp_composed`: the LoRA SwiGLU MLP as library products (each projection one addmm) and
    `tmem::swiglu`, with a backward that sums each gradient inside the products: 13 kernels backward where autograd
    through the same forward launches 17 (`composed_lora_mlp`). x [..., H] -> [..., H], any float dtype, any
    device, shapes in `reference`. The forward's values are `reference.lora_mlp`'s products with `swiglu` for the
    activation. Differentiable w.r.t. x, the b_* and the a_*; the w_* are frozen (ValueError if they need grad)."""
    _check_frozen("lora_mlp", w_gate, w_up, w_down)
    _check_scaling(scaling)
    y = torch.ops.tmem.lora_mlp_composed(_flat(x), w_gate, w_up, w_down, a_gate, b_gate, a_up, b_up, a_down, b_down,
                                         float(scaling))[0]  # fmt: skip
    return y.view(x.shape)


OPS = {
    "lora_mlp_torch": lora_mlp_torch,
    "sgd_step_torch": sgd_step_torch,
    "adamw_step_torch": adamw_step_torch,
    "lora_mlp_native": lora_mlp_native,
    "sgd_step_native": sgd_step_native,
    "adamw_step_native": adamw_step_native,
    "lora_mlp_triton": lora_mlp_triton,
    "sgd_step_triton": sgd_step_triton,
    "adamw_step_triton": adamw_step_triton,
    "randomized_svd_top_r": randomized_svd_top_r,
    "linear_cross_entropy": linear_cross_entropy,
    "linear_cross_entropy_rows": linear_cross_entropy_rows,
    "rms_norm": rms_norm,
    "add_rms_norm": add_rms_norm,
    "rope": rope,
    "qk_norm_rope": qk_norm_rope,
    "swiglu": swiglu,
    "lora_mlp_composed": lora_mlp_composed,
}
