"""GRPO on torch.distributed: two gloo processes under torchrun make the same update as one process
on the whole batch (the rollouts split between the ranks, one group spanning both).

The ranks run this file as a script (`python -m torch.distributed.run --standalone --nproc-per-node 2
tests/test_rl_distributed.py OUT`); the test runs the same function in one process and compares the
gradients each optimizer step was given (1e-6) and the weights after two steps (1e-6).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# lr: AdamW divides each gradient element by its own magnitude, so an element whose gradient is ~1e-9
# (rounded differently when summed over two ranks) moves by up to lr either way; at 1e-4 that stays
# below the 1e-6 compared, while every weight with a real gradient moves by ~1e-4 per step.
CONFIG = dict(group_size=3, batch=3, lr=1e-4, save_every=0, kl_every=1, micro_batch_rows=2, updates_per_batch=2)
STEPS = 2


def run(out: Path) -> None:
    """Train STEPS toy steps (every rank: this process's share); rank 0 saves the gradients given to each
    optimizer step and the final weights under `out`."""
    from tmem_runtime import load_model
    from tmem_runtime.rl.distributed import close_distributed, init_distributed
    from tmem_runtime.rl.policy import Policy, PolicySpec
    from tmem_runtime.rl.toy import PlantedFactEnv
    from tmem_runtime.rl.trainer import GRPOConfig, GRPOTrainer

    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    model, _ = load_model("tiny-llama")
    policy = Policy(model, PolicySpec("full"))
    class EvenTokens(PlantedFactEnv):  # a dense reward (the share of even card tokens): every group learns
        def score(self, tokens, planted):
            _, counts = super().score(tokens, planted)
            return sum(t % 2 == 0 for t in tokens) / len(tokens), counts

    trainer = GRPOTrainer(policy, EvenTokens(model, num_tasks=6), GRPOConfig(**CONFIG), out / "run", ctx)
    grads: dict[str, torch.Tensor] = {}
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        k = len(grads) // len(policy.named)
        grads.update({f"{k}/{n}": p.grad.detach().clone() for n, p in policy.named})
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    records = trainer.train(STEPS)
    if ctx.is_main:
        save_file(grads, str(out / "grads.safetensors"))
        save_file({n: p.detach().contiguous() for n, p in policy.named}, str(out / "weights.safetensors"))
        (out / "records.json").write_text(json.dumps(records))
    close_distributed(ctx)


def test_two_gloo_processes_make_the_one_process_update(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           __file__, str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run(tmp_path / "one")
    two, one = tmp_path / "two", tmp_path / "one"
    g2, g1 = load_file(str(two / "grads.safetensors")), load_file(str(one / "grads.safetensors"))
    assert sorted(g2) == sorted(g1) and len(g1) > 0
    assert max(float(g.abs().max()) for g in g1.values()) > 1e-3  # a real update, not a zero one
    for k in g1:
        assert torch.allclose(g2[k], g1[k], atol=1e-6, rtol=1e-5), (k, float((g2[k] - g1[k]).abs().max()))
    w2, w1 = load_file(str(two / "weights.safetensors")), load_file(str(one / "weights.safetensors"))
    for k in w1:
        assert torch.allclose(w2[k], w1[k], atol=1e-6), (k, float((w2[k] - w1[k]).abs().max()))
    from tmem_runtime import load_model

    start = dict(load_model("tiny-llama")[0].named_parameters())
    assert max(float((w1[k] - start[k]).abs().max()) for k in w1) > 1e-4  # the weights did move
    r2, r1 = json.loads((two / "records.json").read_text()), json.loads((one / "records.json").read_text())
    for a, b in zip(r2, r1):
        assert a["rollouts"] == b["rollouts"] == CONFIG["group_size"] * CONFIG["batch"]
        assert a["reward"] == b["reward"] and a["counts"] == b["counts"]
        assert abs(a["loss"] - b["loss"]) < 1e-6 and abs(a["kl"] - b["kl"]) < 1e-6


if __name__ == "__main__":
    run(Path(sys.argv[1]))


def test_tmem_rl_runs_under_torchrun_and_writes_its_files(tmp_path):
    from tmem_runtime.agent.long_conversations import make_conversations

    (tmp_path / "train.json").write_text(json.dumps(make_conversations(2, 0, n_facts=2, tokens=100,
                                                                       turns_per_session=6)))
    (tmp_path / "held.json").write_text(json.dumps(make_conversations(2, 100, n_facts=2, tokens=100,
                                                                      turns_per_session=6)))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "rl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "tmem_runtime.rl.command", "--model", "tiny-llama", "--data", str(tmp_path / "train.json"),
           "--held-out", str(tmp_path / "held.json"), "--steps", "1", "--group-size", "2", "--batch", "2",
           "--l-max", "200", "--kl-every", "0", "--device", "cpu", "--out", str(out)]
    # (--device cpu: gloo, as the test above; "auto" on a one-GPU machine gave rank 1 the absent cuda:1)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert record["step"] == 1 and record["rollouts"] == 2 * record["groups"] > 0  # both ranks' rollouts
    assert record["reward"] == 0.0 and record["malformed"] == 1.0  # random weights write no valid card
    assert (out / "checkpoints" / "step-000001" / "policy.safetensors").is_file()
    assert all((out / f"rl_{k}.png").stat().st_size > 0 for k in ("reward", "valid_card_rate", "kl", "loss"))
    held = json.loads((out / "held_out.json").read_text())
    assert held["before"]["per-turn"]["groups"] == held["after"]["per-turn"]["groups"] > 0
