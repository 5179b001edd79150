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
from tmem_runtime.trainer import NonFiniteLossError

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


def _cards(k: int, n: int = 3) -> list[tuple[str, str]]:
    """n flashcards of write k, each different."""
    names, facts = ("Mira", "Nina", "Leo", "Ana"), ("teal", "in Porto", "clocks", "a cat called Biscuit")
    return [(f"What did {names[(k + j) % 4]} mention in week {k} ({j})?", facts[(k * n + j) % 4]) for j in range(n)]


def _b_rows(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.double().reshape(-1) for n, v in sorted(state.items()) if "lora_B" in n])


def _float64_reference(fw: FastWeights, untouched) -> FastWeights:
    """The PEFT reference (full forward, torch.optim, everything float64) on a float64 copy of the model,
    holding fw's state (its A too: the SVD of the cast weights is not bit-identical)."""
    ref = FastWeights(copy.deepcopy(untouched).double(), backend="peft")
    ref.load_state_dict({k: v.double() for k, v in fw.state_dict().items()})
    return ref


def test_sgd_writes_over_an_episode_track_a_float64_reference(tiny):
    """SGD, write after write: B and every loss of the float32 fast path stay within float32 rounding of a
    float64 run of the same steps (no error that grows with the episode)."""
    model, tok, untouched = tiny
    recipe = Recipe(optimizer="sgd", lr=0.05, epochs=1, batch_size=4)
    fw = FastWeights(model)
    ref = _float64_reference(fw, untouched)
    errors = []
    for k in range(1, 9):
        got, want = fw.write_qa(tok, _cards(k), recipe, seed=k), ref.write_qa(tok, _cards(k), recipe, seed=k)
        assert got == pytest.approx(want, rel=1e-6, abs=1e-5)
        b, b_ref = _b_rows(fw.state_dict()), _b_rows(ref.state_dict())
        errors.append(float((b - b_ref).norm() / b_ref.norm()))
    assert max(errors) < 2e-6, errors
    assert errors[-1] < 2 * errors[1] + 1e-7  # not growing
    ref.detach()


def test_a_late_adamw_write_is_as_exact_as_the_first_and_a_late_nan_rolls_back_whole(tiny):
    """After 20 AdamW writes (|B| many times the first write's) one more write moves B as the float64
    reference moves it from the same state (AdamW's moments and step count are per write: nothing
    accumulates across writes to overflow). A write that goes NaN that late leaves every stored tensor
    bit-equal and the counters right, and the next write trains on."""
    model, tok, untouched = tiny
    recipe = Recipe(optimizer="adamw", lr=3e-3, epochs=2, batch_size=4)
    fw = FastWeights(model)
    first = fw.write_qa(tok, _cards(0), recipe)
    norm_first = float(_b_rows(fw.state_dict()).norm())
    for k in range(1, 20):
        fw.write_qa(tok, _cards(k), recipe, seed=k)
    before = {k: v.clone() for k, v in fw.state_dict().items()}
    b0 = _b_rows(before)
    assert torch.isfinite(b0).all() and float(b0.norm()) > 5 * norm_first
    ref = _float64_reference(fw, untouched)
    got, want = fw.write_qa(tok, _cards(20), recipe, seed=20), ref.write_qa(tok, _cards(20), recipe, seed=20)
    assert got == pytest.approx(want, rel=1e-5)
    step, step_ref = _b_rows(fw.state_dict()) - b0, _b_rows(ref.state_dict()) - b0
    assert float((step - step_ref).norm() / step_ref.norm()) < 1e-3
    ref.detach()

    stats = copy.copy(fw.stats)
    before = {k: v.clone() for k, v in fw.state_dict().items()}
    blow_up = Recipe(optimizer="sgd", lr=1e30, epochs=3, batch_size=1, divergence_factor=None)
    with pytest.raises(NonFiniteLossError):
        fw.write_qa(tok, _cards(31), blow_up)
    after = fw.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (fw.stats.writes, fw.stats.steps, fw.stats.rollbacks) == (stats.writes, stats.steps, stats.rollbacks + 1)
    assert len(fw.write_qa(tok, _cards(32), recipe)) == 2 and first


def test_reset_after_a_long_episode_is_a_fresh_attach_bit_for_bit(tiny):
    """100 optimizer steps of writes and hot swaps, then reset(): the state dict, the logits
    and the next write's losses and B equal those of fast weights freshly attached to an untouched copy."""
    model, tok, untouched = tiny
    recipe = Recipe(optimizer="adamw", lr=3e-3, epochs=2, batch_size=4)
    fw = FastWeights(model)
    for k in range(1, 51):
        fw.write_qa(tok, _cards(k), recipe, seed=k)
        if k % 10 == 0:
            fw.load_state_dict(fw.state_dict())
    assert fw.stats.steps == 100
    fw.reset()
    fresh_model = copy.deepcopy(untouched)
    fresh = FastWeights(fresh_model)
    got, want = fw.state_dict(), fresh.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids).logits, fresh_model(ids).logits)
    assert torch.equal(model(ids).logits, untouched(ids).logits)  # B = 0: the bare model
    assert fw.write_qa(tok, _cards(7), recipe) == fresh.write_qa(tok, _cards(7), recipe)
    got, want = fw.state_dict(), fresh.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    fresh.detach()


def test_a_server_keeps_at_most_max_loaded_sessions_and_reloads_a_released_one_as_it_was(tiny, tmp_path):
    """A server that meets session after session (a new user every few minutes, for hours) holds at most
    `max_loaded` of them (their B rows, contexts, cards, leases): the least recently used idle ones are
    released to the store. One asked again loads as it was: its memories, counters and answers."""
    from tmem_runtime.serve.service import MemoryService, ServeConfig
    from tmem_runtime.serve.store import Store

    model, tok, _ = tiny
    config = ServeConfig(capacity=4, max_write_sessions=2, max_loaded=3, recipe=Recipe(epochs=2, batch_size=4),
                         lend_cores=False)
    service = MemoryService(model, tok, Store(tmp_path), config)
    service.start()

    def ask(session: str, i: int) -> str:
        messages = [{"role": "user", "content": _cards(i)[0][0]}]
        return service.answer("t", session, messages, 6).future.result(timeout=120)[0].text

    try:
        answers = {}
        for i in range(8):
            s = f"user{i}"
            service.create("t", s)
            assert service.remember("t", s, _cards(i)).done.result(timeout=120)["error"] is None
            answers[s] = ask(s, i)
            assert len(service.convs) <= 3 and len(service.pool.sessions) <= 3
        released = [s for s in answers if ("t", s) not in service.convs]
        assert len(released) == 5 and all(Store(tmp_path).lease("t", s) is None for s in released)
        for i, (s, text) in enumerate(answers.items()):
            assert ask(s, i) == text
            assert service.stats("t", s)["memories"] == 3 and service.stats("t", s)["writes"] == 1
            assert len(service.convs) <= 3 and len(service.pool.sessions) <= 3
    finally:
        service.stop()
