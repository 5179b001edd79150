"""LoCoMo loading and its official scoring, proven on hand-made cases (no model needed)."""

from pathlib import Path

import pytest

from tmem_runtime.agent.locomo import (
    NOT_MENTIONED,
    QA,
    Session,
    Turn,
    exact_match,
    load_locomo,
    multi_answer_f1,
    normalize_answer,
    question_prompt,
    resolve_choice,
    score,
    token_f1,
)

FIXTURE = Path(__file__).parent / "fixtures" / "two_sessions.json"


def test_normalize_drops_commas_punctuation_articles_and_case():
    assert normalize_answer("The Cat, and a Dog!") == "cat dog"
    assert normalize_answer("  an   apple.  ") == "apple"
    assert normalize_answer("1,000 km") == "1000 km"  # commas vanish before punctuation
    assert normalize_answer("theatre") == "theatre"  # whole words only


def test_token_f1_stems_and_counts_a_multiset():
    assert token_f1("running dogs", "run dog") == 1.0  # Porter: running->run, dogs->dog
    assert token_f1("she moved to Denver", "Denver") == pytest.approx(2 * 0.25 * 1 / 1.25)
    assert token_f1("paris paris", "paris") == pytest.approx(2 / 3)  # precision 1/2, recall 1
    assert token_f1("London", "Paris") == 0.0
    assert token_f1("", "Paris") == 0.0
    assert token_f1("the", "a") == 0.0  # both normalise to nothing: no overlap, 0 (as LoCoMo)


def test_category_1_splits_on_commas_and_averages_best_matches():
    assert multi_answer_f1("baker, violin", "violin, baker") == 1.0
    assert multi_answer_f1("baker", "baker, violin") == 0.5
    assert multi_answer_f1("a baker who plays violin", "baker, violin") == pytest.approx(
        (token_f1("a baker who plays violin", "baker") + token_f1("a baker who plays violin", "violin")) / 2
    )
    f1, em = score("violin, baker", "baker, violin", 1)
    assert (f1, em) == (1.0, 1.0)


def test_category_3_cuts_gold_at_semicolon():
    assert score("birds", "birds; parrots because he has one", 3)[0] == 1.0
    assert score("parrots", "birds; parrots", 3)[0] == 0.0


def test_category_5_is_the_adversarial_rule():
    assert score(NOT_MENTIONED, "Kiwi", 5) == (1.0, 1.0)
    assert score("No information available.", "Kiwi", 5) == (1.0, 1.0)
    assert score("Kiwi", "Kiwi", 5) == (0.0, 0.0)


def test_exact_match_is_token_set_equality():
    assert exact_match("the Denver", "Denver") == 1.0
    assert exact_match("Denver Colorado", "Denver") == 0.0
    assert exact_match("denver denver", "Denver") == 1.0  # sets, as LoCoMo's exact_match_score
    assert score("7 May 2023", "7 May, 2023", 2) == (1.0, 1.0)
    assert score("2023", 2023, 2) == (1.0, 1.0)  # integer gold answers are scored as text
    with pytest.raises(ValueError):
        score("x", "y", 9)


def test_prompts_follow_locomo():
    cat2 = QA("When did Ana move?", "May 2023", 2)
    assert question_prompt(cat2).endswith("Use DATE of CONVERSATION to answer with an approximate date.")
    cat5 = QA("What is Ana's parrot called?", "Kiwi", 5)
    prompt = question_prompt(cat5, seed=0)
    assert NOT_MENTIONED in prompt and "Kiwi" in prompt and "(a)" in prompt and "(b)" in prompt
    a_text = prompt.split("(a) ")[1].split(" (b)")[0]
    assert resolve_choice("a", cat5, seed=0) == a_text
    assert resolve_choice("(a)", cat5, seed=0) == a_text
    assert resolve_choice("(b)", cat5, seed=0) != a_text
    assert resolve_choice("It is Kiwi", cat5) == "It is Kiwi"
    assert question_prompt(cat5, seed=0) == question_prompt(cat5, seed=0)  # deterministic order


def test_load_fixture():
    (conv,) = load_locomo(FIXTURE)
    assert conv.sample_id == "fx-1" and (conv.speaker_a, conv.speaker_b) == ("Ana", "Ben")
    assert [s.index for s in conv.sessions] == [1, 2]  # the empty session_3 is skipped
    assert conv.sessions[0].header() == "DATE: 10:00 am on 4 May, 2023"
    assert "[shares a photo of a green parrot]" in conv.sessions[0].render()
    cats = [q.category for q in conv.qa]
    assert cats == [4, 2, 1, 3, 2, 5]
    assert conv.qa[4].answer == "2023"  # int answers become text
    assert conv.qa[5].answer == "Kiwi"  # category 5 takes adversarial_answer
    assert conv.qa[2].evidence_sessions == {1, 2}
    assert load_locomo(FIXTURE, ["fx-1"])[0].sample_id == "fx-1"
    with pytest.raises(ValueError, match="not in"):
        load_locomo(FIXTURE, ["conv-404"])


@pytest.mark.parametrize("text, message", [
    ('[{"conversation": {"session_1": [', "not valid JSON"),
    ('{"foo": 1}', "not a LoCoMo sample"),
    ("[1, 2]", "not a LoCoMo sample"),
    ("[]", "no conversations"),
    ('[{"sample_id": "x", "conversation": {"session_1": [{"text": "hi"}]}, "qa": [{"question": "q"}]}]',
     "question 0 of sample 'x'"),
])
def test_a_file_that_is_not_locomo_is_refused_with_a_clear_message(text, message, tmp_path):
    path = tmp_path / "data.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        load_locomo(path)
    assert str(path) in str(info.value)


def test_a_missing_file_is_refused_with_its_path(tmp_path):
    with pytest.raises(ValueError, match=r"no such file.*nope\.json"):
        load_locomo(tmp_path / "nope.json")


def test_a_turn_with_line_breaks_renders_as_one_line():
    """Some LoCoMo turns hold line breaks (e.g. "...\n\n[Shares a photo ...]"): a context is one turn per
    line, so the break becomes a space rather than a speakerless line of its own."""
    turn = Turn("Ana", "Look at this!\n\n[Shares a photo of a bird]\n", image_caption="a bird\non a branch")
    assert turn.render() == "Ana: Look at this! [Shares a photo of a bird] [shares a bird on a branch]"
    session = Session(1, "d1", [turn, Turn("Ben", "Nice.")])
    assert session.render().splitlines() == ["DATE: d1", turn.render(), "Ben: Nice."]
