"""Seeded long conversations in LoCoMo's JSON format: a few facts early, chit-chat after.

    tmem make-conversations --out runs/long.json --n 2 --seed 0 --tokens 16000

Each conversation opens with `n_facts` personal facts (of different kinds: a pet's name, a job, a
car's color, ...) stated by its two speakers in the first
`fact_sessions` sessions (made-up names, so a model cannot know the answers beforehand), then
chit-chat sessions (weather, coffee, lawn mowers, traffic, TV, ...) until it is about `tokens`
tokens long. The chit-chat is built from templates with their own made-up names (cafés, shows,
streets), so a memory writer has plenty of distracting material, but it never restates or
contradicts a fact. Every fact has one question (category 4, single-hop) whose evidence is the
turn that states it. Token counts are estimated at 4 characters per token (SmolLM2's tokenizer
gives about that on this text); the estimate only decides when to stop adding sessions.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from dataclasses import dataclass
from pathlib import Path

CHARS_PER_TOKEN = 3.5
FACT_KINDS = 10
FIRST_NAMES = ["Ana", "Ben", "Carla", "Dev", "Elif", "Femi", "Greta", "Hugo", "Iris", "Jonas", "Kira", "Luca",
               "Maya", "Nils", "Olga", "Paolo", "Rosa", "Sami", "Tessa", "Viktor"]
_ONSETS = ["b", "br", "d", "dr", "f", "g", "gl", "k", "kl", "l", "m", "n", "p", "pl", "r", "s", "sk", "st", "t",
           "tr", "v", "z", "zh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ee"]
_CODAS = ["", "", "n", "r", "l", "x", "m", "th", "sk", "nd"]


@dataclass(frozen=True)
class Fact:
    """One fact: the turn that states it, its question and its answer."""

    text: str
    question: str
    answer: str


def made_up_word(rng: random.Random, syllables: int = 2) -> str:
    """A pronounceable invented word, capitalised (e.g. "Zorblat")."""
    word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
    return word.capitalize()


def _fact_templates(rng: random.Random, speaker: str, used: set[str]) -> list[Fact]:
    """Every fact template filled in for `speaker` (invented names are unique within a conversation)."""

    def name(syllables: int = 2) -> str:
        while (word := made_up_word(rng, syllables)) in used:
            pass
        used.add(word)
        return word

    s = speaker
    animal = rng.choice(["parrot", "kitten", "puppy", "rabbit", "tortoise"])
    pet, company, town, band, village, teacher = name(), name(), name(), name(), name(3), name()
    brother, daughter, title = rng.choice(FIRST_NAMES), rng.choice(FIRST_NAMES), name()
    month = rng.choice(["January", "March", "April", "June", "August", "October", "November"])
    job = rng.choice(["nurse", "carpenter", "pharmacist", "bus driver", "architect", "baker", "librarian"])
    color = rng.choice(["red", "yellow", "green", "orange", "purple", "silver"])
    instrument = rng.choice(["cello", "trumpet", "banjo", "harp", "accordion", "drums"])
    food = rng.choice(["peanuts", "shrimp", "kiwi", "sesame", "strawberries"])
    age = rng.randint(4, 15)
    return [
        Fact(f"Big news: I adopted a {animal} last week and named him {pet}.",
             f"What is the name of {s}'s {animal}?", pet),
        Fact(f"I just started a new job as a {job} at a company called {company}.", f"Where does {s} work?", company),
        Fact(f"My brother {brother} is moving to a town called {town} in {month}.",
             f"Where is {s}'s brother moving?", town),
        Fact(f"My favorite band is {band}, I have seen them live three times.", f"What is {s}'s favorite band?",
             band),
        Fact(f"I grew up in a small village called {village} by the sea.", f"Where did {s} grow up?", village),
        Fact(f"I have started taking {instrument} lessons with a teacher named {teacher}.",
             f"Which instrument is {s} learning to play?", instrument),
        Fact(f"I finally bought a car, it is a {color} hatchback.", f"What color is {s}'s new car?", color),
        Fact(f"I found out this month that I am allergic to {food}.", f"What is {s} allergic to?", food),
        Fact(f"My daughter {daughter} turned {age} on Saturday.", f"How old is {s}'s daughter?", str(age)),
        Fact(f"I am writing a novel, its title is {title}.", f"What is the title of {s}'s novel?", title),
    ]


REACTIONS = ["Wow, that is great news!", "Oh nice, tell me more about it some time.", "That sounds exciting!",
             "Really? I did not know that.", "Congratulations, I am happy for you!", "Ha, that is so you.",
             "Good for you, that is a big step."]
_CHAT_TOPICS = {
    "weather": ["It has been {adj} all week here, {detail}.", "The forecast says {adj} weather again, {detail}.",
                "What a {adj} morning, {detail}."],
    "coffee": ["I had a {drink} at {Place} this morning, {detail}.", "The {drink} at {Place} was {adj2} today.",
               "I tried a new {drink} recipe at home, it came out {adj2}."],
    "lawn": ["My lawn mower {problem} again, {detail}.", "I spent the afternoon mowing the lawn, {detail}.",
             "The neighbor's lawn mower woke me up at seven, {detail}."],
    "traffic": ["Traffic on {Street} Road was terrible today, {detail}.", "The bus was late again on {Street} Road, "
                "{detail}.", "They are fixing the bridge on {Street} Road, {detail}."],
    "tv": ["I watched two episodes of {Show} last night, {detail}.", "Have you seen the new season of {Show}? "
           "It is {adj2}.", "I fell asleep during {Show} again, {detail}."],
    "food": ["I made {dish} for dinner, {detail}.", "We ordered {dish} from {Place}, it was {adj2}.",
             "I am thinking about cooking {dish} this weekend, {detail}."],
    "chores": ["I finally cleaned the garage, {detail}.", "The washing machine is making a strange noise, {detail}.",
               "I spent the whole evening folding laundry, {detail}."],
}
_FILL = {
    "adj": ["rainy", "windy", "grey", "sunny", "chilly", "humid", "foggy"],
    "adj2": ["pretty good", "a bit bland", "surprisingly nice", "too sweet", "just okay", "really good"],
    "drink": ["latte", "flat white", "black coffee", "cappuccino", "chai latte", "mocha"],
    "problem": ["would not start", "ran out of fuel", "made a rattling sound", "lost a wheel", "stalled twice"],
    "dish": ["pasta", "lentil soup", "tacos", "a stir fry", "pancakes", "a vegetable curry", "pizza"],
    "detail": ["so I stayed inside most of the day", "which was annoying", "but I did not mind much",
               "and I was late for everything", "so that was my big adventure", "nothing special really",
               "and then I took a long nap", "the usual stuff", "at least the cat was happy",
               "so I read the news for a while", "and the kids complained about it"],
}
_CHAT_REPLIES = ["Ha, same here, {detail}.", "Oh no, that sounds {adj3}.", "That happens to me too, {detail}.",
                 "Nice, I should try that some time.", "Typical! {detail2}", "I know what you mean, {detail}.",
                 "Sounds {adj3}, honestly.", "Yes, {detail}."]
_REPLY_FILL = {
    "adj3": ["annoying", "relaxing", "fun", "exhausting", "boring", "lovely"],
    "detail2": ["Nothing ever changes around here.", "Maybe next week will be better.", "Such is life.",
                "At least it is almost the weekend."],
}


def _chit_chat(rng: random.Random, places: list[str], streets: list[str], shows: list[str]) -> str:
    topic = rng.choice(sorted(_CHAT_TOPICS))
    template = rng.choice(_CHAT_TOPICS[topic])
    values = {k: rng.choice(v) for k, v in _FILL.items()}
    values.update(Place=rng.choice(places), Street=rng.choice(streets), Show=rng.choice(shows))
    return template.format(**values)


def _reply(rng: random.Random) -> str:
    values = {k: rng.choice(v) for k, v in {**_FILL, **_REPLY_FILL}.items()}
    return rng.choice(_CHAT_REPLIES).format(**values)


def _date_line(when: dt.datetime) -> str:
    hour = when.hour % 12 or 12
    return f"{hour}:{when.minute:02d} {'am' if when.hour < 12 else 'pm'} on {when.day} {when:%B}, {when.year}"


def make_conversation(
    seed: int,
    n_facts: int = 8,
    tokens: int = 16000,
    fact_sessions: int = 1,
    turns_per_session: int = 40,
    sample_id: str | None = None,
) -> dict:
    """One LoCoMo-format sample: facts in the first `fact_sessions` sessions, chit-chat until ~`tokens` tokens."""
    if not 1 <= n_facts <= FACT_KINDS:
        raise ValueError(f"n_facts must be in 1..{FACT_KINDS}, got {n_facts}")
    rng = random.Random(seed)
    a, b = rng.sample(FIRST_NAMES, 2)
    used: set[str] = set()
    pools = {a: _fact_templates(rng, a, used), b: _fact_templates(rng, b, used)}
    facts = []  # each kind of fact once, told by one speaker or the other
    for kind in rng.sample(range(len(pools[a])), n_facts):
        who = rng.choice([a, b])
        facts.append((who, pools[who][kind]))
    places = [made_up_word(rng) + " Café" for _ in range(4)]
    streets, shows = [made_up_word(rng) for _ in range(4)], [made_up_word(rng, 3) for _ in range(4)]
    conversation: dict = {"speaker_a": a, "speaker_b": b}
    qa, when, chars, n = [], dt.datetime(2023, 1, 1) + dt.timedelta(days=rng.randint(0, 300)), 0, 0
    per_session = -(-len(facts) // fact_sessions)
    while n < fact_sessions or chars / CHARS_PER_TOKEN < tokens:
        n += 1
        when += dt.timedelta(days=rng.randint(2, 9))
        when = when.replace(hour=rng.randint(8, 21), minute=rng.randint(0, 59))
        turns: list[tuple[str, str]] = []
        todo = facts[(n - 1) * per_session : n * per_session] if n <= fact_sessions else []
        speaker = rng.choice([a, b])
        turns.append((speaker, f"Hi {b if speaker == a else a}! {_chit_chat(rng, places, streets, shows)}"))
        for who, fact in todo:
            if turns[-1][0] == who:
                turns.append((b if who == a else a, _reply(rng)))
            turns.append((who, fact.text))
            qa.append({"question": fact.question, "answer": fact.answer, "category": 4,
                       "evidence": [f"D{n}:{len(turns)}"]})
            turns.append((b if who == a else a, rng.choice(REACTIONS)))
        while len(turns) < turns_per_session:
            speaker = b if turns[-1][0] == a else a
            turns.append((speaker, _chit_chat(rng, places, streets, shows) if len(turns) % 2 else _reply(rng)))
        conversation[f"session_{n}_date_time"] = _date_line(when)
        conversation[f"session_{n}"] = [{"speaker": s, "dia_id": f"D{n}:{i + 1}", "text": t}
                                        for i, (s, t) in enumerate(turns)]
        chars += sum(len(s) + len(t) + 3 for s, t in turns) + 30
    return {"sample_id": sample_id or f"long-{seed}", "conversation": conversation, "qa": qa}


def make_conversations(n: int, seed: int = 0, **kwargs) -> list[dict]:
    """`n` conversations, seeds seed .. seed + n - 1 (sample ids long-<seed>)."""
    return [make_conversation(seed + i, **kwargs) for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    """`tmem make-conversations`: write seeded long conversations to a LoCoMo-format JSON file."""
    from tmem_runtime.cli import apply_threads, command_parser, int_in

    p = command_parser("tmem make-conversations", __doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output JSON file")
    p.add_argument("--n", type=int_in(1), default=2, help="how many conversations")
    p.add_argument("--seed", type=int, default=0, help="seed of the first conversation")
    p.add_argument("--facts", type=int_in(1, FACT_KINDS), default=8,
                   help=f"facts per conversation (stated early), 1..{FACT_KINDS}")
    p.add_argument("--tokens", type=int_in(0), default=16000, help="approximate length of each conversation, tokens")
    p.add_argument("--fact-sessions", type=int_in(1), default=1, help="sessions the facts are spread over")
    p.add_argument("--turns", type=int_in(1), default=40, help="turns per session")
    args = p.parse_args(argv)
    apply_threads(args)  # (nothing here runs torch; every command takes --threads)
    data = make_conversations(args.n, args.seed, n_facts=args.facts, tokens=args.tokens,
                              fact_sessions=args.fact_sessions, turns_per_session=args.turns)
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=1))
    except OSError as exc:
        raise SystemExit(f"tmem make-conversations: cannot write {out}: {exc.strerror or exc}") from None
    print(f"wrote {len(data)} conversations to {out}")
    return 0
