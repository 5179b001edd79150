"""`tmem rl`: GRPO on the memory-writing policy over generated conversations, one process or torchrun.

    tmem make-conversations --out runs/train.json --n 64 --seed 0 --tokens 3000
    tmem make-conversations --out runs/held.json --n 8 --seed 1000 --tokens 3000
    tmem rl --data runs/train.json --held-out runs/held.json --steps 200 --out runs/rl
    torchrun --nproc-per-node 8 -m tmem_runtime.rl.command --data ... (the same code: NCCL on GPUs, gloo on CPUs)

OUT gets log.jsonl (one record per step), checkpoints/step-N/ (policy.safetensors: what `tmem eval
--policy` loads; the optimizer state; trainer.json), held_out.json (the greedy writer's reward and
card rates on the held-out conversations, before and after) and plots (rl_*.png). Run again with the
same OUT to continue from its newest checkpoint exactly (--fresh: start over); a checkpoint trained on
another model (type, sizes, weights), with other GRPO settings (group size, batch, lr, temperature, clip,
beta, seed, ...), other environment settings (budget, flashcard mode, replay, policy, fast-weight rank
and layers, dtype), other training data or another tokenizer (by content, not path) is refused.
held_out.json's "before" is the writer's score at step 0; a held-out set or mode first named on a resume is
scored at the resumed step, under "resumed" (each score records its step and its held-out file's SHA-256).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tmem_runtime.cli import (
    add_fast_weight_options,
    check_out_dir,
    command_parser,
    device_arg,
    float_above,
    int_in,
    make_out_dir,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from tmem_runtime.agent.locomo import Conversation
    from tmem_runtime.rl.environment import MemoryEnvConfig, MemoryWriteEnv

PLOTTED = (("reward", "reward (mean F1 after the write)"), ("valid_card_rate", "valid-card rate"),
           ("kl", "KL to the reference"), ("loss", "loss"))


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("tmem rl", __doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="training conversations, LoCoMo-format JSON (tmem make-conversations)")
    p.add_argument("--held-out", default=None, help="held-out conversations: the greedy writer scored before/after")
    p.add_argument("--out", required=True, help="output directory (log, checkpoints, plots); resumed if it has any")
    p.add_argument("--steps", type=int_in(0), default=20, help="GRPO steps in all (a resumed run continues to this)")
    p.add_argument("--group-size", type=int_in(2), default=4,
                   help="flashcard sets sampled per memory write (G >= 2: advantages are relative to the group)")
    p.add_argument("--batch", type=int_in(1), default=1, help="conversations per step, over all ranks")
    p.add_argument("--lr", type=float_above(0), default=1e-5, help="AdamW learning rate (the paper: 1e-6, full model)")
    p.add_argument("--policy", choices=("full", "lora"), default="lora",
                   help="train every weight, or a slow LoRA over all layers (not the fast-weight MLPs)")
    p.add_argument("--lora-rank", type=int_in(1), default=16, help="rank of the slow LoRA (alpha 2 x rank)")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m or a local HF model directory")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (none: the model's; tiny models: "
                   "the embedded model's)")
    p.add_argument("--flashcard-mode", choices=("per-turn", "array"), default="per-turn",
                   help="one card per turn (small models) or one JSON array per context (the paper's)")
    p.add_argument("--eval-modes", nargs="+", choices=("per-turn", "array"), default=None,
                   help="flashcard modes the held-out conversations are scored in (default: --flashcard-mode)")
    p.add_argument("--l-max", type=int_in(1), default=512, help="the agent's budget (tokens): where it writes")
    p.add_argument("--replay", type=int_in(0), default=8, help="earlier episode cards trained again with each write")
    p.add_argument("--temperature", type=float_above(0), default=1.0, help="sampling temperature of the flashcards")
    p.add_argument("--beta", type=float_above(0, inclusive=True), default=0.0,
                   help="KL weight (0: outcome reward only, the paper's)")
    p.add_argument("--kl-every", type=int_in(0), default=1, help="log the KL to the reference every k steps (0: never)")
    p.add_argument("--updates-per-batch", type=int_in(1), default=1, help="optimizer steps per batch of rollouts")
    p.add_argument("--micro-batch-rows", type=int_in(1), default=16, help="scored rows per forward/backward")
    p.add_argument("--save-every", type=int_in(0), default=5, help="checkpoint every k steps (and at the end)")
    add_fast_weight_options(p)
    p.add_argument("--device", type=device_arg(auto=True), default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="the model's dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of the task order, samples, writes and LoRA init")
    p.add_argument("--fresh", action="store_true", help="ignore checkpoints in OUT and start over")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def load_conversations(path: str) -> list[Conversation]:
    """Training or held-out conversations; LoCoMo's own (sample ids conv-*) are refused: it stays for evaluation."""
    from tmem_runtime.agent.locomo import read_locomo

    conversations = read_locomo("tmem rl", path)
    locomo = [c.sample_id for c in conversations if c.sample_id.startswith("conv-")]
    if locomo:
        raise SystemExit(f"{path} holds LoCoMo conversations ({locomo[:3]}): train on generated ones "
                         "(tmem make-conversations); LoCoMo stays for evaluation")
    if not any(c.qa for c in conversations):
        raise SystemExit(f"{path} has no questions: nothing to reward")
    return conversations


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (the training data: where it lies does not matter, what it holds does)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tokenizer_sha256(tokenizer: PreTrainedTokenizerBase) -> str:
    """SHA-256 of what a tokenizer maps text to and from: its vocabulary, special tokens and chat template."""
    what = {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.all_special_tokens,
            "chat_template": getattr(tokenizer, "chat_template", None)}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def read_report(path: Path) -> dict:
    """held_out.json of a run being resumed ({} if there is none); one that cannot be read (cut short by a kill
    while an older tmem wrote it, edited by hand) is said on stderr and left to be scored again, not a traceback."""
    if not path.is_file():
        return {}
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        report = exc
    if isinstance(report, dict) and all(isinstance(v, dict) for v in report.values()):
        return report
    why = report if isinstance(report, Exception) else "not an object of {when: {mode: scores}}"
    print(f"tmem rl: {path} is unreadable ({why}): the held-out writer is scored again", file=sys.stderr)
    return {}


def plot_log(out: Path) -> list[Path]:
    """One PNG per logged quantity (reward, valid-card rate, KL, loss) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = out / "log.jsonl"  # (none where a resumed run's was deleted: empty plots)
    records = [json.loads(x) for x in log.read_text().splitlines() if x.strip()] if log.is_file() else []
    paths = []
    for key, title in PLOTTED:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        fig, ax = plt.subplots(figsize=(5, 3.2))
        if points:
            ax.plot(*zip(*points), marker=".")
        ax.set_xlabel("step")
        ax.set_title(title)
        fig.tight_layout()
        paths.append(out / f"rl_{key}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def check_card_prompts(parser: argparse.ArgumentParser, args: argparse.Namespace, env_config: MemoryEnvConfig,
                       tokenizer: PreTrainedTokenizerBase, window: int | None, train: list[Conversation],
                       held: list[Conversation]) -> None:
    """A usage error (exit status 2) if a flashcard prompt of this run (training on `train` with `env_config`,
    scoring `held` in each --eval-modes mode) with its new tokens would pass the model's window: checked with
    the tokenizer alone, before the model loads (the decoder says the same once it generates, after loading
    and setup)."""
    from tmem_runtime.rl.environment import check_card_window

    runs = [(args.flashcard_mode, train)] + [(m, held) for m in (args.eval_modes or [args.flashcard_mode]) if held]
    for mode, conversations in runs:
        try:
            check_card_window(tokenizer, window, replace(env_config, flashcard_mode=mode), conversations)
        except ValueError as exc:
            parser.error(f"--flashcard-mode {mode} with --l-max {args.l_max} on --model {args.model}: {exc}")


def check_rewardable(env: MemoryWriteEnv, l_max: int) -> None:
    """SystemExit if no training conversation has a write (at budget `l_max`) holding a question's last evidence
    turn: no rollout would ever be rewarded, and the run would train on nothing. Stops at the first one that has
    (usually the first conversation: large data is not read through at start-up)."""
    if not any(w.questions for t in range(env.num_tasks) for w in env.writes(t)):
        raise SystemExit(f"tmem rl: no write of --data at --l-max {l_max} holds a question's evidence (a write "
                         "happens when the context passes the budget): nothing to reward; lower --l-max or use "
                         "longer conversations")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(max(1, args.threads))
    from tmem_runtime import SessionPool
    from tmem_runtime.adapter_file import atomic_write
    from tmem_runtime.agent.generation import Generator
    from tmem_runtime.engine import adapter_layout
    from tmem_runtime.models import model_config
    from tmem_runtime.rl.checkpoint import CheckpointError, remove_checkpoints
    from tmem_runtime.rl.distributed import close_distributed, init_distributed
    from tmem_runtime.rl.environment import MemoryEnvConfig, MemoryWriteEnv, evaluate_writer
    from tmem_runtime.rl.policy import Policy, PolicySpec
    from tmem_runtime.rl.trainer import GRPOConfig, GRPOTrainer
    from tmem_runtime.serve.main import load_serving_model, load_serving_tokenizer

    train = load_conversations(args.data)
    held = load_conversations(args.held_out) if args.held_out else []
    out = Path(args.out)
    check_out_dir("tmem rl", out)  # (made once the model has loaded: a failed load leaves no empty --out)
    env_config = MemoryEnvConfig(args.flashcard_mode, args.l_max, replay=args.replay, temperature=args.temperature)
    tokenizer = load_serving_tokenizer(args.model, args.tokenizer)  # (no weight loaded yet)
    window = getattr(model_config(args.model), "max_position_embeddings", None)  # (the decoder's limit)
    check_card_prompts(parser, args, env_config, tokenizer, window, train, held)
    ctx = init_distributed(args.device)
    model, tokenizer = load_serving_model(args.model, tokenizer, str(ctx.device), args.dtype)
    torch.manual_seed(args.seed)  # the slow LoRA's A (rank 0's: DDP broadcasts it)
    try:
        fast_layers = tuple(dict.fromkeys(s.layer for s in adapter_layout(model, args.rank, args.num_layers).slots))
    except ValueError as exc:
        raise SystemExit(f"tmem rl: --rank {args.rank} / --num-layers {args.num_layers}: {exc}") from None
    try:
        policy = Policy(model, PolicySpec(args.policy, args.lora_rank, 2.0 * args.lora_rank, fast_layers))
    except ValueError as exc:
        raise SystemExit(f"tmem rl: --lora-rank {args.lora_rank}: {exc}") from None
    try:  # (a group size whose pool rows cannot fit in memory: refused before they are allocated)
        pool = SessionPool(model, capacity=args.group_size + 2, rank=args.rank, num_layers=args.num_layers,
                           seed=args.seed)
    except ValueError as exc:
        raise SystemExit(f"tmem rl: --group-size {args.group_size}: {exc}") from None
    generator = Generator(model, tokenizer)
    env = MemoryWriteEnv(pool, generator, train, env_config)
    check_rewardable(env, args.l_max)
    config = GRPOConfig(group_size=args.group_size, batch=args.batch, lr=args.lr, temperature=args.temperature,
                        beta=args.beta, kl_every=args.kl_every, updates_per_batch=args.updates_per_batch,
                        micro_batch_rows=args.micro_batch_rows, save_every=args.save_every, seed=args.seed)
    settings = dict(asdict(env_config), policy=args.policy, lora_rank=args.lora_rank, rank=args.rank,
                    num_layers=args.num_layers, dtype=args.dtype,  # what the steps also depend on
                    data_sha256=file_sha256(args.data), tokenizer_sha256=tokenizer_sha256(tokenizer))
    if ctx.is_main:
        make_out_dir("tmem rl", out)
    trainer = GRPOTrainer(policy, env, config, out, ctx, settings=settings)
    try:
        start = 0 if args.fresh else trainer.resume()
    except CheckpointError as exc:
        raise SystemExit(f"tmem rl: {exc}") from None
    if start == 0 and ctx.is_main:
        remove_checkpoints(out)  # (--fresh: the replaced run's, which a kill before this run's first save resumed)
        (out / "log.jsonl").write_text("")  # a run from step 0 logs from step 1 (--steps 0: an empty log)
    report_path = out / "held_out.json"
    held_sha = file_sha256(args.held_out) if held else None
    report = read_report(report_path) if start else {}
    report = ctx.all_gather_objects(report)[0]  # rank 0's: every rank skips or scores "before" alike

    def score_held_out(when: str, modes: list[str]) -> None:  # the greedy writer on the held-out conversations
        for mode in modes if held else []:  # (shared by the ranks)
            env_mode = MemoryWriteEnv(pool, generator, held, replace(env_config, flashcard_mode=mode))
            scores = evaluate_writer(env_mode, range(len(held)), ctx)
            if ctx.is_main:
                report.setdefault(when, {})[mode] = dict(scores, step=trainer.step, held_out_sha256=held_sha)
                text = json.dumps(report, indent=1)  # (atomic: a kill mid-write leaves the last whole one)
                atomic_write(report_path, lambda tmp, text=text: Path(tmp).write_text(text))
                print(f"held-out {when} ({mode}, step {trainer.step}): {report[when][mode]}")

    # "before" is the initial writer's score: a mode added on a resume (--held-out or --eval-modes new to the run)
    # can only be scored at the resumed step, under "resumed" (each score records its step)
    def scored(mode: str) -> bool:  # on these held-out conversations (an older report recorded no hash)
        return any(report.get(w, {}).get(mode, {}).get("held_out_sha256") == held_sha for w in ("before", "resumed"))

    modes = args.eval_modes or [args.flashcard_mode]
    score_held_out("before" if start == 0 else "resumed", [m for m in modes if not scored(m)])
    trainer.train(args.steps)
    score_held_out("after", modes)
    if ctx.is_main:
        plot_log(out)
        print(f"wrote {out}/log.jsonl, checkpoints/, rl_*.png" + (", held_out.json" if held else ""))
    close_distributed(ctx)
    if ctx.group:  # a torchrun worker, its files written and closed: leave without the interpreter's teardown,
        sys.stdout.flush()  # which once deadlocked on a native mutex at exit (CI, 2026-11-27: 300 s, py-spy)
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
