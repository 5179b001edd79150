"""`tmem demo`: the memory agent on a short multi-session conversation shipped with the package.

The agent reads the conversation with a small budget `l_max`, so memory writes trigger as it goes:
each trigger prints the flashcards the model wrote (and how many it dropped), the write losses and
the context being cleared. Then it answers questions whose evidence left its context long ago, side
by side with two no-memory baselines: the same budget (the most recent `l_max` tokens only) and the
full conversation (which fits this small demo's window: an upper bound, not a peer). F1 is LoCoMo's.
"""

from __future__ import annotations

import os
import time
from importlib import resources
from pathlib import Path

import torch

from tmem_runtime.agent.agent import MemoryAgent, Trigger
from tmem_runtime.agent.channels import make_channel
from tmem_runtime.agent.generation import Generator
from tmem_runtime.agent.locomo import question_prompt, read_locomo, score
from tmem_runtime.agent.write_formats import recipe_name
from tmem_runtime.cli import apply_threads, command_parser, device_arg, int_in, require_tokenizer

DEMO_CONVERSATION = "demo_conversation.json"


def demo_data_path() -> Path:
    """The shipped demo conversation (LoCoMo format)."""
    return Path(str(resources.files("tmem_runtime.data").joinpath(DEMO_CONVERSATION)))


def print_trigger(t: Trigger, l_max: int) -> None:
    w = t.event.weights
    why = f"+ next turn would exceed l_max={l_max}" if t.reason == "budget" else "left at the end of reading"
    print(f"\n[write {t.index + 1}] during session {t.session}: context {t.context_tokens} tokens {why} "
          "-> memory-writing mode")
    if w is not None:
        if w.format == "qa":
            print(f"  flashcards written: {w.n_written}, dropped: {w.n_dropped} {dict(w.dropped) or ''}")
            for q, a in w.pairs:
                print(f"    Q: {q}  ->  A: {a}")
        else:
            print(f"  {w.format}: {w.n_written} text(s) trained")
        if w.losses:
            print(f"  write: {w.n_written} new + {w.replayed} replayed, {len(w.losses)} steps, "
                  f"loss {w.losses[0]:.3f} -> {w.losses[-1]:.3f} "
                  f"(generate {w.generate_s:.1f}s, train {w.train_s:.1f}s)")
        else:
            print("  nothing valid to train on: zero steps")
    print(f"  context cleared (kept only the DATE line); write took {t.seconds:.1f}s")


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns 0."""
    p = command_parser("tmem demo", __doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m or a local HF model directory")
    p.add_argument("--data", default=None, help="a LoCoMo-format file (None: the shipped demo conversation)")
    p.add_argument("--l-max", type=int_in(1), default=150, help="working-context budget in tokens")
    p.add_argument("--write-format", choices=("qa", "summary", "ntp"), default="qa", help="what a write trains on")
    p.add_argument("--recipe", type=recipe_name, default="agent", help='"agent" (AdamW 3e-3) or a runtime recipe name')
    p.add_argument("--replay", type=int_in(0), default=32, help="earlier flashcards trained again per write (0: paper)")
    p.add_argument("--flashcard-tokens", type=int_in(1), default=160, help="max new tokens of one memory write")
    p.add_argument("--flashcard-mode", choices=("per-turn", "array"), default="per-turn",
                   help="one card per turn (small models) or one JSON array per context (the paper's)")
    p.add_argument("--answer-tokens", type=int_in(1), default=16, help="max new tokens per answer")
    p.add_argument("--device", type=device_arg(), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.device == "cpu":
        apply_threads(args)
    from tmem_runtime import FastWeights, load_model

    start = time.perf_counter()
    conv = read_locomo("tmem demo", args.data or demo_data_path())[0]
    questions = [q for q in conv.qa if q.category != 5]
    if not questions:
        raise SystemExit(f"tmem demo: conversation {conv.sample_id!r} has no questions of categories 1-4 to ask")
    model, tokenizer = load_model(args.model, device=args.device)
    require_tokenizer("tmem demo", args.model, tokenizer)
    gen = Generator(model, tokenizer)
    for flag, tokens in (("--answer-tokens", args.answer_tokens), ("--flashcard-tokens", args.flashcard_tokens)):
        if tokens >= gen.window:  # (no prompt would fit: the decoder's error, after the baselines had run)
            raise SystemExit(f"tmem demo: {flag} {tokens} leaves no room for a prompt in the model's window of "
                             f"{gen.window} tokens")
    prompts = [question_prompt(q) for q in questions]
    print(f"tmem demo: {args.model}, conversation {conv.sample_id!r}: {len(conv.sessions)} sessions, "
          f"{gen.count_tokens(conv.render())} tokens; l_max={args.l_max}, write format {args.write_format}, "
          f"flashcards {args.flashcard_mode}, recipe {args.recipe}, replay {args.replay}")

    baselines = {}
    for name, window in (("none, same budget", args.l_max + 160), ("none, full context", None)):
        agent = MemoryAgent(gen, make_channel("none", gen), args.l_max, args.answer_tokens, window=window)
        agent.read(conv)
        baselines[name] = agent.answer(prompts)

    fw = FastWeights(model, rank=6, num_layers=4)
    channel = make_channel("tmem", gen, fw, args.write_format, args.recipe, flashcard_tokens=args.flashcard_tokens,
                           flashcard_mode=args.flashcard_mode, replay=args.replay)
    agent = MemoryAgent(gen, channel, args.l_max, args.answer_tokens)
    print(f"\nreading {len(conv.sessions)} sessions turn by turn ...")
    agent.read(conv, on_trigger=lambda t: print_trigger(t, args.l_max))
    print(f"\nend of conversation: {len(agent.triggers)} writes; working context now {agent.context_tokens} tokens; "
          "tmem answers from its weights alone (bare questions)")
    answers = agent.answer(prompts)

    columns = {"tmem": answers, **baselines}
    totals = {k: 0.0 for k in columns}
    print("\nquestions whose evidence left the tmem agent's context:")
    for i, q in enumerate(questions):
        print(f"\nQ: {q.question}   (gold: {q.answer}; evidence session {sorted(q.evidence_sessions)})")
        for name, col in columns.items():
            f1, _ = score(col[i], q.answer, q.category)
            totals[name] += f1
            print(f"  {name:>20}: F1 {f1:.2f}  {col[i]!r}")
    written = sum(t.event.weights.n_written for t in agent.triggers if t.event.weights)
    dropped = sum(t.event.weights.n_dropped for t in agent.triggers if t.event.weights)
    print("\nmean F1 (LoCoMo scoring, x100): " + ", ".join(f"{k} {100 * v / len(questions):.1f}"
                                                          for k, v in totals.items()))
    print(f"flashcards written {written}, dropped {dropped}; total {time.perf_counter() - start:.0f}s")
    fw.detach()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
