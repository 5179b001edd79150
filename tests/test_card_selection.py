"""Card selection without the model: turns that bring new words get a card, repeated small talk does not."""

import pytest

from tmem_runtime.agent.card_selection import SalientTurns, make_selector
from tmem_runtime.agent.channels import FastWeightChannel

H = "DATE: 1:00 pm on 3 May, 2023"


def _turns(*lines: str) -> list[tuple[str, str]]:
    return [(H, line) for line in lines]


def test_new_facts_score_high_and_repeated_small_talk_low():
    sel = SalientTurns(min_score=4)
    fact = "Ana: Big news, I adopted a green parrot and named him Zorblat last Sunday."
    chat = "Ben: The weather was grey and rainy all week, so I stayed inside."
    assert sel.score(fact) >= 8  # adopted green parrot named zorblat(x2) sunday(x2) big news ...
    first = sel(_turns(fact, chat))
    assert first == _turns(fact, chat)  # the episode's first turns are all new
    again = sel(_turns("Ana: The weather was rainy and grey again, I stayed inside all week.",
                       "Ben: My sister Ines moved to Lisbon in 2021 and works at Harbor Hospital."))
    assert again == _turns("Ben: My sister Ines moved to Lisbon in 2021 and works at Harbor Hospital.")
    assert sel.score("Ana: So Zorblat the parrot was adopted.") < 4  # nothing new any more
    sel.reset()
    assert sel.score("Ana: So Zorblat the parrot was adopted.") >= 4


def test_max_cards_keeps_the_best_scores_in_conversation_order():
    lines = ["Ana: I bought a red bicycle yesterday.",  # bought red bicycle yesterday: 4
             "Ben: My cousin Tarik opened a bakery called Crumbhouse in Porto.",  # the most new words
             "Ana: We visited the aquarium, the penguins were hilarious and loud."]
    sel = SalientTurns(min_score=1, max_cards=2)
    assert sel(_turns(*lines)) == _turns(lines[1], lines[2])
    with pytest.raises(ValueError):
        SalientTurns(min_score=0)
    assert make_selector("all") is None and isinstance(make_selector("salient", 3, 5), SalientTurns)
    with pytest.raises(ValueError, match="card selection"):
        make_selector("some")


def test_replay_per_new_card_caps_the_replayed_sample():
    channel = FastWeightChannel(fast_weights=None, generator=None, replay=32)
    channel.written = [(f"q{i}", f"a{i}") for i in range(40)]
    assert len(channel.replayed(3, n_new=1)) == 32  # the paper-style cap alone
    assert channel.replayed(3, 1) == channel.replayed(3, 5)  # seeded by the trigger, not by the count
    channel.replay_per_item = 4
    assert len(channel.replayed(3, n_new=2)) == 8 and len(channel.replayed(3, n_new=20)) == 32
    assert channel.replayed(3, n_new=0) == []
    assert set(channel.replayed(3, 2)) <= set(channel.written)


def test_turns_in_any_script_are_scored_by_their_new_words():
    """Content words of any script count (Cyrillic, accented Latin), each Han/kana character on its own (those
    scripts have no spaces); a turn repeating what was said scores as little in any script."""
    selector = SalientTurns(min_score=4)
    for turn in ("Мария: Моя сестра работает медсестрой в Москве.", "小明: 我妹妹在东京当护士。",
                 "Zoé: Ma sœur travaille à l'hôpital de Besançon."):  # fmt: skip
        first = selector.score(turn)
        assert first >= 4, turn
        selector([("DATE: 1 May 2024", turn)])
        assert selector.score(turn) == 0, turn  # nothing new the second time
