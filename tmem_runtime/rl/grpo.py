"""GRPO's pieces as pure functions: group-normalised advantages and the clipped ratio objective.

GRPO (DeepSeekMath, arXiv 2402.03300) samples G outputs for one prompt (a group), scores each with
an outcome reward and uses no critic: the advantage of output i is its reward normalised within its
group, A_i = (r_i - mean_g) / (std_g + eps) (std with Bessel's correction, as TRL computes it). A
group of one, or a group whose rewards are all equal, carries no signal: its advantages are 0.

Per written token t of output i, with ratio rho = exp(logp - logp_old):
    loss_t = -min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i) + beta * KL_t
    KL_t   = exp(ref - logp) - (ref - logp) - 1          (the k3 estimator of KL(policy || reference))
and the loss of output i is the mean over its written tokens; the batch loss is the mean over outputs.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

ADVANTAGE_EPS = 1e-4


def group_advantages(rewards: Sequence[float], groups: Sequence[Hashable], eps: float = ADVANTAGE_EPS) -> list[float]:
    """A_i = (r_i - mean of i's group) / (std of i's group + eps); 0 for a group of one or of equal rewards.

    rewards, groups: one per output, any order (a group is every output with the same key).
    """
    if len(rewards) != len(groups):
        raise ValueError(f"{len(rewards)} rewards for {len(groups)} group keys")
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    out = [0.0] * len(rewards)
    for idx in members.values():
        if len(idx) < 2:
            continue
        r = torch.tensor([float(rewards[i]) for i in idx], dtype=torch.float64)
        if bool(r.max() == r.min()):  # all equal (their std may round to 1e-17, not 0): no signal
            continue
        std = r.std(unbiased=True)
        adv = (r - r.mean()) / (std + eps)
        for i, a in zip(idx, adv.tolist()):
            out[i] = a
    return out


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens: exp(d) - d - 1, d = ref - logp (>= 0).
    Computed as expm1(d) - d, clamped at 0: exp(d) - 1 loses d's low digits (a policy pass and a reference pass
    that differ by rounding gave -1.7e-10 in float32)."""
    d = ref_logp - logp
    return (torch.expm1(d) - d).clamp_min(0)


def clipped_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token GRPO loss [N, C] and whether each token's ratio was clipped [N, C] (see the module docstring).

    logp, old_logp, ref_logp: [N, C]; advantages: [N] (one per output). beta > 0 needs ref_logp.
    """
    adv = advantages[:, None].to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    clipped_ratio = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    objective = torch.minimum(ratio * adv, clipped_ratio * adv)
    loss = -objective
    if beta:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference policy's log-probabilities")
        loss = loss + beta * k3_kl(logp, ref_logp)
    clipped = ((ratio < 1 - clip_low) & (adv < 0)) | ((ratio > 1 + clip_high) & (adv > 0))
    return loss, clipped

