"""`tmem ablate --out DIR`: init, preconditioning, rank and place, write format, capacity.

Every study checkpoints to a JSON file under --out as each run finishes (the format study: one
`tmem eval` directory per format and conversation), so the same command resumes after a restart;
`--report-only` rebuilds report.md and the plots from what is there.

The defaults are the scale of benchmarks/RESULTS-ablations.md (about 1.3 CPU hours, 4.3 wall hours on
one thread of a 2-core machine shared with other jobs): 3 held-out fact sets of 3 kinds x 3 seeds, 6
LoCoMo conversations (126 questions), 2 fact orders of 12 capacity writes. Smaller: `--seeds 0`,
`--conversations conv-26 conv-30`, `--capacity-writes 4`; larger: `--sets` every held-out set.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from tmem_runtime.ablations.capacity import REPLAY_MODES
from tmem_runtime.ablations.runs import CONFIGS, ResultStore
from tmem_runtime.ablations.studies import FORMATS, NO_MEMORY
from tmem_runtime.cli import apply_threads, check_out_dir, command_parser, int_in, make_out_dir, require_tokenizer
from tmem_runtime.fact_sets import fact_sets, split_names
from tmem_runtime.recipes import RECIPES

STUDIES = ("precondition", "init", "place", "capacity", "format")
# 126 questions of categories 1-4 whose evidence lies in the first 3 sessions
CONVERSATIONS = ["conv-26", "conv-30", "conv-42", "conv-48", "conv-49", "conv-43"]
SETS = ["numbers_and_dates_b", "titles_b", "people_and_pets"]  # held-out, three kinds: numbers/dates, titles, names
log = logging.getLogger("tmem.ablate")


def build_parser() -> argparse.ArgumentParser:
    """The `tmem ablate` parser (every option's default shown in --help)."""
    p = command_parser("tmem ablate", __doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="checkpoints, report.md and plots")
    p.add_argument("--only", nargs="+", choices=STUDIES, default=list(STUDIES), help="studies to run")
    p.add_argument("--model", default="smollm2-135m", help="load_model name or a local HF directory")
    p.add_argument("--sets", nargs="+", choices=list(fact_sets()), default=SETS, metavar="SET",
                   help="fact sets (init, place)")
    p.add_argument("--precondition-sets", nargs="+", choices=list(fact_sets()), default=split_names("held-out"),
                   metavar="SET", help="fact sets (precondition)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="write seeds (init, place)")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                   help="adapter configurations to run (init, place)")
    p.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["default", "paper"],
                   help="write recipes to run (init)")
    p.add_argument("--all-seeds", action="store_true",
                   help="run every seed even where it cannot change the write (else: recorded as seed 0's copy)")
    p.add_argument("--data", default="../shared/data/locomo10.json", help="LoCoMo JSON (read by path)")
    p.add_argument("--conversations", nargs="+", default=CONVERSATIONS, help="LoCoMo conversations (format study)")
    p.add_argument("--formats", nargs="+", choices=[*FORMATS, NO_MEMORY], default=[*FORMATS, NO_MEMORY],
                   help=f"write formats (format study; {NO_MEMORY!r}: no memory, the read sessions in the prompt)")
    p.add_argument("--max-sessions", type=int_in(1), default=3, help="sessions read per conversation (format study)")
    p.add_argument("--capacity-size", type=int_in(1), default=8, help="facts per write (capacity study)")
    p.add_argument("--replay", nargs="+", choices=REPLAY_MODES, default=["none", "sample32"],
                   help="replay of earlier facts with each write (capacity study)")
    p.add_argument("--capacity-seeds", nargs="+", type=int, default=[0, 1], help="fact orders (capacity study)")
    p.add_argument("--capacity-writes", type=int_in(1, 12), default=12, help="writes per capacity run (at most 12)")
    p.add_argument("--report-only", action="store_true", help="only rebuild report.md and the plots")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run_studies(args: argparse.Namespace) -> None:
    """Run the chosen studies in STUDIES order (each skips what its checkpoint holds)."""
    from tmem_runtime import load_model
    from tmem_runtime.ablations import studies

    out = args.out
    facts = [s for s in ("precondition", "init", "place", "capacity") if s in args.only]
    model_settings = {"model": args.model}  # the checkpoints are opened (their settings checked) before the model loads
    pre = ResultStore(out / "precondition.json", model_settings) if "precondition" in facts else None
    fact_store = ResultStore(out / "facts.json", model_settings) if {"init", "place"} & set(facts) else None
    capacity = None
    if "capacity" in facts:
        capacity = ResultStore(out / "capacity.json", {**model_settings, "size": args.capacity_size})
    if facts:
        model, tokenizer = load_model(args.model)
        require_tokenizer("tmem ablate", args.model, tokenizer)
        neutral = studies.neutral_reference(model, tokenizer) if fact_store is not None else None
        if pre is not None:
            studies.precondition_study(pre, model, tokenizer, args.precondition_sets)
        for name, plan in (("init", studies.INIT_PLAN), ("place", studies.PLACE_PLAN)):
            if name in facts:
                chosen = [(c, r) for c, r in plan if c in args.configs and r in args.recipes]
                studies.fact_study(fact_store, model, tokenizer, chosen, args.sets, args.seeds, neutral,
                                   args.all_seeds)  # fmt: skip
        if capacity is not None:
            studies.capacity_study(capacity, model, tokenizer, args.replay, args.capacity_seeds,
                                   args.capacity_size, out / "adapters", args.capacity_writes)
    if "format" in args.only:
        studies.format_study(out, args.data, args.conversations, args.max_sessions, args.formats, threads=args.threads)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    apply_threads(args)
    if "format" in args.only and not args.report_only:  # checked now, not after the hour of studies before it
        from tmem_runtime.agent.locomo import read_locomo

        read_locomo("tmem ablate", args.data, args.conversations, hint=" (pass --data, --conversations)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    check_out_dir("tmem ablate", args.out)  # made by the studies' first result: a failed model load leaves nothing
    if not args.report_only:
        run_studies(args)
    elif not args.out.is_dir():
        raise SystemExit(f"tmem ablate: {args.out} holds no results to report (run the studies first)")
    make_out_dir("tmem ablate", args.out)
    from tmem_runtime.ablations.report import write_report

    path = write_report(args.out)
    print(f"wrote {path}")
    return 0
