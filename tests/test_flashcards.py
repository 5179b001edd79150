"""The flashcard parser: salvage every valid pair, drop the rest with a reason, never raise."""

import json
import random

from tmem_runtime.agent.flashcards import (
    EXAMPLE_FLASHCARDS,
    FLASHCARD_PREFILL,
    MAX_ANSWER_WORDS,
    TURN_EXAMPLES,
    TURN_PREFILL,
    dated_turns,
    flashcard_messages,
    parse_flashcards,
    third_person,
    turn_flashcard_messages,
)


def test_clean_array():
    text = json.dumps([{"instruction": "Where did Ana move?", "output": "Denver"},
                       {"instruction": "What is Ben's parrot called?", "output": "Kiwi"}])
    r = parse_flashcards(text)
    assert r.pairs == [("Where did Ana move?", "Denver"), ("What is Ben's parrot called?", "Kiwi")]
    assert r.n_dropped == 0


def test_prefilled_reply_and_truncated_array():
    reply = 'Where did Ana move?", "output": "Denver"},\n{"instruction": "What does Ana do?", "output": "bak'
    r = parse_flashcards(FLASHCARD_PREFILL + reply)
    assert r.pairs == [("Where did Ana move?", "Denver")]
    assert r.n_dropped == 1  # the cut-off last card is dropped, not trained on


def test_repairs_single_quotes_trailing_commas_and_wrong_keys():
    text = ("[{'instruction': 'Where did Ana move?', 'output': 'Denver',},"
            ' {"question": "What pet does Ben have?", "answer": "a parrot",},'
            ' {"Q": "What does Ana play?", "A": "the violin"}]')
    r = parse_flashcards(text)
    assert r.pairs == [("Where did Ana move?", "Denver"), ("What pet does Ben have?", "a parrot"),
                       ("What does Ana play?", "the violin")]


def test_drops_empty_duplicate_long_nontext_and_missing():
    cards = [
        {"instruction": "Where did Ana move?", "output": "Denver"},
        {"instruction": "where did ana move", "output": "Denver, Colorado"},  # near-duplicate question
        {"instruction": "", "output": "x"},
        {"instruction": "What?", "output": "   "},
        {"instruction": "Why?", "output": " ".join(["word"] * (MAX_ANSWER_WORDS + 1))},
        {"instruction": "Who?", "output": ["a", "list"]},
        {"instruction": "Who?", "output": None},
        {"instruction": "When?"},
        {"instruction": "What year?", "output": 2023},  # numbers are fine
        {"instruction": "Same?", "output": "Same?"},  # echo
        {"instruction": EXAMPLE_FLASHCARDS[0]["instruction"], "output": EXAMPLE_FLASHCARDS[0]["output"]},
    ]
    r = parse_flashcards(json.dumps(cards))
    assert r.pairs == [("Where did Ana move?", "Denver"), ("What year?", "2023")]
    assert r.dropped == {"duplicate": 1, "empty": 2, "too_long": 1, "not_text": 2, "missing_key": 1, "echo": 2}


def test_line_format_and_prose():
    text = "Sure! Here are flashcards:\nQ: Where did Ana move?\nA: Denver\n\nQuestion: What is Ben's pet?\nAnswer: Kiwi"
    assert parse_flashcards(text).pairs == [("Where did Ana move?", "Denver"), ("What is Ben's pet?", "Kiwi")]
    assert parse_flashcards("I cannot write flashcards for this.").pairs == []
    assert parse_flashcards("").pairs == [] and parse_flashcards(None).pairs == []  # type: ignore[arg-type]


def test_broken_objects_salvaged_by_key_value_scan():
    text = '[{"instruction": "Where did Ana move?" "output": "Denver"} {"instruction": "x" : : }]'
    r = parse_flashcards(text)
    assert ("Where did Ana move?", "Denver") in r.pairs
    assert r.n_dropped >= 1


def test_fuzz_never_raises_and_only_keeps_valid_pairs():
    rng = random.Random(0)
    pieces = ['{', '}', '[', ']', '"', "'", ':', ',', '\\', '\n', '"instruction"', '"output"', '"question"',
              '"answer"', 'Q:', 'A:', 'Where did Ana move?', 'Denver', '', ' ', 'null', '12', 'é中', '{"a": {"b": 1}}']
    valid = json.dumps([{"instruction": "Where did Ana move?", "output": "Denver"}])
    for i in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        if i % 3 == 0:  # a valid array cut at a random point, with noise around it
            cut = rng.randint(0, len(valid))
            text = text[: rng.randint(0, 10)] + valid[:cut] + text[-rng.randint(0, 10):]
        r = parse_flashcards(text)
        keys = set()
        for q, a in r.pairs:
            assert isinstance(q, str) and isinstance(a, str)
            assert q.strip() and a.strip()
            assert len(a.split()) <= MAX_ANSWER_WORDS
            assert q.lower() not in keys
            keys.add(q.lower())
        assert r.n_dropped >= 0


def test_prompt_has_example_and_ends_with_the_context():
    msgs = flashcard_messages("DATE: 1 May\nAna: I moved to Denver.")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert "Ana: I moved to Denver." in msgs[-1]["content"]
    assert json.loads(msgs[2]["content"]) == EXAMPLE_FLASHCARDS


def test_per_turn_prompt_and_dated_turns():
    ctx = "DATE: 1 May\nAna: I moved to Denver last Friday.\nBen: Cool!\nDATE: 9 May\nBen: I got a parrot named Kiwi."
    assert dated_turns(ctx) == [("DATE: 1 May", "Ana: I moved to Denver last Friday."),
                                ("DATE: 9 May", "Ben: I got a parrot named Kiwi.")]  # "Cool!" is too short
    msgs = turn_flashcard_messages("DATE: 1 May", "Ana: I moved to Denver last Friday.")
    assert msgs[0]["role"] == "system" and len(msgs) == 2 + 2 * len(TURN_EXAMPLES)
    assert msgs[-1]["content"] == "DATE: 1 May\nAna: I moved to Denver last Friday."
    # per-turn replies are joined one card per line; an example card echoed back is dropped
    raw = "\n".join(TURN_PREFILL + r for r in ['Where did Ana move?", "output": "Denver"}',
                                               TURN_EXAMPLES[0][1]["instruction"] + '", "output": "x"}'])
    r = parse_flashcards(raw)
    assert r.pairs == [("Where did Ana move?", "Denver")] and r.dropped == {"echo": 1}


def test_turns_in_the_third_person_name_the_speaker():
    assert third_person("Ana: I'm sure my parrot likes me, I have two.") == (
        "Ana: Ana is sure Ana's parrot likes Ana, Ana has two.")
    assert third_person("My Place: I see") == "My Place: My Place see"  # only the text after the speaker changes
    assert third_person("no speaker here, I think") == "no speaker here, I think"
    plain = turn_flashcard_messages("DATE: 1 May", "Ana: I moved to Denver.")
    named = turn_flashcard_messages("DATE: 1 May", "Ana: I moved to Denver.", named=True)
    assert named[-1]["content"] == "DATE: 1 May\nAna: Ana moved to Denver."
    assert "Nina: Nina started a new job" in named[1]["content"] and plain[1]["content"] == TURN_EXAMPLES[0][0]
    assert [m["content"] for m in named[2::2]] == [m["content"] for m in plain[2::2]]  # same worked cards


def test_replies_parsed_one_by_one_so_an_unclosed_card_cannot_swallow_the_next():
    replies = [TURN_PREFILL + 'What is Leo\'s hobby?", "output": "pottery"]',  # closed with the wrong bracket
               TURN_PREFILL + 'What is Leo\'s band?", "output": "the Blue Foxes"}',
               TURN_PREFILL + 'What is Leo\'s band?", "output": "Blue Foxes"}']
    r = parse_flashcards(replies)
    assert r.pairs == [("What is Leo's hobby?", "pottery"), ("What is Leo's band?", "the Blue Foxes")]
    assert r.dropped == {"duplicate": 1}


def test_ungrounded_answers_are_dropped_when_the_context_is_given():
    ctx = "DATE: 1 May\nAna: I moved to Denver last Friday. My parrot Kiwi came too."
    cards = json.dumps([{"instruction": "Where did Ana move?", "output": "Denver"},
                        {"instruction": "Where is Ana flying?", "output": "Lisbon"},  # copied from an example
                        {"instruction": "What is the parrot called?", "output": "kiwi!"}])
    r = parse_flashcards(cards, context=ctx)
    assert r.pairs == [("Where did Ana move?", "Denver"), ("What is the parrot called?", "kiwi!")]
    assert r.dropped == {"ungrounded": 1}
    assert len(parse_flashcards(cards).pairs) == 3  # no context, no grounding check


def test_answers_in_any_script_are_grounded_in_a_context_in_that_script():
    ctx = "DATE: 1 May\nAna: Я переехала в Москву. 我住在东京，在咖啡店工作。Café Müller opened."
    cards = json.dumps([{"instruction": "Where did Ana move?", "output": "Москву"},
                        {"instruction": "Where does Ana live?", "output": "东京"},
                        {"instruction": "What opened?", "output": "Café Müller"},
                        {"instruction": "Where is Ana flying?", "output": "Лиссабон"},  # not in the context
                        {"instruction": "Which city?", "output": "大阪"}])  # no character of it in the context
    r = parse_flashcards(cards, context=ctx)
    assert r.pairs == [("Where did Ana move?", "Москву"), ("Where does Ana live?", "东京"),
                       ("What opened?", "Café Müller")]
    assert r.dropped == {"ungrounded": 2}


class _SliceCountingStr(str):
    """A reply that counts the characters its slices copy (the parser's work on it)."""

    copied = 0

    def __getitem__(self, key):
        part = super().__getitem__(key)
        _SliceCountingStr.copied += len(part)
        return part


def test_a_huge_reply_is_parsed_in_one_pass_not_quadratic_work():
    # a custom writer (or a model with a large max_new_tokens) may return megabytes: the parser must
    # read it in linear work (it once copied the whole text before every quote: minutes at 2 MB)
    card = '{"instruction": "Where did Ana move?", "output": "Denver"}, '
    reply = _SliceCountingStr("[" + card * 2000 + "]")
    _SliceCountingStr.copied = 0
    r = parse_flashcards(reply)
    assert r.pairs == [("Where did Ana move?", "Denver")] and r.dropped == {"duplicate": 1999}
    assert _SliceCountingStr.copied <= 2 * len(reply)


def test_a_card_too_long_to_train_is_dropped_and_the_write_goes_on_with_the_others():
    import torch
    from transformers import AutoModelForCausalLM

    from tmem_runtime import FastWeights
    from tmem_runtime.agent.generation import Generator
    from tmem_runtime.agent.write_formats import AGENT_RECIPE, write_to_weights
    from tmem_runtime.models import _tiny_tokenizer, tiny_config

    tokenizer = _tiny_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("tiny-llama", vocab_size=len(tokenizer))).eval()
    model.requires_grad_(False)
    fw = FastWeights(model)
    url = "https://example.com/" + "/".join(f"part{i}x" for i in range(120))  # one "word", ~700 tokens
    ctx = f"DATE: 1 May\nAna: my photos are at {url}\nBen: I adopted a parrot named Zorblat."
    long_card = {"instruction": "Where are Ana's photos?", "output": url}
    good_card = {"instruction": "What did Ben adopt?", "output": "a parrot named Zorblat"}
    gen = Generator(model, tokenizer)
    bare = {k: v.clone() for k, v in fw.state_dict().items()}
    record = write_to_weights(fw, gen, ctx, writer=lambda c: json.dumps([long_card]))
    assert record.pairs == [] and record.dropped == {"too_long": 1} and record.losses == []
    assert all(torch.equal(bare[k], v) for k, v in fw.state_dict().items())  # nothing written, nothing changed
    record = write_to_weights(fw, gen, ctx, writer=lambda c: json.dumps([long_card, good_card]))
    assert record.pairs == [("What did Ben adopt?", "a parrot named Zorblat")] and record.dropped == {"too_long": 1}
    assert len(record.losses) == AGENT_RECIPE.epochs  # one card: one step per epoch
    assert not all(torch.equal(bare[k], v) for k, v in fw.state_dict().items())
    fw.detach()


def test_a_write_records_the_tokens_its_own_generation_ran():
    """generate_tokens: the generator's tokens while the write made its material (the report's cards
    tokens/s), none for cards from a writer function or for ntp (no model call)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tmem_runtime import FastWeights
    from tmem_runtime.agent.generation import Generator
    from tmem_runtime.agent.write_formats import write_to_weights
    from tmem_runtime.models import _tiny_tokenizer, tiny_config

    tokenizer = _tiny_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("tiny-llama", vocab_size=len(tokenizer))).eval()
    model.requires_grad_(False)
    fw = FastWeights(model)
    gen = Generator(model, tokenizer)
    ctx = "DATE: 1 May\nBen: I adopted a parrot named Zorblat."
    card = {"instruction": "What did Ben adopt?", "output": "a parrot named Zorblat"}
    assert write_to_weights(fw, gen, ctx, writer=lambda c: json.dumps([card])).generate_tokens == 0
    assert write_to_weights(fw, gen, ctx, write_format="ntp").generate_tokens == 0
    before = gen.stats.copy()
    record = write_to_weights(fw, gen, ctx, write_format="summary", max_new_tokens=4)
    assert record.generate_tokens == gen.stats.since(before).tokens > 4  # the prompt's prefill and the decode
    fw.detach()
