"""Learning to write (tmem_runtime/rl): GRPO's pieces, the policy-gradient mask, the stop-gradient at
the write, seeded sampling, checkpoints and resume, bad input, and a toy reward that training raises.

Tiny random models (seconds each); the episode environment runs on a tiny model with SmolLM2's
tokenizer (random weights write no valid card: every sample is malformed, reward 0, counted).
"""

import hashlib
import json
import math
import os
import re
import time

import pytest
import torch

from tmem_runtime import SessionPool, load_model
from tmem_runtime.rl.checkpoint import CheckpointError, latest_checkpoint
from tmem_runtime.rl.grpo import clipped_token_loss, group_advantages, k3_kl
from tmem_runtime.rl.policy import Policy, PolicyFileError, PolicySpec, load_policy
from tmem_runtime.rl.sampling import rollout_seed, sample_completions
from tmem_runtime.rl.scoring import PolicyScorer
from tmem_runtime.rl.toy import EOS, PlantedFactEnv
from tmem_runtime.rl.trainer import LOG_FILE, GRPOConfig, GRPOTrainer

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(mode: str = "full", seed: int = 0) -> Policy:
    model, _ = load_model("tiny-llama", seed=seed)
    return Policy(model, PolicySpec(mode))


# ---------------------------------------------------------------- GRPO's arithmetic
def test_group_advantages_on_hand_made_rewards():
    rewards = [1.0, 0.0, 0.5, 0.5, 0.7, 0.2, 0.2, 0.2, 1.0, 0.0]
    groups = ["a", "a", "a", "a", "solo", "eq", "eq", "eq", "t", "t"]
    adv = group_advantages(rewards, groups)
    # group a: mean 0.5, std (Bessel) sqrt(0.5/3)
    std = math.sqrt(((0.5**2) * 2) / 3)
    assert adv[:4] == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.0, 0.0], abs=1e-12)
    assert adv[2] == adv[3] == 0.0  # ties at the mean: equal advantages
    assert adv[4] == 0.0  # a group of one carries no signal
    assert adv[5:8] == [0.0, 0.0, 0.0]  # all equal: no signal
    std_t = math.sqrt(0.5)
    assert adv[8:] == pytest.approx([0.5 / (std_t + 1e-4), -0.5 / (std_t + 1e-4)], abs=1e-12)
    assert group_advantages([0.3, 0.9, 0.3], [1, 2, 1]) == [0.0, 0.0, 0.0]  # groups need not be contiguous
    with pytest.raises(ValueError):
        group_advantages([1.0], [1, 2])


def test_clipped_loss_and_k3_kl_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.2], [0.1, 0.4]]))
    old = torch.log(torch.tensor([[0.25, 0.2], [0.2, 0.4]]))
    adv = torch.tensor([1.0, -2.0])
    loss, clipped = clipped_token_loss(logp, old, adv, 0.2, 0.2)
    # ratios: 2 (clipped to 1.2, A>0), 1, 0.5 (clipped to 0.8, A<0: min picks -1.6), 1
    assert loss.flatten().tolist() == pytest.approx([-1.2, -1.0, 1.6, 2.0])
    assert clipped.tolist() == [[True, False], [True, False]]
    ref = torch.log(torch.tensor([[0.25, 0.2], [0.2, 0.4]]))
    d = ref - logp
    assert torch.allclose(k3_kl(logp, ref), d.exp() - d - 1)
    # rounding-level differences (a reference pass through other kernels): never negative, and accurate
    logp32 = torch.linspace(-9, -0.1, 1001)
    ref32 = logp32 + torch.linspace(-3e-6, 3e-6, 1001)
    want = ((ref32.double() - logp32.double()).exp() - (ref32.double() - logp32.double()) - 1)
    got = k3_kl(logp32, ref32)
    assert (got >= 0).all() and (got.double() - want).abs().max() < 1e-12  # (exp(d) - d - 1: errors ~1e-7)
    with_kl, _ = clipped_token_loss(logp, old, adv, 0.2, 0.2, ref, beta=0.5)
    assert torch.allclose(with_kl, loss + 0.5 * (d.exp() - d - 1))
    with pytest.raises(ValueError):
        clipped_token_loss(logp, old, adv, beta=0.1)


def test_grpo_config_refuses_a_non_finite_lr_temperature_or_beta():
    """lr=inf stepped every weight to inf/NaN and temperature=inf sampled uniform noise: refused like lr=0."""
    from tmem_runtime.rl.command import parse_args

    for bad in ({"lr": math.inf}, {"lr": math.nan}, {"temperature": math.inf}, {"beta": math.inf}, {"lr": 0.0}):
        with pytest.raises(ValueError, match="finite"):
            GRPOConfig(**bad)
    args = parse_args(["--data", "d.json", "--out", "o", "--lr", "1e-6", "--beta", "0", "--temperature", "0.7"])
    assert (args.lr, args.beta, args.temperature) == (1e-6, 0.0, 0.7)


# ---------------------------------------------------------------- the policy-gradient mask
ROWS = [([1, 7, 9, 11, 13], [20, 21, 2]), ([1, 7, 9, 12], [30]), ([1, 7, 9, 11, 40, 41], [50, 51, 52, 53])]


def reference_logp(model, rows, temperature=1.0):
    """log p of each completion token from one plain forward per row (prompt + completion)."""
    out = []
    for prompt, comp in rows:
        ids = torch.tensor([list(prompt) + list(comp)])
        logits = model(input_ids=ids).logits[0] / temperature
        logp = torch.log_softmax(logits.float(), -1)
        out.append(torch.stack([logp[len(prompt) - 1 + j, t] for j, t in enumerate(comp)]))
    return out


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_policy_gradient_mask_is_exactly_the_written_tokens(mode):
    policy = tiny(mode)
    scorer = PolicyScorer(policy.model)
    logp, mask = scorer(ROWS, 0.7)
    assert mask.tolist() == [[j < len(c) for j in range(4)] for _, c in ROWS]
    assert (logp[~mask] == 0).all()
    ref = reference_logp(policy.model, ROWS, 0.7)
    for i, r in enumerate(ref):
        assert torch.allclose(logp[i, : len(r)], r, atol=1e-5)
    # the gradient of the masked sum is that of the written tokens' log-probabilities, nothing else
    (logp * mask).sum().backward()
    got = [p.grad.clone() for p in policy.parameters()]
    policy.model.zero_grad(set_to_none=True)
    torch.stack([x.sum() for x in reference_logp(policy.model, ROWS, 0.7)]).sum().backward()
    for g, p in zip(got, policy.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-5)


def test_a_lora_rank_past_a_target_matrix_is_refused_before_anything_is_injected(tmp_path):
    """--lora-rank 100000 on SmolLM2 allocated ~100000 x 576 numbers per LoRA matrix (tens of GB: the machine's
    OOM killer, not an error). A rank above a target's smaller side (tiny-llama's k_proj is 36 x 72) is refused,
    the model left as it was; `tmem rl` says it in one line before --out is made."""
    from tmem_runtime.agent.long_conversations import make_conversation
    from tmem_runtime.cli import main

    model, _ = load_model("tiny-llama")
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"lora_rank 37 exceeds model.layers.0.self_attn.k_proj's smaller side "
                                         r"\(36 x 72\)"):
        Policy(model, PolicySpec("lora", lora_rank=37))
    assert model.state_dict().keys() == before.keys() and not any(p.requires_grad for p in model.parameters())
    assert Policy(model, PolicySpec("lora", lora_rank=36)).parameters()  # the largest rank that fits
    (tmp_path / "train.json").write_text(json.dumps([make_conversation(1, n_facts=2, tokens=100, turns_per_session=6)]))
    with pytest.raises(SystemExit) as exit_info:
        main(["rl", "--data", str(tmp_path / "train.json"), "--out", str(tmp_path / "run"), "--model", "tiny-llama",
              "--lora-rank", "100000"])
    assert str(exit_info.value.code).startswith("tmem rl: --lora-rank 100000: lora_rank 100000 exceeds model.layers.0")
    assert not (tmp_path / "run").exists()


def test_a_group_size_whose_pool_cannot_fit_in_memory_is_refused_before_it_is_allocated(tmp_path):
    """--group-size 10**12 made a pool of 10**12 + 2 B rows, allocated up front (all the machine's memory, or
    torch's allocator error deep in a traceback): refused in one line naming the flag, the capacity and the
    bytes, at once, before --out is made."""
    from tmem_runtime.agent.long_conversations import make_conversation
    from tmem_runtime.cli import main

    (tmp_path / "train.json").write_text(json.dumps([make_conversation(1, n_facts=2, tokens=100, turns_per_session=6)]))
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(["rl", "--data", str(tmp_path / "train.json"), "--out", str(tmp_path / "run"), "--model", "tiny-llama",
              "--group-size", str(10**12)])
    assert time.perf_counter() - start < 30
    assert re.fullmatch(r"tmem rl: --group-size 1000000000000: capacity=1000000000002 \(B rows of \d+ bytes each\) "
                        r"needs \d+ bytes \(.* GB\) on cpu, which has \d+ bytes \(.* GB\) available: use a smaller "
                        r"capacity .*", str(exit_info.value.code))
    assert not (tmp_path / "run").exists()


def test_policy_reads_no_fast_weights_and_none_get_a_gradient():
    policy = tiny("lora")
    model = policy.model
    before, _ = PolicyScorer(model)(ROWS)
    pool = SessionPool(model, capacity=2)
    pool.open("s")
    state = {k: torch.randn_like(v) * 0.5 if "lora_B" in k else v for k, v in pool.state_dict("s").items()}
    pool.load_state_dict("s", state)
    logp, mask = PolicyScorer(model)(ROWS)  # no session bound: the policy alone
    assert torch.allclose(logp, before, atol=1e-6)
    ids = torch.tensor([ROWS[0][0]])
    with pool.rows(["s"]):  # (the session does change the model when it is bound)
        bound = model(input_ids=ids).logits
    assert not torch.allclose(bound, model(input_ids=ids).logits, atol=1e-3)
    (logp * mask).sum().backward()
    assert all(p.grad is not None for p in policy.parameters())
    for k, v in pool.state_dict("s").items():  # nothing reached the session
        assert not v.requires_grad and v.grad is None and torch.equal(v, state[k])


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_write_inside_a_training_step_leaves_every_policy_grad_untouched(mode):
    policy = tiny(mode)
    pool = SessionPool(policy.model, capacity=2)
    pool.open("s")
    logp, mask = PolicyScorer(policy.model)(ROWS)
    (logp * mask).sum().backward()  # a training step's gradients so far
    grads = {n: p.grad.clone() for n, p in policy.named}
    flags = {n: p.requires_grad for n, p in policy.model.named_parameters()}
    ids = torch.tensor([[1, 5, 9, 13, 17, 2], [1, 6, 10, 14, 18, 2]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    b_before = pool.state_dict("s")
    losses = pool.write("s", [batch, batch], lr=1e-2, optimizer="adamw")
    assert len(losses) == 2 and any(not torch.equal(v, b_before[k]) for k, v in pool.state_dict("s").items())
    for n, p in policy.named:
        assert torch.equal(p.grad, grads[n]), n
    assert {n: p.requires_grad for n, p in policy.model.named_parameters()} == flags


# ---------------------------------------------------------------- sampling
def test_sampling_is_seeded_per_prompt_and_its_logprobs_are_the_scorers():
    policy = tiny("full")
    prompts = [[1, 7, 9, 11, 13], [1, 7, 9, 12], [1, 8, 40, 41, 42, 43, 44]]
    seeds = [11, 22, 33]
    together = sample_completions(policy.model, prompts, seeds, 1.0, 6, [EOS])
    alone = [sample_completions(policy.model, [p], [s], 1.0, 6, [EOS])[0] for p, s in zip(prompts, seeds)]
    assert [c.tokens for c in together] == [c.tokens for c in alone]  # its batch does not change a row's draw
    other = sample_completions(policy.model, prompts, [12, 23, 34], 1.0, 6, [EOS])
    assert [c.tokens for c in other] != [c.tokens for c in together]
    logp, mask = PolicyScorer(policy.model)([(c.prompt, c.tokens) for c in together])
    for i, c in enumerate(together):
        assert len(c.logprobs) == len(c.tokens) == int(mask[i].sum())
        assert torch.allclose(logp[i, : len(c.tokens)], torch.tensor(c.logprobs), atol=1e-4)


@pytest.mark.parametrize("name", ["tiny-olmo2", "tiny-gemma2"])
def test_sampling_runs_on_models_the_piecewise_decoder_cannot_drive(name):
    """OLMo2 and Gemma2/3 take fast weights but not the piecewise decoder: sampling (greedy_generate's `choose`)
    was a ValueError, so `tmem rl --model` of those families died at its first rollout, after loading and setup.
    They sample by plain forwards now: seeded per prompt, log-probabilities the scorer's, and choosing the
    argmax is transformers' greedy generate."""
    from tmem_runtime.decoding import greedy_generate, reference_generate

    policy = Policy(load_model(name)[0], PolicySpec("lora"))
    with torch.no_grad():
        for p in policy.parameters():  # a trained LoRA: sampling and scoring must both read it
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    model, prompts, seeds = policy.model, [[1, 7, 9, 11, 13], [1, 7, 9, 12], [1, 8, 40, 41, 42, 43, 44]], [11, 22, 33]
    together = sample_completions(model, prompts, seeds, 0.8, 6, [EOS])
    alone = [sample_completions(model, [p], [s], 0.8, 6, [EOS])[0] for p, s in zip(prompts, seeds)]
    assert [c.tokens for c in together] == [c.tokens for c in alone]
    logp, mask = PolicyScorer(model)([(c.prompt, c.tokens) for c in together], 0.8)
    for i, c in enumerate(together):
        assert len(c.logprobs) == len(c.tokens) == int(mask[i].sum()) > 0
        assert torch.allclose(logp[i, : len(c.tokens)], torch.tensor(c.logprobs), atol=1e-4)
    greedy = greedy_generate(model, prompts, 6, [EOS], choose=lambda logits, rows: logits.argmax(-1))
    assert greedy == reference_generate(model, prompts, 6, 0, [EOS])


# ---------------------------------------------------------------- training, checkpoints, bad input
def toy_trainer(out, steps_config: dict | None = None, env_cls=PlantedFactEnv, seed: int = 0,
                settings: dict | None = None) -> GRPOTrainer:
    policy = tiny("full", seed)
    cfg = dict(group_size=8, batch=2, lr=1e-2, save_every=2, kl_every=1, updates_per_batch=2)
    cfg.update(steps_config or {})
    return GRPOTrainer(policy, env_cls(policy.model, num_tasks=8), GRPOConfig(**cfg), out, settings=settings)


class _WritingPlantedFactEnv(PlantedFactEnv):
    """The toy reward, each sample first written (prompt and card, next-token) into its own fast-weight
    session on the policy's model: the memory env's order (sample, write, score) on a toy reward."""

    def __init__(self, model, pool, **kw):
        super().__init__(model, **kw)
        self.pool = pool

    def rollouts(self, tasks, members, seed):
        out = super().rollouts(tasks, members, seed)
        for r in out:
            name = f"m{r.member}"
            if name not in self.pool:
                self.pool.open(name)
            self.pool.reset(name)
            ids = torch.tensor([list(r.segments[0].prompt) + list(r.segments[0].tokens)])
            self.pool.write(name, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}], lr=0.1)
        return out


def test_the_policy_gradient_is_the_hand_computed_grpo_estimate_with_writes_in_the_rollouts(tmp_path):
    # the gradient the optimizer steps with == d/dθ of -1/N Σ_i A_i mean_t log p(o_it): REINFORCE with group-
    # normalised advantages (computed here from the rewards), log-probs from plain forwards of the bare model;
    # the fast-weight writes inside the rollouts add nothing to it (the gradient stops at the write)
    policy = tiny("full")
    env = _WritingPlantedFactEnv(policy.model, SessionPool(policy.model, capacity=8), num_tasks=8, card_tokens=12)
    cfg = GRPOConfig(group_size=8, batch=8, lr=1e-3, save_every=0, kl_every=0, max_grad_norm=1e9)
    trainer = GRPOTrainer(policy, env, cfg, tmp_path)
    stepped = {}
    trainer.optimizer.register_step_pre_hook(
        lambda *_: stepped.update(grads=[p.grad.clone() for p in policy.parameters()]))
    tasks = trainer.tasks_for(1)
    with torch.no_grad():  # the same samples as the trainer's (seeded by step, task and member)
        rollouts = PlantedFactEnv.rollouts(env, tasks, [(b, g) for b in range(len(tasks)) for g in range(8)],
                                           rollout_seed(cfg.seed, "step", 1))
    assert trainer.train_step()["skipped"] is None
    by_group: dict = {}
    for r in rollouts:
        by_group.setdefault(r.group, []).append(r.reward)
    advantage = {}
    for r in rollouts:
        rewards = by_group[r.group]
        mean = sum(rewards) / len(rewards)
        std = math.sqrt(sum((x - mean) ** 2 for x in rewards) / (len(rewards) - 1))
        advantage[r.group, r.member] = 0.0 if max(rewards) == min(rewards) else (r.reward - mean) / (std + 1e-4)
    assert sum(a != 0 for a in advantage.values()) >= 2  # some signal: the check below is not 0 == 0
    written = [r for r in rollouts if r.n_tokens > 0]
    fresh = tiny("full")  # the policy before its update
    logps = reference_logp(fresh.model, [(r.segments[0].prompt, r.segments[0].tokens) for r in written])
    (-sum(advantage[r.group, r.member] * lp.mean() for r, lp in zip(written, logps)) / len(written)).backward()
    for got, p in zip(stepped["grads"], fresh.parameters()):
        assert torch.allclose(got, p.grad, rtol=1e-4, atol=1e-6 * float(p.grad.abs().max()) + 1e-9)


def test_resume_continues_exactly_as_the_uninterrupted_run(tmp_path):
    whole = toy_trainer(tmp_path / "whole")
    whole.train(4)
    first = toy_trainer(tmp_path / "split")
    first.train(2)
    second = toy_trainer(tmp_path / "split")  # a new process: the model as loaded, then the checkpoint
    assert second.resume() == 2
    second.train(4)
    for (n, a), (_, b) in zip(whole.policy.named, second.policy.named):
        assert torch.equal(a, b), n
    sa, sb = whole.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    log_a = [json.loads(x) for x in (tmp_path / "whole" / LOG_FILE).read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "split" / LOG_FILE).read_text().splitlines()]
    keys = ("step", "reward", "loss", "kl", "grad_norm")
    assert [[r[k] for k in keys] for r in log_a] == [[r[k] for k in keys] for r in log_b]
    assert sorted(p.name for p in (tmp_path / "whole" / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_a_log_line_cut_short_by_a_kill_is_dropped_on_resume(tmp_path):
    """A run killed while appending its step's record left a torn last line in log.jsonl: every resume then
    died on a JSONDecodeError traceback. Dropped now with the records after the checkpoint."""
    trainer = toy_trainer(tmp_path)
    trainer.train(2)
    trainer.train_step()  # step 3: logged, not saved
    log = tmp_path / LOG_FILE
    whole = log.read_text().splitlines()
    log.write_text("\n".join(whole) + "\n" + whole[-1][: len(whole[-1]) // 2])  # step 4, killed mid-write
    resumed = toy_trainer(tmp_path)
    assert resumed.resume() == 2
    assert log.read_text() == "".join(line + "\n" for line in whole[:2])
    resumed.train(3)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3]


def test_a_checkpoint_left_half_renamed_by_a_crash_is_never_picked(tmp_path):
    import shutil

    trainer = toy_trainer(tmp_path, {"keep_checkpoints": 2})
    trainer.train(2)
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(tmp_path) == root / "step-000002"
    shutil.copytree(root / "step-000002", root / "step-000003.tmp")  # complete, but crashed before its rename
    (root / "step-000009").mkdir()  # no trainer.json: never finished
    assert latest_checkpoint(tmp_path) == root / "step-000002"
    assert toy_trainer(tmp_path).resume() == 2
    trainer.train(4)  # saves step 4, keeps the 2 newest complete ones
    assert latest_checkpoint(tmp_path) == root / "step-000004"
    names = sorted(p.name for p in root.iterdir())
    assert names == ["step-000002", "step-000003.tmp", "step-000004", "step-000009"]


def test_a_run_started_over_in_an_out_with_later_checkpoints_is_the_one_resumed(tmp_path):
    """`tmem rl --fresh` on an OUT trained further (or any run from step 0 there): its first checkpoint, step 2,
    was pruned at once by the old run's steps 4 and 6 ("the newest 2 kept"), and the next resume continued the
    old run from step 6 under the new run's log. Later checkpoints are another run's now: removed."""
    toy_trainer(tmp_path, {"save_every": 2}).train(6)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000004", "step-000006"]
    fresh = toy_trainer(tmp_path, {"save_every": 2}, seed=1)  # started over: no resume
    fresh.train(2)
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]
    resumed = toy_trainer(tmp_path, {"save_every": 2}, seed=1)
    assert resumed.resume() == 2
    assert all(torch.equal(a, b) for a, b in zip(resumed.policy.parameters(), fresh.policy.parameters()))


def test_a_corrupt_checkpoint_is_refused_and_changes_nothing(tmp_path):
    trainer = toy_trainer(tmp_path)
    trainer.train(2)
    ckpt = latest_checkpoint(tmp_path)
    fresh = toy_trainer(tmp_path / "other", seed=1)
    weights = [p.detach().clone() for p in fresh.policy.parameters()]
    data = bytearray((ckpt / "policy.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (ckpt / "policy.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        fresh.resume(ckpt)
    (ckpt / "trainer.json").write_text("{not json")
    with pytest.raises(CheckpointError):
        fresh.resume(ckpt)
    assert fresh.step == 0
    assert all(torch.equal(a, b) for a, b in zip(weights, fresh.policy.parameters()))
    (ckpt / "policy.safetensors").write_bytes(bytes(data[: len(data) // 2]))  # cut short
    with pytest.raises(PolicyFileError):
        load_policy(load_model("tiny-llama")[0], ckpt / "policy.safetensors")
    fresh.policy.save(tmp_path / "policy.safetensors")
    with pytest.raises(PolicyFileError, match="another model"):
        load_policy(load_model("tiny-qwen3")[0], tmp_path / "policy.safetensors")


def test_a_checkpoint_of_another_model_is_refused_and_changes_nothing(tmp_path):
    """Resuming OUT with another --model whose policy tensors have the same names and shapes (tiny-llama's
    slow LoRA in tiny-qwen2) is refused as `load_policy` refuses its file (it was loaded silently)."""
    cfg = GRPOConfig(group_size=4, batch=1, lr=1e-2, save_every=1)
    mine = Policy(load_model("tiny-llama")[0], PolicySpec("lora"))
    GRPOTrainer(mine, PlantedFactEnv(mine.model, num_tasks=2), cfg, tmp_path).train(1)
    other = Policy(load_model("tiny-qwen2")[0], PolicySpec("lora"))
    assert [(n, p.shape) for n, p in other.named] == [(n, p.shape) for n, p in mine.named]  # it would fit
    trainer = GRPOTrainer(other, PlantedFactEnv(other.model, num_tasks=2), cfg, tmp_path)
    weights = [p.detach().clone() for p in other.parameters()]
    with pytest.raises(CheckpointError, match="another model"):
        trainer.resume()
    assert trainer.step == 0 and all(torch.equal(a, b) for a, b in zip(weights, other.parameters()))


def test_a_checkpoint_of_a_model_with_other_weights_is_refused_and_changes_nothing(tmp_path):
    """Two tiny-llama models of one config and other seeds: same type, sizes, tensor names and shapes, so the
    policy header's check passes (the checkpoint was resumed silently). trainer.json now records the SHA-256 of
    the model's fast-weight MLP weights (the digest a SessionPool's adapter files record), taken before any
    update: the other model is refused, nothing changed; the model it was trained on, loaded again, resumes
    (a "full" policy's trained weights do not count); a checkpoint saved before the fingerprint resumes with
    a warning."""
    cfg = GRPOConfig(group_size=8, batch=2, lr=1e-2, save_every=1, kl_every=0)

    def trainer_on(seed: int) -> GRPOTrainer:
        policy = Policy(load_model("tiny-llama", seed=seed)[0], PolicySpec("full"))
        return GRPOTrainer(policy, PlantedFactEnv(policy.model, num_tasks=8), cfg, tmp_path)

    trained = trainer_on(0)
    (record,) = trained.train(1)
    assert not record.get("skipped")  # the weights it saved are not the model's as loaded
    state_file = tmp_path / "checkpoints" / "step-000001" / "trainer.json"
    state = json.loads(state_file.read_text())
    pool = SessionPool(load_model("tiny-llama", seed=0)[0], capacity=1, backend="torch")
    assert state["weights_sha256"] == pool.metadata()["weights_sha256"]
    other = trainer_on(1)
    assert [(n, p.shape) for n, p in other.policy.named] == [(n, p.shape) for n, p in trainer_on(0).policy.named]
    weights = [p.detach().clone() for p in other.policy.parameters()]
    with pytest.raises(CheckpointError, match="trained on another model: same type and sizes, other weights"):
        other.resume()
    assert other.step == 0 and all(torch.equal(a, b) for a, b in zip(weights, other.policy.parameters()))
    assert trainer_on(0).resume() == 1  # the same model loaded again
    del state["weights_sha256"]  # a checkpoint saved before the fingerprint was recorded
    state_file.write_text(json.dumps(state))
    with pytest.warns(UserWarning, match="records no fingerprint of its model's weights"):
        assert trainer_on(0).resume() == 1


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_a_saved_policy_loads_into_a_fresh_model_as_the_trained_writer(tmp_path, mode):
    policy = tiny(mode)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # as if trained
    policy.save(tmp_path / "policy.safetensors")
    want, _ = PolicyScorer(policy.model)(ROWS)
    fresh, _ = load_model("tiny-llama")
    loaded = load_policy(fresh, tmp_path / "policy.safetensors", num_layers=4)
    assert loaded.spec == policy.spec and not any(p.requires_grad for p in fresh.parameters())
    assert torch.allclose(PolicyScorer(fresh)(ROWS)[0], want, atol=1e-6)
    if mode == "lora":  # its LoRA leaves the fast-weight MLPs out: other fast-weight layers are refused
        with pytest.raises(PolicyFileError, match="layers"):
            load_policy(load_model("tiny-llama")[0], tmp_path / "policy.safetensors", num_layers=2)


class NaNRewardEnv(PlantedFactEnv):
    """Scores every sample NaN: the advantages and so the loss are NaN."""

    def score(self, tokens, planted):
        _, counts = super().score(tokens, planted)
        return math.nan, counts


def test_a_nan_loss_skips_the_step_changes_nothing_and_says_why(tmp_path):
    trainer = toy_trainer(tmp_path, {"save_every": 0}, env_cls=NaNRewardEnv)
    weights = [p.detach().clone() for p in trainer.policy.parameters()]
    record = trainer.train_step()
    assert record["skipped"] == "non-finite loss" and record["loss"] is None
    assert all(torch.equal(a, b) for a, b in zip(weights, trainer.policy.parameters()))
    assert trainer.optimizer.state_dict()["state"] == {}
    assert all(p.grad is None for p in trainer.policy.parameters())
    logged = json.loads((tmp_path / LOG_FILE).read_text().splitlines()[-1])
    assert logged["skipped"] == "non-finite loss" and logged["step"] == 1


def test_toy_reward_rises_on_held_out_contexts(tmp_path):
    policy = tiny("full")
    env = PlantedFactEnv(policy.model, num_tasks=32)
    held_out = PlantedFactEnv(policy.model, num_tasks=32, offset=10_000)
    before = held_out.mean_reward(samples=4)
    trainer = GRPOTrainer(policy, env, GRPOConfig(group_size=16, batch=4, lr=1e-2, save_every=0, kl_every=0),
                          tmp_path)
    trainer.train(30)
    after = held_out.mean_reward(samples=4)
    assert before < 0.03 and after > before + 0.08, (before, after)


# ---------------------------------------------------------------- per-row sessions in the batched decoder
def test_bind_gives_each_row_its_own_session_through_the_sorted_grouped_prefill():
    from tmem_runtime.decoding import greedy_generate

    model, _ = load_model("tiny-llama")
    pool = SessionPool(model, capacity=4)
    for k, name in enumerate(["a", "b", "c"]):
        pool.open(name)
        g = torch.Generator().manual_seed(k)
        pool.load_state_dict(name, {n: torch.randn(v.shape, generator=g) if "lora_B" in n else v
                                    for n, v in pool.state_dict(name).items()})
    # 11 rows of different lengths (more than one prefill group of 8, reordered by length), sessions mixed
    prompts = [[1] + [3 + (7 * i + j) % 400 for j in range(2 + (5 * i) % 9)] for i in range(11)]
    sessions = [["a", "b", "c", None][i % 4] for i in range(11)]
    together = greedy_generate(model, prompts, 6, [2], batch_size=16,
                               bind=lambda idx: pool.rows([sessions[i] for i in idx]))
    for p, s, got in zip(prompts, sessions, together):
        with pool.rows([s]):
            alone = greedy_generate(model, [p], 6, [2])[0]
        assert got == alone
    assert len({tuple(t) for t in together}) > 3  # the sessions do differ


def test_choose_follows_rows_reordered_by_suffix_length():
    from tmem_runtime.decoding import greedy_generate, prefill
    from tmem_runtime.rl.sampling import RowSampler

    model, _ = load_model("tiny-llama")
    shared = [1, 30, 31, 32, 33, 34, 35]
    pre = prefill(model, shared)
    # the batch comes sorted by whole length; the decoder re-sorts by suffix length (prefixed rows first)
    prompts = [[1, 50, 51, 52, 53], shared + [60], [1, 70, 71, 72, 73, 74], shared + [80, 81], [1, 90, 91, 92]]
    prefixes = [None, pre, None, pre, None]
    seeds = [5, 6, 7, 8, 9]
    sampler = RowSampler(seeds, 1.0, EOS, torch.device("cpu"))
    together = greedy_generate(model, prompts, 5, [EOS], prefix=prefixes, choose=sampler)
    for i, p in enumerate(prompts):
        alone = RowSampler([seeds[i]], 1.0, EOS, torch.device("cpu"))
        assert greedy_generate(model, [p], 5, [EOS], prefix=[prefixes[i]], choose=alone)[0] == together[i]
        assert alone.logprobs[0] == pytest.approx(sampler.logprobs[i], abs=1e-5)


# ---------------------------------------------------------------- the episode environment, bad samples
def test_samples_without_a_valid_card_get_reward_0_counted_and_the_step_goes_on(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tmem_runtime.agent.generation import Generator
    from tmem_runtime.agent.locomo import load_locomo
    from tmem_runtime.agent.long_conversations import make_conversation
    from tmem_runtime.models import smollm2_dir, tiny_config
    from tmem_runtime.rl.environment import MemoryEnvConfig, MemoryWriteEnv

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    torch.manual_seed(0)  # random weights with SmolLM2's vocabulary: the "cards" are noise
    model = AutoModelForCausalLM.from_config(tiny_config("tiny-llama", vocab_size=len(tokenizer))).eval()
    model.requires_grad_(False)
    (tmp_path / "conv.json").write_text(json.dumps([make_conversation(3, n_facts=2, tokens=150, turns_per_session=6)]))
    conversations = load_locomo(tmp_path / "conv.json")
    policy = Policy(model, PolicySpec("lora"))
    pool = SessionPool(model, capacity=6)
    env = MemoryWriteEnv(pool, Generator(model, tokenizer), conversations,
                         MemoryEnvConfig(l_max=200, card_tokens=10, answer_tokens=4))
    trainer = GRPOTrainer(policy, env, GRPOConfig(group_size=3, batch=1, lr=1e-2, save_every=0), tmp_path / "run")
    weights = [p.detach().clone() for p in policy.parameters()]
    record = trainer.train_step()
    assert record["rollouts"] == 3 * record["groups"] > 0
    counts = record["counts"]
    assert record["reward"] == 0.0 and counts["malformed"] == counts["samples"] == 3 * record["groups"]
    assert record["valid_card_rate"] == 0.0 and record["skipped"] == "no signal"
    assert all(torch.equal(a, b) for a, b in zip(weights, policy.parameters()))


def test_tmem_rl_trains_on_generated_conversations_only(tmp_path, capsys):
    from tmem_runtime.agent.long_conversations import make_conversation
    from tmem_runtime.rl.command import load_conversations, parse_args

    sample = make_conversation(1, n_facts=2, tokens=100, turns_per_session=6)
    (tmp_path / "gen.json").write_text(json.dumps([sample]))
    assert [c.sample_id for c in load_conversations(str(tmp_path / "gen.json"))] == ["long-1"]
    (tmp_path / "locomo.json").write_text(json.dumps([dict(sample, sample_id="conv-26")]))
    with pytest.raises(SystemExit, match="LoCoMo"):
        load_conversations(str(tmp_path / "locomo.json"))
    (tmp_path / "empty.json").write_text(json.dumps([dict(sample, qa=[])]))
    with pytest.raises(SystemExit, match="no questions"):
        load_conversations(str(tmp_path / "empty.json"))
    args = parse_args(["--data", "d.json", "--out", "o"])
    assert (args.policy, args.group_size, args.steps) == ("lora", 4, 20)
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "(default: lora)" in capsys.readouterr().out  # defaults shown in --help


def test_a_held_out_report_that_cannot_be_read_is_scored_again_not_a_traceback(tmp_path, capsys):
    """held_out.json was written in place (truncated, then written): a kill in between left it empty and every
    resume of that OUT died on json.loads. It is written atomically now, and one that cannot be read is said
    in one line and scored again."""
    from tmem_runtime.rl.command import read_report

    path = tmp_path / "held_out.json"
    assert read_report(path) == {}
    report = {"before": {"per-turn": {"reward": 0.25, "groups": 2, "step": 0}}}
    path.write_text(json.dumps(report, indent=1))
    assert read_report(path) == report and capsys.readouterr().err == ""
    for text in ("", json.dumps(report, indent=1)[:30], "[1, 2]", '{"before": 3}'):
        path.write_text(text)
        assert read_report(path) == {}
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"tmem rl: {path} is unreadable (")
        assert err[0].endswith("the held-out writer is scored again")


def test_tmem_rl_steps_0_ends_cleanly_with_an_empty_log_and_plots(tmp_path, capsys):
    """--steps 0 (allowed: held-out scoring alone, or setup checks) ended with 'tmem rl: No such file or
    directory: OUT/log.jsonl' and exit status 2 (plot_log read a log no step had made)."""
    from tmem_runtime.agent.long_conversations import make_conversation
    from tmem_runtime.cli import main
    from tmem_runtime.rl.command import PLOTTED, plot_log

    (tmp_path / "train.json").write_text(json.dumps([make_conversation(1, n_facts=2, tokens=100, turns_per_session=6)]))
    out = tmp_path / "run"
    assert main(["rl", "--data", str(tmp_path / "train.json"), "--out", str(out), "--model", "tiny-llama",
                 "--group-size", "2", "--steps", "0"]) == 0
    assert (out / LOG_FILE).read_text() == "" and not (out / "checkpoints").exists()
    assert sorted(p.name for p in out.glob("rl_*.png")) == sorted(f"rl_{k}.png" for k, _ in PLOTTED)
    assert capsys.readouterr().out.strip().endswith(f"wrote {out}/log.jsonl, checkpoints/, rl_*.png")
    (out / LOG_FILE).unlink()  # a resumed run whose log was deleted
    assert [p.name for p in plot_log(out)] == [f"rl_{k}.png" for k, _ in PLOTTED]


def test_tmem_rl_fresh_removes_the_replaced_runs_checkpoints_at_its_start(tmp_path):
    """--fresh starts over: a kill before the new run's first save left the old run's checkpoints, so the next
    plain rerun resumed the old run (under the new run's log). They are removed when the new run starts."""
    from tmem_runtime.agent.long_conversations import make_conversation
    from tmem_runtime.cli import main

    (tmp_path / "train.json").write_text(json.dumps([make_conversation(1, n_facts=2, tokens=100, turns_per_session=6)]))
    out = tmp_path / "run"
    run = ["rl", "--data", str(tmp_path / "train.json"), "--out", str(out), "--model", "tiny-llama",
           "--group-size", "2"]
    assert main([*run, "--steps", "1", "--save-every", "1"]) == 0
    assert latest_checkpoint(out) is not None
    assert main([*run, "--steps", "0", "--fresh"]) == 0  # (a fresh run killed before its first save: the same)
    assert latest_checkpoint(out) is None and not (out / "checkpoints").exists()


def test_resuming_with_other_training_settings_is_refused_and_changes_nothing(tmp_path):
    toy_trainer(tmp_path).train(2)
    other = toy_trainer(tmp_path, {"group_size": 4, "lr": 1e-3})
    weights = [p.detach().clone() for p in other.policy.parameters()]
    with pytest.raises(CheckpointError, match=r"group_size 8 -> 4, lr 0.01 -> 0.001"):
        other.resume()
    assert other.step == 0 and all(torch.equal(a, b) for a, b in zip(weights, other.policy.parameters()))
    assert toy_trainer(tmp_path, {"save_every": 1, "micro_batch_rows": 4}).resume() == 2  # bookkeeping may change


def test_resuming_with_other_environment_settings_is_refused_and_changes_nothing(tmp_path):
    env = {"l_max": 512, "flashcard_mode": "per-turn", "num_layers": 4}
    toy_trainer(tmp_path, settings=env).train(2)
    state = json.loads((tmp_path / "checkpoints" / "step-000002" / "trainer.json").read_text())
    assert state["settings"] == env
    other = toy_trainer(tmp_path, settings=dict(env, l_max=256, flashcard_mode="array"))
    weights = [p.detach().clone() for p in other.policy.parameters()]
    with pytest.raises(CheckpointError, match=r"flashcard_mode per-turn -> array, l_max 512 -> 256"):
        other.resume()
    assert other.step == 0 and all(torch.equal(a, b) for a, b in zip(weights, other.policy.parameters()))
    with pytest.raises(CheckpointError, match=r"num_layers 4 -> None"):
        toy_trainer(tmp_path, settings={"l_max": 512, "flashcard_mode": "per-turn"}).resume()
    assert toy_trainer(tmp_path, settings=dict(env)).resume() == 2


def test_tmem_rl_resume_checks_the_data_and_tokenizer_by_content_and_scores_late_held_out_as_resumed(tmp_path):
    """A resume on other training data (same path, other content) is refused and changes nothing; the same data
    moved elsewhere resumes. A held-out set first named on a resume was scored at the resumed step and filed
    under "before" (the step-0 score it is not): it is filed under "resumed" now, once."""
    from tmem_runtime.agent.long_conversations import make_conversation
    from tmem_runtime.cli import main

    data = tmp_path / "train.json"
    data.write_text(json.dumps([make_conversation(1, n_facts=2, tokens=100, turns_per_session=6)]))
    held = tmp_path / "held.json"
    held.write_text(json.dumps([make_conversation(2, n_facts=2, tokens=100, turns_per_session=6)]))
    out = tmp_path / "run"
    run = ["rl", "--out", str(out), "--model", "tiny-llama", "--group-size", "2", "--save-every", "1"]
    assert main([*run, "--data", str(data), "--steps", "1"]) == 0
    state = json.loads((latest_checkpoint(out) / "trainer.json").read_text())
    assert len(state["settings"]["data_sha256"]) == len(state["settings"]["tokenizer_sha256"]) == 64

    other = tmp_path / "other.json"
    other.write_text(json.dumps([make_conversation(3, n_facts=2, tokens=100, turns_per_session=6)]))
    files = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit, match="data_sha256"):
        main([*run, "--data", str(other), "--steps", "2"])
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == files

    moved = tmp_path / "elsewhere" / "train.json"
    moved.parent.mkdir()
    moved.write_bytes(data.read_bytes())
    assert main([*run, "--data", str(moved), "--held-out", str(held), "--steps", "2"]) == 0
    report = json.loads((out / "held_out.json").read_text())
    assert "before" not in report and report["resumed"]["per-turn"]["step"] == 1
    assert report["after"]["per-turn"]["step"] == 2
    assert report["resumed"]["per-turn"]["held_out_sha256"] == hashlib.sha256(held.read_bytes()).hexdigest()
    resumed = report["resumed"]
    assert main([*run, "--data", str(moved), "--held-out", str(held), "--steps", "3"]) == 0
    report = json.loads((out / "held_out.json").read_text())
    assert report["resumed"] == resumed and report["after"]["per-turn"]["step"] == 3  # not scored again


def test_a_checkpoint_older_than_the_input_fingerprints_resumes_with_a_warning(tmp_path):
    env = {"l_max": 512, "flashcard_mode": "per-turn"}
    toy_trainer(tmp_path, settings=env).train(2)
    with pytest.warns(UserWarning, match="records no data_sha256, tokenizer_sha256"):
        assert toy_trainer(tmp_path, settings=dict(env, data_sha256="a" * 64, tokenizer_sha256="b" * 64)).resume() == 2
    with pytest.raises(CheckpointError, match="flashcard_mode per-turn -> array"):  # the others are still checked
        toy_trainer(tmp_path, settings=dict(env, flashcard_mode="array", data_sha256="a" * 64)).resume()


def test_an_environment_sampling_at_another_temperature_than_grpo_scores_is_refused(tmp_path):
    """The ratio pi/pi_old compares the sampler's log-probabilities with the scorer's: at two temperatures they
    are of two distributions, and the Python API trained on silently (the CLI passes one value to both)."""
    policy = tiny("full")
    with pytest.raises(ValueError, match="temperature 0.7 and GRPO scores at 1.0"):
        GRPOTrainer(policy, PlantedFactEnv(policy.model, num_tasks=2, temperature=0.7), GRPOConfig(group_size=2),
                    tmp_path)
    GRPOTrainer(policy, PlantedFactEnv(policy.model, num_tasks=2, temperature=0.7),
                GRPOConfig(group_size=2, temperature=0.7), tmp_path)


def test_tmem_rl_refuses_data_whose_writes_hold_no_question_and_changes_nothing(tmp_path):
    """A rollout is rewarded by the questions whose evidence its write holds: with no question's evidence known
    (or none in any write) the run trained on nothing, silently. Refused before any step; a mix trains."""
    from tmem_runtime.agent.long_conversations import make_conversation
    from tmem_runtime.cli import main

    known = make_conversation(1, n_facts=2, tokens=100, turns_per_session=6)
    unknown = make_conversation(2, n_facts=2, tokens=100, turns_per_session=6)
    unknown["qa"] = [dict(q, evidence=[]) for q in unknown["qa"]]
    (tmp_path / "idle.json").write_text(json.dumps([unknown]))
    (tmp_path / "mix.json").write_text(json.dumps([known, unknown]))
    out = tmp_path / "run"
    run = ["rl", "--out", str(out), "--model", "tiny-llama", "--group-size", "2", "--steps", "1"]
    with pytest.raises(SystemExit, match="no write of --data at --l-max 512 holds a question's evidence"):
        main([*run, "--data", str(tmp_path / "idle.json"), "--l-max", "512"])
    assert not (out / "checkpoints").exists() and not (out / LOG_FILE).exists()
    assert main([*run, "--data", str(tmp_path / "mix.json"), "--l-max", "512"]) == 0


def test_rerunning_a_finished_run_leaves_its_checkpoint_untouched(tmp_path):
    """A finished run rerun (resumed at its last step, nothing to train) removed its last checkpoint and saved
    it again: a kill in between lost the run's end. Nothing is written now."""
    toy_trainer(tmp_path, {"save_every": 0}).train(2)
    (ckpt,) = (tmp_path / "checkpoints").iterdir()
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in ckpt.iterdir()}
    again = toy_trainer(tmp_path, {"save_every": 0})
    assert again.resume() == 2 and again.train(2) == []
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [ckpt.name]
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in ckpt.iterdir()} == stamps


def test_a_lora_policy_of_another_models_weights_is_refused_and_an_older_file_warns(tmp_path):
    """`tmem eval --policy` identified a policy by the model's type and sizes: a slow LoRA trained on one model
    loaded into another of the same shape (another seed, another fine-tune) silently. Its file now records the
    base weights' SHA-256 (as a checkpoint does); a file saved before says so and loads."""
    from safetensors.torch import load_file, save_file

    policy = tiny("lora", seed=0)
    policy.save(tmp_path / "policy.safetensors")
    other, _ = load_model("tiny-llama", seed=1)
    with pytest.raises(PolicyFileError, match="same type and sizes, other weights"):
        load_policy(other, tmp_path / "policy.safetensors")
    assert not any("lora_" in n for n, _ in other.named_parameters())  # refused before any LoRA is injected
    load_policy(load_model("tiny-llama", seed=0)[0], tmp_path / "policy.safetensors")
    with pytest.warns(UserWarning, match="trained on a float32 model and this one is bfloat16"):  # evaluated in bf16
        load_policy(load_model("tiny-llama", seed=1, dtype=torch.bfloat16)[0], tmp_path / "policy.safetensors")
    meta = dict(policy.metadata())
    del meta["base_weights_sha256"]
    save_file(load_file(tmp_path / "policy.safetensors"), tmp_path / "old.safetensors", metadata=meta)
    with pytest.warns(UserWarning, match="records no fingerprint of its base model's weights"):
        load_policy(load_model("tiny-llama", seed=0)[0], tmp_path / "old.safetensors")
