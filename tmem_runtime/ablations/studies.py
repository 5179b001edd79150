"""The studies of `tmem ablate`: each runs what its JSON checkpoint lacks and saves as it goes.

    fact_study       init (svd / random / random-scaled / pissa) and rank / layers / train_a on fact sets
    precondition     B's gradient along each singular direction vs sigma_i, on real writes
    format_study     qa / summary / ntp write formats on LoCoMo through `tmem eval`
    capacity_study   facts written 8 at a time, with and without replay, recall of every write after each
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tmem_runtime.ablations.capacity import recall_by_write, replay_for, write_plan
from tmem_runtime.ablations.drift import neutral_answers_right, neutral_prompts, next_token_logprobs
from tmem_runtime.ablations.runs import (
    CONFIGS,
    ResultStore,
    attach,
    recall_run,
    restore_a,
    seed_changes_write,
)
from tmem_runtime.ablations.spectrum import direction_gradients, random_rows, subspace_energy, weight_gradients
from tmem_runtime.examples import collate, qa_examples
from tmem_runtime.fact_sets import Fact, load_fact_set
from tmem_runtime.fast_weights import FastWeights
from tmem_runtime.recall import ask_facts
from tmem_runtime.recipes import get_recipe
from tmem_runtime.sessions import pad_id

log = logging.getLogger(__name__)

INITS = ("svd", "random", "random-scaled", "pissa")
INIT_PLAN = [*((c, "default") for c in INITS), ("pissa-train-a", "default"), *((c, "paper") for c in INITS)]
PLACE_PLAN = [(c, "default") for c in ("svd", "rank2", "rank16", "middle4", "last8", "train-a")]


def neutral_reference(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):  # noqa: ANN201
    """(neutral prompt ids, groups, the bare model's next-token log-probabilities, whether the bare model
    answers each neutral chat question right): call before attaching."""
    prompts, groups = neutral_prompts(tokenizer)
    right = neutral_answers_right(model, tokenizer)[1]
    return prompts, groups, next_token_logprobs(model, prompts, pad_id(tokenizer)), right


def fact_key(config: str, recipe: str, fact_set: str, seed: int) -> str:
    return f"{config}|{recipe}|{fact_set}|{seed}"


def fact_study(
    store: ResultStore,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    plan: Sequence[tuple[str, str]],
    sets: Sequence[str],
    seeds: Sequence[int],
    neutral,  # noqa: ANN001
    all_seeds: bool = False,
) -> None:
    """Every (config, recipe) x seed x fact set not in `store`: a fresh adapter state, one write, recall.

    A seed at which the write cannot differ from seed 0's (`seed_changes_write`) is recorded as a copy
    of seed 0's run (`"same_as_seed": 0`) unless `all_seeds`."""
    for name, recipe in plan:
        config = CONFIGS[name]
        for seed in seeds:
            todo = [s for s in sets if fact_key(name, recipe, s, seed) not in store]
            if not todo:
                continue
            n_cards = max(len(load_fact_set(s).facts) for s in todo)
            if seed != seeds[0] and not all_seeds:
                if not seed_changes_write(config, get_recipe(recipe), n_cards):
                    for s in todo:
                        first = store.get(fact_key(name, recipe, s, seeds[0]))
                        if first is not None:
                            copy = {**first, "seed": seed, "same_as_seed": seeds[0]}
                            store.put(fact_key(name, recipe, s, seed), copy)
                    continue
            fw = attach(model, config, seed)
            a_start = fw.store.engine.a.detach().clone()
            try:
                for s in todo:
                    fw.reset()
                    restore_a(fw, a_start)
                    fs = load_fact_set(s)
                    record = recall_run(fw, tokenizer, fs.facts, recipe, seed, config.train_a, neutral)
                    record.update(config=name, recipe=recipe, set=s, kind=fs.kind, seed=seed)
                    store.put(fact_key(name, recipe, s, seed), record)
                    log.info(
                        "%s/%s %s seed %d: %d/%d (paraphrase %d) loss %.2f->%.3f KL %.4f write %.1fs",
                        name, recipe, s, seed, sum(record["hits"]), len(record["hits"]),
                        sum(record["paraphrase_hits"]), record["losses"][0], record["losses"][-1],
                        record["drift"]["mean_kl"], record["write_s"],
                    )  # fmt: skip
            finally:
                fw.detach()


# ------------------------------------------------------------------ preconditioning
def adapted_weights(fw: FastWeights) -> list[torch.Tensor]:
    """The base weight of every adapter slot, in the layout's order."""
    mlps = dict(fw.mlps)
    return [getattr(mlps[s.layer], s.target).weight for s in fw.layout.slots]


def slot_a(fw: FastWeights) -> list[torch.Tensor]:
    lay, a = fw.layout, fw.store.engine.a.detach()
    return [lay.a_view(a, i).clone() for i in range(len(lay.slots))]


def gradient_profile(loss: float, grads: Sequence[torch.Tensor], a: Sequence[torch.Tensor], seed: int) -> dict:
    """Per slot: ||G v_i||, ||dB_i||, the gradient's norm and its share in the top-r and in a random
    r-dimensional input subspace. grads: dL/dW per slot ([out, in]); a: A per slot ([r, in])."""
    slots = []
    for i, (g, a_i) in enumerate(zip(grads, a)):
        d = direction_gradients(g, a_i)
        slots.append({
            "projection": d["projection"].tolist(), "dB_norm": d["dB_norm"].tolist(),
            "grad_norm": float(g.norm()), "energy_top": subspace_energy(g, a_i),
            "energy_random": subspace_energy(g, random_rows(a_i.shape[0], a_i.shape[1], seed + i)),
        })  # fmt: skip
    return {"loss": loss, "slots": slots}


def profile_now(fw: FastWeights, batch: dict[str, torch.Tensor], seed: int) -> tuple[dict, list[torch.Tensor]]:
    """(gradient profile for the current B, dB = G A^T per slot)."""
    loss, grads = weight_gradients(fw.model, adapted_weights(fw), batch)
    a = slot_a(fw)
    return gradient_profile(loss, grads, a, seed), [g @ a_i.T for g, a_i in zip(grads, a)]


def b_column_norms(fw: FastWeights) -> list[list[float]]:
    """||B[:, i]|| per slot."""
    state, lay = fw.state_dict(), fw.layout
    return [state[lay.b_name(i)].norm(dim=0).tolist() for i in range(len(lay.slots))]


def spectra(fw: FastWeights, top: int = 16) -> list[list[float]]:
    """The top singular values of every adapted base weight (exact, float32)."""
    return [torch.linalg.svdvals(w.detach().float())[:top].tolist() for w in adapted_weights(fw)]


def precondition_study(
    store: ResultStore, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sets: Sequence[str], seed: int = 0
) -> None:
    """Per fact set: the gradient profile before each of the paper recipe's 5 SGD steps (one step per
    epoch: writing epoch by epoch is the same write), the first step's B against -lr * G A^T (the
    measurement checked against the runtime's own update), B's column norms after SGD and after the
    default AdamW write, and the profile after that write."""
    fw = FastWeights(model, seed=seed)
    try:
        lay = fw.layout
        if "spectra" not in store.data:
            store.data["spectra"] = {"slots": [f"{s.layer}.{s.target}" for s in lay.slots], "sigma": spectra(fw)}
            store.data["sigma_a"] = [a.norm(dim=1).tolist() for a in slot_a(fw)]
            store.save()
        paper = get_recipe("paper")
        one_step = paper.with_(epochs=1)
        for s in sets:
            if s in store:
                continue
            wall, cpu = time.perf_counter(), time.process_time()
            pairs = load_fact_set(s).pairs
            examples, _ = qa_examples(tokenizer, pairs, "answer", paper.max_length)
            batch = collate(examples, pad_id(tokenizer))
            fw.reset()
            record: dict = {"set": s, "sgd": []}
            for step in range(paper.epochs):
                profile, d_b = profile_now(fw, batch, seed)
                record["sgd"].append(profile)
                fw.write_qa(tokenizer, pairs, one_step, seed)
                if step == 0:  # from B = 0, one SGD step gives B = -lr * dB
                    state = fw.state_dict()
                    record["first_step_rel_error"] = max(
                        float((state[lay.b_name(i)] + paper.lr * g).norm() / (paper.lr * g).norm())
                        for i, g in enumerate(d_b)
                    )
            record["b_norms_sgd"] = b_column_norms(fw)
            fw.reset()
            record["adamw_losses"] = fw.write_qa(tokenizer, pairs, "default", seed)
            record["b_norms_adamw"] = b_column_norms(fw)
            record["adamw_end"] = profile_now(fw, batch, seed)[0]
            record["cpu_s"] = round(time.process_time() - cpu, 2)
            record["wall_s"] = round(time.perf_counter() - wall, 2)
            store.put(s, record)
            log.info("precondition %s: first SGD step vs -lr G A^T rel. error %.2e", s, record["first_step_rel_error"])
    finally:
        fw.detach()


# ------------------------------------------------------------------ write formats on LoCoMo
FORMATS = ("qa", "summary", "ntp")
NO_MEMORY = "none"  # `tmem eval --memory none`: no write, no clear; the read sessions stay in the prompt


def format_dir(out: Path, write_format: str, conversation: str) -> Path:
    return out / "format" / write_format / conversation


def format_study(
    out: Path, data: str, conversations: Sequence[str], max_sessions: int, formats: Sequence[str] = FORMATS,
    l_max: int = 768, answer_tokens: int = 16, threads: int = 1,
) -> None:
    """`tmem eval` (tmem channel) once per (format, conversation) into its own directory; one that has
    a report.json is done (cost.json beside it: the process's CPU and wall seconds). Every other
    setting is `tmem eval`'s default (per-turn cards, replay 32, the agent recipe). The format
    NO_MEMORY runs the no-memory channel instead (the paper's "no memory, full context" baseline: the
    read sessions stay in the prompt), what the formats are measured against."""
    from tmem_runtime.agent.evaluate import main as evaluate
    from tmem_runtime.agent.evaluate import parse_args, saved_runs

    for conversation in conversations:
        for f in formats:
            d = format_dir(out, f, conversation)
            memory = ["none"] if f == NO_MEMORY else ["tmem", "--write-format", f]
            argv = [
                "--data", data, "--memory", *memory, "--conversations", conversation,
                "--max-sessions", str(max_sessions), "--l-max", str(l_max), "--answer-tokens", str(answer_tokens),
                "--threads", str(threads), "--out", str(d),
            ]  # fmt: skip
            if (d / "report.json").exists():  # done: with these settings, or refused
                try:
                    saved_runs(d, parse_args(argv))
                except SystemExit as exc:
                    raise SystemExit(f"tmem ablate: format study: {exc}; or delete {d}") from None
                continue
            log.info("format %s on %s", f, conversation)
            wall, cpu = time.perf_counter(), time.process_time()
            evaluate(argv)
            cost = {"cpu_s": round(time.process_time() - cpu, 1), "wall_s": round(time.perf_counter() - wall, 1)}
            (d / "cost.json").write_text(json.dumps(cost))


# ------------------------------------------------------------------ capacity
def capacity_facts(seed: int) -> list[Fact]:
    """Every fact of every set, in a seeded random order."""
    from tmem_runtime.fact_sets import fact_sets

    facts = [f for fs in fact_sets().values() for f in fs.facts]
    random.Random(seed).shuffle(facts)
    return facts


def capacity_study(
    store: ResultStore,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    modes: Sequence[str],
    seeds: Sequence[int],
    size: int,
    adapters: Path,
    max_writes: int | None = None,
) -> None:
    """Per (seed, replay mode): up to `max_writes` writes of `size` facts (default recipe) and, after
    each, every fact written so far asked. The adapter is saved after each write, named by its write count,
    before the record (then the previous file goes), so a restart at any point resumes mid-run from the
    adapter of the last recorded write."""
    for seed in seeds:
        facts = capacity_facts(seed)
        plan = write_plan(len(facts), size)[:max_writes]
        for mode in modes:
            key = f"{mode}|{seed}"
            record = store.get(key) or {"mode": mode, "seed": seed, "size": size, "writes": []}
            if len(record["writes"]) >= len(plan):
                continue
            def path(writes: int, mode: str = mode, seed: int = seed) -> Path:  # the adapter after `writes` writes
                return adapters / f"capacity-{mode}-{seed}-{writes}w.safetensors"

            fw = FastWeights(model, seed=seed)
            try:
                if record["writes"]:
                    fw.load(path(len(record["writes"])))
                for w in range(len(record["writes"]), len(plan)):
                    earlier = [i for k in range(w) for i in plan[k]]
                    replay = replay_for(mode, earlier, w, seed)
                    pairs = [(facts[i].question, facts[i].answer) for i in plan[w] + replay]
                    wall, cpu = time.perf_counter(), time.process_time()
                    losses = fw.write_qa(tokenizer, pairs, "default", seed + w)
                    write_s, write_cpu = time.perf_counter() - wall, time.process_time() - cpu
                    asked = earlier + plan[w]
                    _, hits = ask_facts(model, tokenizer, [facts[i] for i in asked])
                    hit_of = dict(zip(asked, hits))
                    record["writes"].append({
                        "replayed": len(replay), "steps": len(losses), "losses": [round(x, 5) for x in losses],
                        "write_s": round(write_s, 2), "write_cpu_s": round(write_cpu, 2),
                        "run_cpu_s": round(time.process_time() - cpu, 2),
                        "run_s": round(time.perf_counter() - wall, 2),
                        "recall": recall_by_write(hit_of, plan, w), "hits": [hit_of[i] for i in asked],
                    })  # fmt: skip
                    fw.save(path(w + 1))
                    store.put(key, record)
                    path(w).unlink(missing_ok=True)
                    log.info("capacity %s seed %d write %d: first write %.2f, all %.2f, %d steps, %.0fs",
                             mode, seed, w, record["writes"][-1]["recall"][0], sum(hits) / len(hits),
                             len(losses), write_s)
            finally:
                fw.detach()
