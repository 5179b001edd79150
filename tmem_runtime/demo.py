"""The fast-weight demo: facts the model cannot know, written into weights, recalled, then reset."""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from tmem_runtime.chat import ask
from tmem_runtime.cli import apply_threads, command_parser
from tmem_runtime.demo_facts import FACTS, recalled
from tmem_runtime.fast_weights import FastWeights
from tmem_runtime.models import DEFAULT_MODEL, load_model


def _show(title: str, answers: list[str]) -> int:
    hits = [recalled(a, e) for a, (_, e) in zip(answers, FACTS)]
    print(f"\n{title}: {sum(hits)}/{len(FACTS)} recalled")
    for (q, expected), a, ok in zip(FACTS, answers, hits):
        print(f"  {'+' if ok else '-'} {q}  ->  {a[:60]!r}  (fact: {expected})")
    return sum(hits)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("tmem demo-weights", __doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="smollm2-135m or a local HF model directory")
    parser.add_argument("--recipe", default="default", help="a recipe name (tmem_runtime/recipes.py)")
    parser.add_argument("--backend", default="auto", help="auto | triton | native | torch | peft")
    args = parser.parse_args(argv)
    apply_threads(args)

    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    questions = [q for q, _ in FACTS]
    fw = FastWeights(model, backend=args.backend)
    print(f"model {args.model}: fast weights rank {fw.rank} on {', '.join(s.prefix for s in fw.layout.slots[:3])} ...")
    print(
        f"  ({len(fw.layout.slots)} matrices, {fw.layout.numel:,} adapter numbers in one buffer; backend {fw.backend})"
    )
    _show("Before any write (the model has never seen these facts)", ask(model, tokenizer, questions))

    print(f"\nWriting {len(FACTS)} flashcards into fast weights (recipe {args.recipe!r})...")
    bar = tqdm(desc="write", unit="step", leave=False)

    def on_step(step: int, total: int | None, loss: float) -> None:
        bar.total = total
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    t = time.perf_counter()
    losses = fw.write_qa(tokenizer, FACTS, recipe=args.recipe, on_step=on_step)
    bar.close()
    per_step = " ".join(f"{x:.2f}" for x in losses)
    print(f"  {len(losses)} steps in {time.perf_counter() - t:.1f}s; loss per step: {per_step}")

    print("\nContext cleared: the facts are nowhere in the prompt, only in the adapter.")
    after = _show("Asked again, answers from the weights", ask(model, tokenizer, questions))

    fw.reset()
    gone = _show("After reset() (B = 0: the bare model again)", ask(model, tokenizer, questions))
    fw.detach()
    print(
        f"\nrecalled {after}/{len(FACTS)} from weights, {gone}/{len(FACTS)} after reset; "
        f"total {time.perf_counter() - start:.0f}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
