"""Asking the model: batched greedy decoding of chat-templated questions (shared prefix prefilled once)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tmem_runtime.decoding import greedy_generate
from tmem_runtime.examples import chat_prompt_ids


def generate_greedy(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    pad_id: int,
    eos_ids: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Greedy continuations of token-id prompts, batched, their common prefix prefilled once.

    Returns each prompt's new tokens, a [<= max_new_tokens] tensor ending at the first EOS.
    `eos_ids`: the tokens that end a turn (the model's generation config when None).
    """
    new = greedy_generate(model, prompts, max_new_tokens, eos_ids, pad_id=pad_id)
    return [torch.tensor(row, dtype=torch.long) for row in new]


def ask(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    max_new_tokens: int = 24,
    context: str = "",
) -> list[str]:
    """Greedy answers to `questions` (one chat turn each, `context` prepended to every question)."""
    if tokenizer is None:
        raise TypeError("ask needs the model's tokenizer, got None (load_model of a random-weight 'tiny-...' or "
                        "'shapes-...' model returns none: ask a model that has one)")  # fmt: skip
    if isinstance(questions, str):
        raise ValueError("ask takes a list of questions, got one string (wrap it: [question])")
    for i, q in enumerate(questions):
        if not isinstance(q, str):
            raise ValueError(f"question {i} is not a string: {q!r:.80}")
    prompts = [chat_prompt_ids(tokenizer, f"{context}\n\n{q}" if context else q) for q in questions]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = generate_greedy(model, prompts, max_new_tokens, pad)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in answers]
