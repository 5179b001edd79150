"""Temperature sampling through the runtime's batched decoder, each prompt from its own seed.

`RowSampler` is a `decoding.ChooseFn`: at every decode step it draws each unfinished row's next token
from softmax(logits / T) with that row's own generator (Gumbel-max: argmax(log p + Gumbel noise), one
draw per row and step) and records the token's log-probability under the same distribution. A
prompt's tokens therefore depend only on its seed and the model, never on which other prompts share
its batch or on which rank samples it. A row whose logits are not finite ends at once (EOS) and is
marked `broken` (its log-probability NaN): the rollout is malformed, the step does not crash.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tmem_runtime.decoder import supports_piecewise
from tmem_runtime.decoding import DecodeStats, greedy_generate, prefill


def rollout_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (step, task, member, ...): the same on every rank and process."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class Completion:
    """One sampled continuation: its prompt's ids, the sampled ids (ending token kept) and their
    log-probabilities under the sampling distribution (softmax(logits / temperature))."""

    prompt: list[int]
    tokens: list[int]
    logprobs: list[float] = field(default_factory=list)
    broken: bool = False  # non-finite logits met while sampling


class RowSampler:
    """The `choose` hook: temperature sampling with one generator per prompt (see the module docstring).

    seeds: one per prompt. temperature: > 0. eos: the token a broken row is ended with.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, eos: int, device: torch.device) -> None:
        if not temperature > 0:
            raise ValueError(f"sampling needs a temperature > 0, got {temperature}")
        self.temperature, self.eos = temperature, eos
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        self.logprobs: list[list[float]] = [[] for _ in seeds]
        self.broken = [False] * len(seeds)

    def __call__(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        logp = torch.log_softmax(logits.detach().float() / self.temperature, dim=-1)  # (a draw needs no graph)
        tokens = torch.zeros(len(rows), dtype=torch.long, device=logits.device)
        finite = torch.isfinite(logp).all(dim=-1).tolist()
        for i, r in enumerate(rows):
            if r < 0:
                continue  # a finished row: no draw, so no row's stream depends on its batch
            if not finite[i]:
                tokens[i] = self.eos
                self.broken[r] = True
                self.logprobs[r].append(math.nan)
                continue
            u = torch.rand(logp.shape[-1], generator=self.generators[r], device=logp.device)
            gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
            tok = int(torch.argmax(logp[i] + gumbel))
            tokens[i] = tok
            self.logprobs[r].append(float(logp[i, tok]))
        return tokens


def sample_completions(
    model: torch.nn.Module,
    prompts: Sequence[list[int]],
    seeds: Sequence[int],
    temperature: float,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    shared: list[int] | None = None,
    stop_ids: Sequence[int] = (),
    batch_size: int = 64,
    stats: DecodeStats | None = None,
    pad_id: int = 0,
) -> list[Completion]:
    """One continuation per prompt (token ids), sampled with `RowSampler` through `greedy_generate`'s
    batched decoder. shared: token ids every prompt starts with, prefilled once (None: the prompts'
    longest common prefix). A row ends at an EOS, at a token of `stop_ids`, or after max_new_tokens."""
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    if not prompts:
        return []
    prompts = [list(p) for p in prompts]
    prefix = None
    if shared and supports_piecewise(model) and all(len(p) > len(shared) and p[: len(shared)] == shared
                                                    for p in prompts):
        prefix = prefill(model, shared, stats=stats)
    sampler = RowSampler(seeds, temperature, eos_ids[0] if eos_ids else 0, next(model.parameters()).device)
    new = greedy_generate(model, prompts, max_new_tokens, eos_ids, prefix=prefix, batch_size=batch_size,
                          stop_ids=stop_ids, stats=stats, pad_id=pad_id, choose=sampler)
    return [Completion(p, toks, lps, broken) for p, toks, lps, broken
            in zip(prompts, new, sampler.logprobs, sampler.broken)]
