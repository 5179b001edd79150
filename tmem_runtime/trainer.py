"""One write, run: the sessions it trains copied to a workspace, trained step by step, committed.

    engine B rows of the written sessions ──copy──> Workspace [W, b_numel] (+ A when A trains)
    every step planned on the host first; then per step: adapted loss with the workspace bound →
        gradients of the workspace's leaves only, copied into its gradient at once → one fused update over
        the sessions that take part in the step (sessions are ordered by step count, so those are a
        prefix) → the compute-dtype copy of the workspace refreshed (a bf16/fp16 model)
    losses read once at the end ──> each session checked (finite loss and B, not diverged) ──> the good
        ones copied back to their engine rows; a bad one, or an error anywhere, changes no row

Each session's loss is the mean over its own targets, and the step's loss is their sum, so every
session's gradient, update and losses are those of writing it alone. Sessions with fewer steps drop
out of later steps (their AdamW state and B no longer move), as they would have stopped alone.
Readers of the engine's rows see the state before the write until the commit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from tmem_kernels.segments import row_segments
from tmem_runtime.bindings import Binding
from tmem_runtime.engine import FastWeightEngine, FastWeightsError
from tmem_runtime.recipes import OPTIMIZERS, Recipe
from tmem_runtime.uploads import upload, upload_one
from tmem_runtime.write import IGNORE_INDEX, StepBatch, TrunkCache, adapted_loss, plan_steps

if TYPE_CHECKING:
    from tmem_runtime.static_write import StaticWrites

StepCallback = Callable[[int, "int | None", float], None]
Rows = Sequence[int]


class NonFiniteLossError(FastWeightsError):
    """A write step produced a NaN/inf loss or update; the adapter kept its state from before the write."""


class DivergedWriteError(FastWeightsError):
    """A write's loss rose past the recipe's divergence threshold; the adapter kept its state from before."""


@dataclass
class WriteOutcome:
    """Per written session, in the order given: its per-step losses and why it was rolled back (or None)."""

    losses: list[list[float]]
    errors: list[FastWeightsError | None]


def adamw_defaults(weight_decay: float) -> dict:
    return dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay)


class Workspace:
    """The trainable copy of W sessions' B rows (and of A, when it trains): params, grads, moments.

    param = [B rows (W x b_numel) | A (a_numel, only when A trains)], float32 (the master copy); grad,
    exp_avg, exp_avg_sq alike. compute: param in the model's dtype, which the forwards read (param itself
    for a float32 model, else a copy refreshed after every update: a step casts the weights once, not at
    each use, and its backward casts no gradient). The autograd leaves are views of compute, one per
    adapter slot: B of every workspace session [W, out, r] (a strided view with its own version counter,
    so a kernel that steps one slot's B in place does not invalidate what another layer saved), and A
    [r, in] when it trains. A step's gradients of them reach grad in one copy (`set_grad`).
    """

    def __init__(self, engine: FastWeightEngine, slots: Sequence[int], train_a: bool) -> None:
        lay = engine.layout
        self.engine, self.train_a = engine, train_a
        w, nb = len(slots), lay.b_numel
        numel = w * nb + (lay.a_numel if train_a else 0)
        self.param = torch.empty(numel, dtype=torch.float32, device=engine.device)
        same = engine.dtype == torch.float32
        self.compute = self.param if same else torch.empty(numel, dtype=engine.dtype, device=engine.device)
        self.b = self.param[: w * nb].view(w, nb)
        self.a = self.param[w * nb :] if train_a else None
        self.grad = torch.empty_like(self.param)
        self.exp_avg = torch.empty_like(self.param)
        self.exp_avg_sq = torch.empty_like(self.param)
        self.load(slots)
        # b / a as the forwards read them (what must be finite: float16 holds less than a float32 master)
        self.b_compute = self.compute[: w * nb].view(w, nb)
        self.a_compute = self.compute[w * nb :] if train_a else None
        self.b_leaves = tuple(_leaf(lay.b_stack(self.b_compute, i)) for i in range(len(lay.slots)))
        if self.a_compute is None:
            self.a_leaves, a_views = (), engine.a_views
        else:
            self.a_leaves = tuple(_leaf(lay.a_view(self.a_compute, i)) for i in range(len(lay.slots)))
            a_views = self.a_leaves
        self.a_views = a_views

    def load(self, slots: Sequence[int]) -> None:
        """(Re)start from the engine rows `slots` (as many as this workspace holds): B (and A) copied in,
        gradient and moments zeroed, in place (so graphs captured on this workspace stay valid)."""
        if len(slots) != self.b.shape[0]:
            raise ValueError(f"this workspace holds {self.b.shape[0]} sessions, not {len(slots)}")
        self.slots = list(slots)
        with torch.no_grad():
            self.b.copy_(self.engine.b.index_select(0, upload_one(torch.tensor(self.slots), self.engine.device)))
            if self.a is not None:
                self.a.copy_(self.engine.a)
            for t in (self.grad, self.exp_avg, self.exp_avg_sq):
                t.zero_()
        self.refresh()

    def refresh(self) -> None:
        """compute := param (cast to the model's dtype; nothing when that is float32): after a change of param."""
        if self.compute is not self.param:
            with torch.no_grad():
                self.compute.copy_(self.param)

    @property
    def leaves(self) -> tuple[torch.Tensor, ...]:
        return self.b_leaves + self.a_leaves

    def set_grad(self, grads: Sequence[torch.Tensor]) -> None:
        """grad := a step's gradients of `leaves` (in that order, in the compute dtype), in one cat (and one cast
        to float32 after it where the compute dtype differs: CUDA's cat is one kernel only over inputs of its
        output's dtype). The leaves, slot by slot, then A, are the order of a session's row [b_numel (+ a_numel,
        one session only)]."""
        w = self.b.shape[0]
        rows = self.grad.view(w, -1)
        pieces = [g.reshape(w, -1) for g in grads]
        with torch.no_grad():
            if self.compute is self.param:
                torch.cat(pieces, dim=1, out=rows)
            else:
                rows.copy_(torch.cat(pieces, dim=1))

    def binding(self, indptr: torch.Tensor, slots: torch.Tensor, host_slots: tuple[int, ...], per_token: bool,
                sgd_lr: float | None) -> Binding:  # fmt: skip
        """Forwards read the workspace's B leaves (and A, when it trains): segments as in `Binding`.
        One session (the common write) runs the fused single-session kernel."""
        if len(self.slots) == 1:
            indptr = None
        return Binding(self.b_leaves, self.a_views, indptr, slots, host_slots, per_token, True, sgd_lr, resident=False)

    def active(self, sessions: int) -> tuple[torch.Tensor, ...]:
        """(param, grad, exp_avg, exp_avg_sq) of the first `sessions` B rows (and A, when it trains)."""
        if self.a is not None:  # one session: everything
            return self.param, self.grad, self.exp_avg, self.exp_avg_sq
        n = sessions * self.engine.layout.b_numel
        return self.param[:n], self.grad[:n], self.exp_avg[:n], self.exp_avg_sq[:n]

    def commit(self, ok: Sequence[bool]) -> None:
        """Copy the good sessions' B (and A) back to their engine rows."""
        keep = [w for w, good in enumerate(ok) if good]
        if keep:
            rows = self.b.detach()
            if len(keep) < len(ok):  # (a host index: uploaded without a wait)
                rows = rows.index_select(0, upload_one(torch.tensor(keep), rows.device))
            self.engine.set_rows([self.slots[w] for w in keep], rows)
            if self.a is not None:
                self.engine.set_a(self.a.detach())


def _leaf(view: torch.Tensor) -> torch.Tensor:
    """A leaf on `view`'s memory with its own autograd version counter."""
    alias = torch.empty(0, dtype=view.dtype, device=view.device)
    alias.set_(view.untyped_storage(), view.storage_offset(), view.shape, view.stride())
    return alias.requires_grad_(True)


@dataclass
class GenericStep:
    """A step of the generic path (the model's own forward): rows of a padded batch, grouped by session.

    rows [b] (host); groups/slots as in StepBatch; weight [b, T-1] on the device: 1 / (targets of the
    row's session) where the shifted label is a target, else 0; row_group [b] on the device.
    """

    rows: torch.Tensor
    groups: tuple[int, ...]
    slots: tuple[int, ...]
    weight: torch.Tensor
    row_group: torch.Tensor


def plan_generic(batch: dict[str, torch.Tensor], steps: list[list[tuple[int, Rows]]], device: torch.device) -> list:
    out = []
    for groups in steps:
        rows = torch.cat([torch.as_tensor(r, dtype=torch.long).reshape(-1) for _, r in groups])
        sizes = [len(torch.as_tensor(r).reshape(-1)) for _, r in groups]
        row_group = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor(sizes))
        is_target = (batch["labels"][rows, 1:] != IGNORE_INDEX).double()
        per_group = torch.zeros(len(groups), dtype=torch.float64).index_add_(0, row_group, is_target.sum(1))
        if bool((per_group == 0).any()):
            raise ValueError("a write step has a session with no trainable token")
        weight = is_target / per_group[row_group][:, None]
        weight, row_group = upload([weight.float(), row_group], device)  # (no wait for the device)
        out.append(GenericStep(rows, tuple(sizes), tuple(s for s, _ in groups), weight, row_group))
    return out


def generic_loss(engine: FastWeightEngine, batch: dict[str, torch.Tensor], step: GenericStep) -> tuple:
    """(sum of the groups' mean losses, each group's) through the model's own forward."""
    ids, mask, labels = upload([batch[k][step.rows] for k in ("input_ids", "attention_mask", "labels")], engine.device)
    inputs = {"input_ids": ids, "attention_mask": mask}
    logits = engine.model(**inputs).logits[:, :-1].float()
    ce = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none")
    per_row = (ce * step.weight).sum(1)
    per_group = torch.zeros(len(step.groups), device=per_row.device).index_add_(0, step.row_group, per_row)
    return per_group.sum(), per_group


class WriteRun:
    """The steps of one write over a workspace (see the module docstring). Call `run()` once."""

    def __init__(
        self,
        engine: FastWeightEngine,
        data: TrunkCache | dict[str, torch.Tensor],
        schedules: Sequence[Sequence[Rows]],
        slots: Sequence[int],
        recipe: Recipe,
        train_a: bool = False,
        static: StaticWrites | None = None,
    ) -> None:
        if recipe.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {recipe.optimizer!r}")
        if train_a and len(slots) > 1:
            raise ValueError("A is shared by every session: only a one-session write can train it")
        engine.check_attached()
        if engine.mlps[0][1].gate_proj.weight.is_inference():
            raise FastWeightsError(
                "the model's weights were created under torch.inference_mode(): a write needs autograd, so "
                "load the model outside inference mode (writes themselves may be called inside it)"
            )
        self.engine, self.data, self.recipe, self.train_a = engine, data, recipe, train_a
        # sessions ordered by step count (stable): the ones in step k are always a prefix
        self.order = sorted(range(len(slots)), key=lambda i: -len(schedules[i]))
        self.counts = [len(schedules[i]) for i in self.order]
        self.steps = [
            [(w, schedules[i][k]) for w, i in enumerate(self.order) if len(schedules[i]) > k]
            for k in range(max(self.counts, default=0))
        ]
        self.slots = [slots[i] for i in self.order]
        self.cached = isinstance(data, TrunkCache)
        self.sgd_lr = recipe.lr if self._sgd_in_backward(len(slots)) else None
        # static buffers (and their CUDA graphs) only where a captured step never reads the device on the
        # host: several sessions' segments are device tensors that only the Triton kernels take as they
        # are (the torch ops and the composed non-SiLU MLP read them back), so those writes run eagerly
        one_session = len(slots) == 1
        static_ok = (
            static is not None and self.cached and all(engine.fused)
            and (engine.backend == "triton" or (engine.backend == "torch" and one_session))
        )  # fmt: skip
        self.static = static.get(data, len(slots), train_a, recipe, self.sgd_lr) if static_ok else None

    def _sgd_in_backward(self, sessions: int) -> bool:
        """Plain SGD on one session's float32 B with the Triton kernels: the backward kernel applies
        B -= lr * dB itself, so no dB is materialised and no optimizer step runs. Sound because each
        MLP runs once per step."""
        e, r = self.engine, self.recipe
        return (
            e.backend == "triton" and all(e.fused) and e.dtype == torch.float32 and sessions == 1
            and r.optimizer == "sgd" and r.weight_decay == 0 and not self.train_a and self.cached
        )  # fmt: skip

    # ---------------------------------------------------------------- one step
    def _loss(self, plan: StepBatch | GenericStep) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.engine
        if self.cached:
            segments = (plan.seg_indptr, plan.seg_slot)
            if not e.device_segments and plan.host_segments is not None:  # (kernels that read them on the host)
                segments = plan.host_segments
            binding = self.ws.binding(*segments, plan.slots, True, self.sgd_lr)
            with e.bindings.bind(binding):
                return adapted_loss(e.decoder, e.first_layer, self.data, plan)
        indptr, slots = row_segments([w for w, n in zip(plan.slots, plan.groups) for _ in range(n)])
        with e.bindings.bind(self.ws.binding(indptr, slots, plan.slots, False, None)):
            return generic_loss(e, self.data, plan)

    def step(self, plan: StepBatch | GenericStep, step: int | torch.Tensor) -> torch.Tensor:
        """Loss, gradients, update: one step; returns each workspace session's loss [W] (0 for sessions not
        in this step), on the device."""
        with torch.enable_grad():
            total, per_group = self._loss(plan)
            if self.sgd_lr is None:  # the fast weights' gradients only, never a base weight's
                self.ws.set_grad(torch.autograd.grad(total, self.ws.leaves, materialize_grads=True))
            else:  # the backward kernels step B themselves (no gradient comes out)
                total.backward(inputs=list(self.ws.leaves))
        self._update(len(plan.groups), step)
        losses, missing = per_group.detach().float(), len(self.slots) - per_group.shape[0]
        return F.pad(losses, (0, missing)) if missing else losses  # (no copy when every session took part)

    def _counted_step(self, plan: StepBatch, step: torch.Tensor) -> torch.Tensor:
        step.add_(1)
        return self.step(plan, step)

    def _update(self, sessions: int, step: int | torch.Tensor) -> None:
        if self.sgd_lr is not None:
            return  # the backward kernels already stepped B
        param, grad, exp_avg, exp_avg_sq = self.ws.active(sessions)
        ops, r = self.engine.ops, self.recipe
        with torch.no_grad():
            if r.optimizer == "sgd":
                ops.sgd_step_(param, grad, r.lr, r.weight_decay)
            else:
                ops.adamw_step_(param, grad, exp_avg, exp_avg_sq, step, r.lr, **adamw_defaults(r.weight_decay))
        self.ws.refresh()

    # ---------------------------------------------------------------- the whole write
    def plans(self) -> list:
        if self.cached:
            e = self.engine
            return plan_steps(self.data, self.steps, e.device, self.static is not None, e.device_segments)
        return plan_generic(self.data, self.steps, self.engine.device)

    def run_steps(self, on_step: StepCallback | None = None) -> torch.Tensor:
        """Every step -> losses [n_steps, W] on the device. No host sync inside the loop (unless
        `on_step` asks for each loss); on CUDA the steps replay CUDA graphs."""
        plans = self.plans()
        losses = []
        for k, plan in enumerate(plans, start=1):
            loss = self.static.run_step(plan, self._counted_step) if self.static else self.step(plan, k)
            losses.append(loss)
            if on_step is not None:
                on_step(k, len(plans), float(loss.sum()))
        return torch.stack(losses)

    def train(self, on_step: StepCallback | None = None) -> WriteOutcome:
        """Train and check each session; nothing is committed yet (see `commit`)."""
        n = len(self.slots)
        with torch.inference_mode(False):
            with record_function("tmem.write.load"):
                if self.static is None:
                    self.ws = Workspace(self.engine, self.slots, self.train_a)
                else:  # the bucket's buffers: this write's cache and rows copied in
                    self.data = self.static.load(self.data, self.slots)
                    self.ws = self.static.workspace
            if not self.steps:
                return WriteOutcome([[] for _ in range(n)], [None] * n)
            with record_function("tmem.write.steps"):
                losses_dev = self.run_steps(on_step)
            with record_function("tmem.write.check"):
                # the loop's losses and whether each session's update is finite, read at once: the write's one
                # wait for the device. Finite in the compute copy (refreshed after the last update), which the
                # model's forwards read: a float16 model's B past 65504 is inf there, finite in the master
                finite = [torch.isfinite(self.ws.b_compute).all(dim=1)]
                if self.ws.a_compute is not None:
                    finite.append(torch.isfinite(self.ws.a_compute).all().reshape(1))
                flags = torch.cat(finite).to(losses_dev.dtype)
                values = torch.cat([losses_dev.reshape(-1), flags]).tolist()
                cut = losses_dev.numel()
                table = [values[k : k + n] for k in range(0, cut, n)]
                finite_b = [v == 1.0 for v in values[cut : cut + n]]
                finite_a = self.ws.a is None or values[cut + n] == 1.0
        losses = [[row[w] for row in table[: self.counts[w]]] for w in range(n)]
        errors = [write_error(losses[w], finite_b[w] and finite_a, self.recipe) for w in range(n)]
        inverse = {i: w for w, i in enumerate(self.order)}
        return WriteOutcome([losses[inverse[i]] for i in range(n)], [errors[inverse[i]] for i in range(n)])

    def commit(self, outcome: WriteOutcome) -> None:
        """Copy the sessions that trained cleanly back to their engine rows (the others stay as they were)."""
        ok_by_input = [e is None for e in outcome.errors]
        with torch.inference_mode(False):
            self.ws.commit([ok_by_input[i] for i in self.order])


def write_error(losses: list[float], finite_update: bool, recipe: Recipe) -> FastWeightsError | None:
    """Why a session's write must be rolled back (a non-finite loss or update, divergence), or None."""
    bad = next((k for k, v in enumerate(losses, start=1) if not math.isfinite(v)), None)
    if bad is not None or not finite_update:
        what = f"loss {losses[bad - 1]}" if bad is not None else "a non-finite update"
        return NonFiniteLossError(
            f"write step {bad or len(losses)} produced {what}; the adapter was rolled back to its state "
            "before this write"
        )
    k = recipe.diverged_at(losses)
    if k is not None:
        return DivergedWriteError(
            f"write diverged: step {k}'s loss {losses[k - 1]:.4g} exceeds {recipe.divergence_factor} x the first "
            f"step's {losses[0]:.4g} + {recipe.divergence_margin} (Recipe.divergence_factor / divergence_margin); "
            "the adapter was rolled back to its state before this write"
        )
    return None
