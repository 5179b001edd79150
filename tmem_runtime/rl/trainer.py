"""GRPO over an environment, on torch.distributed: sample, score, normalise in groups, update.

One step (every rank runs the same code; one process is the case world = 1):

    tasks of the step (seeded by the step)  x  G members  ──this rank's contiguous share──>
    env.rollouts (sampling, the memory writes and the answers: the environment, no gradient) ──>
    all ranks' (group, reward) gathered ──> group-normalised advantages (groups may span ranks) ──>
    micro-batches of this rank's rollouts ──DDP(PolicyScorer)──> log p of the written tokens ──>
    clipped ratio loss (+ beta KL), scaled world / N_total so DDP's average is the batch mean ──>
    backward (DDP all-reduces once, on the last micro-batch) ──> finite? ──> clip, AdamW step

Rollouts whose advantage is 0 (flat groups) add exactly 0 to the loss and its gradient when beta
is 0, so they are not scored; a batch where no rank has any makes no update (logged as skipped: "no
signal"; AdamW's momentum does not move the weights on a batch that carries nothing). A non-finite
loss or gradient on any rank skips the step on every rank: gradients dropped, no parameter or
optimizer state changed, the reason logged (with updates_per_batch > 1, the batch's earlier
updates stand). Rollouts are seeded by (seed, step, task,
member), so a run resumed from a checkpoint continues exactly as the uninterrupted run, and a
2-process run computes the same update as one process on the whole batch.

The write inside a rollout cannot reach the policy's gradients: rollouts run before the loss, their
samples and rewards are plain numbers, and the fast weights' write backpropagates into its own
workspace only (`trainer.WriteRun`: backward(inputs=workspace)). The policy's forward binds no
fast-weight session (a SessionPool binds none by default), so no gradient passes through them.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tmem_runtime.rl.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tmem_runtime.rl.distributed import DistContext
from tmem_runtime.rl.grpo import clipped_token_loss, group_advantages, k3_kl
from tmem_runtime.rl.policy import Policy, base_weights_sha256
from tmem_runtime.rl.rollout import Environment, Rollout, sum_counts
from tmem_runtime.rl.sampling import rollout_seed
from tmem_runtime.rl.scoring import PolicyScorer

LOG_FILE = "log.jsonl"
# GRPOConfig fields a resumed run may change: bookkeeping, not what the steps compute (the others are refused)
RESUMABLE_CHANGES = ("micro_batch_rows", "kl_every", "save_every", "keep_checkpoints")


@dataclass(frozen=True)
class GRPOConfig:
    """group_size: G samples per situation. batch: tasks per step over all ranks. lr: AdamW's.
    temperature: of sampling (the log-probabilities are of the same tempered distribution).
    clip_low/clip_high: the ratio's clip range. beta: KL weight (0: outcome-only, the paper's).
    updates_per_batch: optimizer steps on one batch of rollouts (> 1 makes the clip matter).
    micro_batch_rows: scored rows per forward/backward. kl_every: log KL to the reference every k steps
    (0: never, unless beta > 0). save_every: checkpoint every k steps (0: only at the end)."""

    group_size: int = 8
    batch: int = 4
    lr: float = 1e-6
    temperature: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    beta: float = 0.0
    updates_per_batch: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    micro_batch_rows: int = 16
    kl_every: int = 1
    save_every: int = 10
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.group_size < 1 or self.batch < 1 or self.updates_per_batch < 1 or self.micro_batch_rows < 1:
            raise ValueError(f"group_size, batch, updates_per_batch and micro_batch_rows must be >= 1: {self}")
        finite = all(math.isfinite(x) for x in (self.lr, self.temperature, self.beta))
        if not (finite and self.lr > 0 and self.temperature > 0 and self.beta >= 0):
            raise ValueError(f"lr and temperature must be finite and > 0, beta finite and >= 0: {self}")


class GRPOTrainer:
    """GRPO on `policy` (its model) against `env` (see the module docstring).

    out: directory of the log (log.jsonl) and checkpoints. reference: the KL reference for a "full"
    policy (default: a copy of the model as it is now); a LoRA policy's reference is its base model.
    settings: what else the steps depend on (the environment's settings: budget, flashcard mode, the
    fast weights' shape, ...), JSON values; recorded in every checkpoint, a resume with others is refused.
    Checkpoints also record the SHA-256 of the model's weights as the trainer got them (`base_weights_sha256`):
    a resume on another model of the same type and sizes is refused too.
    """

    def __init__(self, policy: Policy, env: Environment, config: GRPOConfig, out: str | Path,
                 ctx: DistContext | None = None, reference: nn.Module | None = None,
                 settings: dict | None = None) -> None:
        if env.temperature != config.temperature:
            raise ValueError(f"the environment samples at temperature {env.temperature} and GRPO scores at "
                             f"{config.temperature}: the ratio's log-probabilities would be of another distribution")
        ctx = ctx or DistContext()
        self.policy, self.env, self.config, self.ctx = policy, env, config, ctx
        self.settings = dict(settings or {})
        self.weights_sha256 = base_weights_sha256(policy.model, policy.spec.fast_layers)  # (before any update)
        self.out = Path(out)
        self.scorer = PolicyScorer(policy.model)
        self.ddp: nn.Module = DistributedDataParallel(self.scorer) if ctx.group else self.scorer
        self.optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, betas=(0.9, 0.99), eps=1e-8,
                                           weight_decay=config.weight_decay)
        needs_reference = config.beta > 0 or config.kl_every > 0
        self.reference = reference
        if needs_reference and policy.spec.mode == "full" and reference is None:
            self.reference = copy.deepcopy(policy.model).requires_grad_(False)
        self.step = 0
        if ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- tasks
    def tasks_for(self, step: int) -> list[int]:
        """The step's `batch` task indices: epochs of seeded permutations of every task, in order."""
        n, b = self.env.num_tasks, self.config.batch
        out = []
        for j in range((step - 1) * b, step * b):
            epoch, pos = divmod(j, n)
            perm = list(range(n))
            random.Random(f"{self.config.seed}:epoch{epoch}").shuffle(perm)
            out.append(perm[pos])
        return out

    # ---------------------------------------------------------------- one step
    def train_step(self) -> dict:
        """One GRPO step; returns its log record (also appended to log.jsonl on rank 0)."""
        cfg, ctx = self.config, self.ctx
        step = self.step + 1
        t0 = time.perf_counter()
        tasks = self.tasks_for(step)
        members = ctx.shard([(b, g) for b in range(len(tasks)) for g in range(cfg.group_size)])
        self.policy.model.eval()
        with torch.no_grad():
            rollouts = self.env.rollouts(tasks, members, rollout_seed(cfg.seed, "step", step))
        t_rollout = time.perf_counter() - t0
        everything = [x for part in ctx.all_gather_objects(
            [(r.group, r.member, r.reward, r.n_tokens, r.counts) for r in rollouts]) for x in part]
        advantages = dict(zip([(g, m) for g, m, *_ in everything],
                              group_advantages([r for _, _, r, _, _ in everything], [g for g, *_ in everything])))
        n_total = sum(1 for *_, n, _ in everything if n > 0)
        record = self._batch_record(step, everything, advantages)
        t1 = time.perf_counter()
        record.update(self._update(rollouts, advantages, n_total, step))
        record.update(step=step, seconds=round(time.perf_counter() - t0, 2), rollout_s=round(t_rollout, 2),
                      update_s=round(time.perf_counter() - t1, 2), lr=cfg.lr)
        self.step = step
        if ctx.is_main:
            with open(self.out / LOG_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
        if cfg.save_every and step % cfg.save_every == 0:
            self.save()
        return record

    def _batch_record(self, step: int, everything: list, advantages: dict) -> dict:
        rewards = [r for _, _, r, _, _ in everything]
        counts = sum_counts(c for *_, c in everything)
        mean = sum(rewards) / len(rewards) if rewards else 0.0
        std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards)) if rewards else 0.0
        groups = {g for g, *_ in everything}
        flat = sum(1 for g in groups if all(advantages[(h, m)] == 0 for h, m, *_ in everything if h == g))
        metrics = self.env.metrics(counts) if hasattr(self.env, "metrics") else {}
        return dict(reward=mean, reward_std=std, rollouts=len(rewards), groups=len(groups), flat_groups=flat,
                    tokens=sum(n for *_, n, _ in everything), counts=counts, **metrics)

    def _update(self, rollouts: list[Rollout], advantages: dict, n_total: int, step: int) -> dict:
        cfg, ctx = self.config, self.ctx
        # a rollout whose advantage is 0 adds exactly 0 to the loss and its gradient (without KL): not scored
        trainable = sorted((r for r in rollouts
                            if r.n_tokens > 0 and (cfg.beta > 0 or advantages[(r.group, r.member)])),
                           key=lambda r: (r.group, r.member))
        if not ctx.all_reduce([len(trainable)], op="max")[0]:
            return {"skipped": "no signal", "loss": 0.0, "kl": None, "clip_frac": None, "grad_norm": None}
        chunks = _micro_batches(trainable, cfg.micro_batch_rows)
        want_kl = cfg.beta > 0 or (cfg.kl_every > 0 and step % cfg.kl_every == 0)
        old: dict[int, torch.Tensor] = {}
        ref: dict[int, torch.Tensor] = {}
        out: dict = {"skipped": None}
        for it in range(cfg.updates_per_batch):
            self.optimizer.zero_grad(set_to_none=True)
            sums = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss, kl x tokens, kl tokens, clipped tokens, tokens
            bad = 0.0
            for ci, chunk in enumerate(chunks or [None]):
                last = ci == max(len(chunks), 1) - 1
                with nullcontext() if last or not ctx.group else self.ddp.no_sync():
                    if chunk is None:  # nothing to learn from on this rank: a zero-weight pass keeps DDP in step
                        logp, _ = self.ddp([([0], [0])], cfg.temperature)
                        loss = logp.sum() * 0.0
                        loss.backward()
                        continue
                    rows = [(s.prompt, s.tokens) for r in chunk for s in r.segments]
                    owner = torch.tensor([i for i, r in enumerate(chunk) for _ in r.segments])
                    logp, mask = self.ddp(rows, cfg.temperature)
                    if it == 0:
                        old[ci] = logp.detach()
                        if want_kl:
                            ref[ci] = self._reference_logp(rows)
                    adv = torch.tensor([advantages[(r.group, r.member)] for r in chunk], dtype=logp.dtype)[owner]
                    tok_loss, clipped = clipped_token_loss(logp, old[ci], adv.to(logp.device), cfg.clip_low,
                                                           cfg.clip_high, ref.get(ci), cfg.beta)
                    per_rollout = torch.zeros(len(chunk), dtype=tok_loss.dtype, device=tok_loss.device)
                    per_rollout.index_add_(0, owner.to(tok_loss.device), (tok_loss * mask).sum(-1))
                    n_tok = torch.tensor([r.n_tokens for r in chunk], dtype=tok_loss.dtype, device=tok_loss.device)
                    loss = (per_rollout / n_tok).sum() * (ctx.world / max(n_total, 1))
                    loss.backward()
                    value = loss.item()
                    bad = max(bad, 0.0 if math.isfinite(value) else 1.0)  # (then every rank skips)
                    sums[0] += value / ctx.world
                    tokens = float(sum(r.n_tokens for r in chunk))  # = mask.sum(), known here
                    if ci in ref:
                        kl = k3_kl(logp.detach(), ref[ci])
                        sums[1] += float((kl * mask).sum())
                        sums[2] += tokens
                    sums[3] += float((clipped & mask).sum())
                    sums[4] += tokens
            finite = [torch.isfinite(p.grad).all() for p in self.policy.parameters() if p.grad is not None]
            grads_finite = bool(torch.stack(finite).all()) if finite else True  # one sync for every tensor
            loss_bad, grad_bad = ctx.all_reduce([bad, 0.0 if grads_finite else 1.0], op="max")
            loss_sum, kl_sum, kl_n, clip_n, tok_n = ctx.all_reduce(sums, op="sum")
            if loss_bad or grad_bad:
                self.optimizer.zero_grad(set_to_none=True)
                out["skipped"] = "non-finite loss" if loss_bad else "non-finite gradient"
                break
            norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            if it == 0:
                out.update(loss=loss_sum, kl=kl_sum / kl_n if kl_n else None,
                           clip_frac=clip_n / tok_n if tok_n else 0.0, grad_norm=float(norm))
        self.optimizer.zero_grad(set_to_none=True)
        if out["skipped"]:
            out.update(loss=None, kl=None, clip_frac=None, grad_norm=None)
        return out

    def _reference_logp(self, rows: list) -> torch.Tensor:
        with torch.no_grad():
            if self.policy.spec.mode == "lora":
                with self.policy.adapters_off():
                    return self.scorer(rows, self.config.temperature)[0]
            return PolicyScorer(self.reference)(rows, self.config.temperature)[0]

    # ---------------------------------------------------------------- the loop, files
    def train(self, steps: int, on_step: Callable[[dict], None] | None = None) -> list[dict]:
        """Run until `steps` steps are done in all (a resumed trainer continues from its step)."""
        from tqdm.auto import tqdm

        records = []
        bar = tqdm(total=steps, initial=self.step, desc="rl", unit="step", disable=not self.ctx.is_main)
        with bar:
            while self.step < steps:
                rec = self.train_step()
                records.append(rec)
                bar.set_postfix_str(_postfix(rec))
                bar.update(1)
                if on_step is not None:
                    on_step(rec)
        if records and (not self.config.save_every or self.step % self.config.save_every):
            self.save()  # (a run already at `steps`, e.g. a finished one rerun, leaves its checkpoint as it is)
        return records

    def save(self) -> Path | None:
        """A checkpoint of the current step (rank 0 writes; every rank waits for it)."""
        path = None
        if self.ctx.is_main:
            path = save_checkpoint(self.out, self.step, self.policy, self.optimizer,
                                   {"config": asdict(self.config), "settings": self.settings,
                                    "weights_sha256": self.weights_sha256},
                                   self.config.keep_checkpoints)
        self.ctx.barrier()
        return path

    def resume(self, path: str | Path | None = None) -> int:
        """Load a checkpoint (default: the newest under `out`) and continue after its step; the log
        keeps the records up to that step. Returns the step (0 when there is nothing to resume)."""
        path = Path(path) if path is not None else latest_checkpoint(self.out)
        if path is None:
            return 0
        fixed = {k: v for k, v in asdict(self.config).items() if k not in RESUMABLE_CHANGES}
        state = load_checkpoint(path, self.policy, self.optimizer, fixed, self.settings, self.weights_sha256)
        self.step = int(state["step"])
        log = self.out / LOG_FILE
        if self.ctx.is_main and log.is_file():
            kept = [line for line in log.read_text().splitlines() if _logged_step(line) <= self.step]
            log.write_text("".join(line + "\n" for line in kept))
        self.ctx.barrier()
        return self.step


def _logged_step(line: str) -> float:
    """The step of a log.jsonl line; inf for one that is not a whole record (a run killed while writing it)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _micro_batches(rollouts: list[Rollout], max_rows: int) -> list[list[Rollout]]:
    """Consecutive rollouts (sorted by group, so a group's shared prompt is scored once) in chunks of
    at most `max_rows` scored rows (a rollout with more segments than that is a chunk of its own)."""
    chunks: list[list[Rollout]] = []
    rows = 0
    for r in rollouts:
        if chunks and rows + len(r.segments) <= max_rows:
            chunks[-1].append(r)
            rows += len(r.segments)
        else:
            chunks.append([r])
            rows = len(r.segments)
    return chunks


def _postfix(rec: dict) -> str:
    parts = [f"reward {rec['reward']:.3f}"]
    if rec.get("valid_card_rate") is not None:
        parts.append(f"valid {rec['valid_card_rate']:.2f}")
    parts.append(f"skipped ({rec['skipped']})" if rec.get("skipped") else f"loss {rec['loss']:+.4f}")
    return ", ".join(parts)

