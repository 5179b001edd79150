"""A write waits for the device once: the host syncs of one write, counted on the CPU (benchmarks/host_syncs.py).

Each host read of device data, and each blocking host-to-device copy, drains the GPU's queue: a write that
did ~50 (one session) or ~170 (three sessions, torch backend) spent most of its wall time with the device
idle. The one that remains is the check phase's read of the steps' losses and the finite-update flags
(`WriteRun.train`): the write cannot report its losses or refuse a NaN update without it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from benchmarks.common import flashcard_examples
from benchmarks.host_syncs import census_of
from tmem_runtime import FastWeights, SessionPool
from tmem_runtime.models import load_model
from tmem_runtime.recipes import RECIPES
from tmem_runtime.uploads import upload

RECIPE = RECIPES["paper"]
MAX_SYNCS = 1  # the check phase's one read (see the module docstring)


@pytest.fixture(scope="module")
def model():
    return load_model("tiny-qwen3")[0]


def cards(model, seed: int, ragged: bool = False) -> list:
    """16 cards sharing a 24-token preamble (as profile_write.py writes them); ragged: lengths 40..55."""
    vocab = model.config.vocab_size
    if not ragged:
        return flashcard_examples(512, vocab, 16, 24, seed)
    rows = flashcard_examples(1024, vocab, 16, 24, seed)
    return [(ids[:24] + ids[24 + k :], labels[:24] + labels[24 + k :]) for k, (ids, labels) in enumerate(rows)]


def describe(census) -> str:
    return "\n".join(census.lines())


def test_census_sees_reads_and_blocking_copies(model):
    """The counter itself: an item() of device data, a blocking upload and a mask index count; host work does not."""
    w = model.model.layers[0].mlp.gate_proj.weight

    def run() -> None:
        float(w.sum())  # a read of the device
        torch.tensor([1, 2], device=w.device)  # a blocking host-to-device copy
        w[w > 0]  # a mask index (nonzero inside)
        host = torch.arange(4)
        int(host.sum()), host.tolist(), host[host > 1]  # host data: no sync
        upload([host], w.device)  # pinned, non_blocking: no sync

    census = census_of(run, model)
    assert sorted(s.kind for s in census.syncs) == ["h2d-blocking", "item", "mask-index"], describe(census)


@pytest.mark.parametrize("ragged", [False, True])
def test_fast_weights_write_waits_once(model, ragged):
    fw = FastWeights(model, backend="torch")
    try:
        census = census_of(lambda: fw.write_examples(cards(model, 0, ragged), RECIPE), model, fw.store)  # cold
        assert len(census.syncs) <= MAX_SYNCS and not census.mismatches, describe(census)
        census = census_of(lambda: fw.write_examples(cards(model, 1, ragged), RECIPE), model, fw.store)  # warm
        assert len(census.syncs) <= MAX_SYNCS and not census.mismatches, describe(census)
        assert [s.phase for s in census.syncs] == ["check"]
    finally:
        fw.detach()


def test_a_write_with_the_decoders_cuda_structure_waits_once(model, monkeypatch):
    """The Decoder's CUDA structure forced on the CPU (FUSED_NORM_DEVICES: the fused norms, its own attention,
    the trunk's layers run as halves, checked): a ragged write still waits once."""
    from tmem_runtime import fused_layers

    monkeypatch.setattr(fused_layers, "FUSED_NORM_DEVICES", ("cuda", "cpu"))
    halves = []
    real = fused_layers.runs_as_halves
    monkeypatch.setattr(fused_layers, "runs_as_halves", lambda layer: halves.append(real(layer)) or halves[-1])
    fw = FastWeights(model, backend="torch")
    try:
        for seed in (0, 1):  # cold, warm
            census = census_of(lambda s=seed: fw.write_examples(cards(model, s, True), RECIPE), model, fw.store)
            assert [s.phase for s in census.syncs] == ["check"] and not census.mismatches, describe(census)
    finally:
        fw.detach()
    assert halves and all(halves)


def test_batched_pool_write_waits_once(model):
    pool = SessionPool(model, capacity=3, backend="torch")
    try:
        for s in "abc":
            pool.open(s)
        census = census_of(
            lambda: pool.write_examples_many({s: cards(model, i) for i, s in enumerate("abc")}, RECIPE), model, pool
        )
        assert len(census.syncs) <= MAX_SYNCS and not census.mismatches, describe(census)
        assert [s.phase for s in census.syncs] == ["check"]
    finally:
        pool.detach()


def test_upload_is_bit_exact():
    """Mixed dtypes and shapes (0-d, empty, bool) come back equal, each its own bytes."""
    tensors = [torch.arange(5), None, torch.tensor(0.1, dtype=torch.float32), torch.zeros(0, dtype=torch.long),
               torch.tensor([[True, False], [False, True]]), torch.randn(3, 2, dtype=torch.float64)]  # fmt: skip
    moved = upload(tensors, torch.device("cpu"))
    assert moved[1] is None
    for t, m in zip(tensors, moved):
        if t is not None:
            assert m.dtype == t.dtype and m.shape == t.shape and torch.equal(m, t)
    moved[0].add_(1)
    assert torch.equal(moved[2], tensors[2]) and torch.equal(moved[5], tensors[5])


@pytest.mark.cuda
@pytest.mark.parametrize("sessions", [1, 3])
def test_a_warm_write_on_cuda_synchronises_once(sessions):
    """The same bound on a GPU, counted by CUDA itself (`torch.cuda.set_sync_debug_mode`: a warning per
    synchronising call, pageable uploads included): a write of new cards in a shape already seen (its graphs
    captured, its buffers kept) waits for the device once: a pool's write of one session and a batched write
    of three (auto backend: whatever the pool picks on CUDA)."""
    model = load_model("tiny-qwen3", device="cuda")[0]
    names = "abc"[:sessions]
    pool = SessionPool(model, capacity=sessions, backend="auto")
    try:
        for s in names:
            pool.open(s)

        def write(seed: int) -> None:
            pool.write_examples_many({s: cards(model, seed + i) for i, s in enumerate(names)}, RECIPE)

        write(0)  # cold: kernels compiled, graphs captured
        torch.cuda.synchronize()
        with sync_warnings() as caught:
            write(10)
        assert len(caught) <= MAX_SYNCS, "\n".join(str(w.message)[:200] for w in caught)
    finally:
        pool.detach()


@contextmanager
def sync_warnings() -> Iterator[list]:
    """The warnings CUDA's sync debug mode raises inside the block, one per synchronising call (the list is
    filled when the block ends; the mode is reset after)."""
    caught: list = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode("default")
    caught.extend(w for w in seen if "synchroniz" in str(w.message))


# ---------------------------------------------------------------- a pool's decode step (issue 10)
# On a GPU the bare decode step of a 4B model at batch 64 is host-bound (its eager launches), so whatever the
# pool adds on the host shows in full: a wait for the device, or Python work that grows with the batch or with
# the sessions the pool holds (benchmarks/decode_host.py times it on the CPU).


def pool_step_setup(model, open_sessions: int, rows: int, written: bool = True):
    """A pool of `open_sessions` open sessions (capacity as many), the first `rows` of them read by a decode
    batch (written: each its own random B, else all at B0), the batch's last tokens and a 12-token cache.
    Returns (pool, names, step, forward, on_device): forward() runs one decode step and crops the cache back;
    step() runs it in a rows() block of its own, as a decode loop that binds its rows per step does;
    on_device(): the batch's tensors (token ids, cache), which live on the device on a GPU."""
    from transformers import DynamicCache

    pool = SessionPool(model, capacity=open_sessions, backend="auto")
    names = [f"s{i}" for i in range(rows)]
    g = torch.Generator().manual_seed(5)
    for s in names:
        pool.open(s)
        if written:
            pool.load_state_dict(s, {k: torch.randn(v.shape, generator=g) if "lora_B" in k else v
                                     for k, v in pool.state_dict(s).items()})  # fmt: skip
    for i in range(open_sessions - rows):
        pool.open(f"idle{i}")
    ids = torch.randint(3, model.config.vocab_size, (rows, 13), generator=g).to(model.device)
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), pool.rows(names):
        model(input_ids=ids[:, :12], past_key_values=cache, use_cache=True)

    def forward() -> None:  # (inside the caller's rows() block)
        with torch.no_grad():
            model(input_ids=ids[:, 12:], past_key_values=cache, use_cache=True)
        cache.crop(-1)

    def step() -> None:
        with pool.rows(names):
            forward()

    def on_device() -> list[torch.Tensor]:
        return [ids, *(t for layer in cache.layers for t in (layer.keys, layer.values))]

    return pool, names, step, forward, on_device


def tmem_calls(run) -> int:
    """Python calls (generator resumptions included) into tmem_runtime / tmem_kernels during run()."""
    import sys

    count = 0

    def profile(frame, event, arg) -> None:
        nonlocal count
        if event == "call" and "/tmem_" in frame.f_code.co_filename:
            count += 1

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return count


@pytest.mark.parametrize("written", [True, False])
def test_a_pool_decode_step_never_waits(model, written):
    """A decode step of 64 rows, each its own session, in a rows() block of its own: no read of the device and
    no blocking upload (the binding's segments go up in one pinned, non-blocking copy), the first step of a
    row list and the next ones alike (sessions at B0 take the model's own MLP)."""
    pool, _, step, _, on_device = pool_step_setup(model, 100, 64, written)
    try:
        for _ in range(2):  # the binding made, then reused
            census = census_of(step, model, pool, on_device())
            assert not census.syncs and not census.mismatches, describe(census)
    finally:
        pool.detach()


def test_a_pool_decode_steps_python_work_does_not_grow_with_open_sessions(model):
    """The Python calls of one decode step (64 rows, a rows() block per step) are the same with 100 open
    sessions as with 1,000: nothing per step walks the pool's sessions."""
    counts = []
    for open_sessions in (100, 1000):
        pool, _, step, _, _ = pool_step_setup(model, open_sessions, 64)
        try:
            step()
            counts.append(tmem_calls(step))
        finally:
            pool.detach()
    assert counts[0] == counts[1], counts


def test_the_identity_check_runs_once_per_binding(model):
    """Rows of sessions at B0 run the model's own MLP; whether they are is worked out once per row list, not
    on every adapted layer's call: inside a rows() block a forward's Python calls are the same for 8 rows as
    for 64."""
    counts = []
    for rows in (8, 64):
        pool, names, _, forward, _ = pool_step_setup(model, 100, rows, written=False)
        try:
            with pool.rows(names):
                forward()
                counts.append(tmem_calls(forward))
        finally:
            pool.detach()
    assert counts[0] == counts[1], counts


@pytest.mark.cuda
def test_a_pool_decode_step_on_cuda_synchronises_no_more_than_the_bare_step():
    """The same on a GPU, counted by CUDA itself (sync debug mode): a decode step of 16 rows, each its own
    session, in a rows() block of its own (a new row list, then the same again), waits for the device no more
    often than the model's own step of the same batch (whatever transformers' forward itself does)."""
    model = load_model("tiny-qwen3", device="cuda")[0]
    pool, names, step, forward, _ = pool_step_setup(model, 100, 16)
    try:
        forward()  # bare: no rows bound (kernels warmed)
        step()
        torch.cuda.synchronize()
        with sync_warnings() as bare:
            forward()
        with sync_warnings() as pooled:
            pool.engine.bindings.forget_rows()  # a row list not bound before: its segments go up
            step()
            step()
        assert len(pooled) <= 2 * len(bare), "\n".join(str(w.message)[:200] for w in pooled)
    finally:
        pool.detach()
