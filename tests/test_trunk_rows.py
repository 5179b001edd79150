"""Trunk outputs kept between writes: replayed examples skip the frozen layers, with the same results."""

from __future__ import annotations

import pytest
import torch

from tmem_runtime import Recipe, SessionPool, load_model
from tmem_runtime.trunk_rows import TrunkRows
from tmem_runtime.write import IGNORE_INDEX

RECIPE = Recipe(optimizer="adamw", lr=1e-2, epochs=3, batch_size=4)


def examples(n: int, seed: int, shared: int = 9) -> list[tuple[list[int], list[int]]]:
    """n examples of different lengths sharing a `shared`-token prefix, loss on their tails."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.randint(3, 500, (shared,), generator=torch.Generator().manual_seed(99)).tolist()
    out = []
    for _ in range(n):
        tail = torch.randint(3, 500, (int(torch.randint(4, 14, (), generator=gen)),), generator=gen).tolist()
        out.append((head + tail, [IGNORE_INDEX] * (shared + 2) + tail[2:]))
    return out


@pytest.fixture
def tiny():
    model, _ = load_model("tiny-llama")
    return model


def replaying_writes(model, trunk_cache_bytes: int) -> tuple[list[list[float]], dict, TrunkRows | None]:
    """Three writes of one session, each its new examples plus every earlier one (replay), as the agent does."""
    pool = SessionPool(model, capacity=2, trunk_cache_bytes=trunk_cache_bytes)
    pool.open("s")
    seen, losses = [], []
    for k in range(3):
        new = examples(4, seed=k)
        losses.append(pool.write_examples_many({"s": new + seen}, RECIPE, seed=k)["s"])
        seen += new
    state = pool.state_dict("s")
    pool.detach()
    return losses, state, pool.trunk_rows


def test_replayed_examples_reuse_their_trunk_and_train_the_same(tiny):
    want_losses, want_state, none = replaying_writes(tiny, 0)
    got_losses, got_state, rows = replaying_writes(tiny, 1 << 20)
    assert none is None
    assert (rows.hits, rows.misses) == (4 + 8, 12)  # writes 2 and 3 ran the trunk over their 4 new examples only
    assert len(rows.rows) == 12 and rows.bytes == sum(h.numel() * h.element_size() for _, h in rows.rows.values())
    got, want = torch.tensor(sum(got_losses, [])), torch.tensor(sum(want_losses, []))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for k, v in want_state.items():
        assert (got_state[k] - v).norm() <= 5e-5 * v.norm(), k  # AdamW: rounding of other GEMM sizes, as batched


def test_a_changed_trunk_weight_forgets_every_kept_row(tiny):
    pool = SessionPool(tiny, capacity=1)
    pool.open("s")
    cards = examples(3, seed=5)
    pool.write_examples_many({"s": cards}, RECIPE)["s"]
    with torch.no_grad():
        tiny.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # a trunk layer (the adapted ones are the last 4)
    pool.reset("s")
    after = pool.write_examples_many({"s": cards}, RECIPE)["s"]
    assert pool.trunk_rows.hits == 0 and pool.trunk_rows.misses == 6
    pool.detach()
    fresh = SessionPool(tiny, capacity=1, trunk_cache_bytes=0)
    fresh.open("s")
    torch.testing.assert_close(torch.tensor(after), torch.tensor(fresh.write_examples_many({"s": cards}, RECIPE)["s"]))


def test_kept_rows_stay_within_their_bytes_least_recently_used_out():
    layer = torch.nn.Linear(4, 4)
    rows = TrunkRows([layer], max_bytes=3 * 5 * 4 * 4)  # three rows of 5 x 4 floats
    for i in range(4):
        rows.put((i,) * 7, 2, torch.full((5, 4), float(i)))
    assert list(rows.rows) == [(1,) * 7, (2,) * 7, (3,) * 7] and rows.bytes == rows.max_bytes
    assert rows.get((0,) * 7, 2) is None  # dropped first
    torch.testing.assert_close(rows.get((1,) * 7, 4), torch.full((3, 4), 1.0))  # a later start: its tail
    assert rows.get((1,) * 7, 1) is None  # an earlier start than kept: positions missing
    rows.put((9,) * 7, 2, torch.zeros(5, 4))  # (1,)*7 was used last: (2,)*7 goes
    assert list(rows.rows) == [(3,) * 7, (1,) * 7, (9,) * 7]
    rows.put((8,) * 99, 0, torch.zeros(99, 4))  # larger than everything: not kept, nothing dropped
    assert len(rows.rows) == 3
    with torch.no_grad():
        layer.weight.add_(1)
    rows.validate()
    assert not rows.rows and rows.bytes == 0
    with pytest.raises(ValueError, match=">= 0"):
        TrunkRows([layer], -1)
