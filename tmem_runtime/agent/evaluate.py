"""`tmem eval`: LoCoMo with any memory channel, scored with LoCoMo's official metric.

    tmem eval --data ../shared/data/locomo10.json --memory none summary retrieval tmem tmem+summary \\
        --write-format qa summary ntp --model smollm2-135m --conversations conv-26 conv-30 \\
        --max-questions 20 --l-max 1024 --out runs/locomo

Writes to --out: answers.json (every question, answer, score, and every trigger's flashcards and
losses), report.json and report.md (F1/EM per category and method, peak memory, tokens, flashcards
written/dropped, write losses, and where the time went: card generation, training, answering,
prefill and decode, with tokens/s) and plots (f1_by_category.png, write_loss.png, memory.png,
time.png; recall.png with --probe-every: recall of the questions while reading). The same command
runs a 4B model on a GPU: --model DIR --device cuda --dtype bfloat16. Run again with the same --out and
settings to resume an interrupted run (the episodes it saved are kept); --fresh starts over.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tmem_runtime.adapter_file import atomic_write
from tmem_runtime.agent.agent import MemoryAgent, Trigger
from tmem_runtime.agent.card_selection import SELECTIONS
from tmem_runtime.agent.channels import CHANNELS, MemoryChannel, SummaryChannel, make_channel
from tmem_runtime.agent.flashcards import FLASHCARD_MODES
from tmem_runtime.agent.generation import Generator
from tmem_runtime.agent.locomo import (
    CATEGORY_NAMES,
    QA,
    Conversation,
    question_prompt,
    read_locomo,
    resolve_choice,
    score,
)
from tmem_runtime.agent.monitor import MemoryMonitor
from tmem_runtime.agent.pooled import PoolSession, answer_together
from tmem_runtime.agent.recall_probe import RecallProbe, plot_recall
from tmem_runtime.agent.timing import episode_times, plot_times, time_table
from tmem_runtime.agent.write_formats import WRITE_FORMATS, recipe_name
from tmem_runtime.cli import (
    add_fast_weight_options,
    apply_threads,
    changed_settings,
    check_out_dir,
    command_parser,
    device_arg,
    int_in,
    make_out_dir,
    require_tokenizer,
)
from tmem_runtime.decoding import DecodeStats
from tmem_runtime.models import DTYPES

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = command_parser("tmem eval", __doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="LoCoMo-format JSON file")
    p.add_argument("--memory", nargs="+", choices=CHANNELS, default=["tmem"], help="channels to evaluate")
    p.add_argument("--write-format", nargs="+", choices=WRITE_FORMATS, default=["qa"],
                   help="what tmem channels train on (each format is a separate method)")
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m or a local HF model directory")
    p.add_argument("--conversations", nargs="*", default=None, help="sample ids (None: every conversation in the file)")
    p.add_argument("--max-questions", type=int_in(0), default=None, help="questions per conversation (all categories)")
    p.add_argument("--max-sessions", type=int_in(1), default=None,
                   help="read only the first N sessions; only questions whose evidence lies there are asked")
    p.add_argument("--l-max", type=int_in(1), default=1024, help="budget: working context + explicit memory, tokens")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--device", type=device_arg(), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model weights dtype")
    p.add_argument("--recipe", type=recipe_name, default="agent",
                   help='write recipe: "agent" (AdamW 3e-3, 10 epochs) or a runtime name ("default", "paper")')
    p.add_argument("--replay", type=int_in(0), default=32,
                   help="earlier items of the episode trained again with each write (0: the paper's protocol)")
    p.add_argument("--replay-per-card", type=int_in(0), default=0,
                   help="if > 0, replay at most this many earlier items per new one (cheap writes stay cheap)")
    p.add_argument("--cards", choices=SELECTIONS, default="all",
                   help="which turns get a flashcard: all (of 5+ words) or salient (new content words, no model call)")
    p.add_argument("--card-min-score", type=int_in(1), default=4, help="salient: new content words a turn needs")
    p.add_argument("--max-cards", type=int_in(1), default=None, help="salient: at most this many cards per write")
    p.add_argument("--named-turns", action="store_true",
                   help="per-turn cards: show the writer each turn in the third person (I/my -> the speaker's name)")
    add_fast_weight_options(p)
    p.add_argument("--top-k", type=int_in(1), default=5, help="retrieved chunks per question")
    p.add_argument("--summary-tokens", type=int_in(1), default=512, help="cap on the rolling summary, tokens")
    p.add_argument("--answer-tokens", type=int_in(1), default=24, help="max new tokens per answer")
    p.add_argument("--flashcard-tokens", type=int_in(1), default=192, help="max new tokens of one memory write")
    p.add_argument("--flashcard-mode", choices=FLASHCARD_MODES, default="per-turn",
                   help="one card per turn (small models) or one JSON array per context (the paper's)")
    p.add_argument("--window", type=int_in(1), default=None, help="model context window (None: the config's)")
    p.add_argument("--probe-every", type=int_in(0), default=0,
                   help="ask the questions again after every write once this many tokens were read since the "
                        "last probe (a channel that never writes: after the session crossing it); 0: never")
    p.add_argument("--side-by-side", action="store_true",
                   help="tmem methods: every conversation a session of one SessionPool, all their questions "
                        "answered in one batched decode (a different memory per row); same answers as without")
    p.add_argument("--seed", type=int, default=0, help="seed of adapter init, card order and replay")
    p.add_argument("--policy", default=None,
                   help="a trained memory writer (tmem rl): its policy.safetensors or checkpoint directory")
    p.add_argument("--fresh", action="store_true",
                   help="start over in --out (default: a run with the same settings there is resumed, keeping the "
                        "episodes it saved; one with other settings is refused)")
    return p.parse_args(argv)


_NOT_SETTINGS = ("out", "threads", "fresh")  # what a rerun may change and still resume


def _settings(args: dict) -> dict:
    return json.loads(json.dumps({k: v for k, v in args.items() if k not in _NOT_SETTINGS}))


def saved_runs(out: Path, args: argparse.Namespace) -> list[dict]:
    """The episodes an earlier run with the same settings saved in `out`/answers.json ([] if none or
    --fresh). A run with other settings is refused, since going on would overwrite its answers."""
    path = out / "answers.json"
    if args.fresh or not path.is_file():
        return []
    try:
        saved = json.loads(path.read_text())
        theirs, runs = _settings(saved["args"]), saved["runs"]
        if not isinstance(runs, list) or not all(
            isinstance(r, dict) and isinstance(r.get("method"), str) and isinstance(r.get("conversation"), str)
            for r in runs
        ):
            raise ValueError('its "runs" are not a list of episodes, each with a method and a conversation')
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SystemExit(f"tmem eval: {path} is not a tmem eval answers file ({exc}): pass --fresh to "
                         "overwrite it, or another --out") from None
    mine = _settings(vars(args))
    changed = changed_settings(theirs, mine)
    if changed:
        raise SystemExit(f"tmem eval: {out} holds a run with other settings ({', '.join(changed)}): pass --fresh "
                         "to overwrite it, or another --out")
    return runs


def select_questions(conv: Conversation, max_questions: int | None, max_sessions: int | None) -> list[QA]:
    """Questions answerable from the sessions read, round-robin over categories 1-5 in file order."""
    read = {s.index for s in conv.sessions[:max_sessions]}
    usable = [q for q in conv.qa if q.evidence_sessions and q.evidence_sessions <= read] if max_sessions else conv.qa
    if max_questions is None or max_questions >= len(usable):
        return usable
    by_cat = {c: [q for q in usable if q.category == c] for c in sorted({q.category for q in usable})}
    chosen: list[QA] = []
    while len(chosen) < max_questions:
        for c in by_cat:
            if by_cat[c] and len(chosen) < max_questions:
                chosen.append(by_cat[c].pop(0))
    return [q for q in usable if any(q is c for c in chosen)]


def methods_of(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """(memory, write format) pairs, prompt-space channels first (fast weights attach only after them)."""
    plain = [(m, None) for m in args.memory if not m.startswith("tmem")]
    weighted = [(m, f) for m in args.memory if m.startswith("tmem") for f in args.write_format]
    return plain + weighted


def method_label(memory: str, write_format: str | None) -> str:
    return memory if write_format is None else f"{memory}/{write_format}"


def trigger_record(t: Trigger) -> dict:
    e, w = t.event, t.event.weights
    rec = dict(index=t.index, session=t.session, reason=t.reason, context_tokens=t.context_tokens,
               memory_tokens=t.memory_tokens,
               seconds=round(t.seconds, 3), chunks_indexed=e.chunks_indexed, summary=e.summary)
    if w is not None:
        rec.update(format=w.format, written=w.n_written, dropped=w.n_dropped, drop_reasons=w.dropped,
                   pairs=w.pairs, raw=w.raw[:4000], losses=[round(x, 5) for x in w.losses],
                   replayed=w.replayed, generate_s=round(w.generate_s, 3), generate_tokens=w.generate_tokens,
                   train_s=round(w.train_s, 3),
                   train_tokens=w.train_tokens)
    return rec


def run_conversation(agent: MemoryAgent, conv: Conversation, questions: list[QA], args: argparse.Namespace,
                     label: str) -> dict:
    """Read one conversation and answer its questions; timings, tokens, memory and every answer.

    With `args.probe_every` > 0 the questions are also asked while reading (RecallProbe); that time
    is left out of the timings.
    """
    episode = read_episode(agent, conv, questions, args, label)
    gen = agent.generator
    with MemoryMonitor(args.device) as mon:
        t0, stats0 = time.perf_counter(), gen.stats.copy()
        answers = agent.answer(*episode_questions(questions, args.seed))
        answer_s = time.perf_counter() - t0
    return finish_episode(episode, answers, answer_s, gen.stats.since(stats0), mon)


def episode_questions(questions: list[QA], seed: int) -> tuple[list[str], list[str]]:
    """(prompts as LoCoMo asks them, retrieval queries) of an episode's questions."""
    return [question_prompt(q, seed) for q in questions], [q.question for q in questions]


@dataclass
class ReadEpisode:
    """A conversation read by an agent, its questions not yet answered (what `finish_episode` scores)."""

    agent: MemoryAgent
    conv: Conversation
    questions: list[QA]
    seed: int
    label: str
    sessions_read: int
    probe: RecallProbe | None
    read_s: float  # probes left out
    reading: DecodeStats  # probes left out
    monitor: MemoryMonitor
    prefilled: int  # generator tokens while reading (probes included)
    generated: int


def read_episode(agent: MemoryAgent, conv: Conversation, questions: list[QA], args: argparse.Namespace,
                 label: str) -> ReadEpisode:
    """Reset the agent and read `conv` (probing recall while reading if asked): the episode so far."""
    gen = agent.generator
    before = (gen.counts.prefilled, gen.counts.generated)
    agent.reset()
    probe = RecallProbe(agent, questions, args.probe_every, args.seed) if getattr(args, "probe_every", 0) else None
    on_trigger = (lambda t: probe.maybe(t.index)) if probe is not None else None
    with MemoryMonitor(args.device) as mon:
        t0, stats0 = time.perf_counter(), gen.stats.copy()
        sessions = conv.sessions[: args.max_sessions]
        for s in tqdm(sessions, desc=f"{label} {conv.sample_id} reading", unit="session", leave=False):
            agent.read_session(s, on_trigger)
            if probe is not None and not agent.channel.writes:
                probe.maybe()
        agent.finish(on_trigger)
        read_s = time.perf_counter() - t0 - (probe.seconds if probe else 0.0)
        reading = gen.stats.since(stats0)
        if probe is not None:
            reading = reading.since(probe.stats)
    return ReadEpisode(agent, conv, questions, args.seed, label, len(sessions), probe, read_s, reading, mon,
                       gen.counts.prefilled - before[0], gen.counts.generated - before[1])


def finish_episode(episode: ReadEpisode, answers: list[str], answer_s: float, answering: DecodeStats,
                   answer_monitor: MemoryMonitor) -> dict:
    """The episode's record: every answer scored, timings, tokens, memory (the trace: while reading)."""
    e, agent = episode, episode.agent
    prompts, _ = episode_questions(e.questions, e.seed)
    rows = []
    for q, prompt, answer in zip(e.questions, prompts, answers):
        prediction = resolve_choice(answer, q, e.seed)
        f1, em = score(prediction, q.answer, q.category)
        rows.append(dict(question=q.question, prompt=prompt, gold=q.answer, category=q.category,
                         evidence=q.evidence, prediction=prediction, f1=round(f1, 4), em=em))
    triggers = [trigger_record(t) for t in agent.triggers]
    probe_s = e.probe.seconds if e.probe else 0.0
    mon = e.monitor
    return dict(
        method=e.label, conversation=e.conv.sample_id, sessions_read=e.sessions_read, tokens_read=agent.tokens_read,
        answers=rows, triggers=triggers, read_s=round(e.read_s, 2), answer_s=round(answer_s, 2),
        time=episode_times(e.read_s, answer_s, e.reading, answering, triggers, probe_s),
        probes=e.probe.records if e.probe else [],
        tokens_prefilled=e.prefilled + answering.prefill_tokens, tokens_generated=e.generated + answering.decode_tokens,
        peak_rss_mb=round(max(mon.peak_mb, answer_monitor.peak_mb), 1),
        cuda_peak_mb=max(mon.cuda_peak_mb or 0, answer_monitor.cuda_peak_mb or 0) or None,
        final_context_tokens=agent.context_tokens,
        memory_trace=[(round(t, 2), round(mb, 1)) for t, mb in mon.trace[:: max(1, len(mon.trace) // 200)]],
    )


def run_side_by_side(episodes: list[ReadEpisode]) -> list[dict]:
    """Read episodes (agents of one Generator, pooled memories) answered together: every question of
    every episode in one batched decode, a different memory per row (`pooled.answer_together`).

    Each record's answer time and answering tokens are its share of the joint decode (by questions).
    """
    gen = episodes[0].agent.generator
    asked = [episode_questions(e.questions, e.seed) for e in episodes]
    with MemoryMonitor(episodes[0].monitor.device) as mon:
        t0, stats0 = time.perf_counter(), gen.stats.copy()
        answers = answer_together([e.agent for e in episodes], [p for p, _ in asked], [q for _, q in asked])
        answer_s = time.perf_counter() - t0
        answering = gen.stats.since(stats0)
    total = max(1, sum(len(e.questions) for e in episodes))
    return [finish_episode(e, a, answer_s * len(e.questions) / total, answering.scaled(len(e.questions) / total), mon)
            for e, a in zip(episodes, answers)]


def _mean(xs: list[float]) -> float | None:
    return round(100 * sum(xs) / len(xs), 2) if xs else None


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per method: F1/EM (x100) over categories 1-4 and per category, costs and write statistics."""
    report: dict[str, dict] = {}
    for label in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == label]
        answers = [a for r in mine for a in r["answers"]]
        main = [a for a in answers if a["category"] in (1, 2, 3, 4)]
        triggers = [t for r in mine for t in r["triggers"]]
        losses = [t["losses"] for t in triggers if t.get("losses")]
        entry = dict(
            n=len(answers), n_1_4=len(main),
            f1_1_4=_mean([a["f1"] for a in main]), em_1_4=_mean([a["em"] for a in main]),
            per_category={c: dict(n=len(cs), f1=_mean([a["f1"] for a in cs]), em=_mean([a["em"] for a in cs]))
                          for c in CATEGORY_NAMES if (cs := [a for a in answers if a["category"] == c])},
            peak_rss_mb=max(r["peak_rss_mb"] for r in mine),
            cuda_peak_mb=max((r["cuda_peak_mb"] or 0) for r in mine) or None,
            seconds_per_conversation=round(sum(r["read_s"] + r["answer_s"] for r in mine) / len(mine), 1),
            read_s=round(sum(r["read_s"] for r in mine), 1), answer_s=round(sum(r["answer_s"] for r in mine), 1),
            tokens_processed=sum(r["tokens_prefilled"] + r["tokens_generated"] for r in mine),
            triggers=len(triggers),
            flashcards_written=sum(t.get("written", 0) for t in triggers if t.get("format") == "qa"),
            flashcards_dropped=sum(t.get("dropped", 0) for t in triggers if t.get("format") == "qa"),
            write_steps=sum(len(x) for x in losses),
            first_step_loss=round(sum(x[0] for x in losses) / len(losses), 4) if losses else None,
            last_step_loss=round(sum(x[-1] for x in losses) / len(losses), 4) if losses else None,
        )
        report[label] = entry
    return report


def report_markdown(report: dict[str, dict], args: argparse.Namespace, runs: list[dict] | None = None) -> str:
    """The report's tables as Markdown (with `runs`: where the time went, and the recall probes)."""
    cats = list(CATEGORY_NAMES)
    head = "| method | F1 1-4 | EM 1-4 | " + " | ".join(f"F1 c{c} {CATEGORY_NAMES[c]} (n)" for c in cats) + " |"
    lines = [f"model {args.model}, l_max {args.l_max}, recipe {args.recipe}, device {args.device}/{args.dtype}, "
             f"flashcards {getattr(args, 'flashcard_mode', '-')} ({getattr(args, 'cards', 'all')} turns), "
             f"replay {getattr(args, 'replay', '-')} (per card {getattr(args, 'replay_per_card', 0) or '-'})", "",
             head, "|" + "---|" * (3 + len(cats))]
    for label, e in report.items():
        cells = []
        for c in cats:
            pc = e["per_category"].get(c)
            cells.append(f"{pc['f1']:.1f} ({pc['n']})" if pc else "-")
        lines.append(f"| {label} | {_fmt(e['f1_1_4'])} | {_fmt(e['em_1_4'])} | " + " | ".join(cells) + " |")
    lines += ["", "| method | s/conversation | read s | answer s | tokens | peak RSS MB | CUDA peak MB | triggers "
              "| flashcards written | dropped | write steps | loss first→last step |", "|" + "---|" * 12]
    for label, e in report.items():
        loss = f"{e['first_step_loss']:.3f}→{e['last_step_loss']:.3f}" if e["first_step_loss"] is not None else "-"
        lines.append(f"| {label} | {e['seconds_per_conversation']} | {e['read_s']} | {e['answer_s']} | "
                     f"{e['tokens_processed']} | {e['peak_rss_mb']} | {_fmt(e['cuda_peak_mb'])} | {e['triggers']} | "
                     f"{e['flashcards_written']} | {e['flashcards_dropped']} | {e['write_steps']} | {loss} |")
    if runs:
        lines += ["", "Where the time went (seconds; tokens/s in brackets; recall probes left out):", "",
                  time_table(runs).rstrip()]
        probed = [r for r in runs if r.get("probes")]
        if probed:
            lines += ["", "Recall probes (F1 x100 of the questions, asked again while reading):", "",
                      "| method | conversation | probes: tokens read → F1 |", "|---|---|---|"]
            lines += [f"| {r['method']} | {r['conversation']} | "
                      + ", ".join(f"{p['tokens_read']}→{p['f1']:.0f}" for p in r["probes"]) + " |" for r in probed]
    return "\n".join(lines) + "\n"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}" if isinstance(x, float) else str(x)


def _save(fig, path: Path) -> Path:  # noqa: ANN001
    """Lay out, write as PNG and close one figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(runs: list[dict], report: dict[str, dict], out: Path) -> list[Path]:
    """f1_by_category.png, write_loss.png, memory.png, time.png (and recall.png if probed) under `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    labels = list(report)
    groups = ["1-4"] + [str(c) for c in CATEGORY_NAMES]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        e = report[label]
        vals = [e["f1_1_4"] or 0] + [(e["per_category"].get(c) or {}).get("f1") or 0 for c in CATEGORY_NAMES]
        ax.bar([g + i * width for g in range(len(groups))], vals, width, label=label)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
    ax.set_xlabel("LoCoMo category")
    ax.set_ylabel("F1 (x100)")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / "f1_by_category.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        first = [t["losses"][0] for t in r["triggers"] if t.get("losses")]
        last = [t["losses"][-1] for t in r["triggers"] if t.get("losses")]
        if first:
            line, = ax.plot(first, marker="o", label=f"{r['method']} {r['conversation']} first step")
            ax.plot(last, marker="x", linestyle="--", color=line.get_color(), label="last step")
    ax.set_xlabel("write (trigger with training material)")
    ax.set_ylabel("loss")
    if ax.lines:
        ax.legend(fontsize=6)
    paths.append(_save(fig, out / "write_loss.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in runs:
        if r["memory_trace"]:
            ts, mbs = zip(*r["memory_trace"])
            ax.plot(ts, mbs, label=f"{r['method']} {r['conversation']}")
    ax.set_xlabel("seconds into the episode")
    ax.set_ylabel("process RSS (MB)")
    ax.legend(fontsize=6)
    paths.append(_save(fig, out / "memory.png"))
    if any(r.get("time") for r in runs):
        paths.append(plot_times(runs, out / "time.png", _save))
    if any(r.get("probes") for r in runs):
        paths.append(plot_recall(runs, out / "recall.png", _save))
    return paths


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; returns a process exit code (0 on success)."""
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    methods = methods_of(args)
    if any("summary" in m for m, _ in methods) and args.summary_tokens >= args.l_max:
        raise SystemExit(f"tmem eval: --summary-tokens {args.summary_tokens} must be below --l-max {args.l_max}: the "
                         "summary sits in the working context, so every turn would trigger a write")  # fmt: skip
    if torch.device(args.device).type == "cpu":
        apply_threads(args)
    from tmem_runtime import FastWeights, SessionPool, load_model
    from tmem_runtime.engine import adapter_layout

    conversations = read_locomo("tmem eval", args.data, args.conversations)  # before anything is made or loaded
    ids = [c.sample_id for c in conversations]
    if len(set(ids)) < len(ids):  # episodes are keyed by it: the resume, the --side-by-side sessions
        twice = next(i for i in ids if ids.count(i) > 1)
        raise SystemExit(f"tmem eval: {args.data} holds {ids.count(twice)} conversations with sample_id {twice!r}: "
                         "each needs its own (a resumed run and --side-by-side tell episodes apart by it)")
    if args.policy:
        from tmem_runtime.rl.policy import PolicyFileError, load_policy, policy_path

        try:
            policy_path(args.policy)
        except PolicyFileError as exc:
            raise SystemExit(f"tmem eval: --policy {exc}") from None
    out = Path(args.out)
    check_out_dir("tmem eval", out)  # made once the model has loaded: a failed load leaves no empty --out
    runs = saved_runs(out, args)  # resumed: these episodes are not run again
    done = {(r["method"], r["conversation"]) for r in runs}
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device, seed=args.seed)
    require_tokenizer("tmem eval", args.model, tokenizer)
    if any(m.startswith("tmem") for m, _ in methods):  # before any episode runs (a tmem one may come after others)
        try:
            adapter_layout(model, args.rank, args.num_layers)
        except ValueError as exc:
            raise SystemExit(f"tmem eval: --rank {args.rank} / --num-layers {args.num_layers}: {exc}") from None
    if args.policy:  # before the fast weights: its slow LoRA never sits in their MLPs
        try:
            load_policy(model, args.policy, args.num_layers)
        except PolicyFileError as exc:  # damaged past its header, or for another model
            raise SystemExit(f"tmem eval: --policy {exc}") from None
    generator = Generator(model, tokenizer, args.window)
    if any("summary" in m for m, _ in methods):  # exact now: the notes' heading sits in the context too
        notes = SummaryChannel(generator, args.summary_tokens).max_memory_tokens()
        if notes >= args.l_max:
            raise SystemExit(f"tmem eval: --summary-tokens {args.summary_tokens} with the notes' heading is up to "
                             f"{notes} tokens, which must be below --l-max {args.l_max}: the summary sits in the "
                             "working context, so every turn would trigger a write")  # fmt: skip
    make_out_dir("tmem eval", out)
    pooled = [m for m in methods if m[0].startswith("tmem")] if args.side_by_side else []
    fast_weights = pool = None
    if pooled:  # one session per (tmem method, conversation), answered together at the end
        pool = SessionPool(model, capacity=len(pooled) * len(conversations), rank=args.rank,
                           num_layers=args.num_layers, seed=args.seed)
    waiting: list[ReadEpisode] = []  # read pooled episodes, answered together at the end
    with tqdm(total=len(methods) * len(conversations), initial=len(runs), desc="eval", unit="episode") as bar:

        def record(finished: list[dict]) -> None:
            runs.extend(finished)
            for r in finished:
                bar.set_postfix_str(f"{r['method']} {r['conversation']}: {len(r['triggers'])} writes, "
                                    f"F1 {_mean([a['f1'] for a in r['answers']])}")
            bar.update(len(finished))
            text = json.dumps(dict(args=vars(args), runs=runs), indent=1)
            atomic_write(out / "answers.json", lambda tmp: Path(tmp).write_text(text))  # Ctrl-C: the last one stays

        for memory, write_format in methods:
            label = method_label(memory, write_format)
            if (memory, write_format) in pooled:
                for conv in (c for c in conversations if (label, c.sample_id) not in done):
                    session = PoolSession(pool, f"{label} {conv.sample_id}")
                    agent = MemoryAgent(generator, channel_of(args, memory, write_format, generator, session),
                                        args.l_max, args.answer_tokens)
                    questions = select_questions(conv, args.max_questions, args.max_sessions)
                    waiting.append(read_episode(agent, conv, questions, args, label))
                continue
            if memory.startswith("tmem") and fast_weights is None:
                fast_weights = FastWeights(model, rank=args.rank, num_layers=args.num_layers, seed=args.seed)
            agent = MemoryAgent(generator, channel_of(args, memory, write_format, generator, fast_weights),
                                args.l_max, args.answer_tokens)
            for conv in (c for c in conversations if (label, c.sample_id) not in done):
                questions = select_questions(conv, args.max_questions, args.max_sessions)
                record([run_conversation(agent, conv, questions, args, label)])
            agent.reset()
        if waiting:
            record(run_side_by_side(waiting))
    for handle in (fast_weights, pool):
        if handle is not None:
            handle.detach()
    report = summarize(runs)
    (out / "report.json").write_text(json.dumps(dict(args=vars(args), methods=report), indent=1))
    (out / "report.md").write_text(report_markdown(report, args, runs))
    plot(runs, report, out)
    print(report_markdown(report, args, runs))
    print(f"wrote {out}/answers.json, report.json, report.md and plots")
    return 0


def channel_of(args: argparse.Namespace, memory: str, write_format: str | None, generator: Generator,
               fast_weights: object) -> MemoryChannel:
    """The channel of one method as the command line sets it up."""
    return make_channel(memory, generator, fast_weights, write_format or "qa", args.recipe, args.seed, args.top_k,
                        args.summary_tokens, args.device, args.flashcard_tokens, args.flashcard_mode, args.replay,
                        args.replay_per_card, args.cards, args.card_min_score, args.max_cards, args.named_turns)


if __name__ == "__main__":
    raise SystemExit(main())
