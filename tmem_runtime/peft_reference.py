"""The reference path: the same fast weights built with PEFT and trained with a torch optimizer.

`PeftReferencePool` holds one session: a PEFT `LoraConfig` with `r`, `lora_alpha=r` (scaling 1), the
three MLP targets and `layers_to_transform`; lora_A set to the same A0 and frozen, lora_B to B0;
every step is a full `model(**batch).loss` forward/backward and a `torch.optim.SGD` / `AdamW` step.
It inherits the write API of `SessionStore`, so it sees exactly the batches and schedules the fast
path sees; it is what the fast path is proven and timed against. `FastWeights(model,
backend="peft")` wraps it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedModel

from tmem_kernels.autocast import autocast_off
from tmem_runtime.adapter_file import WeightsFingerprint, adapter_metadata
from tmem_runtime.adapter_init import initial_factors
from tmem_runtime.engine import FastWeightsError
from tmem_runtime.layout import AdapterLayout, AdapterSlot
from tmem_runtime.models import MLP_TARGETS, target_mlps
from tmem_runtime.recipes import Recipe
from tmem_runtime.sessions import Schedules, SessionStats, SessionStore
from tmem_runtime.trainer import StepCallback, write_error


class PeftReferencePool(SessionStore):
    """One session of fast weights on the PEFT reference path (same write API as SessionPool)."""

    backend = "peft"

    def __init__(
        self,
        model: PreTrainedModel,
        rank: int = 6,
        num_layers: int | Sequence[int] = 4,
        init: str = "svd",
        svd: str = "randomized",
        scaling: float = 1.0,
        seed: int = 0,
    ) -> None:
        if getattr(model, "_tmem_fast_weights", None) is not None:
            raise FastWeightsError("this model already has fast weights attached; detach() them first")
        if scaling != 1.0:
            raise ValueError("the PEFT reference uses lora_alpha = r (scaling 1.0)")
        self.model, self.init = model, init
        self.mlps = target_mlps(model, num_layers)
        self.layout = AdapterLayout(
            [AdapterSlot(i, t, getattr(m, t).out_features, getattr(m, t).in_features) for i, m in self.mlps
             for t in MLP_TARGETS],
            rank,
        )  # fmt: skip
        self.fingerprint = WeightsFingerprint([getattr(m, t).weight for _, m in self.mlps for t in MLP_TARGETS])
        self.fingerprint.hexdigest()  # of the original weights (PiSSA replaces them by residuals)
        self._flags = {n: p.requires_grad for n, p in model.named_parameters()}  # PEFT freezes the base
        a0, b0 = initial_factors(self.mlps, self.layout, init, svd, seed)
        config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(MLP_TARGETS),
                            layers_to_transform=[i for i, _ in self.mlps], init_lora_weights=False)  # fmt: skip
        # (attached inside torch.inference_mode() too: LoRA parameters made there could never be trained)
        with torch.inference_mode(False):
            self.peft_model = get_peft_model(model, config)  # injects LoRA into `model` in place
        self._modules = [getattr(m, t) for _, m in self.mlps for t in MLP_TARGETS]
        self._originals: list[torch.Tensor] = []
        with torch.inference_mode(False), torch.no_grad(), autocast_off(self.device.type):
            for i, mod in enumerate(self._modules):
                a, b = self.layout.a_view(a0, i), self.layout.b_view(b0, i)
                mod.lora_A["default"].weight.copy_(a)
                mod.lora_B["default"].weight.copy_(b)
                if init == "pissa":
                    self._originals.append(mod.base_layer.weight.detach().clone())
                    mod.base_layer.weight.sub_((b @ a).to(mod.base_layer.weight.dtype))
            self._init_state = {k: v.clone() for k, v in self._tensors().items()}
        self.session: str | None = None
        self.stats: dict[str, SessionStats] = {}
        self.detached = False
        model._tmem_fast_weights = self

    @property
    def device(self) -> torch.device:
        return self._modules[0].base_layer.weight.device

    def metadata(self) -> dict[str, str]:
        return adapter_metadata(self.model, self.fingerprint, self.init, self.layout, 1.0)

    # ---------------------------------------------------------------- the one session
    def open(self, session: str) -> None:
        if self.session is not None:
            raise ValueError("the PEFT reference holds one session")
        self.session = session
        self.stats[session] = SessionStats()

    def _check(self, session: str) -> None:
        if self.detached:
            raise FastWeightsError("these fast weights were detached from their model; attach new ones")
        if session != self.session:
            raise KeyError(f"unknown session {session!r}")

    def _lora(self, i: int, which: str) -> torch.nn.Parameter:
        return getattr(self._modules[i], which)["default"].weight

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i in range(len(self._modules)):
            out[self.layout.a_name(i)] = self._lora(i, "lora_A").data
            out[self.layout.b_name(i)] = self._lora(i, "lora_B").data
        return out

    def state_dict(self, session: str) -> dict[str, torch.Tensor]:
        self._check(session)
        return {k: v.detach().clone() for k, v in self._tensors().items()}

    def load_state_dict(self, session: str, state: Mapping[str, torch.Tensor], own_a: bool = True) -> None:
        """A and B of the one session (its A is its own: own_a is always true here)."""
        self._check(session)
        targets = self._tensors()
        if set(state) != set(targets):
            raise ValueError(f"adapter state does not match: expected {sorted(targets)[:4]} ...")
        for name, dst in targets.items():
            if tuple(state[name].shape) != tuple(dst.shape) or not bool(torch.isfinite(state[name]).all()):
                raise ValueError(f"{name}: shape {tuple(state[name].shape)} != {tuple(dst.shape)}, or not finite")
        with torch.no_grad():
            for name, dst in targets.items():
                dst.copy_(state[name])

    def reset(self, session: str) -> None:
        """B back to B0; A left as it is (only a train_a write changes it), as SessionPool.reset does."""
        self._check(session)
        with torch.no_grad():
            for i in range(len(self._modules)):
                self._lora(i, "lora_B").copy_(self._init_state[self.layout.b_name(i)])
        self.stats[session] = SessionStats()

    def detach(self) -> PreTrainedModel:
        if self.detached:
            raise FastWeightsError("these fast weights were already detached")
        base = self.peft_model.unload()
        with torch.no_grad():
            for i, orig in enumerate(self._originals):
                getattr(self.mlps[i // 3][1], self.layout.slots[i].target).weight.copy_(orig)
        for n, p in base.named_parameters():
            p.requires_grad_(self._flags.get(n, p.requires_grad))
        base._tmem_fast_weights = None
        self.detached = True
        return base

    # ---------------------------------------------------------------- writes
    def _write(
        self,
        names: list[str],
        data: dict[str, torch.Tensor] | None,
        schedules: Schedules,
        recipe: Recipe,
        train_a: bool,
        on_step: StepCallback | None,
    ) -> dict[str, list[float]]:
        (session,), (schedule,) = names, schedules
        self._check(session)
        if not schedule:
            return {session: []}
        names_ab = ("lora_B", "lora_A") if train_a else ("lora_B",)
        for i in range(len(self._modules)):
            self._lora(i, "lora_A").requires_grad_(train_a)
            self._lora(i, "lora_B").requires_grad_(True)
        params = [self._lora(i, n) for n in names_ab for i in range(len(self._modules))]
        opt_cls = torch.optim.SGD if recipe.optimizer == "sgd" else torch.optim.AdamW
        optimizer = opt_cls(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
        before = self.state_dict(session)
        losses = []
        try:
            with torch.inference_mode(False):
                for k, rows in enumerate(schedule, start=1):
                    optimizer.zero_grad(set_to_none=True)
                    with torch.enable_grad():
                        loss = self.model(**_step_batch(data, rows, self.device)).loss
                        loss.backward(inputs=params)
                    optimizer.step()
                    losses.append(loss.detach())
                    if on_step is not None:
                        on_step(k, len(schedule), float(loss))
            values = torch.stack(losses).tolist()
            error = write_error(values, all(bool(torch.isfinite(p).all()) for p in params), recipe)
        except BaseException:
            self.load_state_dict(session, before)
            raise
        if error is not None:
            self.load_state_dict(session, before)
            self.stats[session].count_write(len(values), failed=True)
            raise error
        self.stats[session].count_write(len(values), failed=False)
        return {session: values}


def _step_batch(data: dict[str, torch.Tensor], rows: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    """The step's rows, cut to their last real token (padded per batch, as a plain HF training loop)."""
    sub = {k: v[rows] for k, v in data.items()}
    real = sub["attention_mask"].bool().any(0).nonzero()
    width = int(real.max()) + 1 if len(real) else 1
    return {k: v[:, :width].to(device) for k, v in sub.items()}
