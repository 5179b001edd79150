"""The write's step loop: planned on the host, no host sync inside it, fixed shapes change no loss."""

from __future__ import annotations

import pytest
import torch

from tmem_runtime import FastWeights, load_model
from tmem_runtime.examples import collate
from tmem_runtime.recipes import Recipe
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
def tiny():
    model, _ = load_model("tiny-llama")
    return model


def test_fixed_shape_plans_give_the_same_losses(tiny):
    fw = FastWeights(tiny, init="random", backend="torch")
    cache = fw._encode_examples(examples(), pad_id=0)
    assert cache.prefix_len == 9
    schedule = [[3, 0, 5], [1], [2, 4]]
    exact = plan_steps(cache, schedule, fw.device)
    fixed = plan_steps(cache, schedule, fw.device, fixed_shapes=True)
    assert [p.width for p in exact] == [int(cache.lengths[r].max()) for r in schedule]
    assert {p.width for p in fixed} == {cache.hidden.shape[1]}
    assert len({p.targets.shape[0] for p in fixed}) == 1  # one target count: the largest step's
    with torch.no_grad():
        for a, b in zip(exact, fixed):
            want = adapted_loss(fw._decoder, fw.first_layer, cache, a)
            got = adapted_loss(fw._decoder, fw.first_layer, cache, b)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="shorter than the longest row"):
        plan_step(cache, [5], fw.device, width=2)
    with pytest.raises(ValueError, match="num_targets"):
        plan_step(cache, [5], fw.device, num_targets=1)
    fw.detach()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_write_steps_never_read_the_device(tiny, optimizer):
    """On the meta device any host read of a tensor (.item(), bool(), nonzero, .tolist()) raises, so
    running every step of a write there proves the loop issues no host sync (what CUDA graphs need)."""
    tiny.to("meta")
    fw = FastWeights(tiny, init="random", backend="torch")
    assert fw.device.type == "meta"
    pool = fw._encode_examples(examples(), pad_id=0)
    steps = [(pool, rows) for rows in ([0, 1, 2], [3, 4, 5], [5, 2])]
    recipe = Recipe(optimizer=optimizer, lr=1e-2)
    fw._begin_write(recipe, train_a=False)
    losses = fw._run_steps(steps, recipe)
    assert losses.device.type == "meta" and losses.shape == (3,)
    step = torch.zeros((), device="meta")  # the graph path counts AdamW's step on the device
    assert fw._counted_step(pool, plan_step(pool, [1, 2], fw.device), recipe, step).shape == ()
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_cuda_graph_write_matches_eager(optimizer):
    model, _ = load_model("tiny-llama")
    model.to("cuda")
    losses, states, stopped = [], [], []
    until = Recipe(optimizer=optimizer, lr=1e-2, epochs=20, batch_size=4, stop_loss=2.0)  # a host read per epoch
    for graphs in (False, True):
        fw = FastWeights(model, backend="auto", cuda_graphs=graphs)
        batches = [collate(examples(6, seed=s)) for s in range(3)]
        losses.append(fw.write(batches * 3, lr=1e-2, optimizer=optimizer))
        states.append(fw.state_dict())
        fw.reset()
        stopped.append(fw.write_examples(examples(6), until))
        fw.detach()
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-5)
    assert len(stopped[1]) == len(stopped[0]) and len(stopped[0]) % 2 == 0  # 2 steps per epoch
    torch.testing.assert_close(torch.tensor(stopped[1]), torch.tensor(stopped[0]), rtol=1e-4, atol=1e-5)
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


@pytest.mark.parametrize("backend", ["torch", "peft"])
def test_each_rows_loss_is_its_own_and_the_mean_is_hf_loss(tiny, backend):
    """The per-row losses a step reports (what `Recipe.stop_loss` reads) equal each row's loss run alone,
    and the step's mean is Hugging Face's causal-LM loss of the batch, on the fast and the generic path."""
    fw = FastWeights(tiny, init="random", backend=backend)
    exs = examples(5)
    order = [3, 0, 4, 1, 2]
    with torch.no_grad():
        want_mean = tiny(**collate([exs[i] for i in order])).loss
        want_rows = torch.stack([tiny(**collate([exs[i]])).loss for i in order])
        pool = fw._encode_examples(exs, pad_id=0)
        if backend == "peft":  # the reference pads its own batches and runs the model's forward
            cases = {"peft": (pool, torch.tensor(order))}
        else:
            cases = {
                "exact plan": (pool, plan_step(pool, order, fw.device)),
                "fixed-shape plan": (pool, plan_steps(pool, [order, [1]], fw.device, fixed_shapes=True)[0]),
                "generic path": (collate(exs), torch.tensor(order)),
            }
        for name, (step_pool, plan) in cases.items():
            mean, rows = fw._step_losses(step_pool, plan)
            torch.testing.assert_close(mean, want_mean, rtol=1e-5, atol=1e-6, msg=name)
            torch.testing.assert_close(rows, want_rows, rtol=1e-5, atol=1e-6, msg=name)
    fw.detach()


@pytest.mark.parametrize("backend", ["torch", "peft"])
def test_stop_loss_ends_the_write_after_the_first_epoch_with_every_example_below_it(tiny, backend):
    exs = examples(6)
    recipe = Recipe(optimizer="sgd", lr=0.5, epochs=8, batch_size=8)  # SGD: epoch-by-epoch writes = one write
    fw = FastWeights(tiny, backend=backend)
    pool = fw._encode_examples(exs, pad_id=0)
    every = torch.arange(6) if backend == "peft" else plan_step(pool, range(6), fw.device)
    worst = []  # each epoch's largest example loss, before that epoch's update
    for _ in range(recipe.epochs):
        with torch.no_grad():
            worst.append(float(fw._step_losses(pool, every)[1].max()))
        fw.write_examples(exs, recipe.with_(epochs=1))
    assert worst == sorted(worst, reverse=True), worst  # the test's premise: the worst loss falls
    threshold = (worst[2] + worst[3]) / 2
    fw.reset()
    assert len(fw.write_examples(exs, recipe.with_(stop_loss=threshold))) == 4  # epoch 4 is the first below
    fw.reset()
    assert len(fw.write_examples(exs, recipe.with_(stop_loss=1e-9))) == 8  # never below: the cap
    fw.reset()
    # several steps per epoch: the check runs only at epoch ends (2 steps of 4 + 2 rows here)
    assert len(fw.write_examples(exs, recipe.with_(batch_size=4, stop_loss=1e9))) == 2
    assert len(fw.write([collate(exs)] * 3, lr=0.5)) == 3  # write(batches): one step per batch, no stop rule
    fw.detach()
    with pytest.raises(ValueError, match="stop_loss"):
        Recipe(stop_loss=0.0)
