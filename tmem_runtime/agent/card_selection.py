"""Which turns deserve a flashcard, decided without running the model.

`SalientTurns` scores each turn by what it adds to the episode: content words never seen before in
it (names count double, a number counts once), so a turn that states something new scores high and
small talk that repeats the episode's vocabulary (weather, coffee, "same here") scores low. Every
turn it is shown (chosen or not) adds its words to the episode's vocabulary; it is shown the turns that
could get a card (`flashcards.dated_turns`: MIN_TURN_WORDS words or more), so the words of shorter turns
stay new to it. `reset()` forgets it. Turns
scoring at least `min_score` get a card, the `max_cards` best of a write at most.
"""

from __future__ import annotations

import re

from tmem_runtime.agent.flashcards import UNSPACED

SELECTIONS = ("all", "salient")
# words of any script (letters, then letters, apostrophes or hyphens), numbers, and each character of the
# scripts written without spaces (Han, kana) on its own, as flashcards' grounding counts them
_WORD = re.compile(rf"[{UNSPACED}]|[^\W\d_{UNSPACED}][^\W\d_{UNSPACED}'-]*|\d+")
_UNSPACED_CHAR = re.compile(rf"[{UNSPACED}]")
_SPEAKER = re.compile(r"^\s*[^:\s][^:]{0,40}:\s")
_STOPWORDS = frozenset(
    """a about after again all also am an and any are as at back be because been before being but by can could
    did do does doing don done down even ever for from get gets getting go going gone got had has have having he
    her here hers him his how i i'm i've if in into is it it's its just know let like lot made make many may me
    more most much my need new no not now of off oh ok okay on one only or other our out over really right said
    same say see she should so some still such sure take than thank thanks that that's the their them then there
    these they thing things think this those though through time to too two up us very want was way we well were
    what when where which while who why will with would yeah yes yet you you're your yours""".split()
)


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


class SalientTurns:
    """Keeps the turns that bring new content words to the episode (see the module docstring).

    min_score: a turn's score = new content words + new capitalised words (names) + 1 if it has a
    number. max_cards: at most this many turns per write (the best scores, in conversation order);
    None: no cap.
    """

    def __init__(self, min_score: int = 4, max_cards: int | None = None):
        if min_score < 1 or (max_cards is not None and max_cards < 1):
            raise ValueError(f"min_score must be >= 1 and max_cards >= 1 or None, got {min_score}, {max_cards}")
        self.min_score, self.max_cards = min_score, max_cards
        self.seen: set[str] = set()

    def reset(self) -> None:
        self.seen = set()

    def score(self, line: str) -> int:
        """What `line` (a "Speaker: text" turn) adds to the words seen so far."""
        text = _SPEAKER.sub("", line, count=1)
        words = _words(text)
        content = {w.lower() for w in words if (len(w) > 2 or _UNSPACED_CHAR.fullmatch(w))
                   and w.lower() not in _STOPWORDS and not w.isdigit()}  # fmt: skip
        names = {w.lower() for i, w in enumerate(words) if i and w[0].isupper() and w.lower() not in _STOPWORDS}
        new = content - self.seen
        return len(new) + len(names & new) + any(w.isdigit() for w in words)

    def __call__(self, turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The (DATE line, turn) pairs that get a card; every turn's words are then counted as seen."""
        scores = []
        for _, line in turns:
            scores.append(self.score(line))
            self.seen |= {w.lower() for w in _words(_SPEAKER.sub("", line, count=1))}
        chosen = [i for i, s in enumerate(scores) if s >= self.min_score]
        if self.max_cards is not None and len(chosen) > self.max_cards:
            chosen = sorted(sorted(chosen, key=lambda i: (-scores[i], i))[: self.max_cards])
        return [turns[i] for i in chosen]

def make_selector(name: str, min_score: int = 4, max_cards: int | None = None) -> SalientTurns | None:
    """None for "all" (a card for every turn of MIN_TURN_WORDS words or more), else the selector."""
    if name not in SELECTIONS:
        raise ValueError(f"card selection must be one of {SELECTIONS}, got {name!r}")
    return None if name == "all" else SalientTurns(min_score, max_cards)
