"""The evaluation harness: question selection, report, plots, and `tmem eval` end to end on a fixture."""

import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from tmem_runtime.agent.evaluate import main, methods_of, plot, report_markdown, select_questions, summarize
from tmem_runtime.agent.locomo import load_locomo
from tmem_runtime.agent.timing import episode_times
from tmem_runtime.decoding import DecodeStats

FIXTURE = Path(__file__).parent / "fixtures" / "two_sessions.json"


def test_select_questions_round_robin_and_session_filter():
    (conv,) = load_locomo(FIXTURE)
    assert len(select_questions(conv, None, None)) == 6
    picked = select_questions(conv, 3, None)
    assert [q.category for q in picked] == [2, 1, 3]  # categories 1, 2, 3 first; file order kept
    assert len({q.category for q in select_questions(conv, 5, None)}) == 5
    only_first = select_questions(conv, None, 1)
    assert only_first and all(q.evidence_sessions == {1} for q in only_first)


def test_methods_put_prompt_space_channels_first():
    args = Namespace(memory=["tmem", "none", "tmem+summary", "retrieval"], write_format=["qa", "ntp"])
    assert methods_of(args) == [("none", None), ("retrieval", None), ("tmem", "qa"), ("tmem", "ntp"),
                                ("tmem+summary", "qa"), ("tmem+summary", "ntp")]


def _run(method: str, f1s: list[tuple[int, float]], losses: list[list[float]]) -> dict:
    triggers = [dict(format="qa", written=2, dropped=1, losses=x, generate_s=0.25, generate_tokens=30, train_s=0.5,
                     train_tokens=100) for x in losses]
    reading = DecodeStats(prefill_tokens=40, prefill_s=0.2, decode_tokens=10, decode_s=0.05 * len(losses))
    answering = DecodeStats(prefill_tokens=8, prefill_s=0.5, decode_tokens=12, decode_s=1.0)
    return dict(
        method=method, conversation="c", answers=[dict(category=c, f1=f, em=float(f == 1.0)) for c, f in f1s],
        triggers=triggers, read_s=1.0, answer_s=2.0, tokens_prefilled=10, tokens_generated=5, peak_rss_mb=100.0,
        cuda_peak_mb=None, memory_trace=[(0.0, 90.0), (1.0, 100.0)],
        time=episode_times(1.0, 2.0, reading, answering, triggers),
        probes=[dict(tokens_read=500 * (i + 1), write=i, f1=10.0 * i, recalled=i, n=3, answers=[]) for i in range(2)],
    )


def test_summary_report_and_plots(tmp_path):
    runs = [_run("none", [(1, 1.0), (4, 0.5), (5, 1.0)], []), _run("tmem/qa", [(2, 0.0), (4, 1.0)], [[2.0, 1.0]])]
    report = summarize(runs)
    assert report["none"]["f1_1_4"] == 75.0 and report["none"]["n_1_4"] == 2 and report["none"]["n"] == 3
    assert report["none"]["per_category"][5] == dict(n=1, f1=100.0, em=100.0)
    assert report["tmem/qa"]["flashcards_written"] == 2 and report["tmem/qa"]["flashcards_dropped"] == 1
    assert report["tmem/qa"]["first_step_loss"] == 2.0 and report["tmem/qa"]["last_step_loss"] == 1.0
    assert report["tmem/qa"]["tokens_processed"] == 15 and report["tmem/qa"]["seconds_per_conversation"] == 3.0
    md = report_markdown(report, Namespace(model="m", l_max=1, recipe="r", device="cpu", dtype="float32"), runs)
    assert "| tmem/qa | 50.0 |" in md and "2.000→1.000" in md
    t = runs[1]["time"]  # one write: 0.25 s generating, 0.5 s training, the rest of the 1 s reading is "other"
    assert (t["cards_s"], t["train_s"], t["other_read_s"], t["total_s"]) == (0.25, 0.5, 0.25, 3.0)
    # the cards' rate is the write's own 30 tokens over its 0.25 s, not every token generated while reading
    # (50 here: a rolling summary's too, whose time is "other reading")
    assert t["cards_tokens"] == 30 and t["cards_tok_s"] == 120.0 and t["train_tok_s"] == 200.0
    assert t["answer_tok_s"] == 10.0 and t["prefill_tokens"] == 48 and t["decode_tok_s"] == round(22 / 1.05, 1)
    assert "| tmem/qa | c | 3.0 | 0.2 (120) | 0.5 (200) | 0.2 | 2.0 (10) |" in md
    # a write that generates nothing (ntp) beside a summary that does: no cards rate (it was 50 tokens / 0 s)
    ntp = [dict(format="ntp", written=1, dropped=0, losses=[1.0], generate_s=0.0, generate_tokens=0, train_s=0.5,
                train_tokens=100)]
    t = episode_times(1.0, 2.0, DecodeStats(prefill_tokens=40, prefill_s=0.2, decode_tokens=10, decode_s=0.3),
                      DecodeStats(), ntp)
    assert t["cards_tokens"] == 0 and t["cards_tok_s"] is None
    assert "| tmem/qa | c | 500→0, 1000→10 |" in md
    paths = plot(runs, report, tmp_path)
    assert {p.name for p in paths} >= {"time.png", "recall.png"}
    for path in paths:
        assert path.stat().st_size > 1000


@pytest.mark.slow
def test_eval_end_to_end_on_two_session_fixture(tmp_path, capsys):
    """`tmem eval` on the fixture: prompt-space baselines and tmem with the model writing its own flashcards."""
    threads = torch.get_num_threads()
    out = tmp_path / "run"
    code = main(["--data", str(FIXTURE), "--memory", "none", "retrieval", "tmem", "--write-format", "qa",
                 "--model", "smollm2-135m", "--max-questions", "3", "--l-max", "64", "--answer-tokens", "8",
                 "--flashcard-tokens", "48", "--recipe", "paper", "--probe-every", "40", "--out", str(out)])
    torch.set_num_threads(threads)  # main() sets 1 thread on CPU
    assert code == 0
    answers = json.loads((out / "answers.json").read_text())
    assert [r["method"] for r in answers["runs"]] == ["none", "retrieval", "tmem/qa"]
    for r in answers["runs"]:
        assert len(r["answers"]) == 3 and all(0.0 <= a["f1"] <= 1.0 for a in r["answers"])
        assert r["tokens_prefilled"] > 0 and r["peak_rss_mb"] > 0
    none, retrieval, tmem = answers["runs"]
    assert none["triggers"] == [] and len(retrieval["triggers"]) >= 1 and len(tmem["triggers"]) >= 1
    for r in answers["runs"]:  # probed while reading, at least every 40 tokens; the probes' time left out
        assert r["probes"] and all(p["n"] == 3 and 0 <= p["f1"] <= 100 for p in r["probes"])
        assert [p["tokens_read"] for p in r["probes"]] == sorted(p["tokens_read"] for p in r["probes"])
        t = r["time"]
        assert abs(t["total_s"] - r["read_s"] - r["answer_s"]) <= 0.02 and t["probe_s"] > 0
        assert t["prefill_tokens"] + t["decode_tokens"] <= r["tokens_prefilled"] + r["tokens_generated"]
    assert tmem["time"]["cards_s"] > 0 and tmem["time"]["train_tokens"] > 0 and none["time"]["cards_s"] == 0
    for t in tmem["triggers"]:
        assert t["format"] == "qa" and t["raw"] and len(t["losses"]) == (5 if t["written"] else 0)
    report = json.loads((out / "report.json").read_text())["methods"]
    assert set(report) == {"none", "retrieval", "tmem/qa"}
    for name in ("report.md", "f1_by_category.png", "write_loss.png", "memory.png", "time.png", "recall.png"):
        assert (out / name).stat().st_size > 0
    assert "| tmem/qa |" in capsys.readouterr().out


def test_eval_resumes_an_interrupted_run_and_refuses_to_overwrite_another(tmp_path):
    """Rerun into the same --out: episodes an interrupted run saved are kept as they are, the rest run;
    other settings are refused (their answers would be overwritten) unless --fresh."""
    threads = torch.get_num_threads()
    out = tmp_path / "run"
    argv = ["--data", str(FIXTURE), "--memory", "none", "retrieval", "--model", "smollm2-135m",
            "--max-questions", "2", "--l-max", "64", "--answer-tokens", "4", "--out", str(out)]
    assert main(argv) == 0
    saved = json.loads((out / "answers.json").read_text())
    first, second = saved["runs"]
    saved["runs"] = [first]  # what a run interrupted after its first episode leaves
    (out / "answers.json").write_text(json.dumps(saved))
    assert main(argv) == 0
    resumed = json.loads((out / "answers.json").read_text())["runs"]
    assert resumed[0] == first  # kept, not re-run (its timings are the first run's)
    assert resumed[1]["method"] == "retrieval" and resumed[1]["answers"] == second["answers"]
    assert set(json.loads((out / "report.json").read_text())["methods"]) == {"none", "retrieval"}
    before = (out / "answers.json").read_text()
    with pytest.raises(SystemExit, match="other settings.*max_questions"):
        main([*argv, "--max-questions", "3"])
    assert (out / "answers.json").read_text() == before
    assert main([*argv, "--fresh", "--memory", "none"]) == 0
    assert [r["method"] for r in json.loads((out / "answers.json").read_text())["runs"]] == ["none"]
    torch.set_num_threads(threads)


def test_an_interrupt_while_saving_leaves_the_episodes_saved_before(tmp_path, monkeypatch):
    """Ctrl-C while answers.json is being written: the file still holds every episode saved before (valid
    JSON), so the rerun resumes from them."""
    threads = torch.get_num_threads()
    out = tmp_path / "run"
    writes, real_write_text = [], Path.write_text

    def interrupted_second_save(self: Path, text: str, *args, **kwargs) -> int:
        if "answers.json" in self.name:
            writes.append(self.name)
            if len(writes) == 2:
                real_write_text(self, text[: len(text) // 2], *args, **kwargs)
                raise KeyboardInterrupt
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", interrupted_second_save)
    argv = ["--data", str(FIXTURE), "--memory", "none", "retrieval", "--model", "smollm2-135m",
            "--max-questions", "2", "--l-max", "64", "--answer-tokens", "4", "--out", str(out)]
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    torch.set_num_threads(threads)
    runs = json.loads((out / "answers.json").read_text())["runs"]
    assert [r["method"] for r in runs] == ["none"]
    assert sorted(p.name for p in out.iterdir()) == ["answers.json"]  # no temp file left


def test_eval_refuses_two_conversations_with_one_sample_id_before_loading(tmp_path):
    """Episodes are keyed by (method, sample_id): with two conversations of one id a resumed run took the second
    for done once the first was saved, and --side-by-side gave both one pool session (the second's reset wiped
    the first's memory). Refused before the model loads; selecting ids that are unique runs."""
    (sample,) = json.loads(FIXTURE.read_text())
    other = dict(sample, sample_id="fx-2")
    data = tmp_path / "twice.json"
    data.write_text(json.dumps([sample, sample, other]))
    argv = ["--data", str(data), "--memory", "none", "--max-questions", "1", "--answer-tokens", "2"]
    with pytest.raises(SystemExit, match=r"holds 2 conversations with sample_id 'fx-1': each needs its own"):
        main([*argv, "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    threads = torch.get_num_threads()
    assert main([*argv, "--conversations", "fx-2", "--out", str(tmp_path / "o2")]) == 0
    torch.set_num_threads(threads)
    runs = json.loads((tmp_path / "o2" / "answers.json").read_text())["runs"]
    assert [(r["method"], r["conversation"], len(r["answers"])) for r in runs] == [("none", "fx-2", 1)]


def test_a_card_min_score_the_selector_refuses_is_a_usage_error(capsys):
    """--card-min-score 0 was taken by the parser and refused by SalientTurns (min_score >= 1) with a traceback
    once the model had loaded and the episodes before the first tmem one had run; now a usage error."""
    from tmem_runtime.agent.card_selection import SalientTurns
    from tmem_runtime.agent.evaluate import parse_args

    argv = ["--data", str(FIXTURE), "--memory", "tmem", "--cards", "salient", "--out", "unused"]
    with pytest.raises(SystemExit) as exc:
        parse_args([*argv, "--card-min-score", "0"])
    assert exc.value.code == 2
    assert "argument --card-min-score: must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="min_score must be >= 1"):
        SalientTurns(0)
    assert SalientTurns(parse_args([*argv, "--card-min-score", "1"]).card_min_score).min_score == 1


def test_a_damaged_answers_file_is_refused_in_one_line_and_left_as_it_was(tmp_path):
    """answers.json is JSON but not a run's (edited by hand, written by another tool): its "args" not an object,
    its "runs" not a list of episodes. Each was an AttributeError/TypeError/KeyError traceback; now refused in
    one line before the model loads, the file left as it was (--fresh overwrites it)."""
    from tmem_runtime.agent.evaluate import parse_args

    out = tmp_path / "run"
    out.mkdir()
    argv = ["--data", str(FIXTURE), "--memory", "none", "--device", "cpu", "--out", str(out)]
    args = vars(parse_args(argv))
    not_episodes = 'its "runs" are not a list of episodes'
    for saved, why in (({"args": [], "runs": []}, "'list' object has no attribute 'items'"),
                       ({"args": args, "runs": "abc"}, not_episodes),
                       ({"args": args, "runs": [{"method": "none"}]}, not_episodes)):  # fmt: skip
        text = json.dumps(saved)
        (out / "answers.json").write_text(text)
        with pytest.raises(SystemExit, match=rf"answers.json is not a tmem eval answers file \({why}"):
            main(argv)
        assert (out / "answers.json").read_text() == text
        assert sorted(p.name for p in out.iterdir()) == ["answers.json"]
