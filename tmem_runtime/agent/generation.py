"""Text in, text out: the one place the agent tokenises, counts tokens and generates (greedy).

`Generator` wraps a transformers causal LM and its tokenizer. Everything the agent and the harness
feed the model goes through it, so its counters are the run's "tokens processed": `counts` (tokens
actually run through the model: a shared prefix counts once) and `stats` (tokens and seconds in
prefill and in decode steps). Generation is the runtime's batched shared-prefix greedy decoder
(`tmem_runtime.decoding`): the part of a batch's prompts they all share is prefilled once. It works
on any device/dtype the model is on (CPU fp32, CUDA bf16, ...).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tmem_runtime.decoder import supports_piecewise
from tmem_runtime.decoding import DecodeStats, Prefix, RowBinding, common_prefix_length, greedy_generate, prefill
from tmem_runtime.examples import check_unicode

if TYPE_CHECKING:
    from tmem_runtime.pool import SessionPool

_SPLIT = "\u241e"  # where split_chat_prompt cuts (the last one: conversation text may hold it too)
_LINE_DONE = re.compile(r"\S[^\n]*\n")


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], prefill: str = "") -> str:
    """The chat template rendered with the assistant turn opened (and `prefill` already written)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefill


@dataclass
class TokenCounts:
    prefilled: int = 0
    generated: int = 0


class Generator:
    """Greedy generation, chat prompts and token counting for one model.

    `window`: the model's context length in tokens (config.max_position_embeddings unless given).
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, window: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.window = int(window or getattr(model.config, "max_position_embeddings", 2048))
        self.counts = TokenCounts()
        self.stats = DecodeStats()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = self._eos_ids()
        self._line_ids: list[int] | None = None
        self._prefixes: dict[tuple[str, tuple[int, ...]], Prefix] = {}

    def _eos_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id and tid >= 0:
                ids.add(tid)
        return sorted(i for i in ids if i is not None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added. ValueError if `text` is not valid unicode (a lone
        surrogate, as JSON can hold: the tokenizer's own error names nothing)."""
        check_unicode(text)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text)) if text else 0

    def keep_last_tokens(self, text: str, max_tokens: int) -> str:
        """The most recent part of `text` that fits in `max_tokens` tokens (cut at a line start if possible).

        A cut inside a character (byte-level tokens split an emoji or a CJK character) moves past it: the
        part kept is always text of `text`, never a U+FFFD standing for the bytes cut off."""
        ids = self.encode(text)
        if len(ids) <= max_tokens:
            return text
        start = len(ids) - max_tokens
        tail = self.tokenizer.decode(ids[start:])
        while tail.startswith("\ufffd") and not text.endswith(tail) and start < len(ids):
            start += 1
            tail = self.tokenizer.decode(ids[start:])
        newline = tail.find("\n")
        return tail[newline + 1 :] if 0 <= newline < len(tail) // 4 else tail

    def chat_prompt(self, messages: list[dict[str, str]], prefill: str = "") -> str:
        """The chat template rendered with the assistant turn opened (and `prefill` already written)."""
        return chat_prompt(self.tokenizer, messages, prefill)

    def chat_preamble(self) -> list[int]:
        """Token ids every chat prompt opening with a user message starts with (the template's default
        system text and the user header; [] when there is none)."""
        probes = [self.encode(self.chat_prompt([{"role": "user", "content": c}])) for c in ("Yes?", "No.")]
        return probes[0][: common_prefix_length(probes)]

    def split_chat_prompt(self, messages: list[dict[str, str]], marker: str) -> tuple[str, str]:
        """Render `messages` and cut the text at `marker` (its last occurrence in the last message, removed).

        Returns (prefix, suffix): the prefix is shared across questions (KV-cached once). The text before
        the marker may hold the marker, or the cut's own U+241E, as conversation text can: the cut is at the
        last of each.
        """
        content = messages[-1]["content"]
        if marker not in content:
            raise ValueError("marker not found in the last message")
        at = content.rindex(marker)
        last = dict(messages[-1], content=content[:at] + _SPLIT + content[at + len(marker) :])
        prefix, suffix = self.chat_prompt(messages[:-1] + [last]).rsplit(_SPLIT, 1)
        return prefix, suffix

    def line_ids(self) -> list[int]:
        """Every token whose text holds a newline."""
        if self._line_ids is None:
            texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
            self._line_ids = [i for i, t in enumerate(texts) if "\n" in t]
        return self._line_ids

    def _first_line_done(self, ids: list[int]) -> bool:
        """True once the text holds a complete non-blank first line (what `clean_answer` keeps)."""
        return "\n" in self.tokenizer.decode(ids[-1:]) and bool(_LINE_DONE.search(self.tokenizer.decode(ids)))

    def prefix(self, ids: list[int], weights: str | None = None) -> Prefix:
        """`ids` prefilled once. weights: a name for the model's current weights (e.g. "base"): the
        prefix is kept and reused by later calls naming the same weights; the caller vouches that the
        weights are the same then. None: not kept."""
        key = (weights or "", tuple(ids))
        if weights is not None and key in self._prefixes:
            return self._prefixes[key]
        before = self.stats.prefill_tokens
        pre = prefill(self.model, ids, stats=self.stats)
        self.counts.prefilled += self.stats.prefill_tokens - before
        if weights is not None:
            self._prefixes[key] = pre
        return pre

    def generate_ids(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        batch_size: int = 32,
        shared: list[int] | None = None,
        weights: str | None = None,
        stop: str | None = None,
    ) -> list[str]:
        """Greedy continuations of token-id prompts, decoded to text.

        shared: token ids every prompt starts with, prefilled once (kept across calls under
        `weights`, see `prefix`); None: the prompts' longest common prefix. stop: None (EOS or
        max_new_tokens), "line" (also at any token holding a newline: the first line is final) or
        "answer" (also once a non-blank first line is complete).
        """
        return self._texts(self.generate_tokens(prompts, max_new_tokens, batch_size, shared, weights, stop))

    def generate_tokens(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        batch_size: int = 32,
        shared: list[int] | None = None,
        weights: str | None = None,
        stop: str | None = None,
        bind: RowBinding | None = None,
    ) -> list[list[int]]:
        """The new token ids of each prompt (see `generate_ids`; the ending token kept). bind: every
        forward runs inside bind(indices of its rows) (`decoding.RowBinding`, e.g. a different
        fast-weight session per row); with a binding nothing is prefilled outside it (`shared` unused)."""
        if not prompts:
            return []
        pre = None
        if bind is None and shared and self._piecewise and all(len(p) > len(shared) and p[: len(shared)] == shared
                                                               for p in prompts):
            pre = self.prefix(shared, weights)
        return self._decode_tokens(prompts, pre, max_new_tokens, batch_size, stop, bind)

    def _texts(self, rows: list[list[int]]) -> list[str]:
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in rows]

    def _decode_tokens(self, prompts: list[list[int]], prefix: Prefix | list[Prefix | None] | None,
                       max_new_tokens: int, batch_size: int, stop: str | None,
                       bind: RowBinding | None = None) -> list[list[int]]:
        """greedy_generate with this generator's stops and counters; the new token ids of each prompt."""
        before = (self.stats.prefill_tokens, self.stats.decode_tokens)
        new = greedy_generate(
            self.model, prompts, max_new_tokens, self.eos_ids, prefix=prefix, batch_size=batch_size,
            stop_ids=self.line_ids() if stop == "line" else (),
            stop=self._first_line_done if stop == "answer" else None, stats=self.stats, pad_id=self.pad_id,
            bind=bind,
        )
        self.counts.prefilled += self.stats.prefill_tokens - before[0]
        self.counts.generated += self.stats.decode_tokens - before[1]
        return new

    @property
    def _piecewise(self) -> bool:
        return supports_piecewise(self.model)

    def generate(self, prompts: list[str], max_new_tokens: int, batch_size: int = 32, shared: str | None = None,
                 weights: str | None = None, stop: str | None = None) -> list[str]:
        """Greedy continuations of text prompts (see `generate_ids`; `shared` is text here).

        Prompts are tokenised whole, so the model sees the same ids whether or not a prefix is shared.
        """
        ids = [self.encode(p) for p in prompts]
        return self.generate_ids(ids, max_new_tokens, batch_size, self.encode(shared) if shared else None,
                                 weights, stop)

    def generate_after_prefix(self, prefix: str, suffixes: list[str], max_new_tokens: int, batch_size: int = 32,
                              stop: str | None = None) -> list[str]:
        """Greedy continuations of `prefix + s` for each s: the ids of `prefix` then the ids of `s`.

        The prefix is prefilled once and shared by every row of every batch.
        """
        shared = self.encode(prefix)
        rows = [shared + self.encode(s) for s in suffixes]
        return self.generate_ids(rows, max_new_tokens, batch_size, shared or None, stop=stop)

    def generate_for_sessions(self, pool: SessionPool, jobs: Sequence[tuple[str | None, str, Sequence[str]]],
                              max_new_tokens: int, batch_size: int = 32, stop: str | None = None) -> list[list[str]]:
        """Each job (session, prefix, suffixes) continued as `generate_after_prefix(prefix, suffixes)` with the
        model reading only that session of `pool` (None: the bare model): every job's rows in one batched
        decode, a different memory per row (`pool.rows`). Each prefix is prefilled once, under its session.
        Returns one list of continuations per job.
        """
        prompts, prefixes, sessions, sizes = [], [], [], []
        for session, prefix, suffixes in jobs:
            shared = self.encode(prefix)
            pre = None
            if shared and suffixes and self._piecewise:
                with pool.rows([session]):
                    pre = self.prefix(shared)
            for s in suffixes:
                prompts.append(shared + self.encode(s))
                prefixes.append(pre)
                sessions.append(session)
            sizes.append(len(suffixes))
        if not prompts:
            return [[] for _ in jobs]
        texts = self._texts(self._decode_tokens(prompts, prefixes, max_new_tokens, batch_size, stop,
                                                bind=lambda rows: pool.rows([sessions[i] for i in rows])))
        starts = [sum(sizes[:j]) for j in range(len(sizes))]
        return [texts[a : a + n] for a, n in zip(starts, sizes)]
