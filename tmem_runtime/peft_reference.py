"""The reference path: the same fast weights built with PEFT and trained with a torch optimizer.

`FastWeights(model, backend="peft")` returns a `PeftFastWeights`: a PEFT `LoraConfig` with `r`,
`lora_alpha=r` (scaling 1), the three MLP targets and `layers_to_transform`; lora_A set to the same
A0 and frozen, lora_B to B0; every step is a full `model(**batch).loss` forward/backward and a
`torch.optim.SGD` / `torch.optim.AdamW` step. It is what the fast path is proven and timed against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import LoraConfig, get_peft_model
from transformers import PreTrainedModel

from tmem_runtime.examples import Example, collate
from tmem_runtime.fast_weights import FastWeights
from tmem_runtime.models import MLP_TARGETS
from tmem_runtime.recipes import Recipe


class PeftFastWeights(FastWeights):
    """FastWeights on the PEFT reference path (same API; see FastWeights)."""

    def _attach(self) -> None:
        self.backend = "peft"
        layers = [idx for idx, _ in self.mlps]
        config = LoraConfig(
            r=self.rank,
            lora_alpha=self.rank,
            lora_dropout=0.0,
            target_modules=list(MLP_TARGETS),
            layers_to_transform=layers,
            init_lora_weights=False,
        )
        self.peft_model = get_peft_model(self.model, config)  # injects LoRA into self.model in place
        self._decoder = None  # every step is the model's full forward
        self._modules = {}
        for _, mlp in self.mlps:
            for t in MLP_TARGETS:
                self._modules[len(self._modules)] = getattr(mlp, t)
        factors = self.initial_factors()
        self._originals = []
        with torch.no_grad():
            for i, s in enumerate(self.layout.slots):
                a, b = factors[(s.layer, s.target)]
                mod = self._modules[i]
                mod.lora_A["default"].weight.copy_(a)
                mod.lora_B["default"].weight.copy_(b)
                if self.init == "pissa":
                    self._originals.append(mod.base_layer.weight.detach().clone())
                    mod.base_layer.weight.sub_((b @ a).to(mod.base_layer.weight.dtype))
        self._init_state = {k: v.clone() for k, v in self._current_tensors().items()}
        self.train_a = self.init == "pissa"
        self._optimizer: torch.optim.Optimizer | None = None

    def _lora(self, i: int, which: str) -> torch.nn.Parameter:
        return getattr(self._modules[i], which)["default"].weight

    def _current_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, s in enumerate(self.layout.slots):
            out[f"{s.prefix}.lora_A"] = self._lora(i, "lora_A").data
            out[f"{s.prefix}.lora_B"] = self._lora(i, "lora_B").data
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self._current_tensors().items()}

    def reset(self) -> None:
        self.load_state_dict(self._init_state)

    def detach(self) -> PreTrainedModel:
        base = self.peft_model.unload()
        with torch.no_grad():
            for i, orig in enumerate(self._originals):
                getattr(self.mlps[i // 3][1], self.layout.slots[i].target).weight.copy_(orig)
        base._tmem_fast_weights = None
        self.model = base
        return base

    # ---------------------------------------------------------------- writes
    def _encode_examples(self, examples: Sequence[Example], pad_id: int) -> object:
        return list(examples), pad_id

    def _step_losses(self, pool: object, plan: object) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(pool, tuple):  # examples padded per batch, as a plain HF training loop would
            examples, pad_id = pool
            return self._full_forward_losses(collate([examples[int(r)] for r in plan], pad_id))
        return super()._step_losses(pool, plan)

    def _params(self) -> list[torch.nn.Parameter]:
        names = ("lora_B", "lora_A") if self.train_a else ("lora_B",)
        return [self._lora(i, n) for n in names for i in range(len(self.layout.slots))]

    def _begin_write(self, recipe: Recipe, train_a: bool) -> None:
        self.train_a = train_a
        for i in range(len(self.layout.slots)):
            self._lora(i, "lora_A").requires_grad_(train_a)
            self._lora(i, "lora_B").requires_grad_(True)
        params = self._params()
        if recipe.optimizer == "sgd":
            self._optimizer = torch.optim.SGD(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
        else:
            self._optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)

    def _zero_grad(self) -> None:
        self._optimizer.zero_grad(set_to_none=True)

    def _update(self, recipe: Recipe, step: int) -> None:
        self._optimizer.step()

    def _snapshot(self) -> None:
        self._last_good_state = self.state_dict()

    def _rollback(self) -> None:
        with torch.no_grad():
            for name, dst in self._current_tensors().items():
                dst.copy_(self._last_good_state[name])

    def _is_initial_state(self) -> bool:
        return False  # PEFT's own LoRA layers run the forward; no identity shortcut here

    def _finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self._params())
