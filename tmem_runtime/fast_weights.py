"""FastWeights: a rank-r LoRA on gate/up/down of the last decoder layers, in one flat buffer.

    fw = FastWeights(model)                      # attach in place: A0 = S_r V_r^T (frozen), B0 = 0
    fw.write_qa(tokenizer, [(q, a), ...])        # train flashcards into B; writes accumulate
    model.generate(...)                          # reads the memory
    fw.reset()                                   # episode boundary: back to the fresh attach state
    fw.save(path); fw.load(path)                 # one safetensors file, atomic save
    fw.detach()                                  # the model exactly as it was

`backend="peft"` builds the reference path (PEFT LoRA + a torch optimizer) behind the same API.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tmem_kernels import reference
from tmem_runtime.backends import kernel_ops, resolve_backend
from tmem_runtime.decoder import Decoder, supports_piecewise
from tmem_runtime.examples import Example, collate, qa_example, text_examples, write_schedule
from tmem_runtime.layout import AdapterLayout, AdapterSlot
from tmem_runtime.models import MLP_TARGETS, target_mlps
from tmem_runtime.recipes import OPTIMIZERS, Recipe, get_recipe
from tmem_runtime.write import (
    IGNORE_INDEX,
    StepBatch,
    TrunkCache,
    adapted_losses,
    encode_trunk,
    plan_steps,
    right_padded_lengths,
    token_loss_means,
)

INITS = ("svd", "random", "pissa")
SVD_METHODS = ("randomized", "exact")
FILE_FORMAT = "tmem-fast-weights/1"
StepCallback = Callable[[int, "int | None", float], None]


class FastWeightsError(RuntimeError):
    """Base class of the runtime's write/load errors."""


class NonFiniteLossError(FastWeightsError):
    """A write step produced a NaN/inf loss or update; the adapter kept its last good state."""


class AdapterFileError(FastWeightsError):
    """An adapter file is corrupt or does not match this model/adapter; nothing was changed."""


def _adamw_defaults(weight_decay: float) -> dict:
    return dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay)


class FastWeights:
    """Fast weights on `gate_proj`/`up_proj`/`down_proj` of the last `num_layers` decoder layers.

    model: a transformers causal LM (modified in place until `detach()`). rank: LoRA rank r.
    init: "svd" (TMEM: A = S_r V_r^T frozen, B = 0), "random" (Kaiming A, B = 0) or "pissa"
    (A = sqrt(S_r) V_r^T, B = U_r sqrt(S_r), base weight replaced by the residual, restored exactly).
    backend: "auto" | "triton" | "native" | "torch" | "peft" (reference). svd: "randomized" | "exact".
    cuda_graphs: on a CUDA device, replay each write's steps as CUDA graphs (fast path only).
    """

    def __new__(cls, model: nn.Module, *args, backend: str = "auto", **kwargs):
        if cls is FastWeights and backend == "peft":
            from tmem_runtime.peft_reference import PeftFastWeights

            return super().__new__(PeftFastWeights)
        return super().__new__(cls)

    def __init__(
        self,
        model: PreTrainedModel,
        rank: int = 6,
        num_layers: int = 4,
        init: str = "svd",
        backend: str = "auto",
        svd: str = "randomized",
        scaling: float = 1.0,
        seed: int = 0,
        cuda_graphs: bool = True,
    ) -> None:
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if svd not in SVD_METHODS:
            raise ValueError(f"svd must be one of {SVD_METHODS}, got {svd!r}")
        if getattr(model, "_tmem_fast_weights", None) is not None:
            raise FastWeightsError("this model already has fast weights attached; detach() them first")
        self.model = model
        self.rank, self.num_layers, self.init, self.svd, self.scaling, self.seed = (
            rank,
            num_layers,
            init,
            svd,
            scaling,
            seed,
        )
        self.cuda_graphs = cuda_graphs
        self._sgd_in_backward: float | None = None  # set during an SGD write the backward kernel applies
        self.mlps = target_mlps(model, num_layers)
        self.first_layer = self.mlps[0][0]
        slots = [
            AdapterSlot(idx, t, getattr(mlp, t).out_features, getattr(mlp, t).in_features)
            for idx, mlp in self.mlps
            for t in MLP_TARGETS
        ]
        self.layout = AdapterLayout(slots, rank)
        weight = self.mlps[0][1].gate_proj.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.backend = resolve_backend(backend, self.device)
        self._attach()
        model._tmem_fast_weights = self

    # ---------------------------------------------------------------- initial factors
    def _base_weights(self, target: str) -> list[torch.Tensor]:
        return [getattr(mlp, target).weight for _, mlp in self.mlps]

    def _svd(self, stacked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.svd == "randomized":
            from tmem_kernels.rsvd import randomized_svd_top_r

            return randomized_svd_top_r(stacked, self.rank, seed=self.seed)
        return reference.svd_top_r(stacked, self.rank)

    def initial_factors(self) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """{(layer, target): (A0 [r, in], B0 [out, r])} for this adapter's init, float32."""
        out = {}
        layers = [idx for idx, _ in self.mlps]
        if self.init == "random":
            gen = torch.Generator().manual_seed(self.seed)
            for s in self.layout.slots:
                bound = 1.0 / math.sqrt(s.in_features)  # kaiming_uniform_(a=sqrt(5)), as nn.Linear/PEFT
                a = (torch.rand(self.rank, s.in_features, generator=gen) * 2 - 1) * bound
                out[(s.layer, s.target)] = (a, torch.zeros(s.out_features, self.rank))
            return out
        # Same-shape weights are stacked so one batched SVD covers them: [2L, I, H] and [L, H, I].
        groups = [("gate_proj", "up_proj"), ("down_proj",)]
        for group in groups:
            stacked = torch.stack([w.detach().float() for t in group for w in self._base_weights(t)])
            u, s, vh = self._svd(stacked)
            names = [(layer, t) for t in group for layer in layers]
            for k, key in enumerate(names):
                if self.init == "svd":
                    a, b = s[k, :, None] * vh[k], torch.zeros(u.shape[1], self.rank)
                else:  # pissa
                    root = s[k].sqrt()
                    a, b = root[:, None] * vh[k], u[k] * root[None, :]
                out[key] = (a, b)
        return out

    # ---------------------------------------------------------------- attach / detach
    def _attach(self) -> None:
        lay = self.layout
        self.buffer = lay.allocate(self.dtype, self.device)
        self.grad = torch.zeros_like(self.buffer)
        self.exp_avg = torch.zeros_like(self.buffer)
        self.exp_avg_sq = torch.zeros_like(self.buffer)
        self._last_good = torch.zeros_like(self.buffer)
        factors = self.initial_factors()
        for i, s in enumerate(lay.slots):
            a, b = factors[(s.layer, s.target)]
            lay.a_view(self.buffer, i).copy_(a)
            lay.b_view(self.buffer, i).copy_(b)
        self._init_state = self.buffer.clone()
        self._identity = self.init != "pissa"  # B = 0 and W untouched: the adapter changes nothing
        self._originals: list[torch.Tensor] = []
        if self.init == "pissa":
            with torch.no_grad():
                for i, s in enumerate(lay.slots):
                    w = getattr(self.mlps[i // 3][1], s.target).weight
                    self._originals.append(w.detach().clone())
                    w.sub_((lay.b_view(self.buffer, i).float() @ lay.a_view(self.buffer, i).float()).to(w.dtype))
        self.ops = kernel_ops(self.backend)
        self._bind(train_a=self.init == "pissa")
        hidden_act = getattr(self.model.config, "hidden_act", "silu")
        self._fused_act = hidden_act in ("silu", "swish")
        for k, (_, mlp) in enumerate(self.mlps):
            mlp.forward = partial(self._mlp_forward, k, mlp)
        self._decoder = Decoder(self.model) if supports_piecewise(self.model) else None

    def _bind(self, train_a: bool) -> None:
        """(Re)create the trainable leaves, one per factor, on the flat buffer's memory.

        Each leaf has its own autograd version counter (a plain view shares its base's): a backward
        kernel that steps one layer's B in place must not invalidate what another layer saved.
        """
        lay, views = self.layout, []
        for k in range(len(self.mlps)):
            per = []
            for i in range(3 * k, 3 * k + 3):
                a = _own_version(lay.a_view(self.buffer, i)).requires_grad_(train_a)
                b = _own_version(lay.b_view(self.buffer, i)).requires_grad_(True)
                a.grad = lay.a_view(self.grad, i) if train_a else None
                b.grad = lay.b_view(self.grad, i)
                per += [a, b]
            views.append(tuple(per))
        self._views = views
        self.train_a = train_a

    def _mlp_forward(self, k: int, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self._identity and not torch.is_grad_enabled():
            # B = 0 and the base weights untouched: the adapter is the identity, so inference runs the
            # model's own MLP and matches the bare model bit for bit, whatever the kernel backend.
            return type(mlp).forward(mlp, x)
        a_g, b_g, a_u, b_u, a_d, b_d = self._views[k]
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self._fused_act:
            in_backward = {} if self._sgd_in_backward is None else {"sgd_lr": self._sgd_in_backward}
            y = self.ops.lora_mlp(
                x2,
                mlp.gate_proj.weight,
                mlp.up_proj.weight,
                mlp.down_proj.weight,
                a_g,
                b_g,
                a_u,
                b_u,
                a_d,
                b_d,
                self.scaling,
                **in_backward,
            )
        else:  # other activations (e.g. Gemma's GELU): the torch composition with the model's act_fn
            s = self.scaling
            gate = reference.lora_linear(x2, mlp.gate_proj.weight, a_g, b_g, s)
            up = reference.lora_linear(x2, mlp.up_proj.weight, a_u, b_u, s)
            y = reference.lora_linear(mlp.act_fn(gate) * up, mlp.down_proj.weight, a_d, b_d, s)
        return y.view(*shape[:-1], y.shape[-1])

    def detach(self) -> PreTrainedModel:
        """Remove the fast weights; the model is exactly as it was before attach. Returns it."""
        for _, mlp in self.mlps:
            mlp.__dict__.pop("forward", None)
        with torch.no_grad():
            for i, orig in enumerate(self._originals):
                getattr(self.mlps[i // 3][1], self.layout.slots[i].target).weight.copy_(orig)
        self.model._tmem_fast_weights = None
        return self.model

    # ---------------------------------------------------------------- state
    def reset(self) -> None:
        """Back to the fresh attach state (B = 0 for svd/random init), optimizer state cleared."""
        with torch.no_grad():
            self.buffer.copy_(self._init_state)
            self._identity = self.init != "pissa"
            self.exp_avg.zero_()
            self.exp_avg_sq.zero_()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A snapshot: {"layers.L.mlp.T.lora_A": [r, in], "...lora_B": [out, r]} (one copy of the buffer)."""
        return self.layout.named_views(self.buffer.detach().clone())

    def _current_tensors(self) -> dict[str, torch.Tensor]:
        return self.layout.named_views(self.buffer)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Hot swap: validate every tensor, then copy into the existing buffers (no reallocation)."""
        targets = self._current_tensors()
        missing, unexpected = set(targets) - set(state), set(state) - set(targets)
        if missing or unexpected:
            raise AdapterFileError(
                f"adapter state does not match: missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}"
            )
        for name, dst in targets.items():
            src = state[name]
            if tuple(src.shape) != tuple(dst.shape):
                raise AdapterFileError(f"{name}: shape {tuple(src.shape)} != expected {tuple(dst.shape)}")
            if not torch.is_floating_point(src) or not bool(torch.isfinite(src).all()):
                raise AdapterFileError(f"{name}: not a finite floating-point tensor")
        with torch.no_grad():
            for name, dst in targets.items():
                dst.copy_(state[name])
        self._identity = self._is_initial_state()

    def _is_initial_state(self) -> bool:
        return self.init != "pissa" and bool(torch.equal(self.buffer, self._init_state))

    def metadata(self) -> dict[str, str]:
        """What identifies this adapter: format, model, rank, layers, targets, init, shapes."""
        cfg = self.model.config
        model_id = f"{cfg.model_type}:{getattr(cfg, '_name_or_path', '') or 'unnamed'}:{cfg.num_hidden_layers}"
        return {"format": FILE_FORMAT, "model": model_id, "init": self.init, **self.layout.describe()}

    def save(self, path: str | os.PathLike) -> None:
        """Write the adapter to one safetensors file atomically (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, tmp, metadata=self.metadata())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def load(self, path: str | os.PathLike) -> None:
        """Load a file written by `save` into the existing buffers; on any mismatch nothing changes."""
        try:
            with safe_open(str(path), framework="pt", device=str(self.device)) as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises several types for a corrupt file
            raise AdapterFileError(f"cannot read adapter file {path}: {exc}") from exc
        expected = self.metadata()
        for key in ("format", "model", "rank", "layers", "targets", "init", "shapes"):
            if meta.get(key) != expected[key]:
                raise AdapterFileError(
                    f"adapter file {path} is for {key}={meta.get(key)!r}, this adapter has {expected[key]!r}"
                )
        self.load_state_dict(state)

    # ---------------------------------------------------------------- writes
    def write(
        self,
        batches: Iterable[dict[str, torch.Tensor]],
        lr: float = 5e-4,
        optimizer: str = "sgd",
        train_a: bool = False,
        weight_decay: float = 0.0,
        on_step: StepCallback | None = None,
    ) -> list[float]:
        """One optimizer step per batch; returns each step's loss (before its update).

        batches: dicts with "input_ids", "attention_mask", "labels", each [B, T] (labels unshifted,
        -100 where ignored). A batch object seen twice (epochs) reuses its trunk pass.
        `on_step(step, n_steps_or_None, loss)` is called after every step (progress bars).
        """
        pools: dict[int, object] = {}
        steps = []
        for batch in batches:
            if id(batch) not in pools:
                pools[id(batch)] = self._encode_batch(batch)
            steps.append((pools[id(batch)], list(range(batch["input_ids"].shape[0]))))
        recipe = Recipe(optimizer=optimizer, lr=lr, weight_decay=weight_decay)
        return self._optimize(steps, recipe, train_a, on_step)

    def write_qa(
        self,
        tokenizer: PreTrainedTokenizerBase,
        pairs: Sequence[tuple[str, str]],
        recipe: str | Recipe = "default",
        seed: int = 0,
        loss_on: str = "answer",
        train_a: bool = False,
        on_step: StepCallback | None = None,
    ) -> list[float]:
        """Train (question, answer) flashcards, chat-templated, loss on answers by default.

        Returns the per-step losses; an empty pair list is zero steps.
        """
        recipe = get_recipe(recipe)
        examples = [qa_example(tokenizer, q, a, loss_on, recipe.max_length) for q, a in pairs]
        return self.write_examples(examples, recipe, seed, train_a, tokenizer.pad_token_id or 0, on_step)

    def write_text(
        self,
        tokenizer: PreTrainedTokenizerBase,
        texts: Sequence[str],
        recipe: str | Recipe = "default",
        seed: int = 0,
        on_step: StepCallback | None = None,
    ) -> list[float]:
        """Next-token training on plain texts (all tokens), cut into recipe.max_length windows."""
        recipe = get_recipe(recipe)
        examples = [ex for t in texts if t.strip() for ex in text_examples(tokenizer, t, recipe.max_length)]
        return self.write_examples(examples, recipe, seed, False, tokenizer.pad_token_id or 0, on_step)

    def write_examples(
        self,
        examples: Sequence[Example],
        recipe: Recipe,
        seed: int = 0,
        train_a: bool = False,
        pad_id: int = 0,
        on_step: StepCallback | None = None,
    ) -> list[float]:
        """The recipe's epochs x batches over tokenized examples (input_ids, labels).

        With `recipe.stop_loss` set, `recipe.epochs` is a cap: the write stops after the first epoch in
        which every example's loss (its mean over its target tokens, taken in its last step before
        that step's update) is below `stop_loss`.
        """
        schedule = write_schedule(len(examples), recipe, seed)
        if not schedule:
            return []
        pool = self._encode_examples(examples, pad_id)
        return self._optimize([(pool, rows) for rows in schedule], recipe, train_a, on_step, len(examples))

    # --- what differs between the fast path and the PEFT reference
    def _encode_examples(self, examples: Sequence[Example], pad_id: int) -> object:
        return self._encode_batch(collate(examples, pad_id))

    def _encode_batch(self, batch: dict[str, torch.Tensor]) -> object:
        ids, mask, labels = (t.cpu() for t in _check_batch(batch))
        lengths = right_padded_lengths(mask)
        if self._decoder is None or lengths is None:
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}
        return encode_trunk(self._decoder, self.first_layer, ids, lengths, labels, self.device)

    def _plan(self, steps: Sequence[tuple[object, Sequence[int]]], fixed_shapes: bool) -> list[object]:
        """What each step reads, prepared before the first step: a StepBatch on the fast path."""
        schedules: dict[int, tuple[object, list]] = {}  # per pool: fixed shapes span all of its steps
        for pool, rows in steps:
            schedules.setdefault(id(pool), (pool, []))[1].append(rows)
        plans = {
            key: iter(
                plan_steps(pool, schedule, self.device, fixed_shapes)
                if isinstance(pool, TrunkCache)
                else [torch.tensor(rows) for rows in schedule]
            )
            for key, (pool, schedule) in schedules.items()
        }
        return [next(plans[id(pool)]) for pool, _ in steps]

    def _step_losses(self, pool: object, plan: object) -> tuple[torch.Tensor, torch.Tensor]:
        """One step's mean loss [] and each of its rows' mean loss [b], on the device."""
        if isinstance(pool, TrunkCache):
            return adapted_losses(self._decoder, self.first_layer, pool, plan)
        return self._full_forward_losses({k: v[plan] for k, v in pool.items()})

    def _full_forward_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The generic path: the model's own forward on a [B, T] batch, HF's causal-LM loss and each row's."""
        batch = {k: v.to(self.device) for k, v in batch.items()}
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        n, t = batch["labels"].shape
        targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)  # t predicts t + 1
        token = F.cross_entropy(logits.reshape(n * t, -1).float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
        row = torch.arange(n, device=self.device).repeat_interleave(t)
        return token_loss_means(token, targets != IGNORE_INDEX, row, n)

    def _trainable(self) -> tuple[torch.Tensor, ...]:
        nb = self.layout.b_numel
        if self.train_a:
            return (self.buffer, self.grad, self.exp_avg, self.exp_avg_sq)
        return (self.buffer[:nb], self.grad[:nb], self.exp_avg[:nb], self.exp_avg_sq[:nb])

    def _begin_write(self, recipe: Recipe, train_a: bool) -> None:
        if train_a != self.train_a:
            self._bind(train_a)
        self.exp_avg.zero_()
        self.exp_avg_sq.zero_()
        self._sgd_in_backward = recipe.lr if self._applies_sgd_in_backward(recipe, train_a) else None

    def _end_write(self) -> None:
        self._sgd_in_backward = None

    def _applies_sgd_in_backward(self, recipe: Recipe, train_a: bool) -> bool:
        """Plain SGD on B alone: the Triton backward kernel applies B -= lr * dB itself, so no dB is
        materialised and no optimizer step runs. Sound because each MLP runs once per step."""
        return (
            self.backend == "triton"
            and self._fused_act
            and recipe.optimizer == "sgd"
            and recipe.weight_decay == 0
            and not train_a
        )

    def _zero_grad(self) -> None:
        if self._sgd_in_backward is None:
            self.grad.zero_()

    def _update(self, recipe: Recipe, step: int | torch.Tensor) -> None:
        if self._sgd_in_backward is not None:
            return  # the backward kernels already stepped B
        param, grad, exp_avg, exp_avg_sq = self._trainable()
        with torch.no_grad():
            if recipe.optimizer == "sgd":
                self.ops.sgd_step_(param, grad, recipe.lr, recipe.weight_decay)
            else:
                self.ops.adamw_step_(
                    param, grad, exp_avg, exp_avg_sq, step, recipe.lr, **_adamw_defaults(recipe.weight_decay)
                )

    def _snapshot(self) -> None:
        self._last_good.copy_(self.buffer)

    def _rollback(self) -> None:
        with torch.no_grad():
            self.buffer.copy_(self._last_good)
        self._identity = self._is_initial_state()

    def _finite(self) -> bool:
        return bool(torch.isfinite(self.buffer).all())

    def _uses_cuda_graphs(self, steps: Sequence[tuple[object, Sequence[int]]]) -> bool:
        return (
            self.cuda_graphs
            and self.device.type == "cuda"
            and self.backend in ("triton", "torch")
            and all(isinstance(pool, TrunkCache) for pool, _ in steps)
        )

    def _train_step(
        self,
        pool: object,
        plan: object,
        recipe: Recipe,
        step: int | torch.Tensor,
        example_losses: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Zero grad, loss, backward, update: one step; returns the loss (before the update) on the device.

        example_losses [N]: when given, each of the step's rows' own loss is stored at its example index.
        """
        self._zero_grad()
        with torch.enable_grad():  # a write works even when called under torch.no_grad()
            loss, row_losses = self._step_losses(pool, plan)
        loss.backward()
        self._update(recipe, step)
        if example_losses is not None:
            rows = plan.rows if isinstance(plan, StepBatch) else torch.as_tensor(plan).to(self.device)
            example_losses.index_copy_(0, rows, row_losses.detach())
        return loss.detach()

    def _counted_step(
        self,
        pool: object,
        plan: object,
        recipe: Recipe,
        step: torch.Tensor,
        example_losses: torch.Tensor | None = None,
    ) -> torch.Tensor:
        step.add_(1)
        return self._train_step(pool, plan, recipe, step, example_losses)

    def _run_steps(
        self,
        steps: Sequence[tuple[object, Sequence[int]]],
        recipe: Recipe,
        on_step: StepCallback | None = None,
        n_examples: int | None = None,
    ) -> torch.Tensor:
        """Every step of a write -> their losses [n_steps] on the device.

        No host sync inside the loop (unless `on_step` asks for each loss); on CUDA the steps replay
        CUDA graphs (see `cuda_graphs.GraphedSteps`). With `recipe.stop_loss` and `n_examples` (the one
        pool's examples, `recipe.batch_size` per step) the loop reads the examples' losses once per
        epoch and stops after the first epoch in which all are below `stop_loss`.
        """
        graphed = self._uses_cuda_graphs(steps)
        plans = self._plan(steps, fixed_shapes=graphed)
        example_losses, epoch_steps = None, 0
        if recipe.stop_loss is not None and n_examples:
            example_losses = torch.full((n_examples,), math.inf, device=self.device)
            epoch_steps = math.ceil(n_examples / recipe.batch_size)
        if graphed:
            from tmem_runtime.cuda_graphs import GraphedSteps

            step_t = torch.zeros((), dtype=torch.float32, device=self.device)  # counted inside the graph
            graphs = {
                id(pool): GraphedSteps(
                    partial(self._counted_step, pool, recipe=recipe, step=step_t, example_losses=example_losses)
                )
                for pool, _ in steps
            }
        losses = []
        self._identity = False
        for k, ((pool, _), plan) in enumerate(zip(steps, plans), start=1):
            if graphed:
                loss = graphs[id(pool)](plan.signature, plan)
            else:
                loss = self._train_step(pool, plan, recipe, k, example_losses)
            losses.append(loss)
            if on_step is not None:
                on_step(k, len(steps), float(loss))
            if epoch_steps and k % epoch_steps == 0 and float(example_losses.max()) < recipe.stop_loss:
                break  # every example has reached the recipe's loss: the write's one host read per epoch
        return torch.stack(losses)

    def _optimize(
        self,
        steps: Sequence[tuple[object, Sequence[int]]],
        recipe: Recipe,
        train_a: bool,
        on_step: StepCallback | None = None,
        n_examples: int | None = None,
    ) -> list[float]:
        """Run a write's steps (pool, rows); a non-finite loss or update rolls the whole write back and raises.

        n_examples: the examples of the one pool `write_examples` built (the early stop of `_run_steps`).
        """
        if recipe.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {recipe.optimizer!r}")
        if not steps:
            return []
        self._begin_write(recipe, train_a)
        self._snapshot()
        try:
            losses = self._run_steps(steps, recipe, on_step, n_examples).tolist()  # the loop's results, read once
        except BaseException:
            self._rollback()  # an error mid-write (or an interrupt) leaves the adapter as it was
            raise
        finally:
            self._end_write()
        bad = next((k for k, v in enumerate(losses, start=1) if not math.isfinite(v)), None)
        if bad is not None or not self._finite():
            self._rollback()
            what = f"loss {losses[bad - 1]}" if bad is not None else "a non-finite update"
            raise NonFiniteLossError(
                f"write step {bad or len(losses)} produced {what}; the adapter was rolled back to its state "
                "before this write"
            )
        return losses


def _own_version(view: torch.Tensor) -> torch.Tensor:
    """A tensor on `view`'s memory (same shape and strides) with a fresh autograd version counter."""
    alias = torch.empty(0, dtype=view.dtype, device=view.device)
    return alias.set_(view.untyped_storage(), view.storage_offset(), view.shape, view.stride())


def _check_batch(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate a write batch: input_ids/attention_mask/labels, same [B, T] shape, some labels kept."""
    missing = [k for k in ("input_ids", "labels") if k not in batch]
    if missing:
        raise ValueError(f"write batch is missing {missing}; expected input_ids, attention_mask, labels [B, T]")
    ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    if ids.dim() != 2 or ids.shape != labels.shape or ids.shape != mask.shape:
        raise ValueError(
            f"write batch shapes differ: input_ids {tuple(ids.shape)}, attention_mask {tuple(mask.shape)}, "
            f"labels {tuple(labels.shape)}; all must be [B, T]"
        )
    if not bool((labels[:, 1:] != IGNORE_INDEX).any()):
        raise ValueError("write batch has no trainable token: every label (after the shift) is -100")
    return ids, mask, labels
