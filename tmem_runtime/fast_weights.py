"""FastWeights: one session of fast weights on a model, the simplest way to use tmem.

    fw = FastWeights(model)                      # attach in place: A0 = S_r V_r^T (frozen), B0 = 0
    fw.write_qa(tokenizer, [(q, a), ...])        # train flashcards into B; writes accumulate
    model.generate(...)                          # every forward reads the memory
    fw.reset()                                   # episode boundary: back to the fresh attach state
    fw.save(path); fw.load(path)                 # one safetensors file, atomic save
    fw.detach()                                  # the model exactly as it was

It is a one-session view of the same engine that serves many sessions: a `SessionPool` of capacity 1
whose one session every forward reads (see pool.py). `backend="peft"` puts the PEFT reference store
(peft_reference.py) behind the same calls instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tmem_runtime.engine import FastWeightsError
from tmem_runtime.examples import Example
from tmem_runtime.layout import AdapterLayout
from tmem_runtime.pool import SessionPool
from tmem_runtime.recipes import Recipe
from tmem_runtime.sessions import SessionStats, SessionStore
from tmem_runtime.trainer import StepCallback

SESSION = "default"


def fast_weights_of(model: PreTrainedModel) -> FastWeights | SessionPool | None:
    """The FastWeights (or SessionPool) attached to `model`, e.g. to a copy made by copy.deepcopy."""
    return getattr(model, "_tmem_fast_weights", None)


class FastWeights:
    """Fast weights on `gate_proj`/`up_proj`/`down_proj` of the last `num_layers` decoder layers
    (or of the layer indices given as a sequence, e.g. four middle layers).

    model: a transformers causal LM (modified in place until `detach()`). rank: LoRA rank r.
    init: "svd" (TMEM: A = S_r V_r^T frozen, B = 0), "random" (Kaiming A, B = 0) or "pissa"
    (A = sqrt(S_r) V_r^T, B = U_r sqrt(S_r), base weight replaced by the residual, restored exactly).
    backend: "auto" | "triton" | "native" | "torch" | "peft" (reference). svd: "randomized" | "exact".
    cuda_graphs: on a CUDA device, replay each write's steps as CUDA graphs (fast path only).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        rank: int = 6,
        num_layers: int | Sequence[int] = 4,
        init: str = "svd",
        backend: str = "auto",
        svd: str = "randomized",
        scaling: float = 1.0,
        seed: int = 0,
        cuda_graphs: bool = True,
    ) -> None:
        self.store: SessionStore
        if backend == "peft":
            from tmem_runtime.peft_reference import PeftReferencePool

            self.store = PeftReferencePool(model, rank, num_layers, init, svd, scaling, seed)
        else:
            self.store = SessionPool(model, 1, rank, num_layers, init, backend, svd, scaling, seed, cuda_graphs)
        self.store.open(SESSION)
        if isinstance(self.store, SessionPool):  # every forward reads the one session's row, pinned for good
            (slot,) = self.store.residency.acquire([SESSION])
            self.store.engine.bindings.default = self.store.engine.bindings.all_rows(slot)
        self.model = model
        self.rank, self.num_layers, self.init, self.scaling, self.seed = rank, num_layers, init, scaling, seed
        self._detached = False
        model._tmem_fast_weights = self  # copy.deepcopy(model) copies this handle with the model

    # ---------------------------------------------------------------- what it is
    @property
    def backend(self) -> str:
        return self.store.engine.backend if isinstance(self.store, SessionPool) else "peft"

    @property
    def layout(self) -> AdapterLayout:
        return self.store.layout

    @property
    def device(self) -> torch.device:
        return self.store.device

    @property
    def mlps(self) -> list:
        return self.store.engine.mlps if isinstance(self.store, SessionPool) else self.store.mlps

    @property
    def stats(self) -> SessionStats:
        """Writes, steps, cards, truncated cards and rollbacks since attach (or the last reset)."""
        return self.store.stats[SESSION]

    def metadata(self) -> dict[str, str]:
        """What identifies this adapter: format, architecture, base-weight hash, init, layout."""
        return self.store.metadata()

    def _check(self) -> None:
        if self._detached:
            raise FastWeightsError("these fast weights were detached from their model; attach new ones")

    # ---------------------------------------------------------------- writes
    def write(
        self,
        batches: Iterable[dict[str, torch.Tensor]],
        lr: float = 5e-4,
        optimizer: str = "sgd",
        train_a: bool = False,
        weight_decay: float = 0.0,
        on_step: StepCallback | None = None,
        recipe: Recipe | None = None,
    ) -> list[float]:
        """One optimizer step per batch; returns each step's loss (before its update).

        batches: dicts with "input_ids", "attention_mask", "labels", each [B, T] (labels unshifted,
        -100 where ignored). A batch object seen twice (epochs) reuses its trunk pass.
        `on_step(step, n_steps, loss)` is called after every step (progress bars). `recipe`, if given,
        replaces lr / optimizer / weight_decay (and sets the divergence guard, see Recipe).
        """
        self._check()
        return self.store.write(SESSION, batches, lr, optimizer, train_a, weight_decay, on_step, recipe)

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

        Returns the per-step losses; an empty pair list is zero steps. A card longer than
        recipe.max_length keeps its answer and has its question cut (counted in `stats`, warned).
        """
        self._check()
        return self.store.write_qa(SESSION, tokenizer, pairs, recipe, seed, loss_on, train_a, on_step)

    def write_text(
        self,
        tokenizer: PreTrainedTokenizerBase,
        texts: Sequence[str],
        recipe: str | Recipe = "default",
        seed: int = 0,
        on_step: StepCallback | None = None,
    ) -> list[float]:
        """Next-token training on plain texts (all tokens), cut into recipe.max_length windows."""
        self._check()
        return self.store.write_text(SESSION, tokenizer, texts, recipe, seed, on_step)

    def write_examples(
        self,
        examples: Sequence[Example],
        recipe: str | Recipe = "default",
        seed: int = 0,
        train_a: bool = False,
        pad_id: int = 0,
        on_step: StepCallback | None = None,
    ) -> list[float]:
        """The recipe's epochs x batches over tokenized examples (input_ids, labels)."""
        self._check()
        return self.store.write_examples_many({SESSION: examples}, recipe, seed, pad_id, train_a, on_step)[SESSION]

    # ---------------------------------------------------------------- state
    def reset(self) -> None:
        """Back to the fresh attach state of B (B = B0), as at an episode boundary. A is left as it is: only
        a `train_a` write changes it, and putting it back is the caller's (`store.engine.set_a`)."""
        self._check()
        self.store.reset(SESSION)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A snapshot: {"layers.L.mlp.T.lora_A": [r, in], "...lora_B": [out, r]}."""
        self._check()
        return self.store.state_dict(SESSION)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Hot swap: validate every tensor, then copy into the existing buffers (no reallocation); an A
        other than this one's (trained by a `train_a` write) is loaded too. A mismatched or non-finite state
        raises AdapterFileError and changes nothing."""
        from tmem_runtime.adapter_file import AdapterFileError

        self._check()
        try:
            self.store.load_state_dict(SESSION, state, own_a=True)
        except ValueError as exc:
            raise AdapterFileError(str(exc)) from exc

    def save(self, path: str | os.PathLike) -> None:
        """Write the adapter to one safetensors file atomically (temp file + rename)."""
        self._check()
        self.store.save(SESSION, path)

    def load(self, path: str | os.PathLike) -> None:
        """Load a file written by `save` (any path, any host, same model weights; its A too, where a
        `train_a` write trained it); on any mismatch or corruption nothing changes (AdapterFileError)."""
        self._check()
        self.store.load(SESSION, path, own_a=True)

    def reading(self) -> AbstractContextManager[None]:
        """A block in which this thread's forwards see the fast weights unchanged: a write, swap or reset
        from another thread waits for it to end (generate() and each plain forward are such blocks)."""
        self._check()
        return self.store.reading() if isinstance(self.store, SessionPool) else nullcontext()

    def detach(self) -> PreTrainedModel:
        """Remove the fast weights; the model is exactly as it was before attach. Returns it."""
        if self._detached:
            raise FastWeightsError("these fast weights were already detached")
        self._detached = True
        self.model = self.store.detach()
        return self.model
