"""Asking the model: left-padded batched greedy decoding, and chat-templated questions on top of it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tmem_runtime.examples import chat_prompt_ids


@torch.no_grad()
def generate_greedy(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    pad_id: int,
    eos_ids: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Greedy continuations of token-id prompts, decoded as one left-padded batch.

    Returns each prompt's new tokens, a [<= max_new_tokens] tensor (pad_id after an early stop).
    `eos_ids`: the tokens that end a turn (the model's generation config when None).
    """
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    device = next(model.parameters()).device
    stop = {} if eos_ids is None else {"eos_token_id": list(eos_ids)}
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        **stop,
    )
    return list(out[:, width:])


def ask(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    max_new_tokens: int = 24,
    context: str = "",
) -> list[str]:
    """Greedy answers to `questions` (one chat turn each, `context` prepended to every question)."""
    prompts = [chat_prompt_ids(tokenizer, f"{context}\n\n{q}" if context else q) for q in questions]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = generate_greedy(model, prompts, max_new_tokens, pad)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in answers]
