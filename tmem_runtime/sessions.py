"""What every session store offers on top of its own write: flashcards, text, batches, files.

`SessionStore` turns the user-facing writes (flashcards through the chat template, plain text, HF
batches) into one call of the store's `_write(sessions, batch, schedules, recipe, train_a, on_step)`:
one padded batch of every session's examples and, per session, the batch rows of each of its steps.
`SessionPool` (the kernels' engine) and `PeftReferencePool` (the PEFT reference) implement `_write`,
the session table and the state; both inherit the rest from here, so the two paths see exactly the
same tokens, batches and schedules. A write runs with dropout off (the model in eval mode for its
duration, every module's mode restored after): a write is a function of its cards and its seed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from tmem_kernels.autocast import autocast_off
from tmem_runtime.adapter_file import AdapterFileError, read_adapter, save_adapter
from tmem_runtime.engine import FastWeightsError
from tmem_runtime.examples import Example, check_examples, collate, qa_examples, text_examples, write_schedule
from tmem_runtime.recipes import Recipe, get_recipe
from tmem_runtime.trainer import StepCallback
from tmem_runtime.write import IGNORE_INDEX

Schedules = list[list[list[int]]]  # per session, per step: rows of the write's batch


class WriteError(FastWeightsError):
    """Some sessions of a batched write were rolled back; the others were committed.

    `errors`: session -> the error that rolled it back. `losses`: session -> per-step losses of the
    committed ones.
    """

    def __init__(self, errors: dict[str, FastWeightsError], losses: dict[str, list[float]]) -> None:
        self.errors, self.losses = errors, losses
        detail = "; ".join(f"{s}: {e}" for s, e in errors.items())
        super().__init__(f"{len(errors)} of {len(errors) + len(losses)} sessions rolled back ({detail})")


@dataclass
class SessionStats:
    """What one session has been through since it was opened (or last reset)."""

    writes: int = 0
    steps: int = 0
    cards: int = 0
    truncated_cards: int = 0  # cards longer than max_length whose question was cut to fit
    rollbacks: int = 0

    def count_write(self, steps: int, failed: bool) -> None:
        """A write of `steps` steps committed (failed: rolled back instead)."""
        if failed:
            self.rollbacks += 1
        else:
            self.writes, self.steps = self.writes + 1, self.steps + steps


class SessionVersions:
    """Per session a number that changes whenever its fast weights may have changed and is never reused
    (e.g. to key what was computed from them). Not locked: its owner's lock guards it."""

    def __init__(self) -> None:
        self._of: dict[str, int] = {}
        self._last = 0

    def of(self, session: str) -> int:
        """The session's version (a new one for a session not seen yet)."""
        if session not in self._of:
            self.bump([session])
        return self._of[session]

    def bump(self, sessions: Iterable[str] | None = None) -> None:
        """New versions for `sessions` (None: every session seen)."""
        for s in list(self._of) if sessions is None else sessions:
            self._last += 1
            self._of[s] = self._last

    def forget(self, session: str) -> None:
        self._of.pop(session, None)


class SessionStore:
    """The write API shared by the session stores (see the module docstring)."""

    stats: dict[str, SessionStats]
    model: nn.Module

    # ---------------------------------------------------------------- what a store implements
    def _write(
        self,
        sessions: list[str],
        batch: dict[str, torch.Tensor] | None,
        schedules: Schedules,
        recipe: Recipe,
        train_a: bool,
        on_step: StepCallback | None,
    ) -> dict[str, list[float]]:
        raise NotImplementedError

    def metadata(self) -> dict[str, str]:
        raise NotImplementedError

    def state_dict(self, session: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def load_state_dict(self, session: str, state: Mapping[str, torch.Tensor], own_a: bool = False) -> None:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    # ---------------------------------------------------------------- writes
    def _train(self, *write_args) -> dict[str, list[float]]:
        """`_write(*write_args)` with dropout off and any enclosing torch.autocast off (a write computes in the
        model's own dtype, B and its optimizer state in fp32, on every backend), once the batch's tokens are
        known to fit the model."""
        batch = write_args[1]
        if batch is not None:
            check_token_range(batch, self.model)
        with eval_mode(self.model), autocast_off(self.device.type):
            return self._write(*write_args)

    def write_examples_many(
        self,
        examples: Mapping[str, Sequence[Example]],
        recipe: str | Recipe = "default",
        seed: int = 0,
        pad_id: int = 0,
        train_a: bool = False,
        on_step: StepCallback | None = None,
    ) -> dict[str, list[float]]:
        """Train each session's tokenized examples (input_ids, labels) in one batched write: the
        recipe's epochs x batches per session, seeded as a write of that session alone. Returns each
        session's per-step losses; WriteError if some sessions were rolled back (the rest committed)."""
        recipe = get_recipe(recipe)
        names = list(examples)
        for s in names:
            check_examples(examples[s], f"session {s!r}")
        schedules, offset = [], 0
        for s in names:
            schedules.append([[offset + i for i in rows] for rows in write_schedule(len(examples[s]), recipe, seed)])
            offset += len(examples[s])
        flat = [ex for s in names for ex in examples[s]]
        return self._train(names, collate(flat, pad_id) if flat else None, schedules, recipe, train_a, on_step)

    def write_qa_many(
        self,
        tokenizer: PreTrainedTokenizerBase,
        pairs: Mapping[str, Sequence[tuple[str, str]]],
        recipe: str | Recipe = "default",
        seed: int = 0,
        loss_on: str = "answer",
        train_a: bool = False,
        on_step: StepCallback | None = None,
    ) -> dict[str, list[float]]:
        """(question, answer) flashcards of several sessions in one batched write, chat-templated, loss
        on the answers by default (see write_examples_many). Cards longer than recipe.max_length keep
        their answer; their question is cut (warned, and counted in `stats` with the cards, once the
        session's write committed: a rolled-back write counts none)."""
        check_tokenizer(tokenizer)
        recipe = get_recipe(recipe)
        pairs = {s: list(p) for s, p in pairs.items()}  # (any iterable of pairs: a generator is read once)
        encoded = {s: qa_examples(tokenizer, p, loss_on, recipe.max_length) for s, p in pairs.items()}
        for s, (_, cut) in encoded.items():
            _warn_cut(s, cut, recipe.max_length)
        examples = {s: ex for s, (ex, _) in encoded.items()}
        committed: Mapping[str, list[float]] = {}  # the sessions whose write committed count their cards
        try:
            committed = losses = self.write_examples_many(examples, recipe, seed, pad_id(tokenizer), train_a, on_step)
        except WriteError as exc:
            committed = exc.losses
            raise
        finally:
            self._count_cards({s: (len(pairs[s]), encoded[s][1]) for s in committed})
        return losses

    def write_qa(
        self,
        session: str,
        tokenizer: PreTrainedTokenizerBase,
        pairs: Sequence[tuple[str, str]],
        recipe: str | Recipe = "default",
        seed: int = 0,
        loss_on: str = "answer",
        train_a: bool = False,
        on_step: StepCallback | None = None,
    ) -> list[float]:
        """One session's flashcards; its per-step losses (an empty list of pairs is zero steps)."""
        return self.write_qa_many(tokenizer, {session: pairs}, recipe, seed, loss_on, train_a, on_step)[session]

    def write_text(
        self,
        session: str,
        tokenizer: PreTrainedTokenizerBase,
        texts: Sequence[str],
        recipe: str | Recipe = "default",
        seed: int = 0,
        on_step: StepCallback | None = None,
    ) -> list[float]:
        """Next-token training on plain texts (all tokens), cut into recipe.max_length windows."""
        check_tokenizer(tokenizer)
        if isinstance(texts, str):
            raise ValueError("write_text takes a list of strings, got one string (wrap it: [text])")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"text {i} is not a string: {t!r:.80}")
        recipe = get_recipe(recipe)
        examples = [ex for t in texts if t.strip() for ex in text_examples(tokenizer, t, recipe.max_length)]
        return self.write_examples_many({session: examples}, recipe, seed, pad_id(tokenizer), on_step=on_step)[session]

    def write(
        self,
        session: str,
        batches: Iterable[dict[str, torch.Tensor]],
        lr: float = 5e-4,
        optimizer: str = "sgd",
        train_a: bool = False,
        weight_decay: float = 0.0,
        on_step: StepCallback | None = None,
        recipe: Recipe | None = None,
    ) -> list[float]:
        """One optimizer step per HF-style batch (input_ids, attention_mask, labels, each [B, T];
        labels unshifted, -100 where ignored). `recipe` (optional) overrides lr / optimizer /
        weight_decay and sets the divergence guard."""
        if isinstance(batches, Mapping):
            raise TypeError("write takes a list of batches (one step each), got one batch: wrap it, [batch]")
        recipe = recipe or Recipe(optimizer=optimizer, lr=lr, weight_decay=weight_decay)
        batch, schedule = concat_batches(list(batches))
        return self._train([session], batch, [schedule], recipe, train_a, on_step)[session]

    def _count_cards(self, written: Mapping[str, tuple[int, int]]) -> None:
        """Add {session: (cards, cards cut)} of committed writes to the sessions' stats."""
        for session, (cards, cut) in written.items():
            st = self.stats.get(session)
            if st is not None:
                st.cards, st.truncated_cards = st.cards + cards, st.truncated_cards + cut

    # ---------------------------------------------------------------- files
    def save(self, session: str, path: str | os.PathLike) -> None:
        """Write the session's adapter to one safetensors file atomically (see adapter_file)."""
        save_adapter(path, self.state_dict(session), self.metadata())

    def load(self, session: str, path: str | os.PathLike, own_a: bool = False) -> None:
        """Load a file written by `save` (by any process, from any path, for the same model weights)
        into a session; on any mismatch or corruption nothing changes (AdapterFileError). own_a: see
        `load_state_dict` (the file's A, e.g. trained, replaces the store's)."""
        tensors = read_adapter(Path(path), self.metadata(), self.device)
        try:
            self.load_state_dict(session, tensors, own_a)
        except ValueError as exc:
            raise AdapterFileError(f"adapter file {path}: {exc}") from exc


def _warn_cut(session: str, cut: int, max_length: int) -> None:
    if cut:
        warnings.warn(
            f"{cut} flashcard(s) of session {session!r} were longer than max_length={max_length}: "
            "their questions were cut to fit (answers kept whole)",
            stacklevel=4,
        )


def check_tokenizer(tokenizer: object) -> None:
    """TypeError for no tokenizer (load_model of a tiny-/shapes- model returns None for it)."""
    if tokenizer is None:
        raise TypeError(
            "flashcard and text writes need the model's tokenizer, got None; "
            "load_model('tiny-...') and load_model('shapes-...') (random weights) return none: write token "
            "batches to them with write(), or pass a tokenizer whose ids fit the model's vocabulary"
        )


def check_batch(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate a write batch: input_ids/attention_mask/labels integer tensors (the mask: any dtype) of one
    [B, T] shape, some labels kept, every row with a token its mask keeps. Returns (input_ids, attention_mask,
    labels), the ids and labels as int64 (int32 ones, e.g. from numpy, as the loss takes them)."""
    missing = [k for k in ("input_ids", "labels") if k not in batch]
    if missing:
        raise ValueError(f"write batch is missing {missing}; expected input_ids, attention_mask, labels [B, T]")
    ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids) if isinstance(ids, torch.Tensor) else None
    for name, t in (("input_ids", ids), ("attention_mask", mask), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"write batch {name} must be a torch.Tensor [B, T], got {type(t).__name__}")
        if name != "attention_mask" and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
            raise TypeError(f"write batch {name} must hold integers (token ids), got {t.dtype}")
    if ids.dim() != 2 or ids.shape != labels.shape or ids.shape != mask.shape:
        raise ValueError(
            f"write batch shapes differ: input_ids {tuple(ids.shape)}, attention_mask {tuple(mask.shape)}, "
            f"labels {tuple(labels.shape)}; all must be [B, T]"
        )
    if not bool((labels[:, 1:] != IGNORE_INDEX).any()):
        raise ValueError("write batch has no trainable token: every label (after the shift) is -100")
    empty = (~mask.bool().any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"write batch rows {empty[:8]} have no token: their attention_mask is all 0")
    return ids.long(), mask, labels.long()


def check_token_range(batch: dict[str, torch.Tensor], model: nn.Module) -> None:
    """ValueError unless the batch's input ids are in the model's vocabulary and its labels are -100 or
    in its output vocabulary (else the embedding or the loss fails deep inside the write, unexplained)."""
    vocab = model.get_input_embeddings().num_embeddings
    ids, labels = batch["input_ids"], batch["labels"]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        bad = ids[(ids < 0) | (ids >= vocab)][0]
        raise ValueError(f"write batch input id {int(bad)} is outside the model's vocabulary of {vocab} tokens "
                         "(a tokenizer of another model?)")
    head = model.get_output_embeddings()
    classes = head.weight.shape[0] if head is not None else vocab
    kept = labels[labels != IGNORE_INDEX]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= classes):
        bad = kept[(kept < 0) | (kept >= classes)][0]
        raise ValueError(f"write batch label {int(bad)} is neither -100 (ignored) nor one of the model's "
                         f"{classes} output tokens")


def concat_batches(batches: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor] | None, list]:
    """Distinct batch objects stacked into one batch (right padded to the longest: a causal model's
    real tokens are unchanged by padding after them) and each step's rows in it."""
    if not batches:
        return None, []
    distinct: dict[int, tuple[int, dict]] = {}
    rows = 0
    for b in batches:
        if id(b) not in distinct:
            ids, mask, labels = (t.detach().cpu().clone() for t in check_batch(b))
            distinct[id(b)] = (rows, {"input_ids": ids, "attention_mask": mask, "labels": labels})
            rows += ids.shape[0]
    width = max(d["input_ids"].shape[1] for _, d in distinct.values())
    fill = {"input_ids": 0, "attention_mask": 0, "labels": IGNORE_INDEX}
    data = {
        k: torch.cat([torch.nn.functional.pad(d[k], (0, width - d[k].shape[1]), value=v) for _, d in distinct.values()])
        for k, v in fill.items()
    }
    schedule = []
    for b in batches:
        start, d = distinct[id(b)]
        schedule.append(list(range(start, start + d["input_ids"].shape[0])))
    return data, schedule


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode inside the block, each module's own mode restored after. A model already in
    eval mode is not touched (no flag is written: forwards on other threads see nothing change)."""
    training = [m for m in model.modules() if m.training]
    for m in training:
        m.training = False
    try:
        yield
    finally:
        for m in training:
            m.training = True
