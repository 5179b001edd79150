"""The write's step loop: planned on the host, no host sync inside it, fixed shapes change no loss."""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tmem_runtime import FastWeights, SessionPool, fused_layers, load_model, static_write
from tmem_runtime import decoder as decoder_module
from tmem_runtime import write as write_module
from tmem_runtime.examples import collate
from tmem_runtime.recipes import Recipe
from tmem_runtime.static_write import StaticWrites
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


@pytest.mark.parametrize("chunk_tokens", [1, 30, 4096])
def test_trunk_chunks_give_the_rows_of_one_pass(tiny, chunk_tokens):
    """The trunk runs the rows in chunks of about `chunk_tokens` padded tokens (one row at least): every
    chunking gives each row the trunk output of a single pass over all rows."""
    fw = FastWeights(tiny, backend="torch")
    e = fw.store.engine
    batch = collate(examples(7))
    lengths = batch["attention_mask"].sum(dim=1)
    args = (e.decoder, e.first_layer, batch["input_ids"], lengths, batch["labels"], fw.device)
    whole = write_module.encode_trunk(*args, chunk_tokens=10**6)
    got = write_module.encode_trunk(*args, chunk_tokens=chunk_tokens)
    assert torch.equal(got.lengths, whole.lengths) and torch.equal(got.labels, whole.labels)
    torch.testing.assert_close(got.prefix_hidden, whole.prefix_hidden, rtol=0, atol=0)
    for i, n in enumerate(got.lengths.tolist()):
        torch.testing.assert_close(got.hidden[i, :n], whole.hidden[i, :n], rtol=1e-5, atol=1e-6)
    fw.detach()


def test_adapted_mlps_run_only_real_tokens(tiny):
    """A step's padding never reaches an adapted MLP (the prefix once per session, then the rows' real
    tokens); a fixed-shape step runs them then one padding position up to its fixed token count, and
    neither changes a loss or a gradient."""
    fw = FastWeights(tiny, init="random", backend="torch")
    engine, device = fw.store.engine, fw.device
    cache = fw.store._encode(collate(examples()))
    groups = [(0, [3, 0]), (1, [5, 1, 2])]  # two sessions' rows in one step, lengths 5 to 20
    exact = write_module.plan_group_step(cache, groups, device)
    real = int(cache.lengths[[3, 0, 5, 1, 2]].sum())
    tokens = write_module.round_up(real, write_module.TOKEN_BUCKET)
    fixed = write_module.plan_group_step(cache, groups, device, cache.hidden.shape[1], 64, tokens)
    assert exact.token_index is not None and exact.token_index.shape[0] == real
    assert fixed.token_index.shape[0] == tokens and torch.equal(fixed.token_index[:real], exact.token_index)
    pad = fixed.token_index[real:]  # one padding position again and again: beyond its row's length
    assert len(set(pad.tolist())) == 1 and pad[0] % cache.hidden.shape[1] >= cache.lengths[[3, 0, 5, 1, 2]][
        pad[0] // cache.hidden.shape[1]]  # fmt: skip
    assert exact.seg_indptr.tolist() == [0, 9, 18, 18 + int(cache.lengths[[3, 0]].sum()), 18 + real]
    assert fixed.seg_indptr.tolist() == exact.seg_indptr.tolist()[:-1] + [18 + tokens]  # the padding: last group
    seen, attended = [], []
    adapted = engine.decoder.layers[engine.first_layer:]
    hooks = [layer.mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0])) for layer in adapted]
    attention_hooks = [layer.self_attn.register_forward_hook(lambda m, args, out, i=i: attended.append(i))
                       for i, layer in enumerate(adapted)]  # fmt: skip
    ws = Workspace(engine, [0, 0], train_a=False)  # two workspace sessions, both from the one row
    results = []
    for plan in (exact, fixed):
        seen.clear(), attended.clear()
        binding = ws.binding(plan.seg_indptr, plan.seg_slot, plan.slots, True, None)
        with torch.enable_grad(), engine.bindings.bind(binding):
            total, per_group = adapted_loss(engine.decoder, engine.first_layer, cache, plan)
            grads = torch.autograd.grad(total, list(ws.leaves))
        results.append((per_group.detach(), grads, list(seen)))
        # the first adapted layer's attention is the trunk's (cached); the others run on the prefixes, then the rows
        assert sorted(attended) == [1, 1, 2, 2, 3, 3]
    for h in hooks + attention_hooks:
        h.remove()
    assert results[0][2] == [2 * 9 + real] * len(hooks)
    assert results[1][2] == [2 * 9 + tokens] * len(hooks)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
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


# writes of 6, 5, 6, 11, 3 and 6 cards: suffix widths 20, 17, 20, 35, 11, 20 -> buckets 32, 32, 32, 64, 32, 32
WRITE_SIZES = [(6, 1), (5, 2), (6, 3), (11, 4), (3, 5), (6, 6)]


def _writes(
    model, recipe: Recipe, static: str, backend: str = "torch"
) -> tuple[list[list[float]], dict[str, torch.Tensor], object]:
    """The WRITE_SIZES writes into one FastWeights; static: "none" (plain), "kept" (the graphed path's
    buffers kept per bucket, eager steps), "fresh" (the same, new buffers for every write) or "graphs"
    (the default on CUDA)."""
    fw = FastWeights(model, backend=backend, cuda_graphs=static == "graphs")
    if static in ("kept", "fresh"):  # what the pool builds on CUDA, here without graphs
        fw.store._static = StaticWrites(fw.store.engine, graphs=False)
    losses = []
    for n, seed in WRITE_SIZES:
        if static == "fresh":
            fw.store._static.buckets.clear()
        losses.append(fw.write_examples(examples(n, seed=seed), recipe))
    state, buckets = fw.state_dict(), fw.store._static
    fw.detach()
    return losses, state, buckets


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.5), ("adamw", 1e-2)])
def test_writes_on_kept_buffers_equal_plain_writes(tiny, optimizer, lr, monkeypatch):
    """Six writes through the buffers a graphed write keeps per shape bucket (copied in, padded to the
    bucket, reused by later writes of the bucket, the oldest bucket dropped past MAX_BUCKETS): bit for
    bit the writes on fresh buffers, and the losses and B of plain writes. Padding adds zero to every
    gradient, but other GEMM shapes round differently: SGD keeps B to 1e-6; AdamW's per-element scaling
    turns rounding-level gradients (of elements whose true gradient is ~0) into whole steps (1.4%)."""
    monkeypatch.setattr(static_write, "MAX_BUCKETS", 1)  # the 64-wide write evicts the 32-wide bucket
    recipe = Recipe(optimizer=optimizer, lr=lr, epochs=2, batch_size=4)
    plain, plain_state, _ = _writes(tiny, recipe, "none")
    kept, kept_state, buckets = _writes(tiny, recipe, "kept")
    fresh, fresh_state, _ = _writes(tiny, recipe, "fresh")
    assert [k[1] for k in buckets.buckets] == [32]  # one bucket kept: the last write's
    assert kept == fresh and all(torch.equal(kept_state[k], v) for k, v in fresh_state.items())
    for a, b in zip(kept, plain):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)
    if optimizer == "sgd":
        for k, v in plain_state.items():
            assert (kept_state[k] - v).norm() <= 1e-6 * v.norm(), k


def test_writes_of_one_bucket_share_its_buffers(tiny):
    fw = FastWeights(tiny, backend="torch")
    fw.store._static = kept = StaticWrites(fw.store.engine, graphs=False)
    fw.write_examples(examples(6, seed=1), Recipe(lr=1e-2, epochs=1))
    (bucket,) = kept.buckets.values()
    assert bucket.hidden.shape[:2] == (16, 32) and bucket.prefix_hidden.shape[1] == 9
    fw.write_examples(examples(5, seed=2), Recipe(lr=1e-2, epochs=1))  # 5 rows, 17 wide: the same bucket
    assert list(kept.buckets.values()) == [bucket]
    fw.write_examples(examples(5, seed=2), Recipe(lr=2e-2, epochs=1))  # another lr: a constant of the graphs
    assert len(kept.buckets) == 2
    fw.detach()


@pytest.mark.parametrize("device_segments", [True, False])
def test_steps_that_split_their_rows_differently_share_a_signature_where_segments_are_read_on_the_device(
    tiny, device_segments
):
    """Two steps of 5 rows of two sessions, split 1 + 4 and 4 + 1: one signature (one CUDA graph) where the
    kernels read the segments on the device, whose split is then only in the step's tensors; two where
    kernels take them on the host. A copy into the first step's batch takes the second's tensors and its
    host fields (group sizes, host segments), so a replay, or the CPU trace checker, runs the second step."""
    fw = FastWeights(tiny, backend="torch")
    cache = fw.store._encode(collate(examples()))
    tokens = write_module.round_up(int(cache.lengths[:5].sum()), write_module.TOKEN_BUCKET)
    shape = (cache.hidden.shape[1], 128, tokens, device_segments)
    a = write_module.plan_group_step(cache, [(0, [0]), (1, [1, 2, 3, 4])], fw.device, *shape)
    b = write_module.plan_group_step(cache, [(0, [4, 3, 2, 1]), (1, [0])], fw.device, *shape)
    assert (a.signature == b.signature) == device_segments
    assert a.seg_indptr.shape == b.seg_indptr.shape and not torch.equal(a.seg_indptr, b.seg_indptr)
    if device_segments:
        static = a.clone()
        static.copy_(b)
        assert static.groups == b.groups == (4, 1) and static.host_segments is b.host_segments
        for name, got, want in zip(static.TENSORS, static.tensors_or_none(), b.tensors_or_none()):
            assert (got is None and want is None) or torch.equal(got, want), name
    fw.detach()


def test_batched_writes_of_varying_cards_keep_a_bounded_set_of_graph_keys(tiny, monkeypatch):
    """120 batched writes of 4 sessions of 1 to 12 cards each through the Triton kernels (which read the
    segments on the device): a bucket's graph keys (`StepBatch.signature`) are its steps' row and session
    counts and its writes' target and token counts, however the rows split among the sessions. Here every
    bucket stays within MAX_GRAPHS (so none drops a graph: each key is captured once, when first seen), and
    the last 40 writes capture a graph for fewer than 1 step in 10; keyed by the splits, the largest bucket
    would need more than twice as many keys and those writes would capture for 1 step in 5 at least (without
    the cap's drops). The steps are planned, not run (the keys are the plans' signatures)."""
    from benchmarks.common import prefixed_examples
    from tmem_runtime.cuda_graphs import MAX_GRAPHS

    planned = []  # (bucket, write, signature, group sizes) of every step

    def plan_only(run: WriteRun, on_step: object = None) -> torch.Tensor:
        plans = run.plans()
        planned.extend((run.static, write, p.signature, p.groups) for p in plans)
        return torch.zeros(len(plans), len(run.slots), device=run.engine.device)  # (finite, not diverging)

    monkeypatch.setattr(WriteRun, "run_steps", plan_only)
    pool = SessionPool(tiny, capacity=4, backend="triton")
    pool._static = StaticWrites(pool.engine, graphs=False)  # (a pool keeps them on CUDA only)
    assert pool.engine.device_segments
    for s in "abcd":
        pool.open(s)
    recipe = Recipe(optimizer="adamw", lr=1e-2, epochs=2, batch_size=4)
    cards = torch.randint(1, 13, (120, 4), generator=torch.Generator().manual_seed(0)).tolist()
    for write, counts in enumerate(cards):
        written = {s: prefixed_examples(n, 10 * write + i) for i, (s, n) in enumerate(zip("abcd", counts))}
        pool.write_examples_many(written, recipe, seed=write)
    pool.detach()
    keys, by_split = {}, {}  # {(bucket, key): the write that first ran it}, the same keyed by the splits too
    for bucket, write, signature, groups in planned:
        keys.setdefault((id(bucket), signature), write)
        by_split.setdefault((id(bucket), signature, groups), write)
    per_bucket = Counter(b for b, _ in keys)
    per_bucket_by_split = Counter(b for b, _, _ in by_split)
    assert max(per_bucket.values()) <= MAX_GRAPHS, per_bucket
    assert max(per_bucket_by_split.values()) > 2 * max(per_bucket.values()), (per_bucket, per_bucket_by_split)
    late = sum(write >= 80 for _, write, _, _ in planned)
    captured, captured_by_split = (sum(w >= 80 for w in k.values()) for k in (keys, by_split))
    assert captured * 10 < late < captured_by_split * 5, (captured, captured_by_split, late)


def test_static_buffers_are_made_outside_inference_mode_and_dropped_when_a_weight_moves(tiny):
    """A graph reads fixed addresses: a write after a model weight moved (same values, new storage) must not
    replay buckets made before. Buckets made by a write called inside inference mode are normal tensors
    (a later write outside it copies into them)."""
    fw = FastWeights(tiny, backend="torch")
    fw.store._static = kept = StaticWrites(fw.store.engine, graphs=False)
    cards, recipe = examples(6, seed=1), Recipe(lr=1e-2, epochs=1)
    with torch.inference_mode():
        first = fw.write_examples(cards, recipe)
    (bucket,) = kept.buckets.values()
    assert not bucket.hidden.is_inference() and not bucket.step.is_inference()
    fw.reset()
    assert fw.write_examples(cards, recipe) == first and list(kept.buckets.values()) == [bucket]
    norm = tiny.model.norm
    norm.weight.data = norm.weight.data.clone()  # the same values somewhere else
    fw.reset()
    assert fw.write_examples(cards, recipe) == first
    (fresh,) = kept.buckets.values()
    assert fresh is not bucket
    fw.detach()


class _KeptBuffersPool(SessionPool):
    """A pool that keeps its writes' buffers per bucket (StaticWrites) on any device, as a pool on CUDA
    does, here without graphs: so its copies build their own StaticWrites in __setstate__ on the CPU too."""

    def _init_static(self) -> None:
        self._static = StaticWrites(self.engine, graphs=False)


def test_a_deepcopy_builds_its_kept_buffers_without_reading_the_model_being_copied(tiny):
    """copy.deepcopy of a model whose pool keeps write buffers (every pool on CUDA): the copy's pool makes
    its own StaticWrites in __setstate__, while deepcopy is still rebuilding the model (not a model to read
    yet), and its writes through them give the original's losses and B."""
    pool = _KeptBuffersPool(tiny, capacity=2, backend="torch")
    recipe = Recipe(lr=1e-2, epochs=2)
    pool.open("s")
    pool.write_examples_many({"s": examples(6, seed=1)}, recipe)  # the original has a bucket
    twin = copy.deepcopy(tiny)
    copied = twin._tmem_fast_weights
    assert isinstance(copied, _KeptBuffersPool) and copied.engine.model is twin
    assert copied._static.engine is copied.engine and not copied._static.buckets
    cards = {"s": examples(5, seed=2)}
    losses = pool.write_examples_many(cards, recipe)
    torch.testing.assert_close(copied.write_examples_many(cards, recipe), losses, rtol=1e-6, atol=1e-6)
    ((key, bucket),) = copied._static.buckets.items()  # its own buffers, for the bucket the original uses
    assert list(pool._static.buckets) == [key]
    assert bucket.hidden.data_ptr() != pool._static.buckets[key].hidden.data_ptr()
    copied_state = copied.state_dict("s")
    for k, v in pool.state_dict("s").items():
        torch.testing.assert_close(copied_state[k], v, rtol=1e-6, atol=1e-7)
    copied.detach()
    pool.detach()


# graphed vs eager steps on CUDA: the same kernels, but reductions with atomics may round differently;
# AdamW's per-element scaling turns that into whole steps for elements whose gradient is ~0 (1.4% of B's
# norm measured for padded vs unpadded shapes on the CPU). The losses, compared to 1e-5, catch a stale
# buffer: every later write's losses read the B the earlier ones left.
B_TOLERANCE = {"sgd": 1e-5, "adamw": 3e-2}


@pytest.mark.cuda
@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.5), ("adamw", 1e-2)])
def test_graphs_replayed_across_writes_match_eager_writes(tiny, optimizer, lr):
    """On CUDA the writes replay graphs that earlier writes of their bucket captured: the same losses and
    B as eager steps on the same buffers (same kernels, same shapes)."""
    recipe = Recipe(optimizer=optimizer, lr=lr, epochs=2, batch_size=4)
    eager, eager_state, _ = _writes(tiny, recipe, "kept", backend="auto")
    graphed, graphed_state, buckets = _writes(tiny, recipe, "graphs", backend="auto")
    assert sorted(k[1] for k in buckets.buckets) == [32, 64]
    for a, b in zip(graphed, eager):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)
    tol = B_TOLERANCE[optimizer]
    for k, v in eager_state.items():
        assert (graphed_state[k] - v).norm() <= tol * v.norm(), k


@pytest.mark.cuda
def test_graphs_past_the_cap_are_dropped_and_captured_again_with_the_same_results(tiny, monkeypatch):
    """A bucket keeps at most MAX_GRAPHS graphs (here 1): the writes drop and capture graphs again as their
    step shapes alternate, with the same losses and B as eager steps on the same buffers."""
    from tmem_runtime import cuda_graphs

    recipe = Recipe(optimizer="sgd", lr=0.5, epochs=2, batch_size=3)  # steps of 3 rows, then the rest
    eager, eager_state, _ = _writes(tiny, recipe, "kept", backend="auto")
    monkeypatch.setattr(cuda_graphs, "MAX_GRAPHS", 1)
    graphed, graphed_state, kept = _writes(tiny, recipe, "graphs", backend="auto")
    assert all(len(bucket.graphs.graphs) <= 1 for bucket in kept.buckets.values())
    for a, b in zip(graphed, eager):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)
    for k, v in eager_state.items():
        assert (graphed_state[k] - v).norm() <= B_TOLERANCE["sgd"] * v.norm(), k


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


@pytest.mark.parametrize("sessions", [1, 3])
def test_the_chunked_head_loss_gives_the_losses_of_the_full_logits(tiny, monkeypatch, sessions):
    """The head's loss through `linear_cross_entropy_rows` (on the CPU always; elsewhere past
    CHUNKED_HEAD_LOGITS) gives the per-step losses of the full [K, V] logits, for one session and for a
    batched write of several (each its own mean)."""
    per_session = {f"s{i}": examples(3 + i, seed=i) for i in range(sessions)}
    recipe = Recipe(optimizer="sgd", lr=0.5, epochs=2, batch_size=2)  # (SGD: B linear in the gradients)

    def write(chunked: bool) -> dict:
        monkeypatch.setattr(write_module, "chunked_head", lambda *a: chunked)
        pool = SessionPool(tiny, capacity=sessions, backend="torch", cuda_graphs=False)
        for s in per_session:
            pool.open(s)
        calls = []
        original = write_module.linear_cross_entropy_rows
        counted = lambda *a, **k: calls.append(1) or original(*a, **k)  # noqa: E731
        monkeypatch.setattr(write_module, "linear_cross_entropy_rows", counted)
        losses = pool.write_examples_many(per_session, recipe)
        monkeypatch.setattr(write_module, "linear_cross_entropy_rows", original)
        assert bool(calls) == chunked
        state = {s: pool.state_dict(s) for s in per_session}
        pool.detach()
        return losses, state

    (chunked, chunked_state), (plain, plain_state) = write(True), write(False)
    for s in per_session:
        torch.testing.assert_close(torch.tensor(chunked[s]), torch.tensor(plain[s]), rtol=1e-5, atol=1e-6)
        for k in plain_state[s]:
            torch.testing.assert_close(chunked_state[s][k], plain_state[s][k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.5), ("adamw", 1e-2)])
def test_the_decoders_norms_through_the_fused_op_give_the_modules_writes(name, optimizer, lr, device, monkeypatch):
    """The norms the Decoder calls itself (each adapted layer's two, the final one) run `tmem_kernels.rms_norm`
    (on CUDA; here on the CPU too, forced); a write gives the losses and B of the same write through the HF
    modules (the forward is bit for bit the module's on the CPU; the backward's formula rounds otherwise:
    SGD's B within 1e-6, AdamW's, whose per-element scaling amplifies rounding-level gradients, within 1e-3;
    measured 3.5e-7 and 6.1e-5 on the CPU. On CUDA the Triton forward rounds otherwise too: AdamW within 2e-2,
    as the kept-buffers test allows for other GEMM shapes; not yet measured there)."""
    model = load_model(name)[0].to(device)
    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
    recipe = Recipe(optimizer=optimizer, lr=lr, epochs=2, batch_size=4)
    got, got_state, want, want_state = _writes_with_and_without(model, recipe, monkeypatch, "_fused_rms_norm",
                                                                "fused_norm")  # fmt: skip
    for a, b in zip(got, want):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)
    for k, v in want_state.items():
        adamw_tol = 1e-3 if device.type == "cpu" else 2e-2
        assert (got_state[k] - v).norm() <= (1e-6 if optimizer == "sgd" else adamw_tol) * v.norm(), k


def _writes_with_and_without(  # noqa: ANN001
    model, recipe: Recipe, monkeypatch, counted: str, switch: str, replacement=lambda *_: False
) -> tuple:
    """The same writes twice: with fused_layers' `counted` function in use (checked: it ran), then with its
    `switch` function replaced (by default a predicate saying no everywhere; checked: `counted` did not run).
    (losses, B) of each."""
    calls = []
    fn = getattr(fused_layers, counted)
    monkeypatch.setattr(fused_layers, counted, lambda *a: calls.append(1) or fn(*a))
    got, got_state, _ = _writes(model, recipe, "none")
    assert calls, f"the write never ran {counted}"
    calls.clear()
    monkeypatch.setattr(fused_layers, switch, replacement)
    want, want_state, _ = _writes(model, recipe, "none")
    assert not calls
    return got, got_state, want, want_state


def _assert_same_writes(got: list, got_state: dict, want: list, want_state: dict, device: torch.device) -> None:
    """Two writes' losses and states: bit for bit on the CPU (the ops' CPU paths are HF's compositions); on CUDA
    the losses to 1e-5 and each state within 1e-6 of its norm (the Triton norm and rotary round otherwise)."""
    if device.type == "cpu":
        assert got == want
        assert all(torch.equal(got_state[k], v) for k, v in want_state.items())
    else:
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-6)
        for k, v in want_state.items():
            assert (got_state[k] - v).norm() <= 1e-6 * v.norm(), k


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
@pytest.mark.parametrize("kernel", ["composition", "triton"])
def test_the_decoders_own_attention_gives_the_modules_writes(name, kernel, device, monkeypatch):
    """The adapted layers' attention the Decoder runs itself (`fused_layers.attention`, the rotary as `tmem::rope`;
    on CUDA, here on the CPU too, forced; the op's Triton kernels forced too for "triton") gives the losses and
    B of the same writes through HF's attention modules: on the CPU bit for bit (the same ops, the op's
    backward rounding as autograd's), on CUDA SGD's B within 1e-6 (the fp32 Triton rotary may fuse a product
    into its add)."""
    from tmem_kernels import rotary

    if kernel == "triton":
        pytest.importorskip("triton")
        monkeypatch.setattr(rotary, "use_triton", lambda q, k, c, s: len({q.dtype, k.dtype, c.dtype, s.dtype}) == 1)
    model = load_model(name)[0].to(device)
    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
    recipe = Recipe(optimizer="sgd", lr=0.5, epochs=2, batch_size=4)
    rotary_op = "_fused_qk_norm_rope" if name == "tiny-qwen3" else "_fused_rope"  # (Qwen3's: with its q/k norms)
    got, got_state, want, want_state = _writes_with_and_without(model, recipe, monkeypatch, rotary_op,
                                                                "own_attention")  # fmt: skip
    _assert_same_writes(got, got_state, want, want_state, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["composition", "triton"])
def test_qwen3s_norms_and_rotary_as_one_op_give_the_writes_of_the_two_ops(kernel, dtype, device, monkeypatch):
    """tiny-qwen3's attentions in a write (the trunk's, and the adapted layers' whose norms the engine routes:
    `Decoder.routed_norms`) with the q/k norms and the rotary as one op (`fused_qk_norm_rope`, on CUDA; here on the CPU
    too, forced; "triton": the norm's, the rotary's and that op's Triton kernels forced) give the losses and B
    of the writes through the two ops (`rms_norm`, `rope`: the path before it): bit for bit on the CPU."""
    from tmem_kernels import qknorm_rope, rmsnorm, rotary

    if kernel == "triton":
        pytest.importorskip("triton")
        monkeypatch.setattr(rmsnorm, "use_triton", lambda x: x.dtype != torch.float64)
        monkeypatch.setattr(rotary, "use_triton", lambda q, k, c, s: len({q.dtype, k.dtype, c.dtype, s.dtype}) == 1)
        monkeypatch.setattr(qknorm_rope, "use_triton", lambda *ts: len({t.dtype for t in ts}) == 1)
    model = _qwen3_with_norm_weights(device, dtype)
    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
    recipe = Recipe(optimizer="sgd", lr=0.5, epochs=2, batch_size=4)
    fused = []  # (module, whether it ran as one op, under grad) of every own attention
    real = fused_layers.fused_qk_norm_rope

    def recorded(module: torch.nn.Module, device: torch.device, routed: tuple = ()) -> bool:
        fused.append((module, real(module, device, routed), torch.is_grad_enabled()))
        return fused[-1][1]

    monkeypatch.setattr(fused_layers, "fused_qk_norm_rope", recorded)
    got, got_state, _ = _writes(model, recipe, "none")
    # every attention as one op: the adapted layers' in write steps (under grad) and the trunk's (without grad,
    # the first adapted layer's attention half among them)
    assert any(grad for *_, grad in fused) and any(not grad for *_, grad in fused)
    assert all(ran for _, ran, _ in fused)
    monkeypatch.setattr(fused_layers, "fused_qk_norm_rope", lambda *_: False)
    want, want_state, _ = _writes(model, recipe, "none")
    _assert_same_writes(got, got_state, want, want_state, device)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_the_trunks_halved_layers_give_the_modules_writes(name, device, monkeypatch):
    """The trunk's layers run as the Decoder's halves (`runs_as_halves`: fused norms, q/k norms included, and
    the own attention; on CUDA, here on the CPU too, forced) give the losses and B of the same writes whose
    trunk calls HF's layer modules: on the CPU bit for bit (the ops' CPU forwards are HF's compositions, and
    the trunk runs no backward); on CUDA within the fused norm's write tolerances (not yet measured there)."""
    model = _qwen3_with_norm_weights(device) if name == "tiny-qwen3" else load_model(name)[0].to(device)
    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
    recipe = Recipe(optimizer="sgd", lr=0.5, epochs=2, batch_size=4)
    seen = []
    real = fused_layers.runs_as_halves
    monkeypatch.setattr(fused_layers, "runs_as_halves", lambda layer: seen.append(real(layer)) or seen[-1])
    got, got_state, _ = _writes(model, recipe, "none")
    assert seen and all(seen)  # every trunk layer of every write ran as halves
    monkeypatch.setattr(fused_layers, "runs_as_halves", lambda layer: False)
    want, want_state, _ = _writes(model, recipe, "none")
    _assert_same_writes(got, got_state, want, want_state, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_the_trunks_fused_residual_add_and_norm_give_the_same_writes(name, dtype, device, monkeypatch):
    """The trunk's halves with each residual add and the next norm one op (`fused_layers.add_rms_norm`:
    `tmem::add_rms_norm`; CUDA's structure forced on the CPU, the norms' Triton kernels too, under the
    interpreter) give the losses and B of the same writes whose trunk adds, then runs `tmem::rms_norm`:
    bit for bit (the fused forward rounds the sum as torch's add and normalises it with the norm kernel's lines;
    the trunk runs no backward)."""
    from tmem_kernels import rmsnorm

    pytest.importorskip("triton")
    monkeypatch.setattr(rmsnorm, "use_triton", lambda x: x.dtype != torch.float64)
    model = _qwen3_with_norm_weights(device, dtype) if name == "tiny-qwen3" else load_model(name)[0].to(device, dtype)
    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
    recipe = Recipe(optimizer="sgd", lr=0.5, epochs=2, batch_size=4)

    def unfused(module, hidden, delta):  # the halves before the fused op: torch's add, then the norm op
        hidden = hidden + delta
        return fused_layers.rms_norm(module, hidden), hidden

    got, got_state, want, want_state = _writes_with_and_without(model, recipe, monkeypatch, "_fused_add_rms_norm",
                                                                "add_rms_norm", unfused)  # fmt: skip
    assert got == want
    assert all(torch.equal(got_state[k], v) for k, v in want_state.items())


def _swiglu_calls(monkeypatch) -> tuple[list[int], list[int]]:
    """Records the fused SwiGLU op's calls: the Decoder's frozen MLPs' (`fused_layers._fused_swiglu`) and the
    engine's adapted MLPs' (`engine.lora_mlp_composed`, whose SiLU is the op's): two lists, one entry per call."""
    from tmem_runtime import engine as engine_module

    trunk, steps = [], []
    real_trunk, real_steps = fused_layers._fused_swiglu, engine_module.lora_mlp_composed
    monkeypatch.setattr(fused_layers, "_fused_swiglu", lambda *a: trunk.append(1) or real_trunk(*a))
    monkeypatch.setattr(engine_module, "lora_mlp_composed", lambda *a: steps.append(1) or real_steps(*a))
    return trunk, steps


def _relative_errors(losses: list, state: dict, truth: list, truth_state: dict) -> tuple[float, float]:
    """(largest relative error of a loss, of a B tensor's norm) of a write against another (float64) write."""
    flat = lambda ls: torch.tensor([v for step in ls for v in step], dtype=torch.float64)  # noqa: E731
    got, want = flat(losses), flat(truth)
    loss_error = ((got - want).abs() / want.abs()).max().item()
    b_error = max(((state[k].double() - v.double()).norm() / v.double().norm()).item() for k, v in truth_state.items())
    return loss_error, b_error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["composition", "triton"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_the_fused_swiglu_gives_the_writes_of_torchs_composition(name, kernel, dtype, device, monkeypatch):
    """silu(gate) * up as `tmem::swiglu` in a write: the trunk's frozen MLPs (`fused_layers.mlp`) and the torch
    backend's adapted MLPs in every step (`tmem_kernels.lora_mlp_composed`: its SiLU the op's, its backward's
    sums inside the products), on CUDA; here on the CPU too, forced ("triton": the op's kernels forced, under the
    interpreter). The losses and B of the same writes through torch's composition (the MLP modules,
    `lora_mlp_torch` under autograd: the path before the ops): fp32 losses within 1e-5 and B within 2e-6 of its
    norm (SGD; measured 1.5e-7 and 5.6e-7 through the kernels); bf16 judged against bf16's own error, the same
    writes in float64: the losses' and B's errors within 1.25x the composition's or below 2^-10 (B 1.0-1.4% off
    in either, 0.9-1.2% apart, 1.0x; the losses 1e-4 off in either, up to 1.4x with the hand-written backward).
    The trunk alone through the op's composition is bit for bit the modules' (tests/test_trunk_halves.py)."""
    import copy

    from tmem_kernels import swiglu_act
    from tmem_runtime import engine as engine_module

    if kernel == "triton":
        pytest.importorskip("triton")
        monkeypatch.setattr(swiglu_act, "use_triton", lambda g: g.dtype != torch.float64)
    else:
        monkeypatch.setattr(swiglu_act, "use_triton", lambda g: False)
    model = _qwen3_with_norm_weights(device, dtype) if name == "tiny-qwen3" else load_model(name)[0].to(device, dtype)
    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
    recipe = Recipe(optimizer="sgd", lr=0.5, epochs=2, batch_size=4)
    trunk, steps = _swiglu_calls(monkeypatch)
    got, got_state, _ = _writes(model, recipe, "none")
    assert trunk and steps, "the write never ran the fused SwiGLU"
    # the path before the op: the trunk's MLP modules, the torch backend's `lora_mlp_torch`
    monkeypatch.setattr(fused_layers, "fused_swiglu_mlp", lambda module: False)
    monkeypatch.setattr(engine_module, "fused_on", lambda device: False)
    trunk.clear()
    steps.clear()
    want, want_state, _ = _writes(model, recipe, "none")
    assert not trunk and not steps
    if dtype == torch.float32:
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-6)
        for k, v in want_state.items():
            assert (got_state[k] - v).norm() <= 2e-6 * v.norm(), k
    else:
        truth, truth_state, _ = _writes(copy.deepcopy(model).to(torch.float64), recipe, "none")
        fused_errors = _relative_errors(got, got_state, truth, truth_state)
        torch_errors = _relative_errors(want, want_state, truth, truth_state)
        # (an error below 2^-10, an eighth of bf16's spacing at 1, is at bf16's own resolution either way)
        assert all(f <= max(1.25 * t, 2**-10) for f, t in zip(fused_errors, torch_errors)), (fused_errors, torch_errors)


def test_reads_keep_torchs_composition_on_fused_devices(device, monkeypatch):
    """Only write steps run the adapted MLP's SiLU and product as `tmem::swiglu`: a read of the written session
    (on FUSED_NORM_DEVICES, forced here on the CPU) runs `lora_mlp` as before, bit for bit the logits off them
    (it rounds as `composed_mlp_segmented`, the forward of base weights taking gradients, and a pool's rows)."""
    model = load_model("tiny-llama")[0].to(device)
    fw = FastWeights(model, backend="torch")
    fw.write_examples(examples(4, seed=1), Recipe(optimizer="sgd", lr=0.5, epochs=1, batch_size=4))
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
    trunk, steps = _swiglu_calls(monkeypatch)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    fw.detach()
    assert not trunk and not steps
    assert torch.equal(got, want)


def test_fused_norm_takes_only_the_llama_formula():
    """`fused_norm`: transformers' Llama/Qwen2/Qwen3/Mistral RMSNorm as they are; not a subclass, Gemma's
    (1 + weight, rounded last), a LayerNorm, a hooked norm or one whose forward was replaced."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.mistral.modeling_mistral import MistralRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    assert all(fused_layers.fused_norm(cls(8)) for cls in (LlamaRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm, MistralRMSNorm))
    sub = type("LlamaRMSNorm", (LlamaRMSNorm,), {"forward": lambda self, x: 2 * x})(8)  # same name, other module
    hooked, patched = LlamaRMSNorm(8), LlamaRMSNorm(8)
    hooked.register_forward_hook(lambda m, i, o: o * 2)
    patched.forward = lambda x: x
    for norm in (sub, GemmaRMSNorm(8), torch.nn.LayerNorm(8), hooked, patched):
        assert not fused_layers.fused_norm(norm), norm
        x = torch.randn(3, 8)
        torch.testing.assert_close(fused_layers.rms_norm(norm, x), norm(x))  # the module itself runs


def test_the_decoder_runs_the_fused_norm_on_cuda_only(monkeypatch):
    """On the CPU the module runs (the op would be its own composition behind a custom op's dispatch: more host
    time, the same values); a CUDA tensor goes through the op."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    seen = []
    monkeypatch.setattr(fused_layers, "_fused_rms_norm", lambda x, w, eps: seen.append(x.device.type) or x)
    norm, x = LlamaRMSNorm(8), torch.randn(3, 8)
    assert torch.equal(fused_layers.rms_norm(norm, x), norm(x)) and seen == []
    assert fused_layers.FUSED_NORM_DEVICES == ("cuda",)
    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
    fused_layers.rms_norm(norm, x)
    assert seen == ["cpu"]


def _qwen3_with_norm_weights(device: torch.device, dtype: torch.dtype = torch.float32):
    """tiny-qwen3 (per-head q_norm / k_norm in every attention) whose norm weights are not all ones."""
    model = load_model("tiny-qwen3")[0].to(device, dtype)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=g))
    return model


def _writing(engine) -> object:
    """The binding a one-session write step runs under (its rows, `writing`)."""
    return dataclasses.replace(engine.bindings.all_rows(0), writing=True)


def _norm_and_grads(norm, fn, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(y, dx, d weight) of fn(x) (fn: `norm` or a function of its weight) for the output gradient dy."""
    xr = x.clone().requires_grad_(True)
    norm.weight.requires_grad_(True)
    try:
        y = fn(xr)
        y.backward(dy)
        return y.detach(), xr.grad, norm.weight.grad
    finally:
        norm.weight.grad = None
        norm.weight.requires_grad_(False)


@pytest.mark.parametrize("kernel", ["composition", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_adapted_layers_attention_norms_run_the_fused_op_in_writes_only(kernel, dtype, device, monkeypatch):
    """Qwen3's per-head q_norm / k_norm of the adapted layers (only theirs) run `tmem_kernels.rms_norm` in a
    write step (on CUDA; here on the CPU too, forced), the module's own forward otherwise (bit for bit the
    bare model's). Through the op: the module's output and gradients (x and weight): the torch composition
    bit for bit forward, gradients within 1e-5 (fp32) / 1.6e-2 (bf16, as test_rms_norm); the Triton kernels
    (compiled on CUDA, under the interpreter here) within 1e-5 / 1.6e-2 both ways."""
    from tmem_kernels import rmsnorm

    if kernel == "triton":
        pytest.importorskip("triton")
        from tmem_kernels.rmsnorm_triton import DTYPES

        monkeypatch.setattr(rmsnorm, "use_triton", lambda x: x.dtype in DTYPES)
    else:
        monkeypatch.setattr(rmsnorm, "use_triton", lambda x: False)
    model = _qwen3_with_norm_weights(device, dtype)
    fw = FastWeights(model, backend="torch")
    engine = fw.store.engine
    adapted = [layer.self_attn for layer in engine.mlp_layers]
    assert engine.attention_norms == [n for attn in adapted for n in (attn.q_norm, attn.k_norm)]
    for layer in model.model.layers:
        routed = layer.self_attn in adapted
        assert all(("forward" in vars(n)) == routed for n in (layer.self_attn.q_norm, layer.self_attn.k_norm))

    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
    calls = []
    fused = fused_layers._fused_rms_norm
    monkeypatch.setattr(fused_layers, "_fused_rms_norm", lambda *a: calls.append(1) or fused(*a))
    g = torch.Generator().manual_seed(12)
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    for norm in engine.attention_norms:
        shape = (3, 7, 2, norm.weight.shape[0])  # [B, T, heads, head_dim], as the attention calls it
        x = (torch.randn(shape, generator=g) * 3).to(device, dtype)
        dy = torch.randn(shape, generator=g).to(device, dtype)
        with torch.no_grad():
            assert torch.equal(norm(x), type(norm).forward(norm, x)) and not calls  # no write: the module
        with engine.bindings.bind(_writing(engine)):
            y, dx, dw = _norm_and_grads(norm, norm, x, dy)
            y_ref, dx_ref, dw_ref = _norm_and_grads(norm, partial(type(norm).forward, norm), x, dy)
        assert len(calls) == 1
        calls.clear()
        assert y.dtype == dx.dtype == dw.dtype == dtype
        if kernel == "composition" and device.type == "cpu":
            assert torch.equal(y, y_ref)
        else:
            torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol * y_ref.abs().max().item())
        torch.testing.assert_close(dx, dx_ref, rtol=tol, atol=tol * dx_ref.abs().max().item())
        torch.testing.assert_close(dw, dw_ref, rtol=tol, atol=tol * dw_ref.abs().max().item())
    fw.detach()


def test_the_adapted_layers_qk_norms_compute_the_op_where_the_decoder_is_given_them(device, monkeypatch):
    """An adapted layer's q_norm / k_norm (routed by the engine: an instance forward, so not a `fused_norm`)
    compute the op in the Decoder's trunk and write steps: `fused_qk_norm_rope` holds for its attention given the
    engine's routed norms (`Decoder.routed_norms`), not without them; a trunk layer's always; none with a hook
    on a routed norm, or off FUSED_NORM_DEVICES."""
    model = _qwen3_with_norm_weights(device)
    fw = FastWeights(model, backend="torch")
    engine = fw.store.engine
    adapted = [layer.self_attn for layer in engine.mlp_layers]
    trunk = [layer.self_attn for layer in model.model.layers if layer.self_attn not in adapted]
    routed = engine.decoder.routed_norms
    assert adapted and trunk
    assert [id(n) for n in routed] == [id(n) for m in adapted for n in (m.q_norm, m.k_norm)]
    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
    assert all(fused_layers.fused_qk_norm_rope(m, device) for m in trunk)
    assert not any(fused_layers.fused_qk_norm_rope(m, device) for m in adapted)
    assert all(fused_layers.fused_qk_norm_rope(m, device, routed) for m in adapted + trunk)
    handle = adapted[0].k_norm.register_forward_pre_hook(lambda m, i: None)
    assert not fused_layers.fused_qk_norm_rope(adapted[0], device, routed)
    handle.remove()
    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda",) if device.type == "cpu" else ())
    assert not any(fused_layers.fused_qk_norm_rope(m, device, routed) for m in adapted + trunk)
    fw.detach()


def test_detach_restores_the_attention_norms_and_copies_route_their_own(device):
    """Attach gives the adapted layers' q_norm / k_norm an instance forward (the engine's); a deepcopy or a
    pickled copy of the model routes its own norms through its own engine; detach removes every one of them:
    the norms are the modules they were (`fused_norm` again), the bare logits bit for bit."""
    import pickle

    from tmem_runtime.fast_weights import fast_weights_of

    model = _qwen3_with_norm_weights(device)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(13))
    ids = ids.to(device)
    norms = [n for layer in model.model.layers for n in (layer.self_attn.q_norm, layer.self_attn.k_norm)]
    before = [dict(vars(n)) for n in norms]
    with torch.no_grad():
        bare = model(input_ids=ids).logits
    fw = FastWeights(model, backend="torch")
    assert len(fw.store.engine.attention_norms) == 2 * len(fw.store.engine.mlp_layers) > 0
    fw.write_examples(examples(), Recipe(optimizer="sgd", lr=0.5, epochs=1, batch_size=3))
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        engine = fast_weights_of(twin).store.engine
        assert engine is not fw.store.engine and engine.attention_norms
        for norm in engine.attention_norms:
            assert norm.forward.func.__self__ is engine and norm.forward.args == (norm,)
            assert any(norm is layer.self_attn.q_norm or norm is layer.self_attn.k_norm for layer in twin.model.layers)
        with torch.no_grad():
            torch.testing.assert_close(twin(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
        fast_weights_of(twin).detach()
    fw.detach()
    assert [dict(vars(n)) for n in norms] == before
    assert all(fused_layers.fused_norm(n) for n in norms)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, bare)


def test_a_write_longer_than_mistrals_sliding_window_runs_the_models_own_attention():
    """Mistral's plain `sliding_window` lets the piecewise write path through (its full causal masks are
    right within the window); a write whose examples are longer than the window takes the model's own
    forward instead (the generic path, which masks by the window): its losses are those of a write with
    the fast path off, and not those of full-attention masks."""
    from transformers import AutoModelForCausalLM

    from tmem_runtime.models import tiny_config

    def losses(window: int | None, fast_path: bool) -> list[float]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config("tiny-mistral", sliding_window=window)).eval()
        fw = FastWeights(model, backend="torch")
        if not fast_path:
            fw.store.engine.decoder = None
        got = fw.write_examples(examples(4, seed=3), Recipe(optimizer="sgd", lr=0.5, epochs=2, batch_size=4))
        fw.detach()
        return got

    longest = max(len(ids) for ids, _ in examples(4, seed=3))
    window = longest - 4
    windowed = losses(window, fast_path=True)
    assert windowed == pytest.approx(losses(window, fast_path=False), rel=1e-5, abs=1e-6)
    assert windowed != pytest.approx(losses(None, fast_path=True), rel=1e-5, abs=1e-6)  # (the window matters)


class StorageUse(TorchDispatchMode):
    """Per aten / tmem op dispatched other than views: (phase, its name, which of `watched` ({name: tensor}) it
    reads or writes, by storage, so views of them count). `phase` is whatever the caller set last."""

    def __init__(self, watched: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.watched = {t.untyped_storage().data_ptr(): name for name, t in watched.items()}
        self.ops: list[tuple[str, str, set[str]]] = []
        self.phase = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        flat = [*args, *(kwargs or {}).values()]
        tensors = [t for a in flat for t in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(t, torch.Tensor)]
        touched = {self.watched.get(t.untyped_storage().data_ptr()) for t in tensors} - {None}
        if not func.is_view:
            self.ops.append((self.phase, func.overloadpacket.__name__, touched))
        return func(*args, **(kwargs or {}))

    def touching(self, phase: str, name: str) -> list[str]:
        """The ops of `phase` that read or wrote `name`."""
        return [op for p, op, touched in self.ops if p == phase and name in touched]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_write_step_touches_the_float32_master_and_its_gradient_once_each(backend, dtype, monkeypatch):
    """A one-session write step's forward and backward read the workspace's compute copy only (bf16: no cast
    of a fast weight at each use, none of its gradient), its B leaves' backward makes no zeros (no select),
    and its gradients land in the float32 gradient in one op; only the update reads the master, and a bf16
    update refreshes the compute copy from it in one copy. (Before: per step 12 casts forward and 12
    backward, 12 select backwards, a zero fill and 12 accumulations into .grad.) The step's losses [1] come
    back as they are (no padding copy: every session of the write took part)."""
    if backend == "triton":
        pytest.importorskip("triton")
    model, _ = load_model("tiny-llama", dtype=dtype)
    fw = FastWeights(model, init="random", backend=backend)
    modes = []
    step, update = WriteRun.step, WriteRun._update

    def traced_step(self, plan, k):  # noqa: ANN001, ANN202
        ws = self.ws
        watched = {"param": ws.param, "grad": ws.grad} | ({} if ws.compute is ws.param else {"compute": ws.compute})
        with StorageUse(watched) as mode:
            mode.phase = "step"
            modes.append(mode)
            return step(self, plan, k)

    def traced_update(self, *args):  # noqa: ANN001, ANN202
        modes[-1].phase = "update"
        return update(self, *args)

    monkeypatch.setattr(WriteRun, "step", traced_step)
    monkeypatch.setattr(WriteRun, "_update", traced_update)
    fw.write_examples(examples(), Recipe(optimizer="adamw", lr=1e-2, epochs=1, batch_size=3))
    fw.detach()
    assert len(modes) == 2
    for mode in modes:
        assert not {"select_backward", "constant_pad_nd"} & {op for _, op, _ in mode.ops}
        assert mode.touching("step", "grad") == ["cat" if dtype == torch.float32 else "copy_"]
        assert mode.touching("update", "grad") and mode.touching("update", "param")  # (the torch backend's: ops)
        if dtype == torch.bfloat16:  # (float32: the compute copy is the master)
            assert mode.touching("step", "compute") and mode.touching("step", "param") == []
            assert [(op, t) for p, op, t in mode.ops if "compute" in t and p == "update"] == [
                ("copy_", {"param", "compute"})  # the compute copy refreshed from the master
            ]


def test_the_adapted_mlp_tokens_split_back_into_prefix_and_rows_with_one_backward_op(monkeypatch):
    """Each adapted MLP runs [prefix tokens ; row tokens] at once; its output is split back with `split`, whose
    backward is one cat, not sliced (each slice's backward a zero-padded copy, then their sum: 3 ops). With the
    CUDA paths (the decoder's own attention: HF's rotate_half slices are not in the step)."""
    from benchmarks.graph_trace import cuda_paths

    model, _ = load_model("tiny-llama")
    fw = FastWeights(model, init="random", backend="torch")
    cache = fw.store._encode(collate(examples()))
    assert cache.prefix_len > 0
    engine = fw.store.engine
    batch = plan_step(cache, [0, 3, 5], fw.device)
    ws = Workspace(engine, [0], train_a=False)
    binding = ws.binding(batch.seg_indptr, batch.seg_slot, (0,), True, None)
    with cuda_paths(), engine.bindings.bind(binding), torch.enable_grad():
        total, _ = adapted_loss(engine.decoder, engine.first_layer, cache, batch)
        with StorageUse({}) as mode:
            torch.autograd.grad(total, ws.leaves)
    ops = [op for _, op, _ in mode.ops]
    assert "slice_backward" not in ops
    assert ops.count("cat") >= len(engine.mlp_layers)  # (the splits' backward among them)
    fw.detach()


@pytest.mark.parametrize("prefix_len", [0, 5])
def test_the_additive_mask_follows_its_rule(prefix_len):
    """Query i of a row sees every prefix key and suffix keys j <= i with j < its length (0), others not
    (the dtype's min), checked entry by entry."""
    lengths, q_len = torch.tensor([7, 3, 1, 5]), 7
    mask = decoder_module.additive_mask(lengths, q_len, prefix_len, torch.bfloat16)
    assert mask.shape == (4, 1, q_len, prefix_len + q_len) and mask.dtype == torch.bfloat16
    blocked = torch.finfo(torch.bfloat16).min
    for b, length in enumerate(lengths.tolist()):
        for i in range(q_len):
            for k in range(prefix_len + q_len):
                j = k - prefix_len
                seen = j < 0 or (j <= i and j < length)
                assert mask[b, 0, i, k].item() == (0.0 if seen else blocked), (b, i, k)


@pytest.mark.parametrize("prefix_len", [0, 5])
def test_an_aligned_additive_mask_has_8_aligned_rows_and_the_same_values(prefix_len, monkeypatch):
    """On MASK_ALIGNED_DEVICES (CUDA) the mask's rows start at multiples of 8 elements (a slice of a wider buffer:
    what the memory-efficient SDPA kernel takes without padding it into a copy per call), its values those of the
    plain mask; elsewhere it is contiguous as before. Forced here on the CPU."""
    lengths, q_len = torch.tensor([7, 3, 1, 5]), 7
    plain = decoder_module.additive_mask(lengths, q_len, prefix_len, torch.bfloat16)
    assert plain.is_contiguous()
    monkeypatch.setattr(decoder_module, "MASK_ALIGNED_DEVICES", ("cuda", "cpu"))
    aligned = decoder_module.additive_mask(lengths, q_len, prefix_len, torch.bfloat16)
    assert aligned.shape == plain.shape and aligned.stride(-1) == 1
    assert all(aligned.stride(d) % 8 == 0 for d in range(aligned.dim() - 1) if aligned.shape[d] > 1)
    torch.testing.assert_close(aligned, plain, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_a_write_with_aligned_masks_equals_one_with_plain_masks(name, monkeypatch):
    """The aligned masks (CUDA's layout, forced on the CPU, with the Decoder's own attention and halved trunk
    layers as on CUDA) change nothing a write computes: writes of padded rows with a shared prefix give the same
    losses and B bit for bit."""
    model, _ = load_model(name)
    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
    recipe = Recipe(optimizer="adamw", lr=1e-2, epochs=2, batch_size=4)
    monkeypatch.setattr(decoder_module, "MASK_ALIGNED_DEVICES", ("cuda", "cpu"))
    got, got_state, _ = _writes(model, recipe, "none")
    monkeypatch.setattr(decoder_module, "MASK_ALIGNED_DEVICES", ())
    want, want_state, _ = _writes(model, recipe, "none")
    _assert_same_writes(got, got_state, want, want_state, torch.device("cpu"))


@pytest.mark.cuda
def test_sdpa_takes_the_decoders_mask_without_padding_it():
    """On CUDA a bf16 SDPA call with the Decoder's mask (rows of 13 keys: not a multiple of 8) runs no pad of the
    mask (torch's `preprocess_mask` pads an unaligned one into a copy on every call): counted with the profiler,
    forward and backward; a contiguous mask of the same values is padded (what the count would catch)."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device("cuda")
    q, k, v = (torch.randn(2, 4, 8, 64, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    kk = torch.randn(2, 4, 13, 64, device=device, dtype=torch.bfloat16)
    lengths = torch.tensor([8, 5], device=device)
    mask = decoder_module.additive_mask(lengths, 8, 5, torch.bfloat16)
    keys = torch.cat([kk[:, :, :5], k], dim=2)
    values = torch.cat([kk[:, :, :5], v], dim=2)

    def pads(m: torch.Tensor) -> int:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=m)
            out.sum().backward()
        return sum(e.count for e in prof.key_averages() if "pad" in e.key)

    assert mask.stride(-2) % 8 == 0
    assert pads(mask) == 0
    assert pads(mask.contiguous()) > 0


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
@pytest.mark.parametrize("padded", [False, True])
def test_the_rows_and_prefix_attention_inputs_come_from_one_rotary_call(name, padded):
    """`Decoder._row_and_prefix_inputs`: the positions, rotary and masks of `_attention_inputs` for the rows and
    for the prefix, bit for bit, from one call of the model's rotary embedding instead of two."""
    model, _ = load_model(name, dtype=torch.bfloat16)
    dec = decoder_module.Decoder(model)
    rows, prefix = torch.randn(3, 6, model.config.hidden_size).bfloat16(), torch.randn(1, 4, model.config.hidden_size)
    lengths = torch.tensor([6, 2, 4]) if padded else None
    want = dec._attention_inputs(rows, 4, lengths), dec._attention_inputs(prefix.bfloat16(), 0, None)
    calls = []
    hook = model.model.rotary_emb.register_forward_hook(lambda *args: calls.append(1))
    got = dec._row_and_prefix_inputs(rows, 4, lengths)
    hook.remove()
    assert len(calls) == 1
    for g, w in zip(got, want):
        (g_pos, (g_cos, g_sin), g_mask), (w_pos, (w_cos, w_sin), w_mask) = g, w
        assert all(torch.equal(a, b) for a, b in ((g_pos, w_pos), (g_cos, w_cos), (g_sin, w_sin)))
        assert (g_mask is None and w_mask is None) or torch.equal(g_mask, w_mask)
