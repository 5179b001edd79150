"""Asking the model questions: chat-templated prompts, batched greedy decoding."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tmem_runtime.examples import chat_prompt_ids


@torch.no_grad()
def ask(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    max_new_tokens: int = 24,
    context: str = "",
) -> list[str]:
    """Greedy answers to `questions` (one chat turn each, `context` prepended to every question)."""
    prompts = [chat_prompt_ids(tokenizer, f"{context}\n\n{q}" if context else q) for q in questions]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding for generation
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    device = next(model.parameters()).device
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
