"""The long-conversation generator: LoCoMo's format, seeded, facts early, chit-chat that never restates them."""

import json

import pytest
from transformers import AutoTokenizer

from tmem_runtime.agent.locomo import load_locomo
from tmem_runtime.agent.long_conversations import FACT_KINDS, main, make_conversation, make_conversations
from tmem_runtime.models import smollm2_dir


def test_seeded_and_in_locomo_format(tmp_path):
    assert make_conversation(3, tokens=3000) == make_conversation(3, tokens=3000)
    assert make_conversation(3, tokens=3000) != make_conversation(4, tokens=3000)
    out = tmp_path / "long.json"
    assert main(["--out", str(out), "--n", "2", "--seed", "5", "--tokens", "3000", "--facts", "6"]) == 0
    assert json.loads(out.read_text()) == make_conversations(2, 5, tokens=3000, n_facts=6)
    convs = load_locomo(out)
    assert [c.sample_id for c in convs] == ["long-5", "long-6"]
    assert all(len(c.qa) == 6 and {q.category for q in c.qa} == {4} for c in convs)


def _load(sample: dict, tmp_path) -> list:
    """A generated sample through the LoCoMo loader (the parser the evaluation uses)."""
    path = tmp_path / f"{sample['sample_id']}.json"
    path.write_text(json.dumps([sample]))
    return load_locomo(path)


def test_facts_come_early_and_the_chit_chat_never_repeats_them(tmp_path):
    (conv,) = _load(make_conversation(11, n_facts=FACT_KINDS, tokens=6000, fact_sessions=2), tmp_path)
    turns = {t.dia_id: t for s in conv.sessions for t in s.turns}
    answers = [q.answer for q in conv.qa]
    assert len(set(answers)) == FACT_KINDS  # one fact of each kind
    for q in conv.qa:
        (evidence,) = q.evidence
        assert q.evidence_sessions <= {1, 2}
        assert q.answer in turns[evidence].text  # the evidence turn states the answer
        assert turns[evidence].speaker in q.question  # and its speaker is the one asked about
    later = " ".join(t.text for s in conv.sessions[2:] for t in s.turns)
    assert not [a for a in answers if not a.isdigit() and a in later]
    assert len(conv.sessions) > 4 and len({t.speaker for s in conv.sessions for t in s.turns}) == 2


def test_length_reaches_the_target_in_model_tokens(tmp_path):
    tok = AutoTokenizer.from_pretrained(smollm2_dir())
    for seed in (0, 1):
        (conv,) = _load(make_conversation(seed), tmp_path)
        n = len(tok(conv.render(), add_special_tokens=False)["input_ids"])
        assert 15000 <= n <= 19000


def test_bad_fact_count_is_refused():
    with pytest.raises(ValueError, match="n_facts"):
        make_conversation(0, n_facts=FACT_KINDS + 1)
