"""The measures behind `tmem ablate`: drift (KL), B's gradient along singular directions, bootstrap
intervals, capacity bookkeeping. Tiny random models and hand-made data; each against a reference."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from tmem_runtime import FastWeights, load_model
from tmem_runtime.ablations.capacity import (
    Capacity,
    capacity,
    first_write_curve,
    recall_by_write,
    replay_for,
    write_plan,
)
from tmem_runtime.ablations.drift import drift, kl_divergence, next_token_logprobs
from tmem_runtime.ablations.runs import CONFIGS, scaled_random_a, seed_changes_write
from tmem_runtime.ablations.spectrum import (
    direction_gradients,
    log_slope,
    share_of_variance,
    subspace_energy,
    weight_gradients,
)
from tmem_runtime.ablations.stats import bootstrap_means, mean_interval, paired_difference
from tmem_runtime.recipes import Recipe


def _batch(vocab: int, rows: int = 3, width: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, width), generator=gen)
    labels = ids.clone()
    labels[:, : width // 2] = -100  # loss on the second half, as on flashcard answers
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _slot_tensors(fw: FastWeights) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(base weight, A) per adapter slot, in the layout's order."""
    mlps, lay = dict(fw.mlps), fw.layout
    state = fw.state_dict()
    weights = [getattr(mlps[s.layer], s.target).weight for s in lay.slots]
    return weights, [state[lay.a_name(i)] for i in range(len(lay.slots))]


# ------------------------------------------------------------------ drift
def test_kl_divergence_matches_closed_form_and_torch_distributions():
    p = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    q = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5]])
    kl = kl_divergence(p.log(), q.log())
    assert kl[0].item() == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), rel=1e-6)
    assert kl[1].item() == pytest.approx(0.0, abs=1e-7)  # identical distributions; 0 log 0 counted as 0
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 40, generator=gen), torch.randn(5, 40, generator=gen)
    ref = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=a),
                                            torch.distributions.Categorical(logits=b))  # fmt: skip
    torch.testing.assert_close(kl_divergence(a.log_softmax(-1), b.log_softmax(-1)).float(), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        kl_divergence(a.log_softmax(-1), b[:, :10].log_softmax(-1))


def test_drift_is_zero_until_a_write_and_the_batch_equals_each_prompt_alone():
    model, _ = load_model("tiny-llama")
    vocab = model.config.vocab_size
    prompts = [[1, 5, 9, 3], [7, 2], [4, 4, 8, 6, 1, 2]]
    before = next_token_logprobs(model, prompts)
    for p, row in zip(prompts, before):  # left padding with explicit positions changes nothing
        alone = torch.log_softmax(model(input_ids=torch.tensor([p])).logits[0, -1].float(), -1)
        torch.testing.assert_close(row, alone.detach(), rtol=1e-5, atol=1e-5)
    groups = ["chat", "chat", "text"]
    fw = FastWeights(model, rank=2, num_layers=2, backend="torch")
    unchanged = drift(before, next_token_logprobs(model, prompts), groups)
    assert max(unchanged.kl) == 0.0 and unchanged.top1_kept == 1.0
    fw.write([_batch(vocab)] * 10, lr=0.05, optimizer="adamw")
    after = next_token_logprobs(model, prompts)
    moved = drift(before, after, groups)
    ref = [float(kl_divergence(before[i], after[i])) for i in range(3)]
    assert list(moved.kl) == pytest.approx(ref) and min(moved.kl) > 1e-4
    assert moved.mean_kl("chat") == pytest.approx((ref[0] + ref[1]) / 2)
    assert moved.as_dict()["mean_kl_text"] == pytest.approx(ref[2], abs=1e-6)
    fw.detach()


# ------------------------------------------------------------------ gradient along singular directions
def test_direction_gradients_equal_lora_autograd_and_split_into_sigma_times_projection():
    gen = torch.Generator().manual_seed(0)
    out_f, in_f, r = 7, 11, 3
    w = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64)
    _, s, vh = torch.linalg.svd(w, full_matrices=False)
    a = s[:r, None] * vh[:r]  # the SVD init: A = S_r V_r^T
    b = torch.randn(out_f, r, generator=gen, dtype=torch.float64, requires_grad=True)
    x, y = torch.randn(5, in_f, generator=gen, dtype=torch.float64), torch.randn(5, out_f, generator=gen)
    w_eff = (w + b.detach() @ a).requires_grad_(True)
    ((x @ w_eff.T - y).pow(2).sum()).backward()  # G = dL/dW at the effective weight
    ((x @ (w + b @ a).T - y).pow(2).sum()).backward()  # dL/dB through the LoRA product
    d = direction_gradients(w_eff.grad, a)
    torch.testing.assert_close(d["dB"], b.grad.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d["sigma"], s[:r].float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(d["dB_norm"], d["sigma"] * d["projection"], rtol=1e-5, atol=0)
    ref_proj = (w_eff.grad @ vh[:r].T).norm(dim=0).float()  # ||G v_i||
    torch.testing.assert_close(d["projection"], ref_proj, rtol=1e-5, atol=0)


def test_weight_gradients_predict_the_runtimes_sgd_steps_at_zero_and_nonzero_b():
    model, _ = load_model("tiny-llama")
    model.lm_head.weight.requires_grad_(True)  # a flag the measurement must leave alone
    fw = FastWeights(model, rank=3, num_layers=2, backend="torch")
    weights, a = _slot_tensors(fw)
    batch, lr, lay = _batch(model.config.vocab_size), 0.05, fw.layout
    b_prev = [torch.zeros(s.out_features, 3) for s in lay.slots]
    for _ in range(2):  # from B = 0 (the model's own MLP), then from B != 0 (the adapted MLP)
        _, grads = weight_gradients(model, weights, batch)
        fw.write([batch], lr=lr, optimizer="sgd")
        state = fw.state_dict()
        for i, (g, a_i) in enumerate(zip(grads, a)):
            step = state[lay.b_name(i)] - b_prev[i]
            torch.testing.assert_close(step, -lr * (g @ a_i.T), rtol=1e-4, atol=1e-7)
        b_prev = [state[lay.b_name(i)] for i in range(len(lay.slots))]
        assert min(float(b.norm()) for b in b_prev) > 0
    assert all(not w.requires_grad and w.grad is None for w in weights)
    assert model.lm_head.weight.requires_grad and model.lm_head.weight.grad is None
    fw.detach()


def test_subspace_energy_slope_and_share_of_variance_on_known_cases():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(9, 9, generator=gen))
    u = torch.randn(4, generator=gen)
    inside = torch.outer(u, q[:, 0]) + torch.outer(u.flip(0), q[:, 1])
    assert subspace_energy(inside, 3.0 * q[:, :2].T) == pytest.approx(1.0, abs=1e-6)  # row scale is irrelevant
    assert subspace_energy(inside, q[:, 2:5].T) == pytest.approx(0.0, abs=1e-6)
    mixed = inside + torch.outer(u, q[:, 5])  # energy |u|^2 of 3 |u|^2 outside span(q0, q1)
    assert subspace_energy(mixed, q[:, :2].T) == pytest.approx(2 / 3, rel=1e-5)
    x = [1.0, 2.0, 3.0, 5.0]
    assert log_slope(x, [0.7 * v**2 for v in x]) == pytest.approx(2.0)
    assert log_slope(x, [4.0] * 4) == pytest.approx(0.0)
    sigma = [math.log(v) for v in (10.0, 12.0, 15.0)]
    assert share_of_variance(sigma, [s + 0.3 for s in sigma]) == pytest.approx(1.0)  # equal projections
    assert share_of_variance(sigma, [s + p for s, p in zip(sigma, (0.0, 1.0, -1.0))]) == pytest.approx(
        torch.tensor(sigma).var().item() / torch.tensor([sigma[0], sigma[1] + 1, sigma[2] - 1]).var().item()
    )


def test_scaled_random_a_keeps_the_svd_row_norms_with_new_directions():
    model, _ = load_model("tiny-llama")
    fw = FastWeights(model, rank=3, num_layers=2, backend="torch")
    a = fw.store.engine.a.detach().clone()
    new, lay = scaled_random_a(a, fw.layout, seed=4), fw.layout
    for i in range(len(lay.slots)):
        old_rows, new_rows = lay.a_view(a, i), lay.a_view(new, i)
        torch.testing.assert_close(new_rows.norm(dim=1), old_rows.norm(dim=1), rtol=1e-5, atol=0)
        cos = (old_rows / old_rows.norm(dim=1, keepdim=True) * new_rows / new_rows.norm(dim=1, keepdim=True)).sum(1)
        assert cos.abs().max() < 0.9
    torch.testing.assert_close(scaled_random_a(a, lay, seed=4), new)
    fw.detach()
    assert seed_changes_write(CONFIGS["random"], Recipe(), 10)
    assert seed_changes_write(CONFIGS["random-scaled"], Recipe(), 10)
    assert not seed_changes_write(CONFIGS["svd"], Recipe(batch_size=16), 10)  # one batch holds every card
    assert seed_changes_write(CONFIGS["svd"], Recipe(batch_size=4), 10)


# ------------------------------------------------------------------ bootstrap
def test_bootstrap_interval_matches_the_exact_bootstrap_distribution():
    values = [0.0, 1.0, 3.0, 7.0]
    # every one of the 4^4 resamples is equally likely: the exact bootstrap distribution of the mean
    exact = sorted(sum(c) / 4 for c in itertools.product(values, repeat=4))
    iv = mean_interval(values, alpha=0.05, n_resamples=200_000, seed=3)
    assert iv.mean == pytest.approx(2.75) and iv.n == 4
    cdf = lambda v: sum(e <= v for e in exact) / len(exact)
    for q, got in ((0.025, iv.low), (0.975, iv.high)):
        atom = exact[math.ceil(q * len(exact)) - 1]  # the exact q-quantile: the first value with CDF >= q
        below = max([e for e in exact if e < atom], default=atom)
        assert cdf(below) < q - 0.005 and cdf(atom) > q + 0.005  # well clear of the jump: no MC ambiguity
        assert got == atom
    means = bootstrap_means(values, 200_000, seed=3)
    pop_var = torch.tensor(values).var(unbiased=False).item()
    assert means.std().item() == pytest.approx(math.sqrt(pop_var / 4), rel=0.01)  # sd of the bootstrap mean


def test_bootstrap_interval_near_normal_theory_and_degenerate_when_constant():
    rng = random.Random(0)
    x = [rng.gauss(1.0, 2.0) for _ in range(400)]
    iv = mean_interval(x, n_resamples=20_000, seed=1)
    sd = torch.tensor(x).std().item() / math.sqrt(len(x))
    assert iv.low == pytest.approx(iv.mean - 1.96 * sd, abs=0.15 * sd)
    assert iv.high == pytest.approx(iv.mean + 1.96 * sd, abs=0.15 * sd)
    const = mean_interval([0.25] * 30)
    assert (const.mean, const.low, const.high) == pytest.approx((0.25, 0.25, 0.25))
    assert const.excludes_zero() and iv.excludes_zero()
    with pytest.raises(ValueError, match="empty"):
        mean_interval([])


def test_paired_difference_uses_the_pairing():
    rng = random.Random(2)
    base = [rng.uniform(0, 100) for _ in range(60)]  # large spread between items, shared by both settings
    a = [v + 1.0 + rng.uniform(-0.1, 0.1) for v in base]
    iv = paired_difference(a, base)
    assert 0.95 < iv.low < iv.mean < iv.high < 1.05  # the items' own spread cancels in the pairs
    assert iv.as_dict()["n"] == 60 and iv.fmt() == f"{iv.mean:+.1f} [{iv.low:+.1f}, {iv.high:+.1f}]"
    with pytest.raises(ValueError, match="differ in length"):
        paired_difference([1.0, 2.0], [1.0])


# ------------------------------------------------------------------ capacity bookkeeping
def test_write_plan_and_replay_selection():
    assert write_plan(20, 8) == [list(range(8)), list(range(8, 16))]  # the partial last chunk is dropped
    assert write_plan(16, 8)[-1] == list(range(8, 16)) and write_plan(7, 8) == []
    earlier = list(range(40))
    assert replay_for("none", earlier, 5, 0) == [] and replay_for("all", earlier, 5, 0) == earlier
    sample = replay_for("sample32", earlier, 5, seed=2)
    agent = random.Random(2 * 1000 + 5).sample(earlier, 32)  # FastWeightChannel.write's own selection
    assert sample == agent and len(set(sample)) == 32
    assert replay_for("sample32", earlier[:10], 1, 0) == random.Random(1).sample(earlier[:10], 10)
    with pytest.raises(ValueError, match="replay mode"):
        replay_for("half", earlier, 1, 0)
    with pytest.raises(ValueError, match="write size"):
        write_plan(10, 0)


def test_recall_by_write_and_capacity_on_hand_made_runs():
    plan = write_plan(24, 8)
    hits = {i: i % 4 != 0 for i in range(24)}  # 6 of every 8 recalled
    hits.update({i: i < 2 for i in range(8)})  # the first write: 2 of 8
    assert recall_by_write(hits, plan, 2) == [0.25, 0.75, 0.75]
    assert recall_by_write(hits, plan, 0) == [0.25]
    fading = [[1.0], [0.75, 1.0], [0.5, 0.9, 1.0], [0.375, 0.5, 0.9, 1.0], [0.625, 0.5, 0.5, 0.9, 1.0]]
    assert first_write_curve(fading) == [1.0, 0.75, 0.5, 0.375, 0.625]
    cap = capacity(fading, 8)  # 0.5 is not below 0.5; the first fall is at the 4th write (32 facts)
    assert cap == Capacity(held=24, fell_at=32) and not cap.censored and cap.fmt() == "24 (below at 32)"
    assert capacity([[0.4], [1.0, 1.0]], 8) == Capacity(held=0, fell_at=8)
    kept = capacity([[1.0], [0.9, 1.0], [0.6, 1.0, 1.0]], 8)
    assert kept == Capacity(held=24, fell_at=None) and kept.censored and kept.fmt() == ">= 24 (never fell)"
    assert capacity(fading, 8, threshold=0.8).held == 8


def test_recall_difference_pairs_facts_and_averages_seeds():
    from tmem_runtime.ablations.report import fact_hits, recall_difference

    base = [{"set": "s", "hits": [True, False, True, False]}]  # one seed: a deterministic write
    runs = [{"set": "s", "hits": [True, True, False, False]}, {"set": "s", "hits": [True, True, True, False]}]
    assert fact_hits(runs) == {("s", 0): 1.0, ("s", 1): 1.0, ("s", 2): 0.5, ("s", 3): 0.0}
    iv = recall_difference(runs, base)  # per fact: 0, +1, -0.5, 0
    assert iv.n == 4 and iv.mean == pytest.approx(0.125)
    assert -0.5 <= iv.low < iv.mean < iv.high <= 1.0  # a resampled mean lies between the extreme facts
    assert recall_difference(runs, [{"set": "other", "hits": [True]}]) is None


# ------------------------------------------------------------------ the command and a resumed study
def test_ablate_help_shows_every_default_and_the_default_sets_are_three_held_out_kinds():
    from tmem_runtime.ablations.command import build_parser, parse_args
    from tmem_runtime.fact_sets import load_fact_set

    parser = build_parser()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert all(a.help for a in options), [a.dest for a in options if not a.help]  # help: the default is shown
    text = parser.format_help()
    assert text.count("(default:") == len(options)
    args = parse_args(["--out", "x"])
    sets = [load_fact_set(s) for s in args.sets]
    assert len({s.kind for s in sets}) == 3 and {s.split for s in sets} == {"held-out"}
    assert args.seeds == [0, 1, 2] and args.capacity_writes == 12 and len(args.conversations) == 6


def test_capacity_study_stops_at_max_writes_and_a_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from tmem_runtime.ablations.runs import ResultStore
    from tmem_runtime.ablations.studies import capacity_study
    from tmem_runtime.models import _tiny_tokenizer, tiny_config

    tokenizer = _tiny_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("tiny-llama", vocab_size=len(tokenizer))).eval()
    model.requires_grad_(False)

    def run(out, writes: int) -> dict:
        capacity_study(ResultStore(out / "c.json"), model, tokenizer, ["sample32"], [0], 2, out / "ad", writes)
        return ResultStore(out / "c.json").get("sample32|0")

    part = run(tmp_path / "a", 2)
    assert [len(w["recall"]) for w in part["writes"]] == [1, 2]
    assert [w["replayed"] for w in part["writes"]] == [0, 2]
    assert all(w["run_s"] >= w["write_s"] > 0 for w in part["writes"])
    assert [p.name for p in (tmp_path / "a" / "ad").iterdir()] == ["capacity-sample32-0-2w.safetensors"]
    resumed, whole = run(tmp_path / "a", 3), run(tmp_path / "b", 3)
    assert resumed["writes"][:2] == part["writes"] and len(resumed["writes"]) == 3
    assert resumed["writes"][2]["losses"] == pytest.approx(whole["writes"][2]["losses"], rel=1e-5)
    # killed between saving write 3's adapter and recording write 3: the resume starts from write 2's adapter
    run(tmp_path / "c", 2)
    put = ResultStore.put

    def killed(self, key, record):
        if len(record["writes"]) == 3:
            raise KeyboardInterrupt
        put(self, key, record)

    monkeypatch.setattr(ResultStore, "put", killed)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "c", 3)
    monkeypatch.undo()
    assert len(list((tmp_path / "c" / "ad").iterdir())) == 2  # write 2's and write 3's adapters
    crashed = run(tmp_path / "c", 3)
    assert crashed["writes"][2]["losses"] == pytest.approx(whole["writes"][2]["losses"], rel=1e-5)
    assert crashed["writes"][2]["hits"] == whole["writes"][2]["hits"]


def test_every_neutral_chat_question_has_its_right_answers():
    from tmem_runtime.ablations.drift import NEUTRAL_KEYS, NEUTRAL_QUESTIONS

    assert len(NEUTRAL_KEYS) == len(NEUTRAL_QUESTIONS)
    assert all(keys and all(k == k.lower() for k in keys) for keys in NEUTRAL_KEYS)


def test_a_checkpoint_of_other_settings_is_refused_and_left_as_it_was(tmp_path):
    """`tmem ablate` resumes from its checkpoints: one whose records were made with another model or study
    size is refused before any work (resuming would mix two experiments in one table), and left as it was;
    the same settings resume; a checkpoint of before settings were recorded is taken and adopts them."""
    from tmem_runtime.ablations.command import main
    from tmem_runtime.ablations.runs import ResultStore

    path = tmp_path / "capacity.json"
    store = ResultStore(path, {"model": "smollm2-135m", "size": 8})
    store.put("none|0", {"writes": []})
    before = path.read_text()
    with pytest.raises(SystemExit, match=r"other settings \(model 'smollm2-135m' -> 'tiny-llama', size 8 -> 4\)"):
        main(["--out", str(tmp_path), "--only", "capacity", "--model", "tiny-llama", "--capacity-size", "4"])
    assert path.read_text() == before
    assert ResultStore(path, {"model": "smollm2-135m", "size": 8}).get("none|0") == {"writes": []}
    old = tmp_path / "old.json"
    old.write_text('{"runs": {"k": {"x": 1}}}')  # made before settings were recorded
    adopted = ResultStore(old, {"model": "m"})
    adopted.put("k2", {})
    assert ResultStore(old, {"model": "m"}).data["settings"] == {"model": "m"}


def test_a_damaged_checkpoint_is_refused_in_one_line_and_left_as_it_was(tmp_path):
    """A checkpoint that is not JSON (a file edited by hand, a disk that filled) or not the layout (a JSON
    list) was a JSONDecodeError / AttributeError traceback; now one line naming it, before any model loads
    (--model tiny-llama would load), and the file is left as it was; --report-only the same."""
    from tmem_runtime.ablations.command import main

    path = tmp_path / "capacity.json"
    for damaged, why in (("{not json", "Expecting property name"), ("[]", 'not an object with a "runs" object'),
                         ('{"runs": []}', 'not an object with a "runs" object')):  # fmt: skip
        path.write_text(damaged)
        with pytest.raises(SystemExit, match=rf"tmem ablate: {path} is not a tmem ablate checkpoint \({why}"):
            main(["--out", str(tmp_path), "--only", "capacity", "--model", "tiny-llama"])
        with pytest.raises(SystemExit, match="is not a tmem ablate checkpoint"):
            main(["--out", str(tmp_path), "--report-only"])
        assert path.read_text() == damaged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["capacity.json"]


def test_a_format_study_done_with_other_settings_is_refused(tmp_path):
    """The format study skips a (format, conversation) whose `tmem eval` report exists: only when that run
    had the same settings (another --max-sessions is refused, not silently reused)."""
    import json

    from tmem_runtime.ablations.studies import format_dir, format_study
    from tmem_runtime.agent.evaluate import parse_args

    d = format_dir(tmp_path, "none", "conv-26")
    d.mkdir(parents=True)
    argv = ["--data", "data.json", "--memory", "none", "--conversations", "conv-26", "--max-sessions", "3",
            "--l-max", "768", "--answer-tokens", "16", "--threads", "1", "--out", str(d)]  # fmt: skip
    (d / "answers.json").write_text(json.dumps({"args": vars(parse_args(argv)), "runs": []}, default=str))
    (d / "report.json").write_text("{}")
    format_study(tmp_path, "data.json", ["conv-26"], 3, ["none"])  # done, same settings: skipped
    with pytest.raises(SystemExit, match=r"format study: .*other settings \(max_sessions\)"):
        format_study(tmp_path, "data.json", ["conv-26"], 2, ["none"])


def test_the_report_has_a_section_only_for_a_fact_study_that_ran(tmp_path):
    """`tmem ablate --only init --configs svd --recipes paper` (the smallest run) records one run that only the
    init study plans: the report shows that study (its table row and plot) and no empty "rank, layers" table
    or plot for the place study, which did not run."""
    import warnings

    from tmem_runtime.ablations.report import write_report
    from tmem_runtime.ablations.runs import ResultStore

    hits = [True, False] * 5
    drift_record = {"mean_kl_chat": 0.26, "mean_kl_text": 0.14, "top1_kept": 0.75,
                    "neutral_right_before": [True] * 4 + [False] * 6, "neutral_right_after": [True] * 2 + [False] * 8}
    ResultStore(tmp_path / "facts.json", {"model": "smollm2-135m"}).put("svd|paper|titles_b|0", {
        "config": "svd", "recipe": "paper", "set": "titles_b", "seed": 0, "hits": hits, "paraphrase_hits": hits,
        "losses": [6.4, 5.8, 5.3], "write_s": 2.3, "write_cpu_s": 2.3, "run_cpu_s": 11.4, "run_s": 11.5,
        "drift": drift_record, "bytes_per_session": 350208})  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns on a legend of an empty plot
        report = write_report(tmp_path).read_text()
    assert "## 1. Init" in report and "| svd (" in report and (tmp_path / "init.png").exists()
    assert "## 3. Rank, layers" not in report and not (tmp_path / "place.png").exists()


def _finished_format_run(out, write_format: str, conversation: str, f1s: list[float]) -> None:
    """The files `tmem eval` leaves for one (format, conversation) of the format study."""
    import json

    from tmem_runtime.ablations.studies import format_dir

    d = format_dir(out, write_format, conversation)
    d.mkdir(parents=True)
    answers = [{"question": f"q{i}", "category": 1 + i % 4, "f1": f, "em": float(f == 1.0)} for i, f in enumerate(f1s)]
    (d / "answers.json").write_text(json.dumps({"runs": [{"answers": answers}]}))
    (d / "report.json").write_text(json.dumps({"methods": {write_format: {"triggers": 2, "write_steps": 9,
                                                                            "flashcards_written": 5}}}))


def test_the_format_report_compares_the_formats_that_ran(tmp_path):
    """`tmem ablate --only format --formats qa ntp` runs two of the three formats: the report compares those
    two (before, it waited for all three and printed 'no conversation finished' forever)."""
    from tmem_runtime.ablations.report import format_section

    for conv, shift in (("conv-1", 0.0), ("conv-2", 0.1)):
        _finished_format_run(tmp_path, "qa", conv, [0.5 + shift, 1.0, 0.25, 0.75])
        _finished_format_run(tmp_path, "ntp", conv, [0.25 + shift, 0.5, 0.0, 0.5])
    _finished_format_run(tmp_path, "qa", "conv-3", [1.0, 1.0, 1.0, 1.0])  # ntp not finished: left out
    text = "\n".join(format_section(tmp_path))
    assert "per format (qa, ntp), conversations conv-1, conv-2" in text and "**8 questions" in text
    qa = next(line for line in text.splitlines() if line.startswith("| qa |"))
    assert qa.split("|")[2].strip().startswith(f"{100 * (0.6 + 1.0 + 0.25 + 0.75 + 0.5 + 1.0 + 0.25 + 0.75) / 8:.1f}")
    assert "| qa − ntp |" in text and "summary" not in text
