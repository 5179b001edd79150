"""LoCoMo: loading its JSON format, rendering sessions as text, and its official scoring.

Scoring follows LoCoMo's own evaluation code (snap-research/locomo, task_eval/evaluation.py):
normalise (drop commas, lowercase, strip punctuation, drop a/an/the/and, collapse whitespace),
token F1 over Porter-stemmed tokens (multiset overlap); category 1 (multi-hop) splits prediction
and gold on commas and averages the best match per gold part; category 3 cuts the gold at the first
';'; category 5 (adversarial) scores 1 when the prediction says "no information available" or
"not mentioned". EM is LoCoMo's `exact_match_score` (equal token sets after normalisation) for
categories 1-4 and the same adversarial rule for category 5.

The question prompts follow LoCoMo's too: category 2 asks for a date from the conversation's DATE
lines; category 5 is a two-way choice between "Not mentioned in the conversation" and the
adversarial answer, in a seeded random order.
"""

from __future__ import annotations

import json
import random
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from nltk.stem import PorterStemmer

CATEGORY_NAMES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
NOT_MENTIONED = "Not mentioned in the conversation"
_STEMMER = PorterStemmer()
_PUNCTUATION = set(string.punctuation)


@dataclass
class Turn:
    speaker: str
    text: str
    dia_id: str = ""
    image_caption: str | None = None

    def render(self) -> str:
        """One line: `Speaker: text [shares <caption>]` (line breaks inside the text or caption, which some
        LoCoMo turns hold, become spaces: a context is one turn per line)."""
        line = f"{self.speaker}: {_one_line(self.text)}"
        if self.image_caption:
            line += f" [shares {_one_line(self.image_caption)}]"
        return line


def _one_line(text: str) -> str:
    return _LINE_BREAKS.sub(" ", text.strip())


_LINE_BREAKS = re.compile(r"\s*[\r\n]+\s*")


@dataclass
class Session:
    index: int
    date_time: str
    turns: list[Turn]

    def header(self) -> str:
        return f"DATE: {self.date_time}" if self.date_time else f"SESSION {self.index}"

    def render(self) -> str:
        return "\n".join([self.header()] + [t.render() for t in self.turns])


@dataclass
class QA:
    question: str
    answer: str
    category: int
    evidence: list[str] = field(default_factory=list)

    @property
    def evidence_sessions(self) -> set[int]:
        """Session numbers named by the evidence ids ("D3:12" -> 3); malformed ids are skipped."""
        found = set()
        for ev in self.evidence:
            m = re.match(r"D(\d+):", str(ev).strip())
            if m:
                found.add(int(m.group(1)))
        return found


@dataclass
class Conversation:
    sample_id: str
    speaker_a: str
    speaker_b: str
    sessions: list[Session]
    qa: list[QA]

    def render(self) -> str:
        return "\n\n".join(s.render() for s in self.sessions)


def _parse_conversation(raw: dict) -> Conversation:
    conv = raw["conversation"]
    numbers = sorted(
        int(m.group(1)) for k in conv if (m := re.fullmatch(r"session_(\d+)", k)) and isinstance(conv[k], list)
    )
    sessions = []
    for n in numbers:
        turns = [
            Turn(
                speaker=str(t.get("speaker", "")),
                text=str(t.get("text", "")),
                dia_id=str(t.get("dia_id", "")),
                image_caption=t.get("blip_caption"),
            )
            for t in conv[f"session_{n}"]
        ]
        if turns:
            sessions.append(Session(index=n, date_time=str(conv.get(f"session_{n}_date_time", "")), turns=turns))
    qa = []
    for j, q in enumerate(raw.get("qa", [])):
        try:
            category = int(q["category"])
            answer = q.get("answer", q.get("adversarial_answer", "")) if category != 5 else q.get(
                "adversarial_answer", q.get("answer", "")
            )
            qa.append(QA(str(q["question"]), str(answer), category, [str(e) for e in q.get("evidence", [])]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"question {j} of sample {raw.get('sample_id')!r} is malformed "
                             f"({type(exc).__name__}: {exc}); it needs 'question' and 'category'") from None
    return Conversation(
        sample_id=str(raw.get("sample_id", "")),
        speaker_a=str(conv.get("speaker_a", "")),
        speaker_b=str(conv.get("speaker_b", "")),
        sessions=sessions,
        qa=qa,
    )


def load_locomo(path: str | Path, sample_ids: list[str] | None = None) -> list[Conversation]:
    """Read a LoCoMo-format JSON file (a list of samples); keep `sample_ids` in the file's order if given.

    A file that is missing, not JSON, or not LoCoMo's layout raises ValueError saying which and where.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"no such file: {path}") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON ({exc}); a LoCoMo file is a JSON list of samples") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path} holds no conversations (a LoCoMo file is a non-empty JSON list of samples)")
    conversations = []
    for i, raw in enumerate(data):
        if not isinstance(raw, dict) or not isinstance(raw.get("conversation"), dict):
            raise ValueError(f"{path}: item {i} is not a LoCoMo sample (a dict with a 'conversation' dict of "
                             "session_N turn lists, and 'qa')")
        try:
            conversations.append(_parse_conversation(raw))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{path}: sample {i} is malformed: {exc}") from None
    if sample_ids:
        known = {c.sample_id for c in conversations}
        missing = [s for s in sample_ids if s not in known]
        if missing:
            raise ValueError(f"conversations {missing} are not in {path} (it has {sorted(known)})")
        conversations = [c for c in conversations if c.sample_id in set(sample_ids)]
    return conversations


def question_prompt(qa: QA, seed: int = 0) -> str:
    """The question as LoCoMo's evaluation asks it (date hint for cat 2, a two-way choice for cat 5)."""
    if qa.category == 2:
        return qa.question + " Use DATE of CONVERSATION to answer with an approximate date."
    if qa.category == 5:
        a, b = adversarial_options(qa, seed)
        return f"{qa.question} Select the correct answer: (a) {a} (b) {b}."
    return qa.question


def adversarial_options(qa: QA, seed: int = 0) -> tuple[str, str]:
    """(option a, option b) for a category-5 question, in an order fixed by `seed` and the question."""
    rng = random.Random(f"{seed}:{qa.question}")
    if rng.random() < 0.5:
        return NOT_MENTIONED, qa.answer
    return qa.answer, NOT_MENTIONED


def resolve_choice(prediction: str, qa: QA, seed: int = 0) -> str:
    """Map a bare "a"/"(a)"/"b"/"(b)" reply to the option's text (LoCoMo's get_cat_5_answer)."""
    if qa.category != 5:
        return prediction
    p = prediction.strip().lower()
    a, b = adversarial_options(qa, seed)
    if len(p) == 1:
        return a if "a" in p else b
    if len(p) == 3:
        return a if "(a)" in p else b
    return prediction


def normalize_answer(s: str) -> str:
    """LoCoMo's normalisation: drop commas, lowercase, strip punctuation, drop a/an/the/and, squeeze spaces."""
    s = str(s).replace(",", "").lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = re.sub(r"\b(a|an|the|and)\b", " ", s)
    return " ".join(s.split())


def _stems(s: str) -> list[str]:
    return [_STEMMER.stem(w) for w in normalize_answer(s).split()]


def token_f1(prediction: str, gold: str) -> float:
    """Token F1 over Porter-stemmed normalised tokens, multiset overlap (LoCoMo's f1_score)."""
    pred, ref = _stems(prediction), _stems(gold)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def multi_answer_f1(prediction: str, gold: str) -> float:
    """Category 1: split both on commas; mean over gold parts of the best F1 against any predicted part."""
    preds = [p.strip() for p in str(prediction).split(",")]
    golds = [g.strip() for g in str(gold).split(",")]
    return sum(max(token_f1(p, g) for p in preds) for g in golds) / len(golds)


def exact_match(prediction: str, gold: str) -> float:
    """LoCoMo's exact_match_score: the normalised token sets are equal."""
    return float(set(normalize_answer(prediction).split()) == set(normalize_answer(gold).split()))


def says_not_mentioned(prediction: str) -> float:
    """Category 5 rule: 1 if the prediction says "no information available" or "not mentioned"."""
    p = str(prediction).lower()
    return float("no information available" in p or "not mentioned" in p)


def score(prediction: str, gold: str, category: int) -> tuple[float, float]:
    """(F1, EM) of one prediction under LoCoMo's per-category rules."""
    prediction = str(prediction)
    gold = str(gold)
    if category == 5:
        s = says_not_mentioned(prediction)
        return s, s
    if category == 3:
        gold = gold.split(";")[0].strip()
    if category == 1:
        return multi_answer_f1(prediction, gold), exact_match(prediction, gold)
    if category in (2, 3, 4):
        return token_f1(prediction, gold), exact_match(prediction, gold)
    raise ValueError(f"unknown LoCoMo category {category}")


def read_locomo(
    command: str, path: str | Path, sample_ids: list[str] | None = None, hint: str = ""
) -> list[Conversation]:
    """`load_locomo` for a command line: a file it refuses ends the command with its message (SystemExit
    "`command`: ...`hint`"), not a traceback."""
    try:
        return load_locomo(path, sample_ids)
    except ValueError as exc:
        raise SystemExit(f"{command}: {exc}{hint}") from None
