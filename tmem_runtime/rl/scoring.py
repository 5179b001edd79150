"""The policy's log-probabilities of sampled tokens, teacher-forced, differentiable.

    rows (prompt ids, completion ids) ──the tokens every row shares, once at batch 1 (with grad)──>
        its keys/values broadcast to every row ──each row's rest, right padded──> hidden states at the
        positions that predict a completion token only ──final norm, lm_head, / temperature,
        log_softmax──> log p of each completion token [N, C] and the mask of the written tokens [N, C]

The mask is 1 exactly at the sampled tokens (the action) and 0 at every prompt token (the
instruction, the context, a prefilled JSON opening) and at padding: the policy gradient flows
through the written tokens only. The shared prefix is computed once with its graph, so its gradient
is the sum over the rows that read it (exact, not a stop-gradient). `PolicyScorer` is an
`nn.Module` so that DistributedDataParallel wraps it: one forward per backward.

Models the piecewise `Decoder` cannot drive run whole rows through `model(...)` (no sharing).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tmem_runtime.decoder import Decoder, PrefixKV, supports_piecewise
from tmem_runtime.decoding import common_prefix_length

Row = tuple[Sequence[int], Sequence[int]]  # (prompt ids, completion ids)


class PolicyScorer(nn.Module):
    """forward(rows, temperature) -> (logp [N, C] float32, mask [N, C] bool), C = the longest completion.

    logp[i, j] = log softmax(logits / temperature)[completion_i[j]] at the position before it.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, rows: Sequence[Row], temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        if not rows or any(len(p) == 0 or len(c) == 0 for p, c in rows):
            raise ValueError("every scored row needs a prompt token and a completion token")
        hidden = self._hidden_shared(rows) if supports_piecewise(self.model) else self._hidden_whole(rows)
        logits = self._head(hidden) / temperature
        targets = torch.tensor([t for _, c in rows for t in c], dtype=torch.long, device=logits.device)
        token_logp = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]
        width = max(len(c) for _, c in rows)
        mask = torch.zeros(len(rows), width, dtype=torch.bool, device=logits.device)
        for i, (_, c) in enumerate(rows):
            mask[i, : len(c)] = True
        logp = torch.zeros(len(rows), width, dtype=token_logp.dtype, device=logits.device)
        return logp.masked_scatter(mask, token_logp), mask

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _hidden_shared(self, rows: Sequence[Row]) -> torch.Tensor:
        """Normed final hidden states [M, H] at every completion-predicting position, rows in order. The prefix
        every row's prompt shares (at most min(prompt length) - 1 tokens: the last prompt token of each row is
        in its own part, its position predicts the first completion token) runs once; a single row shares none."""
        decoder = Decoder(self.model)
        device = self._device()
        p = common_prefix_length([prompt for prompt, _ in rows]) if len(rows) > 1 else 0
        tails = [list(prompt[p:]) + list(comp[:-1]) for prompt, comp in rows]
        lengths = torch.tensor([len(t) for t in tails], device=device)
        ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long, device=device)
        for i, t in enumerate(tails):
            ids[i, : len(t)] = torch.tensor(t, device=device)
        kv = None
        n = len(decoder.layers)
        if p:
            kv = PrefixKV()
            decoder.run_layers(decoder.embed(torch.tensor([list(rows[0][0][:p])], device=device)), 0, n, None, kv)
            kv.recording = False
        hidden = decoder.run_layers(decoder.embed(ids), 0, n, lengths, kv)
        return decoder.final_norm(_predicting(hidden, rows, p))

    def _hidden_whole(self, rows: Sequence[Row]) -> torch.Tensor:
        device = self._device()
        seqs = [list(prompt) + list(comp[:-1]) for prompt, comp in rows]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, device=device)
            mask[i, : len(s)] = 1
        inner = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.model
        hidden = inner(input_ids=ids, attention_mask=mask).last_hidden_state
        return _predicting(hidden, rows, 0)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(hidden)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def _predicting(hidden: torch.Tensor, rows: Sequence[Row], offset: int) -> torch.Tensor:
    """hidden [N, T, H] of rows whose first `offset` prompt tokens are left out -> [M, H]: the states
    at the positions that predict each completion token (row by row, in order)."""
    index = [(i, len(prompt) - offset - 1 + j) for i, (prompt, comp) in enumerate(rows) for j in range(len(comp))]
    rows_i = torch.tensor([i for i, _ in index], device=hidden.device)
    cols = torch.tensor([j for _, j in index], device=hidden.device)
    return hidden[rows_i, cols]
