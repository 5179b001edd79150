"""Episodes as sessions of one SessionPool: one batched decode with a different memory per row gives
the answers of running the episodes one by one (the spec)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tmem_runtime import FastWeights, Recipe, SessionPool, load_model
from tmem_runtime.decoding import DecodeStats, greedy_generate, prefill
from tmem_runtime.write import IGNORE_INDEX

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _examples(n: int, seed: int) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 500, (int(torch.randint(5, 12, (), generator=g)),), generator=g).tolist()
        out.append((ids, [IGNORE_INDEX] * 2 + ids[2:]))
    return out


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_bind_gives_each_row_its_session_through_batches_and_dropped_rows(name):
    """greedy_generate(bind=pool.rows ...) over rows of three memories (one bare), batches of 3, rows of
    different lengths and prefixes, equals each prompt generated alone with only its session bound."""
    model, _ = load_model(name, seed=3)
    pool = SessionPool(model, capacity=2, backend="torch")
    pool.open("p")
    pool.open("q")
    pool.write_examples_many({"p": _examples(4, 1), "q": _examples(4, 2)}, Recipe(lr=3e-2, epochs=5))
    g = torch.Generator().manual_seed(0)
    head = torch.randint(3, 500, (9,), generator=g).tolist()
    sessions = ["p", "q", None, "q", "p", "p", None, "q"]
    prompts = [head + torch.randint(3, 500, (n,), generator=g).tolist() for n in (1, 6, 3, 2, 8, 4, 5, 3)]
    prefixes = {}
    for s in ("p", "q", None):
        with pool.rows([s]):
            prefixes[s] = prefill(model, head)
    out = greedy_generate(model, prompts, 10, eos_ids=[7, 11, 13], prefix=[prefixes[s] for s in sessions],
                          batch_size=3, bind=lambda rows: pool.rows([sessions[i] for i in rows]))
    alone = []
    for p, s in zip(prompts, sessions):
        with pool.rows([s]):
            alone += greedy_generate(model, [p], 10, eos_ids=[7, 11, 13])
    assert out == alone
    bare = greedy_generate(model, prompts, 10, eos_ids=[7, 11, 13])  # outside rows(): no session
    assert [o for o, b, s in zip(out, bare, sessions) if s is None] == [b for b, s in zip(bare, sessions) if s is None]
    assert sum(o != b for o, b, s in zip(out, bare, sessions) if s is not None) >= 4  # the memories answered
    pool.detach()


def test_a_joint_decode_is_shared_out_by_questions():
    """run_side_by_side charges each episode its share of the joint decode's counts."""
    joint = DecodeStats(prefill_tokens=30, prefill_s=3.0, decode_tokens=12, decode_s=1.5)
    parts = [joint.scaled(1 / 3), joint.scaled(2 / 3)]
    assert [p.prefill_tokens for p in parts] == [10, 20] and [p.decode_tokens for p in parts] == [4, 8]
    assert sum(p.prefill_s for p in parts) == pytest.approx(3.0) and parts[0].decode_s == pytest.approx(0.5)
    assert joint.prefill_tokens == 30  # a new object


# --------------------------------------------------------------------------- the agent on SmolLM2


@pytest.fixture(scope="module")
def smollm2():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model("smollm2-135m")
    torch.set_num_threads(threads)


CARDS = dict(cards="salient", max_cards=3)  # few cards per write: a short test
L_MAX = 200


@pytest.fixture(scope="module")
def two_conversations(tmp_path_factory):
    """Two short generated conversations (facts early, chit-chat after) as a LoCoMo-format file."""
    from tmem_runtime.agent.long_conversations import make_conversations

    path = tmp_path_factory.mktemp("pooled") / "two.json"
    path.write_text(json.dumps(make_conversations(2, seed=5, n_facts=3, tokens=300, turns_per_session=5)))
    return path


@pytest.fixture(scope="module")
def one_by_one(smollm2, two_conversations):
    """The spec: each conversation read by a tmem agent on FastWeights, then its questions answered,
    one conversation after the other. Returns (answers per conversation, flashcards per conversation)."""
    from tmem_runtime.agent.agent import MemoryAgent
    from tmem_runtime.agent.channels import make_channel
    from tmem_runtime.agent.generation import Generator
    from tmem_runtime.agent.locomo import load_locomo

    model, tok = smollm2
    gen = Generator(model, tok)
    fw = FastWeights(model)
    agent = MemoryAgent(gen, make_channel("tmem", gen, fw, **CARDS), l_max=L_MAX, answer_tokens=12)
    answers, cards = [], []
    for c in load_locomo(two_conversations):
        agent.reset()
        agent.read(c)
        answers.append(agent.answer([q.question for q in c.qa]))
        cards.append([t.event.weights.pairs for t in agent.triggers])
    fw.detach()
    return answers, cards


@pytest.mark.slow
def test_agents_in_one_pool_answer_as_they_do_one_by_one(smollm2, two_conversations, one_by_one):
    """The same conversations as two sessions of one SessionPool, every question answered in one batched
    decode (and each agent alone): the answers of the one-by-one run, hence its F1."""
    from tmem_runtime.agent.agent import MemoryAgent
    from tmem_runtime.agent.channels import make_channel
    from tmem_runtime.agent.generation import Generator
    from tmem_runtime.agent.locomo import load_locomo
    from tmem_runtime.agent.pooled import PoolSession, answer_together

    model, tok = smollm2
    gen = Generator(model, tok)
    convs = load_locomo(two_conversations)
    questions = [[q.question for q in c.qa] for c in convs]
    pool = SessionPool(model, capacity=2)
    agents = [MemoryAgent(gen, make_channel("tmem", gen, PoolSession(pool, c.sample_id), **CARDS), l_max=L_MAX,
                          answer_tokens=12) for c in convs]
    for a, c in zip(agents, convs):
        a.read(c)
        assert len(a.triggers) >= 2  # the budget triggered writes into this conversation's session
    together = answer_together(agents, questions)
    alone = [a.answer(qs) for a, qs in zip(agents, questions)]
    pool.detach()
    spec, _ = one_by_one
    assert together == spec
    assert alone == spec
    assert spec[0] != spec[1]  # different memories answered


@pytest.mark.slow
def test_eval_side_by_side_equals_one_by_one(smollm2, two_conversations, one_by_one, tmp_path, monkeypatch):
    """`tmem eval --side-by-side`: the tmem episodes of the two conversations as sessions of one pool,
    answered in one decode: every prediction and flashcard of the one-by-one run, and its F1."""
    from tmem_runtime.agent import evaluate
    from tmem_runtime.agent.locomo import load_locomo, score

    monkeypatch.setattr("tmem_runtime.load_model", lambda *a, **k: smollm2)
    argv = ["--data", str(two_conversations), "--memory", "tmem", "--l-max", str(L_MAX), "--answer-tokens", "12",
            "--cards", "salient", "--max-cards", "3", "--side-by-side", "--out", str(tmp_path)]
    assert evaluate.main(argv) == 0
    runs = json.loads((tmp_path / "answers.json").read_text())["runs"]
    spec, cards = one_by_one
    convs = load_locomo(two_conversations)
    assert [r["conversation"] for r in runs] == [c.sample_id for c in convs]
    for run, answers, pairs, conv in zip(runs, spec, cards, convs):
        assert [a["prediction"] for a in run["answers"]] == answers
        assert [a["f1"] for a in run["answers"]] == [round(score(x, q.answer, q.category)[0], 4)
                                                     for x, q in zip(answers, conv.qa)]
        assert [[tuple(p) for p in t["pairs"]] for t in run["triggers"]] == [[tuple(p) for p in t] for t in pairs]
