"""The fast-weight demo: facts the model cannot know, written into weights, recalled, then reset."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from tmem_runtime.backends import RUNTIME_BACKENDS, resolve_backend
from tmem_runtime.cli import apply_threads, command_parser, require_tokenizer
from tmem_runtime.fact_sets import DEMO, FactSet, fact_sets, load_fact_set
from tmem_runtime.fast_weights import FastWeights
from tmem_runtime.models import DEFAULT_MODEL, load_model
from tmem_runtime.recall import ask_facts, write_and_recall
from tmem_runtime.recipes import RECIPES


def _show(title: str, facts: FactSet, answers: list[str], hits: list[bool]) -> int:
    print(f"\n{title}: {sum(hits)}/{len(hits)} recalled")
    for f, a, ok in zip(facts.facts, answers, hits):
        print(f"  {'+' if ok else '-'} {f.question}  ->  {a[:60]!r}  (fact: {f.answer})")
    return sum(hits)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("tmem demo-weights", __doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="smollm2-135m or a local HF model directory")
    parser.add_argument("--recipe", default="default", choices=sorted(RECIPES),
                        help="a recipe name (tmem_runtime/recipes.py)")
    parser.add_argument("--backend", default="auto", choices=RUNTIME_BACKENDS, help="fast-weight kernels")
    parser.add_argument("--facts", default=DEMO.name, choices=list(fact_sets()), help="fact set (fact_sets.py)")
    args = parser.parse_args(argv)
    try:  # a backend that cannot run here (Triton on the CPU without its interpreter): before the model loads
        resolve_backend(args.backend, torch.device("cpu"), torch.float32)
    except (ValueError, RuntimeError) as exc:
        parser.error(f"--backend {args.backend}: {exc}")
    apply_threads(args)

    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    require_tokenizer("tmem demo-weights", args.model, tokenizer)
    facts = load_fact_set(args.facts)
    n = len(facts.facts)
    fw = FastWeights(model, backend=args.backend)
    print(f"model {args.model}: fast weights rank {fw.rank} on {', '.join(s.prefix for s in fw.layout.slots[:3])} ...")
    print(
        f"  ({len(fw.layout.slots)} matrices, {fw.layout.numel:,} adapter numbers in one buffer; backend {fw.backend})"
    )
    _show("Before any write (the model has never seen these facts)", facts, *ask_facts(model, tokenizer, facts.facts))

    print(f"\nWriting {n} flashcards into fast weights (recipe {args.recipe!r})...")
    bar = tqdm(desc="write", unit="step", leave=False)

    def on_step(step: int, total: int | None, loss: float) -> None:
        bar.total = total
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    run = write_and_recall(fw, tokenizer, facts.facts, args.recipe, paraphrases=False, on_step=on_step)
    bar.close()
    per_step = " ".join(f"{x:.2f}" for x in run.losses)
    print(f"  {len(run.losses)} steps in {run.write_seconds:.1f}s; loss per step: {per_step}")

    print("\nContext cleared: the facts are nowhere in the prompt, only in the adapter.")
    after = _show("Asked again, answers from the weights", facts, run.answers, run.hits)

    fw.reset()
    gone = _show("After reset() (B = 0: the bare model again)", facts, *ask_facts(model, tokenizer, facts.facts))
    fw.detach()
    print(
        f"\nrecalled {after}/{n} from weights, {gone}/{n} after reset; "
        f"total {time.perf_counter() - start:.0f}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
