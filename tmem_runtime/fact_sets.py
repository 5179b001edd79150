"""Sets of made-up facts for measuring recall: the demo's ten and the JSON sets in data/fact_sets/.

Each set is ten (question, answer) facts of one kind (names, numbers and dates, multi-token titles,
one-word answers, places) with a paraphrased question per fact. A set's `split` says what it is for:
"tune" sets choose a write recipe (benchmarks/recall_study.py), "held-out" sets only report it.
The demo's set (`demo_facts.FACTS`, no paraphrases) is a "tune" set: the first recipe sweep used it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from tmem_runtime.demo_facts import FACTS

FACT_SET_DIR = Path(__file__).parent / "data" / "fact_sets"
SPLITS = ("tune", "held-out")


@dataclass(frozen=True)
class Fact:
    """One made-up fact: the question written and asked, its answer, and a rephrased question (or None)."""

    question: str
    answer: str
    paraphrase: str | None = None


@dataclass(frozen=True)
class FactSet:
    """A named set of facts of one `kind`; `split` is "tune" or "held-out"."""

    name: str
    kind: str
    split: str
    facts: tuple[Fact, ...]
    description: str = ""

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"fact set {self.name!r}: split must be one of {SPLITS}, got {self.split!r}")
        if not self.facts or any(not f.question.strip() or not f.answer.strip() for f in self.facts):
            raise ValueError(f"fact set {self.name!r} is empty or has an empty question or answer")

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """The facts as (question, answer) flashcards, as `FastWeights.write_qa` takes them."""
        return [(f.question, f.answer) for f in self.facts]


DEMO = FactSet("demo", "mixed", "tune", tuple(Fact(q, a) for q, a in FACTS), "The demo's ten facts (demo_facts.py).")


def _read(path: Path) -> FactSet:
    data = json.loads(path.read_text())
    facts = tuple(Fact(f["question"], f["answer"], f.get("paraphrase")) for f in data["facts"])
    return FactSet(data["name"], data["kind"], data["split"], facts, data.get("description", ""))


@cache
def fact_sets() -> dict[str, FactSet]:
    """Every fact set by name: "demo" first, then data/fact_sets/*.json in name order."""
    sets = {DEMO.name: DEMO}
    for path in sorted(FACT_SET_DIR.glob("*.json")):
        fs = _read(path)
        if fs.name in sets or fs.name != path.stem:
            raise ValueError(f"{path}: fact set name {fs.name!r} is a duplicate or differs from the file name")
        sets[fs.name] = fs
    return sets


def load_fact_set(name: str) -> FactSet:
    """The fact set called `name` (see `fact_sets()`)."""
    try:
        return fact_sets()[name]
    except KeyError:
        raise ValueError(f"unknown fact set {name!r}; known: {sorted(fact_sets())}") from None


def split_names(split: str) -> list[str]:
    """Names of the fact sets in `split` ("tune" or "held-out")."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [name for name, fs in fact_sets().items() if fs.split == split]
