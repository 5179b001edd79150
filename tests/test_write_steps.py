"""The write's step loop: planned on the host, no host sync inside it, fixed shapes change no loss."""

from __future__ import annotations

import pytest
import torch

from tmem_runtime import FastWeights, load_model
from tmem_runtime import write as write_module
from tmem_runtime.examples import collate
from tmem_runtime.recipes import Recipe
from tmem_runtime.trainer import Workspace, WriteRun
from tmem_runtime.write import IGNORE_INDEX, adapted_loss, plan_step, plan_steps


def examples(n: int = 6, shared: int = 9, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """n examples of different lengths sharing a `shared`-token prefix, loss on each tail."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.randint(0, 500, (shared,), generator=gen).tolist()
    out = []
    for i in range(n):
        tail = torch.randint(0, 500, (5 + 3 * i,), generator=gen).tolist()
        out.append((head + tail, [IGNORE_INDEX] * (shared + 2) + tail[2:]))
    return out


@pytest.fixture
def tiny(device):
    model, _ = load_model("tiny-llama")
    return model.to(device)


def test_fixed_shape_plans_give_the_same_losses(tiny):
    fw = FastWeights(tiny, init="random", backend="torch")
    engine, device = fw.store.engine, fw.device
    cache = fw.store._encode(collate(examples()))
    assert cache.prefix_len == 9
    schedule = [[3, 0, 5], [1], [2, 4]]
    exact = plan_steps(cache, schedule, device)
    fixed = plan_steps(cache, schedule, device, fixed_shapes=True)
    assert [p.width for p in exact] == [int(cache.lengths[r].max()) for r in schedule]
    assert {p.width for p in fixed} == {cache.hidden.shape[1]}
    assert len({p.targets.shape[0] for p in fixed}) == 1  # one target count: the largest step's
    with torch.no_grad():
        for a, b in zip(exact, fixed):
            want, _ = adapted_loss(engine.decoder, engine.first_layer, cache, a)
            got, _ = adapted_loss(engine.decoder, engine.first_layer, cache, b)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="shorter than the longest row"):
        plan_step(cache, [5], device, width=2)
    with pytest.raises(ValueError, match="num_targets"):
        plan_step(cache, [5], device, num_targets=1)
    fw.detach()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_write_steps_never_read_the_device(tiny, optimizer):
    """On the meta device any host read of a tensor (.item(), bool(), nonzero, .tolist()) raises, so
    running every step of a write there proves the loop issues no host sync (what CUDA graphs need)."""
    tiny.to("meta")
    fw = FastWeights(tiny, init="random", backend="torch")
    engine = fw.store.engine
    assert fw.device.type == "meta"
    cache = fw.store._encode(collate(examples()))
    recipe = Recipe(optimizer=optimizer, lr=1e-2)
    run = WriteRun(engine, cache, [[[0, 1, 2], [3, 4, 5], [5, 2]]], [0], recipe)
    run.ws = Workspace(engine, [0], train_a=False)
    losses = run.run_steps()
    assert losses.device.type == "meta" and losses.shape == (3, 1)
    step = torch.zeros((), device="meta")  # the graph path counts AdamW's step on the device
    assert run._counted_step(plan_step(cache, [1, 2], fw.device), step).shape == (1,)
    with pytest.raises((RuntimeError, NotImplementedError)):
        losses.tolist()  # the one sync of a write happens after the loop
    fw.detach()


def test_a_write_is_atomic_when_a_later_step_goes_non_finite(tiny):
    """Step 1 is finite, step 2's batch makes the loss inf: the whole write rolls back."""
    fw = FastWeights(tiny, backend="torch")
    fw.write([collate(examples(3))], lr=1e-2, optimizer="adamw")
    before = fw.state_dict()
    good = collate(examples(3, seed=1))
    with torch.no_grad():
        emb = tiny.model.embed_tokens.weight
        saved = emb.clone()
        bad = dict(good)
        bad["input_ids"] = good["input_ids"].clone()
        bad["input_ids"][:, -1] = 511  # poison one embedding row that only the second batch reads
        emb[511] = float("inf")
    try:
        with pytest.raises(Exception, match="write step 2 produced loss"):
            fw.write([good, bad], lr=1e-2, optimizer="adamw")
    finally:
        with torch.no_grad():
            emb.copy_(saved)
    assert all(torch.equal(fw.state_dict()[k], before[k]) for k in before)
    fw.detach()


@pytest.mark.cuda
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_cuda_graph_write_matches_eager(optimizer, tiny):
    model = tiny
    losses, states = [], []
    for graphs in (False, True):
        fw = FastWeights(model, backend="auto", cuda_graphs=graphs)
        batches = [collate(examples(6, seed=s)) for s in range(3)]
        losses.append(fw.write(batches * 3, lr=1e-2, optimizer=optimizer))
        states.append(fw.state_dict())
        fw.detach()
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-5)
    for k in states[0]:
        torch.testing.assert_close(states[1][k], states[0][k], rtol=1e-3, atol=1e-5)


def test_an_error_mid_write_leaves_the_adapter_as_it_was(tiny):
    fw = FastWeights(tiny, backend="torch")
    fw.write([collate(examples(3))], lr=1e-2, optimizer="adamw")
    before = fw.state_dict()

    def stop_at_step_2(step: int, n: int | None, loss: float) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fw.write([collate(examples(3, seed=s)) for s in range(3)], lr=1e-2, optimizer="adamw", on_step=stop_at_step_2)
    assert all(torch.equal(fw.state_dict()[k], before[k]) for k in before)
    fw.detach()


def test_a_big_head_runs_the_chunked_cross_entropy_with_the_same_losses(tiny, monkeypatch):
    """Past CHUNKED_HEAD_LOGITS (K x V) the head's loss is chunked (no [K, V] logits): same losses."""
    batches = [collate(examples(4, seed=s)) for s in range(2)] * 2
    fw = FastWeights(tiny, backend="torch", cuda_graphs=False)  # counts Python calls: a graph replays without them
    plain = fw.write(batches, lr=1e-2, optimizer="adamw")
    fw.reset()
    calls = []
    original = write_module.linear_cross_entropy
    monkeypatch.setattr(write_module, "linear_cross_entropy", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(write_module, "CHUNKED_HEAD_LOGITS", 0)
    chunked = fw.write(batches, lr=1e-2, optimizer="adamw")
    assert len(calls) == len(batches)
    torch.testing.assert_close(torch.tensor(chunked), torch.tensor(plain), rtol=1e-5, atol=1e-6)
    fw.detach()
