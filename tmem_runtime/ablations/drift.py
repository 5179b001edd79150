"""Collateral damage of a write: how the next-token distribution on unrelated prompts moves.

A fixed set of neutral prompts (general chat questions, asked as the flashcards are, and plain-text
openings) is run through the model before and after a write; drift is KL(before || after) of the
distribution over the token that follows each prompt, plus whether its most likely token changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tmem_runtime.examples import chat_prompt_ids

NEUTRAL_QUESTIONS = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Who wrote Romeo and Juliet?",
    "What colour is the sky on a clear day?",
    "What is seven times eight?",
    "Name a fruit that is yellow.",
    "What do bees make?",
    "What is the largest ocean on Earth?",
    "Which planet is closest to the Sun?",
    "How do you say thank you in Spanish?",
)
NEUTRAL_KEYS = (  # per neutral question: an answer counts as right if it contains one of these (lowercase)
    ("paris",),
    ("8", "eight"),
    ("shakespeare",),
    ("blue",),
    ("56", "fifty-six", "fifty six"),
    ("banana", "lemon", "pineapple", "mango"),
    ("honey",),
    ("pacific",),
    ("mercury",),
    ("gracias",),
)
NEUTRAL_TEXTS = (
    "The capital of Italy is",
    "Water boils at a temperature of",
    "Once upon a time, there was a",
    "The quick brown fox jumps over the",
    "In 1492, Columbus sailed across the",
    "import numpy as",
    "The mitochondria is the powerhouse of the",
    "My favourite season of the year is",
    "The stock market closed higher today after",
    "To make a cup of tea, first",
)


def neutral_prompts(tokenizer: PreTrainedTokenizerBase) -> tuple[list[list[int]], list[str]]:
    """(token ids of every neutral prompt, its group: "chat" or "text"). Chat questions go through the
    chat template up to where the answer starts, as `write_qa` trains and `recall` asks."""
    ids = [chat_prompt_ids(tokenizer, q) for q in NEUTRAL_QUESTIONS]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids += [bos + tokenizer(t, add_special_tokens=False)["input_ids"] for t in NEUTRAL_TEXTS]
    return ids, ["chat"] * len(NEUTRAL_QUESTIONS) + ["text"] * len(NEUTRAL_TEXTS)


def neutral_answers_right(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[list[str], list[bool]]:
    """Greedy answers to the neutral chat questions and whether each is right (NEUTRAL_KEYS): whether a
    write's drift on these prompts changes what the model says, not only its first-token distribution."""
    from tmem_runtime.chat import ask

    answers = ask(model, tokenizer, list(NEUTRAL_QUESTIONS))
    return answers, [any(k in a.lower() for k in keys) for a, keys in zip(answers, NEUTRAL_KEYS)]


@torch.no_grad()
def next_token_logprobs(model: PreTrainedModel, prompts: Sequence[Sequence[int]], pad_id: int = 0) -> torch.Tensor:
    """Log-probabilities [P, V] (float32) of the token after each prompt, one left-padded batch."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    device = next(model.parameters()).device
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device)
    ).logits[:, -1]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) in nats per row (float64), from log-probabilities [..., V]; 0 * log 0 counts as 0."""
    if logp.shape != logq.shape:
        raise ValueError(f"log-probability shapes differ: {tuple(logp.shape)} vs {tuple(logq.shape)}")
    logp, logq = logp.double(), logq.double()
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    return terms.sum(-1)


@dataclass(frozen=True)
class Drift:
    """Drift of one write: KL(before || after) per prompt (nats), and whether each top token stayed."""

    kl: tuple[float, ...]
    same_top1: tuple[bool, ...]
    groups: tuple[str, ...]

    def mean_kl(self, group: str | None = None) -> float:
        """Mean KL over the prompts (of one group, "chat" or "text", if given)."""
        vals = [k for k, g in zip(self.kl, self.groups) if group is None or g == group]
        return sum(vals) / len(vals)

    @property
    def top1_kept(self) -> float:
        """Fraction of prompts whose most likely next token is unchanged."""
        return sum(self.same_top1) / len(self.same_top1)

    def as_dict(self) -> dict:
        return {
            "kl": [round(k, 6) for k in self.kl],
            "same_top1": list(self.same_top1),
            "mean_kl": round(self.mean_kl(), 6),
            "mean_kl_chat": round(self.mean_kl("chat"), 6),
            "mean_kl_text": round(self.mean_kl("text"), 6),
            "top1_kept": self.top1_kept,
        }


def drift(before: torch.Tensor, after: torch.Tensor, groups: Sequence[str]) -> Drift:
    """Drift between next-token log-probabilities [P, V] before and after a write."""
    kl = kl_divergence(before, after)
    same = before.argmax(-1) == after.argmax(-1)
    return Drift(tuple(kl.tolist()), tuple(same.tolist()), tuple(groups))
