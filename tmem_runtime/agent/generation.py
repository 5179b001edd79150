"""Text in, text out: the one place the agent tokenises, counts tokens and generates (greedy).

`Generator` wraps a transformers causal LM and its tokenizer. Everything the agent and the harness
feed the model goes through it, so its counters (`tokens_prefilled`, `tokens_generated`) are the
run's "tokens processed". It works on any device/dtype the model is on (CPU fp32, CUDA bf16, ...).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from tmem_runtime.chat import generate_greedy

# transformers >= 5.2x renames `past_key_values` to `cache`; older 5.x (the GPU image) only knows the former
warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*", category=FutureWarning)

_SPLIT = "\u241e"  # a marker that never occurs in conversation text


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
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = self._eos_ids()

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
        """Token ids of `text`, no special tokens added."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text)) if text else 0

    def keep_last_tokens(self, text: str, max_tokens: int) -> str:
        """The most recent part of `text` that fits in `max_tokens` tokens (cut at a line start if possible)."""
        ids = self.encode(text)
        if len(ids) <= max_tokens:
            return text
        tail = self.tokenizer.decode(ids[len(ids) - max_tokens :])
        newline = tail.find("\n")
        return tail[newline + 1 :] if 0 <= newline < len(tail) // 4 else tail

    def chat_prompt(self, messages: list[dict[str, str]], prefill: str = "") -> str:
        """The chat template rendered with the assistant turn opened (and `prefill` already written)."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + prefill

    def split_chat_prompt(self, messages: list[dict[str, str]], marker: str) -> tuple[str, str]:
        """Render `messages` and cut the text at `marker` (a substring of the last message, removed).

        Returns (prefix, suffix): the prefix is shared across questions (KV-cached once).
        """
        if marker not in messages[-1]["content"]:
            raise ValueError("marker not found in the last message")
        last = dict(messages[-1], content=messages[-1]["content"].replace(marker, _SPLIT, 1))
        prefix, suffix = self.chat_prompt(messages[:-1] + [last]).split(_SPLIT, 1)
        return prefix, suffix

    def generate(self, prompts: list[str], max_new_tokens: int, batch_size: int = 8) -> list[str]:
        """Greedy continuations of `prompts` (left-padded batches of `batch_size`)."""
        outputs: list[str] = []
        for b in range(0, len(prompts), batch_size):
            batch = [self.encode(p) for p in prompts[b : b + batch_size]]
            new = generate_greedy(self.model, batch, max_new_tokens, self.pad_id, self.eos_ids)
            self.counts.prefilled += sum(len(ids) for ids in batch)
            for row in new:
                self.counts.generated += int((row != self.pad_id).sum())
                outputs.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return outputs

    @torch.no_grad()
    def generate_after_prefix(
        self, prefix: str, suffixes: list[str], max_new_tokens: int, progress: bool = False
    ) -> list[str]:
        """Greedy continuations of `prefix + s` for each s, prefilling the shared prefix once.

        The prefix's KV cache is computed once and copied for each suffix (batch 1 per suffix, so no
        padding sits between prefix and suffix).
        """
        if not suffixes:
            return []
        prefix_ids = torch.tensor([self.encode(prefix)], device=self.device)
        cache = DynamicCache(config=self.model.config)
        if prefix_ids.shape[1] > 0:
            self.model(input_ids=prefix_ids, past_key_values=cache, use_cache=True)
            self.counts.prefilled += prefix_ids.shape[1]
        outputs = []
        for s in tqdm(suffixes, desc="answering", unit="q", disable=not progress, leave=False):
            suffix_ids = torch.tensor([self.encode(s)], device=self.device)
            ids = torch.cat([prefix_ids, suffix_ids], dim=1)
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                past_key_values=copy.deepcopy(cache) if prefix_ids.shape[1] > 0 else None,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_ids,
            )
            self.counts.prefilled += suffix_ids.shape[1]
            self.counts.generated += out.shape[1] - ids.shape[1]
            outputs.append(self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
        return outputs
