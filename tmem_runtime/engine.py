"""FastWeightEngine: one model's fast weights for `capacity` sessions, attached in place.

    A  [a_numel]              shared by every session: A0 = S_r V_r^T with the SVD init (frozen)
    B  [capacity, b_numel]    one contiguous row per session, float32 (the master copy); when the model
                              is not float32 a compute-dtype copy sits beside it, refreshed on change

The MLP of every adapted layer runs `_mlp_forward` instead of its own forward. That reads the calling
thread's `Binding`: which rows (or tokens) of the batch use which session's B, or none (the bare MLP).
Base products and the shrink x @ A.T run once for the whole batch; only the expand is per session.
While every bound session's B is still its initial zero, the model's own MLP runs (bit-exact bare
logits). A write binds its own workspace instead of the resident rows (see `trainer.py`). In a write,
the adapted layers' per-head q/k RMSNorms (Qwen3's) run the fused op `tmem_kernels.rms_norm` on CUDA
(`_norm_forward`); elsewhere their own forward.

The engine knows nothing of session names, files or tokenizers: `SessionPool` and `FastWeights` do.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn
from transformers import PreTrainedModel

from tmem_kernels import lora_mlp_composed
from tmem_kernels.autocast import autocast_off
from tmem_runtime.adapter_file import WeightsFingerprint, adapter_metadata
from tmem_runtime.adapter_init import initial_factors
from tmem_runtime.backends import kernel_ops, resolve_backend
from tmem_runtime.bindings import Binding, Bindings, token_segments
from tmem_runtime.decoder import Decoder, supports_piecewise
from tmem_runtime.device_memory import check_fits
from tmem_runtime.fused_layers import fused_attention_norms, fused_norm_forward, fused_on
from tmem_runtime.layout import AdapterLayout, AdapterSlot
from tmem_runtime.models import MLP_TARGETS, decoder_layers, is_silu, target_mlps
from tmem_runtime.uploads import upload_one


def adapter_layout(model: nn.Module, rank: int, num_layers: int | Sequence[int] = 4) -> AdapterLayout:
    """The layout fast weights of this rank and layers would have on `model`, allocating nothing; ValueError
    (ModelNotSupportedError) for layers the model lacks, a rank above a targeted matrix's smaller side or
    a model without the target modules, as attaching them would raise (a command line checks its flags with
    it before it runs anything)."""
    return _layout(target_mlps(model, num_layers), rank)


def _layout(mlps: list[tuple[int, nn.Module]], rank: int) -> AdapterLayout:
    slots = [AdapterSlot(i, t, getattr(mlp, t).out_features, getattr(mlp, t).in_features) for i, mlp in mlps
             for t in MLP_TARGETS]  # fmt: skip
    return AdapterLayout(slots, rank)


def row_bytes(layout: AdapterLayout, dtype: torch.dtype) -> int:
    """Bytes one B row takes on the device for a model of `dtype`: its float32 master, and beside it the
    compute-dtype copy of a model not in float32."""
    return layout.b_numel * (4 + (0 if dtype == torch.float32 else dtype.itemsize))


class FastWeightsError(RuntimeError):
    """Base class of the runtime's attach/write errors."""


class FastWeightEngine:
    """Fast weights on gate/up/down of the last `num_layers` decoder layers (or of the layers listed),
    `capacity` B rows.

    model: a transformers causal LM (modified in place until `detach()`). rank: LoRA rank r.
    init: "svd" | "random" | "pissa" (see `adapter_init`). backend: "auto" | "triton" | "native" |
    "torch". svd: "randomized" | "exact". A capacity whose rows (`row_bytes` each) exceed the device's
    available memory is refused (ValueError) before anything is allocated.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        capacity: int = 1,
        rank: int = 6,
        num_layers: int | Sequence[int] = 4,
        init: str = "svd",
        backend: str = "auto",
        svd: str = "randomized",
        scaling: float = 1.0,
        seed: int = 0,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
            raise ValueError(f"scaling must be a finite number, got {scaling!r}")  # (inf: every write's loss NaN)
        if getattr(model, "_tmem_fast_weights", None) is not None:
            raise FastWeightsError("this model already has fast weights attached; detach() them first")
        self.model = model
        self.capacity, self.rank, self.init, self.scaling = capacity, rank, init, scaling
        self.mlps = target_mlps(model, num_layers)
        self.mlp_layers = [decoder_layers(model)[i] for i, _ in self.mlps]  # the decoder layer of each
        self.first_layer = self.mlps[0][0]
        self.layout = _layout(self.mlps, rank)
        weight = self.mlps[0][1].gate_proj.weight
        self.device, self.dtype = weight.device, weight.dtype
        row = row_bytes(self.layout, self.dtype)  # (a capacity that cannot fit is refused before any allocation)
        check_fits(f"capacity={capacity} (B rows of {row} bytes each)", capacity * row, self.device,
                   "use a smaller capacity (a pool keeps more open sessions than rows, offloaded)")
        self.backend = resolve_backend(backend, self.device, self.dtype, rank, capacity)
        self.ops = kernel_ops(self.backend)
        self.fused = [is_silu(mlp.act_fn) for _, mlp in self.mlps]
        self.fingerprint = WeightsFingerprint([w for _, mlp in self.mlps for w in _weights(mlp)])
        with torch.inference_mode(False), torch.no_grad(), autocast_off(self.device.type):
            self._allocate(svd, seed)  # (in fp32 whatever autocast the caller has on)
        self.initial = [True] * capacity  # per B row: still equal to B0
        self.initial_epoch = 0  # bumped whenever a flag of `initial` may change (bindings' identity memos)
        self.device_segments = self.ops.name == "triton"  # its segmented op reads the segments on the device
        self.bindings = Bindings(self.b_stacks, self.a_views, capacity, self.device)
        self.detached = False
        for k, (_, mlp) in enumerate(self.mlps):
            mlp.forward = partial(self._mlp_forward, k, mlp)
        # the adapted layers' per-head q/k RMSNorms (Qwen3): the fused op in write steps (`_norm_forward`)
        self.attention_norms = [n for layer in self.mlp_layers for n in fused_attention_norms(layer)]
        for norm in self.attention_norms:
            norm.forward = partial(self._norm_forward, norm)
        if hasattr(model, "_expand_inputs_for_generation"):  # generate()'s beams and return sequences
            model._expand_inputs_for_generation = partial(self._expand_for_generation, model)
        self.decoder = Decoder(model, self.attention_norms) if supports_piecewise(model) else None
        model._tmem_fast_weights = self

    # ---------------------------------------------------------------- buffers
    def _allocate(self, svd: str, seed: int) -> None:
        lay = self.layout
        if self.init == "pissa":
            self.fingerprint.hexdigest()  # of the original weights, before they become residuals
        a0, b0 = initial_factors(self.mlps, lay, self.init, svd, seed)
        self.a0, self.b0 = a0, b0
        self.a = a0.clone()
        self.b = b0.expand(self.capacity, -1).clone()
        self.a_compute = self.a if self.dtype == torch.float32 else self.a.to(self.dtype)
        self.b_compute = self.b if self.dtype == torch.float32 else self.b.to(self.dtype)
        self.b_rows = self.b.unbind(0)  # row views, made once (the hot-swap path indexes nothing)
        self.b_compute_rows = self.b_compute.unbind(0)
        self.b_stacks = tuple(lay.b_stack(self.b_compute, i) for i in range(len(lay.slots)))
        self.a_views = tuple(lay.a_view(self.a_compute, i) for i in range(len(lay.slots)))
        self._originals: list[torch.Tensor] = []
        if self.init == "pissa":
            for i, s in enumerate(lay.slots):
                w = getattr(self.mlps[i // 3][1], s.target).weight
                self._originals.append(w.detach().clone())
                w.sub_((lay.b_view(b0, i) @ lay.a_view(a0, i)).to(w.dtype))

    @property
    def identity_init(self) -> bool:
        """B0 = 0 and the base weights untouched: a session in its initial state changes nothing."""
        return self.init != "pissa"

    def metadata(self) -> dict[str, str]:
        """What an adapter of this engine fits: architecture, base-weight hash, init, layout. FastWeightsError
        once the model was cast or moved after attach (its hash would name weights the adapter was not made for)."""
        self._check_weight(self.mlps[0][1].gate_proj.weight)
        return adapter_metadata(self.model, self.fingerprint, self.init, self.layout, self.scaling)

    def buffer_bytes(self) -> int:
        """Bytes the engine holds: A and every B row (float32 masters, and the compute-dtype copies of a
        bf16/fp16 model), A0 and B0, and PiSSA's copies of the original weights."""
        held = {id(t): t for t in (self.a, self.b, self.a0, self.b0, self.a_compute, self.b_compute, *self._originals)}
        return sum(t.numel() * t.element_size() for t in held.values())

    def set_rows(self, slots: Sequence[int], b_rows: torch.Tensor) -> None:
        """B rows of `slots` := b_rows [len(slots), b_numel] (float32 master and compute copy)."""
        idx = upload_one(torch.tensor(list(slots), dtype=torch.long), self.device)  # (no wait for the device)
        with torch.no_grad():
            self.b.index_copy_(0, idx, b_rows.to(self.b.dtype))
            if self.b_compute is not self.b:
                self.b_compute.index_copy_(0, idx, b_rows.to(self.dtype))
        for s in slots:
            self.initial[s] = False
        self.initial_epoch += 1

    def set_row(self, slot: int, b_row: torch.Tensor) -> None:
        """B row `slot` := b_row [b_numel] (one copy, no allocation: the hot-swap path)."""
        self.b_rows[slot].copy_(b_row)  # (the buffers never require grad: no autograd to switch off)
        if self.b_compute is not self.b:
            self.b_compute_rows[slot].copy_(b_row)
        self.initial[slot] = False
        self.initial_epoch += 1

    def copy_rows(self, dst: Sequence[int], src: Sequence[int]) -> None:
        """B rows of `dst` := those of `src` (master, compute copy and `initial` flag)."""
        self.set_rows(dst, self.b.index_select(0, upload_one(torch.tensor(list(src), dtype=torch.long), self.device)))
        for d, s in zip(dst, src):
            self.initial[d] = self.initial[s]
        self.initial_epoch += 1

    def reset_rows(self, slots: Sequence[int]) -> None:
        """B rows of `slots` back to B0."""
        with torch.no_grad():
            for s in slots:
                self.b[s].copy_(self.b0)
                if self.b_compute is not self.b:
                    self.b_compute[s].copy_(self.b0)
                self.initial[s] = True
        self.initial_epoch += 1

    def set_a(self, a: torch.Tensor) -> None:
        """The shared A := a [a_numel] (only a one-session engine trains A)."""
        with torch.no_grad():
            self.a.copy_(a)
            if self.a_compute is not self.a:
                self.a_compute.copy_(a)

    # ---------------------------------------------------------------- bindings
    def _expand_for_generation(self, model: PreTrainedModel, *args, **kwargs):
        """The model's `_expand_inputs_for_generation`, with this thread's rows binding expanded alike
        (`Bindings.expand_for_generation`)."""
        own = inspect.getattr_static(type(model), "_expand_inputs_for_generation").__get__(model, type(model))
        params = dict(zip(("expand_size", "is_encoder_decoder", "input_ids"), args), **kwargs)
        ids = params.get("input_ids")
        if ids is not None:
            self.bindings.expand_for_generation(ids.shape[0], int(params.get("expand_size", 1)))
        return own(*args, **kwargs)

    # ---------------------------------------------------------------- the adapted MLP
    def _mlp_forward(self, k: int, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        binding = self.bindings.current()
        if binding is None:
            return type(mlp).forward(mlp, x)
        if binding is not self.bindings.default and not binding.writing:
            self._check_not_recomputed(k)
        if self._is_identity(binding):  # the model's own MLP: bit-exact bare outputs, once the rows are
            if binding.indptr is not None:  # checked as below (a wrong row list fails before any write too)
                token_segments(binding, x.shape, x.numel() // x.shape[-1], False)
            return type(mlp).forward(mlp, x)
        ws = _weights(mlp)
        self._check_weight(ws[0])
        if binding.writing:
            ws = tuple(w.detach() for w in ws)  # constants to a write, whatever their requires_grad
        # outside a write, base weights that require grad get their gradient (e.g. an RL policy)
        w_grad = not binding.writing and torch.is_grad_enabled() and any(w.requires_grad for w in ws)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        lo = 3 * k
        a = [binding.a_views[lo + j].to(x.dtype) for j in range(3)]
        if binding.indptr is None and self.fused[k] and not w_grad:  # one session: the fused kernel
            b = [_session_b(binding.b_stacks[lo + j], binding.host_slots[0]).to(x.dtype) for j in range(3)]
            # a write step's torch composition on CUDA: its SiLU and product one op, its backward's sums inside the
            # products (`tmem_kernels.lora_mlp_composed`). Reads keep `lora_mlp`, which rounds as
            # `composed_mlp_segmented` does (the forward of base weights taking gradients, a pool's rows)
            if binding.writing and self.ops.name == "torch" and fused_on(x.device):
                y = lora_mlp_composed(x2, *ws, a[0], b[0], a[1], b[1], a[2], b[2], self.scaling)
            else:
                sgd = {} if binding.sgd_lr is None else {"sgd_lr": binding.sgd_lr}
                y = self.ops.lora_mlp(x2, *ws, a[0], b[0], a[1], b[1], a[2], b[2], self.scaling, **sgd)
        else:
            fused = self.fused[k] and not w_grad
            indptr, slots = token_segments(binding, shape, x2.shape[0], fused and self.device_segments)
            b = [binding.b_stacks[lo + j].to(x.dtype) for j in range(3)]
            if fused:
                y = self.ops.lora_mlp_segmented(x2, *ws, *a, *b, indptr, slots, self.scaling)
            else:  # (host segments: reading device ones back would wait for the device)
                segs = (indptr.tolist(), slots.tolist())
                y = composed_mlp_segmented(x2, ws, a, b, *segs, self.scaling, mlp.act_fn)
        return y.view(*shape[:-1], y.shape[-1])

    def _norm_forward(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """An adapted layer's q_norm / k_norm: in a write step (a writing binding) `fused_norm_forward` (the fused
        op on CUDA: one kernel forward, one backward, instead of about seven and a dozen), elsewhere the module's
        own forward (bare reads stay bit for bit the model's). x [..., head_dim] -> the same shape."""
        binding = self.bindings.current()
        if binding is not None and binding.writing:
            return fused_norm_forward(norm, x)
        return type(norm).forward(norm, x)

    def _check_not_recomputed(self, k: int) -> None:
        """FastWeightsError for a forward of bound rows (a pool's rows() block) that gradient checkpointing will run
        again in its backward: the recompute runs outside the block, or on autograd's device thread, where the
        rows are not bound (torch's CheckpointError, or gradients of other weights than the forward read)."""
        layer = self.mlp_layers[k]
        if torch.is_grad_enabled() and layer.training and getattr(layer, "gradient_checkpointing", False):
            raise FastWeightsError(
                "a forward reading a pool's rows (pool.rows) with gradient checkpointing on: its backward would "
                "recompute the layers where these rows are no longer bound (after the block, or on autograd's "
                "thread); run it without gradient checkpointing (model.gradient_checkpointing_disable()), in eval "
                "mode, or under torch.no_grad()"
            )

    def _is_identity(self, binding: Binding) -> bool:
        """Every B the binding reads is a resident row still at B0 = 0: the adapter changes nothing. Worked
        out once per binding and `initial_epoch` (not per adapted layer: a forward asks once per layer)."""
        if binding.writing or not binding.resident or not self.identity_init:
            return False
        epoch, memo = self.initial_epoch, binding.identity
        if memo and memo[0][0] == epoch:
            return memo[0][1]
        identity = all(s < 0 or self.initial[s] for s in binding.host_slots)
        memo[:] = [(epoch, identity)]  # (one pair, swapped whole: another thread reads the old or the new one)
        return identity

    # ---------------------------------------------------------------- detach
    def detach(self) -> PreTrainedModel:
        """Remove the fast weights; the model is exactly as it was before attach. Returns it."""
        if self.detached:
            raise FastWeightsError("these fast weights were already detached")
        for module in (*(mlp for _, mlp in self.mlps), *self.attention_norms):
            module.__dict__.pop("forward", None)
        self.model.__dict__.pop("_expand_inputs_for_generation", None)
        with torch.no_grad():
            for i, orig in enumerate(self._originals):
                getattr(self.mlps[i // 3][1], self.layout.slots[i].target).weight.copy_(orig)
        self.model._tmem_fast_weights = None
        self.detached = True
        return self.model

    def check_attached(self) -> None:
        """FastWeightsError if detached, or if the model was cast or moved since attach."""
        if self.detached:
            raise FastWeightsError("these fast weights were detached from their model; attach new ones")
        self._check_weight(self.mlps[0][1].gate_proj.weight)

    def _check_weight(self, w: torch.Tensor) -> None:
        # the buffers, the kernels (backend) and the adapter files' identity are for the attach-time dtype/device
        if w.dtype != self.dtype or w.device != self.device:
            raise FastWeightsError(
                f"the model was cast or moved to {w.dtype} on {w.device} after its fast weights were attached "
                f"for {self.dtype} on {self.device}: cast or move the model first, then attach"
            )


def _weights(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight


def _session_b(stack: torch.Tensor, slot: int) -> torch.Tensor:
    """One session's B, stack[slot] ([S, out, r] -> [out, r]). Row 0 of a one-session stack (a one-session
    write's workspace leaf) is squeezed out instead: the same view, but its backward is a view too, where
    select's is a zeros and a copy kernel."""
    return stack.squeeze(0) if stack.shape[0] == 1 and slot == 0 else stack[slot]


def composed_mlp_segmented(
    x: torch.Tensor,
    ws: Sequence[torch.Tensor],
    a: Sequence[torch.Tensor],
    b_stacks: Sequence[torch.Tensor],
    indptr: Sequence[int],
    slots: Sequence[int],
    scaling: float,
    act_fn: nn.Module,
) -> torch.Tensor:
    """The adapted MLP as torch ops, any activation, a different B per segment (differentiable in
    everything that requires grad). x [N, H]; ws (w_gate, w_up, w_down); a: three A [r, in];
    b_stacks: three [S, out, r]; segments as in `Binding`. Each segment's expand and add one addmm, as
    `reference.lora_linear`'s: a segment rounds as its session alone does."""

    def linear(inp: torch.Tensor, j: int) -> torch.Tensor:
        base = inp @ ws[j].T
        shrink = inp @ a[j].T
        parts = [
            base[lo:hi] if s < 0 else torch.addmm(base[lo:hi], shrink[lo:hi], b_stacks[j][s].T, alpha=scaling)
            for lo, hi, s in zip(indptr[:-1], indptr[1:], slots)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    return linear(act_fn(linear(x, 0)) * linear(x, 1), 2)
