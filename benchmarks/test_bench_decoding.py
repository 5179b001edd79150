"""The agent's two generation workloads, shared-prefix batched decoding vs the paths it replaced.

1. Memory writing: 16 per-turn flashcard prompts (system text + 3 worked examples + one turn, reply
   opened), 48 new tokens, no early stop: (a) `generate` one prompt at a time (the spec),
   (b) transformers `generate` on one left-padded batch (the agent's code at 8e09ad3),
   (c) `greedy_generate`: the worked examples prefilled once, suffixes batched.
2. Answering: 10 questions after one ~1,000-token context, 24 new tokens: (a) the 8e09ad3 path, the
   context's cache prefilled once and deep-copied into a batch-1 `generate` per question, (c) one
   batch over the shared context.

All paths run in one process on the same prompts, side by side; outputs are checked equal to the
spec's (token for token) and the ratios printed. SmolLM2-135M (CPU), fp32.

3. The decode step's products (pytest-benchmark): `greedy_generate` of 32 tokens for 1, 4 and 16 rows
   with the model's linears packed for oneDNN (`tmem_runtime.packed_linears`, load_model's CPU default)
   vs plain nn.Linear (MKL on the row-major weights); the same tokens from both.

    pytest benchmarks/test_bench_decoding.py -s
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
from transformers import DynamicCache

from tmem_runtime import load_model
from tmem_runtime.agent.flashcards import TURN_PREFILL, turn_flashcard_messages
from tmem_runtime.agent.generation import Generator
from tmem_runtime.agent.long_conversations import make_conversation
from tmem_runtime.decoding import DecodeStats, common_prefix_length, greedy_generate, reference_generate
from tmem_runtime.packed_linears import AVAILABLE

RESULTS: dict[str, float] = {}


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = load_model("smollm2-135m")
    gen = Generator(model, tokenizer)
    conv = make_conversation(0, tokens=3000)
    header = f"DATE: {conv['conversation']['session_1_date_time']}"
    turns = [f"{t['speaker']}: {t['text']}" for t in conv["conversation"]["session_1"]][:16]
    cards = [gen.encode(gen.chat_prompt(turn_flashcard_messages(header, t), prefill=TURN_PREFILL)) for t in turns]
    context = "\n".join(f"{t['speaker']}: {t['text']}" for s in ("session_1", "session_2")
                        for t in conv["conversation"][s])
    context = gen.keep_last_tokens(context, 1000)
    prefix = gen.encode(gen.chat_prompt([{"role": "user", "content": context + "\n\n"}]).split("<|im_end|>")[0])
    questions = [gen.encode(f"Question: {q['question']} Short answer:<|im_end|>\n<|im_start|>assistant\n")
                 for q in conv["qa"]] + [gen.encode("Question: Who likes coffee? Short answer:<|im_end|>\n"
                                                    "<|im_start|>assistant\n")] * 2
    return model, gen, cards, prefix, questions[:10]


def _left_padded_batch(model, prompts, max_new_tokens, pad_id, eos_ids):
    """The agent's flashcard path at 8e09ad3: transformers `generate` on one left-padded batch."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad_id, eos_token_id=eos_ids)
    return [[t for t in row.tolist() if t != pad_id] for row in out[:, width:]]


@torch.no_grad()
def _copied_cache_per_question(model, prefix, questions, max_new_tokens, pad_id, eos_ids):
    """The agent's answer path at 8e09ad3: prefix cache once, deep-copied into a batch-1 generate per question."""
    prefix_ids = torch.tensor([prefix])
    cache = DynamicCache(config=model.config)
    model(input_ids=prefix_ids, past_key_values=cache, use_cache=True)
    outputs = []
    for q in questions:
        ids = torch.cat([prefix_ids, torch.tensor([q])], dim=1)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=copy.deepcopy(cache),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=eos_ids)
        outputs.append(out[0, ids.shape[1] :].tolist())
    return outputs


def _timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def test_flashcards_16_turns(setup):
    model, gen, cards, _, _ = setup
    spec, t_spec = _timed(reference_generate, model, cards, 48, gen.pad_id, gen.eos_ids)
    old, t_old = _timed(_left_padded_batch, model, cards, 48, gen.pad_id, gen.eos_ids)
    new, t_new = _timed(lambda: greedy_generate(model, cards, 48, gen.eos_ids, batch_size=16))
    assert new == spec
    prompt = sum(len(c) for c in cards)
    print(f"\n[flashcards] 16 prompts, {prompt} prompt tokens ({common_prefix_length(cards)} shared): "
          f"one by one {t_spec:.1f} s, left-padded batch (8e09ad3) {t_old:.1f} s, shared prefix {t_new:.1f} s "
          f"-> {t_old / t_new:.1f}x vs 8e09ad3, {t_spec / t_new:.1f}x vs one by one; "
          f"left-padded batch equal to the spec: {old == spec}")


def test_answers_10_questions_after_a_shared_context(setup):
    model, gen, _, prefix, questions = setup
    rows = [prefix + q for q in questions]
    spec, t_spec = _timed(reference_generate, model, rows, 24, gen.pad_id, gen.eos_ids)
    old, t_old = _timed(_copied_cache_per_question, model, prefix, questions, 24, gen.pad_id, gen.eos_ids)
    new, t_new = _timed(lambda: greedy_generate(model, rows, 24, gen.eos_ids, batch_size=16))
    assert new == spec
    print(f"\n[answers] 10 questions after a {len(prefix)}-token context: one by one {t_spec:.1f} s, "
          f"copied cache per question (8e09ad3) {t_old:.1f} s, one batch {t_new:.1f} s "
          f"-> {t_old / t_new:.1f}x vs 8e09ad3, {t_spec / t_new:.1f}x vs one by one; "
          f"8e09ad3 path equal to the spec: {old == spec}")


DECODE_TOKENS = 32
TOKENS: dict[tuple[str, int], list[list[int]]] = {}


@pytest.fixture(scope="module")
def plain_model():
    return load_model("smollm2-135m", packed_linears=False)[0]


@pytest.mark.skipif(not AVAILABLE, reason="this torch has no oneDNN")
@pytest.mark.parametrize("rows", [1, 4, 16])
@pytest.mark.parametrize("impl", ["packed", "plain"])
def test_decode_step_packed_linears(benchmark, setup, plain_model, rows, impl):
    packed_model, gen = setup[0], setup[1]
    model = packed_model if impl == "packed" else plain_model
    prompts = [gen.encode(f"Tell me about item {i} and who owns it.") for i in range(rows)]
    stats = DecodeStats()

    def run():
        with torch.inference_mode():
            return greedy_generate(model, prompts, DECODE_TOKENS, eos_ids=[], stats=stats, batch_size=rows)

    benchmark.group = f"decode {rows} rows x {DECODE_TOKENS} tokens (SmolLM2, fp32, CPU)"
    TOKENS[impl, rows] = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    RESULTS[f"{impl} {rows}"] = stats.decode_s / stats.decode_tokens * rows  # seconds per decode step
    if {("packed", rows), ("plain", rows)} <= TOKENS.keys():  # the second of the pair: compare
        assert TOKENS["packed", rows] == TOKENS["plain", rows]
        step = {k: RESULTS[f"{k} {rows}"] * 1e3 for k in ("packed", "plain")}
        print(f"\n[decode step] {rows} rows: packed {step['packed']:.1f} ms, plain {step['plain']:.1f} ms "
              f"-> {step['plain'] / step['packed']:.2f}x")
