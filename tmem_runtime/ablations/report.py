"""report.md and the PNG plots of `tmem ablate`, from the checkpoints under --out.

Recall is in percent of facts; intervals are 95% percentile bootstraps: over facts (paired: the same
fact under two settings, each setting's hits averaged over its seeds) for recall differences, over
runs for drift, over (fact set, matrix) pairs for the gradient measures, over questions (paired) for
LoCoMo F1. Costs are the runs' own CPU time and wall time (one torch thread, on a 2-core machine
shared with other jobs: wall is up to several times CPU). Wall is summed over the runs that recorded it
(older checkpoints hold CPU time only: "n/a").
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from tmem_runtime.ablations.capacity import capacity, first_write_curve
from tmem_runtime.ablations.runs import CONFIGS, ResultStore
from tmem_runtime.ablations.spectrum import log_slope, share_of_variance
from tmem_runtime.ablations.stats import Interval, mean_interval, paired_difference
from tmem_runtime.ablations.studies import FORMATS, INIT_PLAN, NO_MEMORY, PLACE_PLAN, format_dir

Lines = list[str]


# ------------------------------------------------------------------ helpers
def _pyplot():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> str:  # noqa: ANN001
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path.name


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> Lines:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _cost(runs: Sequence[dict], field: str = "run_cpu_s") -> float:
    """CPU seconds of the runs actually run (copies of another seed's run cost nothing)."""
    return sum(r.get(field, 0.0) for r in runs if "same_as_seed" not in r)


def _color(i: int):  # noqa: ANN202
    return _pyplot().get_cmap("tab20")(i % 20)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} CPU min"


def _cost_text(cpu_s: float, items: Sequence[dict], wall_field: str) -> str:
    """"x CPU min, y wall min" where every item recorded its wall time, else how many did."""
    timed = [i[wall_field] for i in items if wall_field in i]
    if not timed:
        return f"{_minutes(cpu_s)}, wall n/a"
    partial = "" if len(timed) == len(items) else f" ({len(timed)} of {len(items)} runs timed)"
    return f"{_minutes(cpu_s)}, {sum(timed) / 60:.1f} wall min{partial}"


def neutral_right(runs: Sequence[dict]) -> str:
    """Right answers to the 10 neutral chat questions, bare and after the write (mean over the runs that
    asked them), e.g. "4.0→3.3 (9 runs)"; "-" for checkpoints from before they were asked."""
    asked = [r["drift"] for r in runs if "neutral_right_after" in r["drift"]]
    if not asked:
        return "-"
    before = statistics.mean(sum(d["neutral_right_before"]) for d in asked)
    after = statistics.mean(sum(d["neutral_right_after"]) for d in asked)
    return f"{before:.1f}→{after:.1f} ({len(asked)} runs)"


def per_set_recall(runs: Sequence[dict]) -> str:
    """Recall % per fact set (mean over seeds), in the runs' order, e.g. "titles_b 90 / places 100"."""
    sets = list(dict.fromkeys(r["set"] for r in runs))
    return " / ".join(
        f"{s} {100 * statistics.mean(h for r in runs if r['set'] == s for h in r['hits']):.0f}" for s in sets
    )


# ------------------------------------------------------------------ fact runs (init, place)
def fact_hits(runs: Sequence[dict], field: str = "hits") -> dict[tuple[str, int], float]:
    """(fact set, fact index) -> the fact's hit rate over the runs' seeds."""
    per: dict[tuple[str, int], list[float]] = {}
    for r in runs:
        for i, h in enumerate(r[field]):
            per.setdefault((r["set"], i), []).append(float(h))
    return {k: sum(v) / len(v) for k, v in per.items()}


def recall_difference(runs: Sequence[dict], baseline: Sequence[dict], field: str = "hits") -> Interval | None:
    """Paired difference in recall (0..1) per fact, runs minus baseline, over the facts both have."""
    a, b = fact_hits(runs, field), fact_hits(baseline, field)
    keys = sorted(set(a) & set(b))
    return paired_difference([a[k] for k in keys], [b[k] for k in keys]) if keys else None


def mean_losses(runs: Sequence[dict]) -> list[float]:
    """Per step, the mean write loss over runs (steps every run has)."""
    steps = min(len(r["losses"]) for r in runs)
    return [statistics.mean(r["losses"][k] for r in runs) for k in range(steps)]


def fact_rows(store: ResultStore, plan: Sequence[tuple[str, str]], baseline: str = "svd") -> tuple[Lines, dict]:
    """The fact-study table for `plan` and a summary per (config, recipe) for plots and verdicts."""
    head = ["config", "recipe", "runs", "recall %", "Δ vs svd, pts [95% CI]", "paraphrase %", "Δ paraphrase",
            "loss first→last", "KL chat", "KL text", "top-1 kept", "neutral answers right (bare→after)",
            "write s (median)", "write CPU s", "bytes/session", "recall % per set", "cost"]  # fmt: skip
    rows, summary = [], {}
    for name, recipe in plan:
        runs = store.runs(config=name, recipe=recipe)
        if not runs:
            continue
        base = store.runs(config=baseline, recipe=recipe)
        hits = fact_hits(runs)
        diff = recall_difference(runs, base) if name != baseline else None
        pdiff = recall_difference(runs, base, "paraphrase_hits") if name != baseline else None
        losses = mean_losses(runs)
        real = [r for r in runs if "same_as_seed" not in r]
        kl_chat = mean_interval([r["drift"]["mean_kl_chat"] for r in runs])
        entry = dict(recall=100 * statistics.mean(hits.values()), diff=diff, losses=losses, kl_chat=kl_chat,
                     kl_text=statistics.mean(r["drift"]["mean_kl_text"] for r in runs),
                     top1=statistics.mean(r["drift"]["top1_kept"] for r in runs),
                     paraphrase=100 * statistics.mean(fact_hits(runs, "paraphrase_hits").values()),
                     write_s=statistics.median(r["write_s"] for r in real),
                     write_cpu_s=statistics.median(r["write_cpu_s"] for r in real),
                     bytes=runs[0]["bytes_per_session"], cost=_cost(runs), n=len(real))  # fmt: skip
        summary[(name, recipe)] = entry
        rows.append([
            f"{name} ({CONFIGS[name].describe()})", recipe, f"{len(real)} (+{len(runs) - len(real)} same)",
            f"{entry['recall']:.1f}", diff.fmt(100) if diff else "-", f"{entry['paraphrase']:.1f}",
            pdiff.fmt(100) if pdiff else "-", f"{losses[0]:.2f}→{losses[-1]:.3f}",
            f"{kl_chat.mean:.2f} [{kl_chat.low:.2f}, {kl_chat.high:.2f}]", f"{entry['kl_text']:.3f}",
            f"{100 * entry['top1']:.0f}%", neutral_right(runs), f"{entry['write_s']:.1f}",
            f"{entry['write_cpu_s']:.1f}",
            f"{entry['bytes']:,}", per_set_recall(runs), _cost_text(entry["cost"], real, "run_s"),
        ])  # fmt: skip
    return _table(head, rows), summary


def plot_init(summary: dict, path: Path) -> str:
    """Recall per init and recipe (bars, CI of the difference to svd) and the mean loss per step."""
    plt = _pyplot()
    recipes = sorted({r for _, r in summary})
    inits = [c for c, r in INIT_PLAN if r == recipes[0]]
    fig, axes = plt.subplots(1, 1 + len(recipes), figsize=(5 + 4.5 * len(recipes), 4))
    width = 0.8 / len(recipes)
    for j, recipe in enumerate(recipes):
        vals = [summary.get((c, recipe), {}).get("recall", 0.0) for c in inits]
        errs = [[0, 0] if (c, recipe) not in summary or summary[(c, recipe)]["diff"] is None else
                [100 * (summary[(c, recipe)]["diff"].mean - summary[(c, recipe)]["diff"].low),
                 100 * (summary[(c, recipe)]["diff"].high - summary[(c, recipe)]["diff"].mean)] for c in inits]
        axes[0].bar([i + j * width for i in range(len(inits))], vals, width, yerr=list(zip(*errs)), capsize=3,
                    label=f"recipe {recipe}")  # fmt: skip
    axes[0].set_xticks([i + width * (len(recipes) - 1) / 2 for i in range(len(inits))], inits, fontsize=8)
    axes[0].set_ylabel("recall of held-out facts, %")
    axes[0].set_title("recall (error bar: 95% CI of the difference to svd)", fontsize=8)
    axes[0].legend(fontsize=7)
    for ax, recipe in zip(axes[1:], recipes):
        for c in inits:
            if (c, recipe) in summary:
                ax.plot(range(1, len(summary[(c, recipe)]["losses"]) + 1), summary[(c, recipe)]["losses"],
                        marker="o", label=c)  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("write loss (mean over sets and seeds)")
        ax.set_title(f"recipe {recipe}", fontsize=9)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_place(summary: dict, path: Path) -> str:
    """Recall against bytes per session, and chat drift, per configuration."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    names = [c for c, _ in PLACE_PLAN if (c, "default") in summary]
    for i, c in enumerate(names):
        e = summary[(c, "default")]
        ax1.scatter(e["bytes"] / 1024, e["recall"], color=_color(2 * i), marker="o", label=f"{c}: asked")
        ax1.scatter(e["bytes"] / 1024, e["paraphrase"], color=_color(2 * i), marker="x", label=f"{c}: paraphrase")
    ax1.set_xscale("log")
    ax1.set_ylim(0, 105)
    ax1.set_xlabel("KiB per session (float32 B, + A when trained)")
    ax1.set_ylabel("recall of held-out facts, % (o asked, x paraphrased)")
    ax1.legend(fontsize=6, ncol=2, loc="lower right")
    kls = [summary[(c, "default")]["kl_chat"] for c in names]
    ax2.bar(names, [k.mean for k in kls], yerr=[[k.mean - k.low for k in kls], [k.high - k.mean for k in kls]],
            capsize=3)  # fmt: skip
    ax2.set_ylabel("KL on neutral chat prompts after a write (nats)")
    ax2.tick_params(axis="x", labelsize=8)
    return _save(fig, path)


# ------------------------------------------------------------------ preconditioning
def _spread(values: Sequence[float]) -> float:
    return max(values) / min(values)


def _share(sigma: Sequence[float], norms: Sequence[float]) -> float:
    return share_of_variance([math.log(v) for v in sigma], [math.log(v) for v in norms])


def precondition_units(data: dict, stage: str = "sgd0") -> list[dict]:
    """Per (fact set, matrix): sigma_i, ||G v_i||, ||dB_i|| at `stage` ("sgdK": before SGD step K+1;
    "adamw_end": after the default write) and the derived measures."""
    sigma = data["sigma_a"]
    units = []
    for key, rec in data["runs"].items():
        profile = rec["adamw_end"] if stage == "adamw_end" else rec["sgd"][int(stage[3:])]
        for i, slot in enumerate(profile["slots"]):
            s, proj, d_b = sigma[i], slot["projection"], slot["dB_norm"]
            units.append(dict(set=key, slot=i, sigma=s, projection=proj, dB=d_b,
                              share=_share(s, d_b), slope_projection=log_slope(s, proj),
                              energy_top=slot["energy_top"], energy_random=slot["energy_random"]))  # fmt: skip
    return units


def precondition_section(data: dict, out: Path) -> Lines:
    names, spectra = data["spectra"]["slots"], data["spectra"]["sigma"]
    units = precondition_units(data)
    lines = [f"Real writes: the {len(data['runs'])} fact sets' flashcards, SVD init, rank 6, last 4 layers. "
             "G = dL/dW; dB_i = sigma_i G v_i. Step 0 = the first SGD step of the paper recipe (B = 0).", ""]
    err = max(r["first_step_rel_error"] for r in data["runs"].values())
    lines += [f"Check: the first SGD step's B equals -lr G A^T to {err:.1e} (relative, worst matrix): the "
              "measured G is the gradient the runtime's write follows.", ""]
    adamw_steps = "/".join(sorted({str(len(r["adamw_losses"])) for r in data["runs"].values()}))
    rows = []
    for i, name in enumerate(names):
        mine = [u for u in units if u["slot"] == i]
        s = spectra[i]
        rows.append([name, f"{s[0] / s[5]:.2f}", f"{s[1] / s[5]:.2f}", f"{s[6] / s[5]:.3f}",
                     f"{statistics.mean(_spread(u['projection']) for u in mine):.1f}",
                     f"{statistics.mean(u['share'] for u in mine):.2f}",
                     f"{statistics.mean(u['energy_top'] / u['energy_random'] for u in mine):.1f}x",
                     f"{statistics.mean(_spread(r['b_norms_sgd'][i]) for r in data['runs'].values()):.1f}",
                     f"{statistics.mean(_spread(r['b_norms_adamw'][i]) for r in data['runs'].values()):.2f}",
                     ])  # fmt: skip
    lines += _table(["matrix", "σ1/σ6", "σ2/σ6", "σ7/σ6", "‖Gv_i‖ max/min over i", "share of var(log ‖dB_i‖) "
                     "from σ_i", "G energy in top-6 vs random 6-dim", "‖B_i‖ max/min after SGD (5 steps)",
                     f"‖B_i‖ max/min after AdamW ({adamw_steps} steps)"], rows)  # fmt: skip
    share = mean_interval([u["share"] for u in units])
    ratio = mean_interval([u["energy_top"] / u["energy_random"] for u in units])
    sig_spread = mean_interval([_spread(u["sigma"]) for u in units])
    proj_spread = mean_interval([_spread(u["projection"]) for u in units])
    lines += ["", f"Pooled over {len(units)} (set, matrix) pairs at step 0: σ_i max/min over the top 6 "
              f"{sig_spread.mean:.2f} against ‖G v_i‖ max/min {proj_spread.mean:.1f} [{proj_spread.low:.1f}, "
              f"{proj_spread.high:.1f}]; share of the direction-to-direction variance of log ‖dB_i‖ that σ_i "
              f"accounts for {share.mean:.2f} [{share.low:.2f}, {share.high:.2f}]; gradient energy in the top-6 "
              f"right singular subspace {ratio.mean:.1f}x [{ratio.low:.1f}, {ratio.high:.1f}] that of a random "
              "6-dim subspace.", ""]
    stages = [f"sgd{k}" for k in range(len(next(iter(data["runs"].values()))["sgd"]))] + ["adamw_end"]
    per_stage = {st: statistics.mean(u["share"] for u in precondition_units(data, st)) for st in stages}
    lines += ["Share from σ_i over the write: " + ", ".join(f"{k} {v:.2f}" for k, v in per_stage.items()), ""]
    lines += [f"![preconditioning]({plot_precondition(data, units, out / 'precondition.png')})", ""]
    cost = _cost_text(sum(r["cpu_s"] for r in data["runs"].values()), list(data["runs"].values()), "wall_s")
    lines += [f"Cost: {cost} ({len(data['runs'])} sets: 5 gradient measurements + 5 SGD steps + one "
              "AdamW write + one measurement each).", ""]
    return lines


def plot_precondition(data: dict, units: Sequence[dict], path: Path) -> str:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, (name, s) in enumerate(zip(data["spectra"]["slots"], data["spectra"]["sigma"])):
        axes[0].plot(range(1, len(s) + 1), [v / s[5] for v in s], marker=".", label=name, color=_color(i))
    axes[0].axvline(6.5, color="grey", linestyle=":")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("k")
    axes[0].set_ylabel("σ_k / σ_6")
    axes[0].set_title("spectra of the 12 adapted weights", fontsize=9)
    axes[0].legend(fontsize=5, ncol=2)
    for ax, field, title in ((axes[1], "dB", "‖dB_i‖ = σ_i ‖G v_i‖"), (axes[2], "projection", "‖G v_i‖")):
        for u in units:
            rel = [v / u["sigma"][5] for v in u["sigma"]]
            ys = [v / statistics.mean(u[field]) for v in u[field]]
            ax.scatter(rel, ys, s=6, alpha=0.5, color=_color(u["slot"]))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("σ_i / σ_6 (same matrix)")
        ax.set_ylabel(f"{title}, / its mean over i")
        ax.set_title(f"{title} vs σ_i at step 0 (each set, each matrix)", fontsize=9)
    return _save(fig, path)


# ------------------------------------------------------------------ write formats
def format_answers(
    out: Path, conversations: Sequence[str], formats: Sequence[str] = FORMATS
) -> dict[str, list[dict]]:
    """Per format, the answers of the conversations every format has finished, in one order."""
    done = [c for c in conversations if all((format_dir(out, f, c) / "report.json").exists() for f in formats)]
    answers: dict[str, list[dict]] = {f: [] for f in formats}
    for c in done:
        per = {f: json.loads((format_dir(out, f, c) / "answers.json").read_text())["runs"][0]["answers"]
               for f in formats}  # fmt: skip
        questions = [a["question"] for a in per[formats[0]]]
        if any([a["question"] for a in per[f]] != questions for f in formats):
            raise ValueError(f"{c}: the formats were asked different questions")
        for f in formats:
            answers[f] += [{**a, "conversation": c} for a in per[f]]
    return answers


def format_section(out: Path) -> Lines:
    """The formats the study ran (`--formats` may pick some), compared on the conversations all of them finished."""
    root = out / "format"
    formats = [f for f in FORMATS if (root / f).is_dir() and any((root / f).iterdir())]
    if not formats:
        return ["(no conversation finished for every format yet)", ""]
    conversations = sorted(p.name for p in (root / formats[0]).iterdir())
    answers = format_answers(out, conversations, formats)
    main = {f: [a for a in answers[f] if a["category"] in (1, 2, 3, 4)] for f in formats}
    if not main[formats[0]]:
        return [f"(no conversation finished for every format yet: {', '.join(formats)})", ""]
    convs = sorted({a["conversation"] for a in main[formats[0]]})
    floor = format_answers(out, convs, [*formats, NO_MEMORY])[NO_MEMORY]  # only if it ran on every one
    methods = list(formats)
    if len(floor) == len(answers[formats[0]]):
        main[NO_MEMORY] = [a for a in floor if a["category"] in (1, 2, 3, 4)]
        methods.append(NO_MEMORY)
    lines = [f"`tmem eval --memory tmem` per format ({', '.join(formats)}), conversations {', '.join(convs)}, "
             f"first 3 sessions each, every question whose evidence lies there: **{len(main[formats[0]])} questions "
             "of categories 1-4** (the same for every format; paired).", ""]
    rows = []
    f1s = {f: mean_interval([a["f1"] for a in main[f]]) for f in methods}
    for f in methods:
        f1 = f1s[f]
        em = statistics.mean(a["em"] for a in main[f])
        reports = [json.loads((format_dir(out, f, c) / "report.json").read_text())["methods"] for c in convs]
        entry = [next(iter(r.values())) for r in reports]
        costs = [json.loads(p.read_text()) for c in convs if (p := format_dir(out, f, c) / "cost.json").exists()]
        rows.append([f, f"{100 * f1.mean:.1f} [{100 * f1.low:.1f}, {100 * f1.high:.1f}]", f"{100 * em:.1f}",
                     str(sum(e.get("triggers", 0) for e in entry)), str(sum(e.get("write_steps", 0) for e in entry)),
                     str(sum(e.get("flashcards_written", 0) for e in entry)),
                     _minutes(sum(c["cpu_s"] for c in costs)) + f" ({len(costs)} conv.)",
                     f"{sum(c['wall_s'] for c in costs) / 60:.0f} min"])  # fmt: skip
    lines += _table(["format", "F1 1-4 [95% CI]", "EM 1-4", "writes", "write steps", "cards", "cost", "wall"], rows)
    lines += [""]
    diffs = {}
    pairs = [(x, y) for x, y in (("qa", "summary"), ("qa", "ntp"), ("summary", "ntp")) if x in main and y in main]
    pairs += [(f, NO_MEMORY) for f in formats] if NO_MEMORY in main else []
    for x, y in pairs:
        diffs[(x, y)] = paired_difference([a["f1"] for a in main[x]], [a["f1"] for a in main[y]])
    lines += _table(["difference", "F1 points [95% CI]", "CI excludes 0"],
                    [[f"{x} − {y}", d.fmt(100), "yes" if d.excludes_zero() else "no"] for (x, y), d in diffs.items()])
    lines += ["", f"![write formats]({plot_formats(f1s, diffs, out / 'format.png')})", ""]
    return lines


def plot_formats(f1s: dict, diffs: dict, path: Path) -> str:
    """Each method's F1 interval (`f1s`: method -> Interval) and the paired differences, side by side."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ivs = list(f1s.values())
    ax1.bar(list(f1s), [100 * i.mean for i in ivs], capsize=4,
            yerr=[[100 * (i.mean - i.low) for i in ivs], [100 * (i.high - i.mean) for i in ivs]])  # fmt: skip
    ax1.set_ylabel("LoCoMo F1, categories 1-4 (x100)")
    labels = [f"{x} − {y}" for x, y in diffs]
    ds = list(diffs.values())
    ax2.errorbar([100 * d.mean for d in ds], labels, capsize=4, fmt="o",
                 xerr=[[100 * (d.mean - d.low) for d in ds], [100 * (d.high - d.mean) for d in ds]])  # fmt: skip
    ax2.axvline(0, color="grey", linestyle=":")
    ax2.set_xlabel("paired F1 difference, points (95% bootstrap CI)")
    return _save(fig, path)


# ------------------------------------------------------------------ capacity
def capacity_section(store: ResultStore, out: Path) -> Lines:
    runs = [r for r in store.data["runs"].values() if r["writes"]]
    if not runs:
        return ["(no capacity run yet)", ""]
    modes = list(dict.fromkeys(r["mode"] for r in runs))
    rows = []
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        caps = [capacity([w["recall"] for w in r["writes"]], r["size"]) for r in mine]
        last = [r["writes"][-1] for r in mine]
        total = [sum(w["hits"]) for w in last]
        rows.append([mode, ", ".join(c.fmt() for c in caps),
                     ", ".join(str(len(r["writes"]) * r["size"]) for r in mine),
                     ", ".join(f"{t}" for t in total), ", ".join(f"{100 * w['recall'][0]:.0f}%" for w in last),
                     str(sum(w["steps"] for r in mine for w in r["writes"])),
                     _cost_text(sum(w["run_cpu_s"] for r in mine for w in r["writes"]),
                                [w for r in mine for w in r["writes"]], "run_s")])  # fmt: skip
    head = ["replay", "facts held before the first write fell below 50% (per seed)", "facts written",
            "facts recalled after the last write", "first write after the last", "write steps", "cost"]
    lines = _table(head, rows)
    lines += ["", "Recall (%) of the first write's facts after each write (the decay), and of every fact written "
              "so far:", "", *curve_table(runs, "first"), "", *curve_table(runs, "all")]
    lines += ["", f"![capacity]({plot_capacity(runs, modes, out / 'capacity.png')})", ""]
    return lines


def curve_table(runs: Sequence[dict], which: str) -> Lines:
    """Per run, recall (%) after each write: of the first write's facts ("first") or of every fact
    written so far ("all")."""
    size, longest = runs[0]["size"], max(len(r["writes"]) for r in runs)
    rows = []
    for r in runs:
        if which == "first":
            values = first_write_curve([w["recall"] for w in r["writes"]])
        else:
            values = [sum(w["hits"]) / len(w["hits"]) for w in r["writes"]]
        rows.append([r["mode"], str(r["seed"]), *(f"{100 * v:.0f}" for v in values), *[""] * (longest - len(values))])
    head = ["replay", "seed", *(f"{which} after {size * (w + 1)}" for w in range(longest))]
    return _table(head, rows)


def plot_capacity(runs: Sequence[dict], modes: Sequence[str], path: Path) -> str:
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for j, mode in enumerate(modes):
        mine = [r for r in runs if r["mode"] == mode]
        for k, r in enumerate(mine):
            xs = [r["size"] * (w + 1) for w in range(len(r["writes"]))]
            curve = first_write_curve([w["recall"] for w in r["writes"]])
            ax1.plot(xs, [100 * v for v in curve], color=f"C{j}", alpha=0.7, marker=".",
                     label=f"replay {mode}" if k == 0 else None)  # fmt: skip
            ax2.plot(xs, [sum(w["hits"]) for w in r["writes"]], color=f"C{j}", alpha=0.7, marker=".",
                     label=f"replay {mode}" if k == 0 else None)  # fmt: skip
    ax1.axhline(50, color="grey", linestyle=":")
    ax1.set_xlabel("facts written (writes of 8)")
    ax1.set_ylabel("recall of the first write's 8 facts, %")
    ax1.legend(fontsize=8)
    ax2.plot([0, max(r["size"] * len(r["writes"]) for r in runs)], [0, max(r["size"] * len(r["writes"])
             for r in runs)], color="grey", linestyle=":")  # fmt: skip
    ax2.set_xlabel("facts written")
    ax2.set_ylabel("facts recalled (all asked)")
    ax2.legend(fontsize=8)
    return _save(fig, path)


# ------------------------------------------------------------------ the report
def write_report(out: Path) -> Path:
    """Build report.md (and the plots) from whatever the checkpoints under `out` hold."""
    out = Path(out)
    lines = ["# tmem ablate", "", __doc__.split("\n\n", 1)[1].strip(), ""]
    facts = ResultStore(out / "facts.json")
    # a study with no run of its own (e.g. `--only init`) gets no section: no empty table, no empty plot
    table, summary = fact_rows(facts, INIT_PLAN)
    if summary:
        lines += ["## 1. Init: svd vs random vs pissa", "", *table, "",
                  f"![init]({plot_init(summary, out / 'init.png')})", ""]  # fmt: skip
    table, summary = fact_rows(facts, PLACE_PLAN)
    if summary:
        lines += ["## 3. Rank, layers, train_a", "", *table, "",
                  f"![place]({plot_place(summary, out / 'place.png')})", ""]  # fmt: skip
    pre = ResultStore(out / "precondition.json")
    if pre.data["runs"]:
        lines += ["## 2. Preconditioning: B's gradient along singular directions vs σ_i", "",
                  *precondition_section(pre.data, out)]  # fmt: skip
    if (out / "format").exists():
        lines += ["## 4. Write format on LoCoMo", "", *format_section(out)]
    cap = ResultStore(out / "capacity.json")
    if cap.data["runs"]:
        lines += ["## 5. Capacity", "", *capacity_section(cap, out)]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
