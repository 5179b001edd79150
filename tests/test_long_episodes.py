"""Long episodes: many writes behave as few do (counts kept, caches bounded, numerics sound, reset exact).

The soak itself (hundreds of writes, sessions and turns, with growth figures) is `tools/soak.py`; these
are its findings made into fast checks on the tiny random models.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tmem_runtime import FastWeights, Recipe, SessionPool
from tmem_runtime.agent.agent import MemoryAgent
from tmem_runtime.agent.channels import make_channel
from tmem_runtime.agent.generation import Generator
from tmem_runtime.agent.locomo import Conversation, Session, Turn
from tmem_runtime.agent.pooled import PoolSession
from tmem_runtime.fast_weights import fast_weights_of
from tmem_runtime.serve.main import load_serving_model

SHORT = Recipe(optimizer="adamw", lr=3e-3, epochs=1, batch_size=8)


@pytest.fixture(scope="module")
def loaded():
    model, tok = load_serving_model("tiny-llama")
    return model, tok, copy.deepcopy(model)


@pytest.fixture
def tiny(loaded):
    """tiny-llama with the embedded tokenizer (its vocabulary), and an untouched copy; whatever a test
    attached to the model is detached after it."""
    yield loaded
    attached = fast_weights_of(loaded[0])
    if attached is not None:
        attached.detach()


def card_writer(context: str) -> str:
    """One card per turn, no generation: the answer is the turn's last word."""
    cards = []
    for line in context.splitlines():
        speaker, _, text = line.partition(": ")
        if not line.startswith("DATE:") and text:
            cards.append({"instruction": f"What did {speaker} fix in {text.split()[3]}?", "output": text.split()[-1]})
    return json.dumps(cards)


def long_conversation(turns: int) -> Conversation:
    words = ("clocks", "bikes", "radios", "lamps", "boats")
    lines = [Turn(n, f"I fixed week{i} the {words[i % 5]} number{i}", f"t{i}")
             for i, n in zip(range(turns), ["Mira", "Nina"] * turns)]
    return Conversation("long", "Mira", "Nina", [Session(1, "1 May, 2023", lines)], [])


@pytest.mark.parametrize("kind", ["fast_weights", "pool_session"])
def test_a_long_agent_episode_counts_every_write_clears_each_context_and_resets_exactly(tiny, kind):
    """Many triggers: each clears the context, the writes accumulate (the session's counters say how many:
    the agent's switching the fast weights off to write cards is no episode boundary), the kept trunk rows
    stay within their bound, and reset() gives the state of a fresh attach, bit for bit."""
    model, tok, _ = tiny
    store = SessionPool(model, capacity=2, trunk_cache_bytes=64 << 10) if kind == "pool_session" else None
    fw = PoolSession(store, "ep") if store is not None else FastWeights(model)
    pool = store if store is not None else fw.store
    pool.trunk_rows.max_bytes = 64 << 10
    gen = Generator(model, tok)
    channel = make_channel("tmem", gen, fw, recipe=SHORT, replay=4)
    channel.writer = card_writer
    agent = MemoryAgent(gen, channel, l_max=40)
    contexts = []
    agent.read(long_conversation(40), on_trigger=lambda t: contexts.append(list(agent.lines)))
    writes = [t for t in agent.triggers if t.event.weights.pairs]
    assert len(writes) >= 12
    assert all(lines == [] for lines in contexts)  # cleared at every trigger
    stats = fw.stats
    assert stats.writes == len(writes) and stats.rollbacks == 0
    assert stats.steps == sum(len(t.event.weights.losses) for t in writes)
    assert stats.cards == sum(len(t.event.weights.pairs) + t.event.weights.replayed for t in writes)
    assert len(channel.written) == sum(len(t.event.weights.pairs) for t in writes)
    assert pool.trunk_rows.bytes <= 64 << 10
    slot = pool.residency.resident["ep" if store is not None else "default"]
    assert not torch.equal(pool.engine.b[slot], pool.engine.b0)
    agent.reset()
    assert fw.stats.writes == fw.stats.steps == fw.stats.cards == 0
    assert agent.triggers == [] and agent.lines == [] and channel.written == []
    assert pool.engine.initial[slot] and torch.equal(pool.engine.b[slot], pool.engine.b0)
