"""Memory-writing mode: the flashcard prompt, and the parser that salvages what the model wrote.

Two prompts, both few-shot with the reply's JSON opening prefilled so the model only continues it:
- "array" (the paper's): one worked example (a conversation and its JSON array of flashcards), then
  the whole working context; the model writes the array.
- "per-turn" (for small models): one card per turn of the context (turns of at least
  MIN_TURN_WORDS words, each under its DATE line), three worked examples, all turns batched. A 135M
  model writes mostly one repeated card in "array" mode but a card per turn here.

The parser never raises. It accepts a clean JSON array, a truncated one, single quotes, trailing
commas, wrong key names (question/answer, q/a, input/output, ...), and `Q: ... A: ...` lines; it
keeps every pair whose question and answer are non-empty, short enough and not a copy of each other,
drops near-duplicates, and counts every drop by reason.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field

QUESTION_KEYS = ("instruction", "question", "q", "input", "prompt", "query")
ANSWER_KEYS = ("output", "answer", "a", "response", "reply", "value")
MAX_QUESTION_WORDS = 40
MAX_ANSWER_WORDS = 12

FLASHCARD_SYSTEM = (
    "You write memory flashcards. Read the conversation and write question-answer pairs about the facts in it. "
    "Only use facts stated in the conversation. Name the person in every question. Put dates in answers. "
    "Answers are short. Reply with a JSON array only."
)
FLASHCARD_INSTRUCTION = (
    'Write flashcards for this conversation as a JSON array of {"instruction": question, "output": answer}.'
)
EXAMPLE_CONTEXT = (
    "DATE: 3:00 pm on 2 March, 2021\n"
    "Nina: Hi Omar! I started a new job at the city library last week.\n"
    "Omar: Congrats Nina! I adopted a puppy named Biscuit on Sunday.\n"
    "Nina: So cute! I'm going to Lisbon in June to see my sister."
)
EXAMPLE_FLASHCARDS = [
    {"instruction": "Where does Nina work?", "output": "the city library"},
    {"instruction": "When did Nina start her new job?", "output": "the week before 2 March 2021"},
    {"instruction": "What is the name of Omar's puppy?", "output": "Biscuit"},
    {"instruction": "When did Omar adopt his puppy?", "output": "Sunday before 2 March 2021"},
    {"instruction": "Where is Nina going in June?", "output": "Lisbon, to see her sister"},
]
FLASHCARD_PREFILL = '[\n{"instruction": "'
FLASHCARD_MODES = ("per-turn", "array")

TURN_SYSTEM = (
    "You write one memory flashcard about a chat message: a question about the fact in the message and its "
    "short answer. Name the person. Reply with JSON only."
)
TURN_EXAMPLES = [
    ("DATE: 3:00 pm on 2 March, 2021\nNina: I started a new job at the city library last week.",
     {"instruction": "Where does Nina work?", "output": "the city library"}),
    ("DATE: 3:00 pm on 2 March, 2021\nOmar: I adopted a puppy named Biscuit on Sunday.",
     {"instruction": "What is the name of Omar's puppy?", "output": "Biscuit"}),
    ("DATE: 5:00 pm on 9 June, 2022\nNina: I'm flying to Lisbon in July to see my sister.",
     {"instruction": "Where is Nina flying in July?", "output": "Lisbon"}),
]
TURN_PREFILL = '{"instruction": "'
MIN_TURN_WORDS = 5


def flashcard_messages(context: str) -> list[dict[str, str]]:
    """Chat messages asking for flashcards about `context` (system, worked example, the real request)."""
    example = "[\n" + ",\n".join(json.dumps(c) for c in EXAMPLE_FLASHCARDS) + "\n]"
    return [
        {"role": "system", "content": FLASHCARD_SYSTEM},
        {"role": "user", "content": f"{EXAMPLE_CONTEXT}\n\n{FLASHCARD_INSTRUCTION}"},
        {"role": "assistant", "content": example},
        {"role": "user", "content": f"{context}\n\n{FLASHCARD_INSTRUCTION}"},
    ]


_FIRST_PERSON = {"I'm": "{s} is", "I am": "{s} is", "I've": "{s} has", "I have": "{s} has", "I'll": "{s} will",
                 "I'd": "{s} would", "I": "{s}", "my": "{s}'s", "My": "{s}'s", "myself": "{s}", "me": "{s}",
                 "mine": "{s}'s"}
_FIRST_PERSON_RE = re.compile(r"\b(" + "|".join(sorted(map(re.escape, _FIRST_PERSON), key=len, reverse=True)) + r")\b")


def third_person(line: str) -> str:
    """A "Speaker: text" turn with the speaker's first-person words replaced by the speaker's name.

    "Ana: I adopted my cat" -> "Ana: Ana adopted Ana's cat": a small model then names the person in
    its question instead of writing "you". Grammar is not repaired ("Ana love ...").
    """
    speaker, sep, text = line.partition(": ")
    if not sep or not speaker.strip():
        return line
    text = _FIRST_PERSON_RE.sub(lambda m: _FIRST_PERSON[m.group(1)].format(s=speaker), text)
    return f"{speaker}: {text}"


def turn_flashcard_messages(header: str, line: str, named: bool = False) -> list[dict[str, str]]:
    """Chat messages asking for one flashcard about one dated turn (three worked examples first).

    named: every turn (the examples' and this one) shown in the third person (`third_person`).
    """
    voice = third_person if named else (lambda x: x)
    messages = [{"role": "system", "content": TURN_SYSTEM}]
    for context, card in TURN_EXAMPLES:
        date, turn = context.split("\n", 1)
        messages += [{"role": "user", "content": f"{date}\n{voice(turn)}"},
                     {"role": "assistant", "content": json.dumps(card)}]
    return messages + [{"role": "user", "content": f"{header}\n{voice(line)}" if header else voice(line)}]


def dated_turns(context: str, min_words: int = MIN_TURN_WORDS) -> list[tuple[str, str]]:
    """(DATE line, turn) for each turn of a rendered context with at least `min_words` words."""
    header, turns = "", []
    for line in context.splitlines():
        if line.startswith("DATE:") or line.startswith("SESSION "):
            header = line
        elif len(line.split()) >= min_words:
            turns.append((header, line))
    return turns


@dataclass
class ParseResult:
    """Valid (question, answer) pairs in order of appearance, and the drops counted by reason."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())


def _balanced_objects(text: str) -> list[str]:
    """Every top-level `{...}` substring (quotes respected); an unclosed last object is returned as is."""
    objects, depth, start, in_str, quote, escaped = [], 0, -1, False, "", False
    last = ""  # the last non-blank character before `ch` (kept as we go: a huge reply stays linear)
    for i, ch in enumerate(text):
        prev, last = last, (last if ch.isspace() else ch)
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                in_str = False
            continue
        if ch in "\"'" and depth > 0:
            # a quote opens a string only where JSON would allow one (after { , : [ or space)
            if ch == '"' or prev in "{,:[":
                in_str, quote = True, ch
            continue
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                objects.append(text[start : i + 1])
    if depth > 0 and start >= 0:
        objects.append(text[start:])
    return objects


def _loads_lenient(obj: str) -> dict | None:
    """json.loads with the usual small-model repairs; None if it still is not an object."""
    candidates = [obj, re.sub(r",\s*}", "}", obj)]
    if "'" in obj and obj.count('"') < obj.count("'"):
        candidates.append(re.sub(r",\s*}", "}", obj.replace('"', '\\"').replace("'", '"')))
    for c in candidates:
        try:
            value = json.loads(c)
        except (json.JSONDecodeError, ValueError, RecursionError):
            continue
        return value if isinstance(value, dict) else None
    return None


_KV_RE = re.compile(r"""["']?(\w+)["']?\s*:\s*(?:"((?:[^"\\]|\\.)*)"|'((?:[^'\\]|\\.)*)'|(-?\d+(?:\.\d+)?))""")


def _key_values(obj: str) -> dict:
    """Regex salvage of `key: "value"` pairs from a broken object (e.g. truncated mid-way)."""
    found = {}
    for m in _KV_RE.finditer(obj):
        key = m.group(1)
        raw = next(g for g in m.groups()[1:] if g is not None)
        try:
            value = json.loads(f'"{raw}"') if m.group(2) is not None else raw
        except (json.JSONDecodeError, ValueError):
            value = raw
        found.setdefault(key, value)
    return found


_MISSING = object()


def _pick(d: dict, keys: tuple[str, ...]) -> object:
    lowered = {str(k).strip().lower(): v for k, v in d.items()}
    for k in keys:
        if k in lowered:
            return lowered[k]
    return _MISSING


def _as_text(value: object) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return " ".join(value.split())
    return None


def _line_pairs(text: str) -> list[tuple[object, object]]:
    """`Q: ... / A: ...` or `Question: ... / Answer: ...` line pairs (the model's other habit)."""
    pairs, question = [], None
    for line in text.splitlines():
        m = re.match(r"\s*(?:\d+[.)]\s*)?(q|question|a|answer)\s*[:\-]\s*(.*)", line, flags=re.IGNORECASE)
        if not m:
            continue
        tag, body = m.group(1).lower(), m.group(2)
        if tag.startswith("q"):
            question = body
        elif question is not None:
            pairs.append((question, body))
            question = None
    return pairs


def _norm_key(s: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())


def _candidates(text: str, result: ParseResult) -> list[tuple[object, object]]:
    """Raw (question, answer) values found in one model reply; unusable objects are counted as drops."""
    candidates: list[tuple[object, object]] = []
    for obj in _balanced_objects(text):
        d = _loads_lenient(obj)
        if d is None:
            d = _key_values(obj)
            if not d:
                result.dropped["unparseable"] += 1
                continue
        q, a = _pick(d, QUESTION_KEYS), _pick(d, ANSWER_KEYS)
        if q is _MISSING or a is _MISSING:
            result.dropped["missing_key"] += 1
            continue
        candidates.append((q, a))
    return candidates or _line_pairs(text)


_STOPWORDS = frozenset(
    "a an the and or of to in on at for with is are was were be been it its this that i you he she we they my your "
    "his her our their me him us them what who when where which how why do does did not no yes".split()
)


# Han, kana: scripts written without spaces, where each character is a word for grounding
UNSPACED = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CONTENT_WORD = re.compile(rf"[{UNSPACED}]|[^\W_{UNSPACED}]+")


def _content_words(text: str) -> set[str]:
    """Lower-cased words of any script (letters and digits; each Han/kana character alone), stopwords out."""
    return {w for w in _CONTENT_WORD.findall(text.lower()) if w not in _STOPWORDS}


def parse_flashcards(
    text: str | list[str],
    max_answer_words: int = MAX_ANSWER_WORDS,
    max_question_words: int = MAX_QUESTION_WORDS,
    context: str | None = None,
) -> ParseResult:
    """Salvage every valid (question, answer) pair from model output; never raises.

    text: one reply, or a list of replies parsed one by one (per-turn cards: a card left unclosed
    cannot swallow the next one), deduplicated together.
    context: the text the cards were written from; if given, a card whose answer shares no content
    word with it is dropped as "ungrounded" (e.g. "Lisbon" copied from a worked example).
    Drop reasons: unparseable, missing_key, not_text, empty, too_long, echo (answer repeats the
    question, or a worked example is copied), ungrounded, duplicate.
    """
    grounding = _content_words(context) if context is not None else None
    result = ParseResult()
    replies = text if isinstance(text, list) else [text]
    candidates = [c for r in replies if isinstance(r, str) and r.strip() for c in _candidates(r, result)]
    example_questions = {_norm_key(c["instruction"]) for c in EXAMPLE_FLASHCARDS}
    example_questions |= {_norm_key(card["instruction"]) for _, card in TURN_EXAMPLES}
    seen: set[str] = set()
    for q_raw, a_raw in candidates:
        q, a = _as_text(q_raw), _as_text(a_raw)
        if q is None or a is None:
            result.dropped["not_text"] += 1
            continue
        q, a = q.strip(" \"'"), a.strip(" \"'")
        if not _norm_key(q) or not _norm_key(a):
            result.dropped["empty"] += 1
            continue
        if len(q.split()) > max_question_words or len(a.split()) > max_answer_words:
            result.dropped["too_long"] += 1
            continue
        if _norm_key(a) == _norm_key(q) or _norm_key(q) in example_questions:
            result.dropped["echo"] += 1
            continue
        if grounding is not None and not (_content_words(a) & grounding):
            result.dropped["ungrounded"] += 1
            continue
        key = _norm_key(q)
        if key in seen:
            result.dropped["duplicate"] += 1
            continue
        seen.add(key)
        result.pairs.append((q, a))
    return result
