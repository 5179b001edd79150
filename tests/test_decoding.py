"""Shared-prefix batched greedy decoding against its spec, transformers' `generate` one prompt at a time.

Every comparison is token for token: same prompts, the reference run at batch 1 without padding, the
fast path with prefixes prefilled once, suffixes left-padded in batches, rows dropped as they end.
"""

import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tmem_runtime import FastWeights, load_model
from tmem_runtime.chat import ask
from tmem_runtime.decoding import (
    DecodeStats,
    KVBuffer,
    common_prefix_length,
    greedy_generate,
    prefill,
    reference_generate,
)
from tmem_runtime.examples import chat_prompt_ids

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen3"])
def tiny(request):
    model, _ = load_model(request.param, seed=3)
    return model


def _prompts(seed: int, prefix_len: int, suffix_lens: list[int], vocab: int = 512) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, vocab, (prefix_len,), generator=g).tolist()
    return [shared + torch.randint(3, vocab, (n,), generator=g).tolist() for n in suffix_lens]


def _cut(row: list[int], stops: set[int]) -> list[int]:
    """Where a row ends when any token of `stops` ends it (the spec of stop_ids)."""
    for i, t in enumerate(row):
        if t in stops:
            return row[: i + 1]
    return row


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # each prompt keeps at least one token
    assert common_prefix_length([[7, 1], [8, 1]]) == 0


def test_matches_reference_with_a_found_common_prefix(tiny):
    prompts = _prompts(0, 21, [1, 5, 9, 2, 7, 3, 4])
    ref = reference_generate(tiny, prompts, 12, pad_id=0, eos_ids=[2])
    stats = DecodeStats()
    out = greedy_generate(tiny, prompts, 12, eos_ids=[2], batch_size=3, stats=stats)
    assert out == ref
    # the prefix ran once: 21 shared tokens + every suffix token, not 7 x 21
    assert stats.prefill_tokens == 21 + sum([1, 5, 9, 2, 7, 3, 4])
    assert stats.decode_tokens == sum(len(r) for r in ref)


def test_suffixes_prefilled_in_groups_of_their_own_length(tiny, monkeypatch):
    import tmem_runtime.decoding as decoding

    monkeypatch.setattr(decoding, "PREFILL_ROWS", 2)  # 7 rows -> 4 groups, each padded to its own width
    prompts = _prompts(10, 6, [9, 1, 4, 12, 2, 7, 3])
    out = greedy_generate(tiny, prompts, 10, eos_ids=[2], batch_size=7)
    assert out == reference_generate(tiny, prompts, 10, pad_id=0, eos_ids=[2])


def test_rows_with_different_prefixes_share_a_batch(tiny):
    a, b = _prompts(1, 7, [3, 6]), _prompts(2, 15, [1, 4, 2])
    pa, pb = prefill(tiny, a[0][:7]), prefill(tiny, b[0][:15])
    prompts = [a[0], b[0], a[1], b[1], b[2]]
    prefixes = [pa, pb, pa, pb, None]  # the last row has no prefix: all of it is prefilled in the batch
    out = greedy_generate(tiny, prompts, 10, eos_ids=[2], prefix=prefixes, batch_size=5)
    assert out == reference_generate(tiny, prompts, 10, pad_id=0, eos_ids=[2])


def test_rows_that_stop_early_are_dropped_and_the_rest_match(tiny, monkeypatch):
    selected = []
    select = KVBuffer.select
    monkeypatch.setattr(KVBuffer, "select", lambda self, rows: selected.append(len(rows)) or select(self, rows))
    prompts = _prompts(4, 12, [2, 8, 3, 5, 1, 6, 4, 7])
    ref = reference_generate(tiny, prompts, 16, pad_id=0, eos_ids=[2])
    stops = {r[2] for r in ref[::2]}  # tokens the rows do write: most rows end early, at different steps
    out = greedy_generate(tiny, prompts, 16, eos_ids=[2], batch_size=8, stop_ids=sorted(stops))
    assert out == [_cut(r, stops | {2}) for r in ref]
    assert selected and selected[0] < 8  # finished rows left the batch
    calls = []

    def stop_after_three(row: list[int]) -> bool:
        calls.append(len(row))
        return len(row) == 3

    out = greedy_generate(tiny, prompts, 16, eos_ids=[2], stop=stop_after_three)
    assert out == [r[:3] for r in ref] and max(calls) == 3


def test_each_row_can_have_its_own_stop_function(tiny):
    prompts = _prompts(11, 8, [2, 6, 3, 5, 4])
    ref = reference_generate(tiny, prompts, 14, pad_id=0, eos_ids=[2])
    limits = [1, 9, None, 4, 14]  # row i stops after limits[i] tokens (None: no stop function)
    seen: list[list[int]] = [[] for _ in prompts]

    def after(i: int, n: int):
        return lambda row: seen[i].append(len(row)) or len(row) == n

    stops = [None if n is None else after(i, n) for i, n in enumerate(limits)]
    out = greedy_generate(tiny, prompts, 14, eos_ids=[2], batch_size=5, stop=stops)
    expected = [r if n is None else _cut(r, {2})[:n] for r, n in zip(ref, limits)]
    assert out == expected
    for i, n in enumerate(limits):  # called after each of its own row's tokens the decoder did not end
        if n is not None:
            by_decoder = out[i][-1] == 2 or len(out[i]) == 14
            assert seen[i] == list(range(1, len(out[i]) + (0 if by_decoder else 1)))
    with pytest.raises(ValueError, match="2 stop functions for 5 prompts"):
        greedy_generate(tiny, prompts, 4, stop=stops[:2])


def test_a_prefix_extended_in_two_parts_equals_one_prefill(tiny):
    prompts = _prompts(5, 30, [4, 2, 6])
    whole = prefill(tiny, prompts[0][:30])
    two = prefill(tiny, prompts[0][18:30], past=prefill(tiny, prompts[0][:18]))
    assert two.ids == whole.ids
    for k1, k2 in zip(whole.keys, two.keys):
        torch.testing.assert_close(k1, k2, rtol=1e-5, atol=1e-5)
    assert greedy_generate(tiny, prompts, 8, eos_ids=[2], prefix=two) == reference_generate(
        tiny, prompts, 8, pad_id=0, eos_ids=[2])


def test_matches_reference_with_fast_weights_written(tiny):
    fw = FastWeights(tiny, rank=4, num_layers=2, seed=0, backend="torch")
    try:
        g = torch.Generator().manual_seed(9)
        ids = torch.randint(3, 512, (4, 10), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        fw.write([batch] * 3, lr=5e-2, optimizer="sgd")
        prompts = _prompts(6, 9, [3, 1, 5, 2])
        assert greedy_generate(tiny, prompts, 10, eos_ids=[2], batch_size=2) == reference_generate(
            tiny, prompts, 10, pad_id=0, eos_ids=[2])
    finally:
        fw.detach()


def test_bad_input_gets_a_clear_error(tiny):
    prompts = _prompts(7, 5, [2, 3])
    pre = prefill(tiny, prompts[0][:5])
    with pytest.raises(ValueError, match="start with its prefix"):
        greedy_generate(tiny, [[9, 9, 9, 9, 9, 9, 9]], 4, prefix=pre)
    with pytest.raises(ValueError, match="extend it by at least one token"):
        greedy_generate(tiny, [prompts[0][:5]], 4, prefix=pre)
    with pytest.raises(ValueError, match="at least one token"):
        greedy_generate(tiny, [[]], 4)
    with pytest.raises(ValueError, match="2 prefixes for 1 prompts"):
        greedy_generate(tiny, [prompts[0]], 4, prefix=[pre, pre])
    assert greedy_generate(tiny, [], 4) == []


def test_max_new_tokens_and_the_window_are_checked_before_anything_runs(tiny):
    """0 new tokens: nothing per prompt; negative: refused; a prompt that with its new tokens passes the
    model's window (max_position_embeddings) is refused, not run at positions the model never saw. The same
    on the piecewise path and the reference path (a GPT-2), which used to differ (the reference refused 0,
    and failed on a long prompt with an IndexError from inside the model)."""
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    for model in (tiny, gpt2):
        window = model.config.max_position_embeddings
        prompts = _prompts(9, 4, [2, 3], vocab=64)
        assert greedy_generate(model, prompts, 0) == [[], []]
        with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
            greedy_generate(model, prompts, -1)
        long = _prompts(9, window - 3, [1], vocab=64)
        assert len(greedy_generate(model, long, 2, eos_ids=[])[0]) == 2  # exactly fills the window
        with pytest.raises(ValueError, match=f"window of {window} positions"):
            greedy_generate(model, long, 3)


def test_models_the_decoder_cannot_drive_use_the_reference():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    prompts = _prompts(8, 6, [2, 4], vocab=64)
    assert greedy_generate(model, prompts, 6, eos_ids=[1]) == reference_generate(model, prompts, 6, 0, [1])
    with pytest.raises(ValueError, match="piecewise"):
        prefill(model, prompts[0])


def test_no_eos_on_the_reference_path_means_none_not_the_models():
    """eos_ids=[] (no EOS) on a model the Decoder cannot drive decodes every row to max_new_tokens, as on the
    piecewise path: it used to fall back to the model's own EOS (generation_config), ending rows there."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    prompts = _prompts(8, 6, [2, 4], vocab=64)
    free = reference_generate(model, prompts, 6, 0, [])
    assert all(len(row) == 6 for row in free)
    eos = free[0][1]  # a token the first row generates early
    model.generation_config.eos_token_id = eos
    assert greedy_generate(model, prompts, 6, eos_ids=[]) == free
    assert greedy_generate(model, prompts, 6)[0] == free[0][: free[0].index(eos) + 1]  # default: the model's EOS


@pytest.mark.slow
def test_smollm2_flashcards_and_answers_match_the_reference():
    """The agent's real prompts on the real model: per-turn flashcards (shared prompt prefix) and
    answers after a shared context, through the agent's Generator, against `generate` one by one."""
    from tmem_runtime.agent.agent import QA_PROMPT
    from tmem_runtime.agent.flashcards import TURN_PREFILL, turn_flashcard_messages
    from tmem_runtime.agent.generation import Generator

    model, tok = load_model("smollm2-135m")
    gen = Generator(model, tok)
    header = "DATE: 1:56 pm on 8 May, 2023"
    turns = ["Ana: Big news! I adopted a green parrot and named him Zorblat.",
             "Ben: Wow, congratulations Ana! I started a new job at the Riverside bakery last week.",
             "Ana: The weather was grey all week, so I mostly stayed home and read.",
             "Ben: My sister Ines is moving to Lisbon in June.",
             "Ana: ok"]
    prompts = [gen.chat_prompt(turn_flashcard_messages(header, t), prefill=TURN_PREFILL) for t in turns]
    ids = [gen.encode(p) for p in prompts]
    ref = reference_generate(model, ids, 48, gen.pad_id, gen.eos_ids)
    cards = gen.generate(prompts, 48, batch_size=3, shared=gen.split_chat_prompt(
        turn_flashcard_messages("", "\u241f"), "\u241f")[0], weights="base")
    assert cards == [tok.decode(r, skip_special_tokens=True) for r in ref]
    first_lines = gen.generate(prompts, 48, batch_size=3, stop="line", weights="base")
    assert [c.split("\n")[0] for c in first_lines] == [c.split("\n")[0] for c in cards]

    context = "\n".join([header] + turns)
    prefix, suffix = gen.split_chat_prompt([{"role": "user", "content": f"{context}\n\n\u241f"}], "\u241f")
    questions = ["What is the name of Ana's parrot?", "Where does Ben work?", "Where is Ines moving?"]
    suffixes = [QA_PROMPT.format(question=q) + suffix for q in questions]
    ref = reference_generate(model, [gen.encode(prefix) + gen.encode(s) for s in suffixes], 24, gen.pad_id,
                             gen.eos_ids)
    answers = gen.generate_after_prefix(prefix, suffixes, 24, batch_size=2)
    assert answers == [tok.decode(r, skip_special_tokens=True) for r in ref]

    asked = ask(model, tok, questions, max_new_tokens=16, context=context)  # the runtime's ask(): same decoder
    ref = reference_generate(model, [chat_prompt_ids(tok, f"{context}\n\n{q}") for q in questions], 16,
                             gen.pad_id, None)
    assert asked == [tok.decode(r, skip_special_tokens=True).strip() for r in ref]


def test_ask_refuses_one_bare_string_and_questions_that_are_not_strings(tiny):
    """ask(model, tok, "What is it?") answered each of its 11 characters as a question; a None failed in
    the chat template's jinja. Both are ValueErrors naming the fix, before anything runs."""
    from tmem_runtime.models import _tiny_tokenizer

    tok = _tiny_tokenizer()
    with pytest.raises(ValueError, match=r"got one string \(wrap it: \[question\]\)"):
        ask(tiny, tok, "What is it?")
    with pytest.raises(ValueError, match="question 1 is not a string: None"):
        ask(tiny, tok, ["What is it?", None])
    assert ask(tiny, tok, []) == []
    with pytest.raises(TypeError, match="ask needs the model's tokenizer, got None"):  # was: NoneType not callable
        ask(tiny, None, ["What is it?"])
