"""Fact sets and the recall scorer's normalisation (the real-model recall test is in test_smollm2.py)."""

from __future__ import annotations

import json

import pytest

from tmem_runtime.demo_facts import FACTS
from tmem_runtime.fact_sets import DEMO, Fact, FactSet, _read, fact_sets, load_fact_set, split_names
from tmem_runtime.recall import recalled


def test_fact_sets_are_ten_distinct_facts_each_with_kinds_on_both_sides_of_the_split():
    sets = fact_sets()
    assert list(sets)[0] == "demo" and sets["demo"].pairs == FACTS  # the demo's set stays as it is
    assert len(sets) >= 9
    questions = [f.question for fs in sets.values() for f in fs.facts]
    assert len(questions) == len(set(questions)), "a question is in two sets"
    for fs in sets.values():
        assert len(fs.facts) == 10, fs.name
        assert len({f.answer for f in fs.facts}) == 10, fs.name
        for f in fs.facts:
            # a fact the question gives away, or a paraphrase equal to the question, measures nothing
            assert not recalled(f.question, f.answer), (fs.name, f)
            assert f.paraphrase != f.question, (fs.name, f)
            assert fs.name == "demo" or f.paraphrase, (fs.name, f)
    tune, held_out = split_names("tune"), split_names("held-out")
    assert set(tune) | set(held_out) == set(sets) and not set(tune) & set(held_out)
    kinds = {split: {sets[n].kind for n in names} for split, names in (("tune", tune), ("held-out", held_out))}
    assert len(kinds["held-out"]) >= 4 and {"names", "numbers and dates", "multi-token titles"} <= kinds["held-out"]
    assert {"one-word answers", "places"} <= kinds["held-out"] - kinds["tune"]  # kinds never tuned on


def test_recalled_is_case_insensitive_containment_without_a_leading_article():
    assert recalled("Her cat is called biscuit.", "Biscuit")
    assert recalled("Beagle", "A beagle") and recalled("He plays the cello", "The cello")
    assert recalled("It was built in 1846.", "1846")
    assert not recalled("Paper Lanterns", "Paper Lanterns in the Rain")
    assert not recalled("November 18", "November 8")


def test_unknown_or_malformed_fact_sets_are_refused(tmp_path):
    assert load_fact_set("titles_b").split == "held-out" and load_fact_set("demo") is DEMO
    with pytest.raises(ValueError, match="unknown fact set"):
        load_fact_set("nope")
    with pytest.raises(ValueError, match="split"):
        split_names("test")
    with pytest.raises(ValueError, match="split must be"):
        FactSet("x", "names", "train", (Fact("Q?", "A"),))
    with pytest.raises(ValueError, match="empty"):
        FactSet("x", "names", "tune", (Fact("Q?", " "),))
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "bad", "kind": "k", "split": "tune", "facts": []}))
    with pytest.raises(ValueError, match="empty"):
        _read(path)
