"""SessionPool: batched writes equal sequential ones, a memory per row, residency, threads, kept trunk rows."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from benchmarks.common import prefixed_examples
from tmem_kernels.ops import available
from tmem_runtime import (
    FastWeights,
    FastWeightsError,
    PoolFullError,
    Recipe,
    SessionPool,
    UnknownSessionError,
    WriteError,
    load_model,
)
from tmem_runtime.static_write import StaticWrites
from tmem_runtime.trunk_rows import MAX_PREFIXES, TrunkRows
from tmem_runtime.write import IGNORE_INDEX

BACKENDS = [b for b in ("torch", "native") if available(b)]


examples = prefixed_examples  # n cards after a shared 9-token prefix (a chat preamble), loss on tails


@pytest.fixture
def tiny():
    model, _ = load_model("tiny-llama")
    return model


SESSIONS = {"a": examples(5, 1), "b": examples(1, 2), "c": examples(11, 3), "d": examples(3, 4)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.5), ("adamw", 1e-2)])
def test_batched_write_equals_sequential_writes(tiny, backend, optimizer, lr):
    """Four sessions of 1 to 11 cards (so 1 to 2 steps per epoch: sessions drop out of later steps),
    written in one batched write vs one after another: per-step losses and final B within 1e-5."""
    recipe = Recipe(optimizer=optimizer, lr=lr, epochs=3, batch_size=4)
    pool = SessionPool(tiny, capacity=4, backend=backend)
    for s in SESSIONS:
        pool.open(s)
    pool.write_examples_many({"a": SESSIONS["a"][:2]}, recipe)  # "a" starts from an earlier write
    batched = pool.write_examples_many(SESSIONS, recipe, seed=7)
    batched_states = {s: pool.state_dict(s) for s in SESSIONS}
    pool.detach()

    pool = SessionPool(tiny, capacity=4, backend=backend)
    for s in SESSIONS:
        pool.open(s)
    pool.write_examples_many({"a": SESSIONS["a"][:2]}, recipe)
    for s, ex in SESSIONS.items():
        alone = pool.write_examples_many({s: ex}, recipe, seed=7)[s]
        assert len(alone) == len(batched[s])
        torch.testing.assert_close(torch.tensor(batched[s]), torch.tensor(alone), rtol=1e-5, atol=1e-6)
        # B to 1e-5 (relative Frobenius) with SGD; AdamW divides each element's step by its own gradient
        # scale, which turns rounding-level gradient differences (other GEMM sizes) into ~2e-5: 5e-5
        tol = 1e-5 if optimizer == "sgd" else 5e-5
        for k, v in pool.state_dict(s).items():
            err = (batched_states[s][k] - v).norm() / v.norm().clamp_min(1e-12)
            assert err <= tol, (s, k, float(err))
    pool.detach()


def _write_modes(pool: SessionPool, mode: str) -> None:
    """Run the pool's writes as `mode`: "plain" (no kept buffers: each write's own tensors, eager), "static"
    (kept bucket-padded buffers, eager steps) or "graphed" (the same buffers, steps replayed as CUDA graphs)."""
    pool._static = {"plain": None, "static": StaticWrites(pool.engine, graphs=False),
                    "graphed": StaticWrites(pool.engine)}[mode]  # fmt: skip


@pytest.mark.cuda
@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.5), ("adamw", 1e-2)])
def test_a_graphed_batched_write_equals_the_eager_one(optimizer, lr):
    """The batched write of four sessions captured in CUDA graphs (the default on a GPU) vs the same
    steps run eagerly on the same (bucket-padded) buffers: its segments live on the device, so nothing
    in a captured step may read them on the host. Written twice: the second write replays the graphs
    the first captured. One pool (one A) for both: only the steps' execution differs."""
    model, _ = load_model("tiny-llama", device="cuda")
    recipe = Recipe(optimizer=optimizer, lr=lr, epochs=3, batch_size=4)
    pool = SessionPool(model, capacity=4, backend="auto", cuda_graphs=True)
    for s in SESSIONS:
        pool.open(s)
    losses, states = {}, {}
    for mode in ("static", "graphed"):
        _write_modes(pool, mode)
        for s in SESSIONS:
            pool.reset(s)
        for seed in (7, 8):
            losses[mode, seed] = pool.write_examples_many(SESSIONS, recipe, seed=seed)
            states[mode, seed] = {s: pool.state_dict(s) for s in SESSIONS}
    pool.detach()
    tol = 1e-5 if optimizer == "sgd" else 3e-2  # see B_TOLERANCE in test_write_steps.py
    for seed in (7, 8):  # the first write captures, the second replays: which one differs says where
        for s in SESSIONS:
            where = f"write seed {seed}, session {s}"
            torch.testing.assert_close(torch.tensor(losses["graphed", seed][s]),
                                       torch.tensor(losses["static", seed][s]), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, where=where: f"{where}: {m}")  # fmt: skip
            for k, v in states["static", seed][s].items():
                err = (states["graphed", seed][s][k] - v).norm() / v.norm().clamp_min(1e-12)
                assert err <= tol, (seed, s, k, float(err))


@pytest.mark.cuda
def test_two_pools_attached_to_one_cuda_model_start_from_the_same_a():
    """A (the randomized SVD of the weights) is the same at every attach to the same weights: saved B rows mean
    nothing with another A. On the tiny model's flat spectrum the SVD turns rounding into ~100x larger A
    differences (CPU: weights 1e-7 apart -> A 1e-5 apart), and SGD is equivariant to a rotation of A's rows, so
    two pools with different A give equal losses and B apart: what the two-pool graphed-write test saw."""
    model, _ = load_model("tiny-llama", device="cuda")
    first = SessionPool(model, capacity=4, backend="auto", cuda_graphs=True)
    a = first.engine.a.clone()
    first.detach()
    second = SessionPool(model, capacity=4, backend="auto", cuda_graphs=True)
    err = float((second.engine.a - a).norm() / a.norm())
    second.detach()
    assert err <= 1e-6, err


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["plain", "static", "graphed"])
@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.5), ("adamw", 1e-2)])
def test_a_batched_write_on_cuda_equals_sequential_writes(optimizer, lr, mode):
    """The spec of a batched write (per-step losses and final B of each session equal those of writing
    the sessions one after another), on CUDA with the Triton kernels, in each way a write's steps can run.
    The sequential reference writes run plain (eager, their own tensors), in the same pool (one A)."""
    model, _ = load_model("tiny-llama", device="cuda")
    recipe = Recipe(optimizer=optimizer, lr=lr, epochs=3, batch_size=4)
    pool = SessionPool(model, capacity=8, backend="auto", cuda_graphs=True)
    _write_modes(pool, "plain")
    alone = {}
    for s, ex in SESSIONS.items():
        pool.open(s + "-alone")
        alone[s] = pool.write_examples_many({s + "-alone": ex}, recipe, seed=7)[s + "-alone"]
    _write_modes(pool, mode)
    for s in SESSIONS:
        pool.open(s)
    batched = pool.write_examples_many(SESSIONS, recipe, seed=7)
    tol = 1e-5 if optimizer == "sgd" else 5e-5  # as test_batched_write_equals_sequential_writes (CPU)
    errors = {}
    for s in SESSIONS:
        torch.testing.assert_close(torch.tensor(batched[s]), torch.tensor(alone[s]), rtol=1e-5, atol=1e-6,
                                   msg=lambda m, s=s: f"{mode}, session {s}: {m}")  # fmt: skip
        ref = pool.state_dict(s + "-alone")
        for k, v in pool.state_dict(s).items():
            errors[s, k] = float((v - ref[k]).norm() / ref[k].norm().clamp_min(1e-12))
    pool.detach()
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, (mode, worst, errors[worst])


def test_per_row_forward_equals_the_model_with_only_that_session(tiny):
    """Row i of one batch reads session i (or none): its logits are those of the model with only that
    session attached (FastWeights), to 1e-5; None rows are the bare model."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (5, 13), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, :4] = 0  # left padding, as generate() batches
    with torch.no_grad():
        bare = tiny(input_ids=ids, attention_mask=mask).logits
    pool = SessionPool(tiny, capacity=3, backend="torch")
    states = {}
    for i, s in enumerate(("x", "y", "z")):
        pool.open(s)
        pool.write_examples_many({s: examples(4, 10 + i)}, Recipe(lr=1e-2, epochs=3))
        states[s] = pool.state_dict(s)
    rows = ["y", None, "x", "y", "z"]
    with torch.no_grad(), pool.rows(rows):
        mixed = tiny(input_ids=ids, attention_mask=mask).logits
    pool.detach()
    for i, s in enumerate(rows):
        if s is None:
            torch.testing.assert_close(mixed[i], bare[i], rtol=1e-5, atol=1e-5)
            continue
        fw = FastWeights(tiny, backend="torch")
        fw.load_state_dict(states[s])
        with torch.no_grad():
            alone = tiny(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits[0]
        fw.detach()
        torch.testing.assert_close(mixed[i], alone, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(mixed[i], bare[i], atol=1e-3)


def test_generate_with_a_different_memory_per_row(tiny):
    pool = SessionPool(tiny, capacity=2, backend="torch")
    pool.open("p")
    pool.open("q")
    pool.write_examples_many({"p": examples(4, 1), "q": examples(4, 2)}, Recipe(lr=3e-2, epochs=5))
    prompt = torch.tensor([[5, 6, 7, 8]] * 3)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with pool.rows(["p", "q", None]):
        mixed = tiny.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
    for i, s in enumerate(["p", "q", None]):
        with pool.rows([s]):
            alone = tiny.generate(prompt[:1], attention_mask=torch.ones_like(prompt[:1]), **kw)
        assert torch.equal(mixed[i], alone[0])
    pool.detach()


def test_beams_and_return_sequences_read_their_prompts_session(tiny):
    """generate() expands each prompt into beams / return sequences before its first forward: every copy
    reads its prompt's session (sequences and beam scores those of the model with only that session,
    generated alone), and a rows list that matches the expanded batch but not the prompts is refused."""
    pool = SessionPool(tiny, capacity=2, backend="torch")
    pool.open("p")
    pool.open("q")
    pool.write_examples_many({"p": examples(4, 1), "q": examples(4, 2)}, Recipe(lr=3e-2, epochs=5))
    states = {s: pool.state_dict(s) for s in ("p", "q")}
    ids = torch.randint(3, 500, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding
    rows = ["p", None, "q"]
    kw = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    with pool.rows(rows):
        mixed = tiny.generate(ids, attention_mask=mask, **kw)
        again = tiny(input_ids=ids, attention_mask=mask).logits  # a forward after generate(): the named rows
    with pytest.raises(ValueError, match="1 prompts"), pool.rows(["p", "q"]):  # 2 rows = 1 prompt x 2 beams
        tiny.generate(ids[:1], max_new_tokens=2, num_beams=2, do_sample=False, pad_token_id=0)
    pool.detach()
    for i, s in enumerate(rows):
        fw = None if s is None else FastWeights(tiny, backend="torch")
        if fw is not None:
            fw.load_state_dict(states[s])
        n = int(mask[i].sum())
        alone = tiny.generate(ids[i : i + 1, -n:], attention_mask=mask[i : i + 1, -n:], **kw)
        with torch.no_grad():
            logits = tiny(input_ids=ids[i : i + 1, -n:]).logits[0]
        if fw is not None:
            fw.detach()
        assert torch.equal(mixed.sequences[2 * i : 2 * i + 2, -5:], alone.sequences[:, -5:]), s
        torch.testing.assert_close(mixed.sequences_scores[2 * i : 2 * i + 2], alone.sequences_scores,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(again[i, -n:], logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offload", ["host", "disk"])
def test_more_sessions_than_capacity_move_out_and_back(tiny, tmp_path, offload):
    pool = SessionPool(tiny, capacity=2, backend="torch", offload=offload, offload_dir=tmp_path)
    states = {}
    for i in range(5):
        s = f"s{i}"
        pool.open(s)
        pool.write_examples_many({s: examples(3, i)}, Recipe(lr=1e-2, epochs=2))
        states[s] = pool.state_dict(s)
    pool.open("fresh")  # never written: evicted and restored for free
    c = pool.counters()
    assert c["resident"] == 2 and c["open"] == 6 and c["evictions"] >= 3
    for s, want in reversed(states.items()):  # every one comes back exactly
        got = pool.state_dict(s)
        assert all(torch.equal(got[k], want[k]) for k in want), s
    assert all(v.abs().sum() == 0 for k, v in pool.state_dict("fresh").items() if k.endswith("lora_B"))
    c = pool.counters()
    assert c["restores"] >= 3
    if offload == "disk":
        assert c["disk_writes"] >= 3 and c["disk_reads"] >= 3
    pool.close("s0")
    assert "s0" not in pool.sessions
    away = next(s for s in states if s in pool.sessions and s not in pool.residency.resident)
    before, files = pool.counters(), sorted(tmp_path.iterdir())
    pool.reset(away)  # an offloaded session is reset where it is: no row taken, nothing evicted for it
    c = pool.counters()
    assert (c["evictions"], c["restores"]) == (before["evictions"], before["restores"])
    assert len(sorted(tmp_path.iterdir())) == len(files) - (offload == "disk")  # its offload file is gone
    assert all(v.abs().sum() == 0 for k, v in pool.state_dict(away).items() if k.endswith("lora_B"))
    pool.detach()


def test_a_detached_pool_refuses_use(tiny, tmp_path):
    """After detach() the pool is unusable: opening, closing, resetting, rows()/reading() blocks, state
    dicts and swaps raise FastWeightsError (a rows() block ran generate() on the bare model, silently; a
    session opened after detach was reported open). Counters and the session list still read."""
    pool = SessionPool(tiny, capacity=1, backend="torch", offload="disk", offload_dir=tmp_path)
    pool.open("a")
    pool.write_examples_many({"a": examples(3, 1)}, Recipe(lr=1e-2, epochs=1))
    state = pool.state_dict("a")
    pool.detach()
    calls = {
        "open": lambda: pool.open("b"),
        "close": lambda: pool.close("a"),
        "reset": lambda: pool.reset("a"),
        "rows": lambda: pool.rows(["a"]),
        "reading": lambda: pool.reading(["a"]),
        "state_dict": lambda: pool.state_dict("a"),
        "load_state_dict": lambda: pool.load_state_dict("a", state),
        "save": lambda: pool.save("a", tmp_path / "a.safetensors"),
        "write": lambda: pool.write_examples_many({"a": examples(3, 1)}, Recipe(lr=1e-2, epochs=1)),
    }
    for name, call in calls.items():
        with pytest.raises(FastWeightsError, match="detached"):
            call()
            pytest.fail(f"{name} after detach")
    assert pool.sessions == ["a"] and pool.counters()["open"] == 1 and not any(tmp_path.iterdir())


def test_a_failed_offload_loses_no_session(tiny, tmp_path):
    """An eviction whose offload file cannot be written (here the offload dir is a file; a full disk is
    the same) raises and leaves every session where it was, its weights intact; once the directory is
    usable again the same write runs."""
    offload_dir = tmp_path / "offload"
    pool = SessionPool(tiny, capacity=2, backend="torch", offload="disk", offload_dir=offload_dir)
    states = {}
    for s in ("a", "b", "c"):
        pool.open(s)
    for s in ("a", "b"):
        pool.write_examples_many({s: examples(3, ord(s))}, Recipe(lr=1e-2, epochs=1))
        states[s] = pool.state_dict(s)
    offload_dir.write_text("not a directory")
    with pytest.raises(OSError):
        pool.write_examples_many({"c": examples(2, 5)}, Recipe(lr=1e-2, epochs=1))  # must evict "a"
    assert sorted(pool.sessions) == ["a", "b", "c"] and pool.counters()["resident"] == 2
    offload_dir.unlink()
    pool.write_examples_many({"c": examples(2, 5)}, Recipe(lr=1e-2, epochs=1))
    for s, want in states.items():
        got = pool.state_dict(s)
        assert all(torch.equal(got[k], want[k]) for k in want), s
    pool.detach()


@contextmanager
def undeletable(files: list[Path]) -> Iterator[None]:
    """Inside the block `files` cannot be deleted (they still read): their directory read-only, or, for root (who
    deletes from read-only directories), the files immutable (chattr +i); skipped where neither can be had."""
    if os.geteuid() != 0:
        folder = files[0].parent
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", *map(str, files)], capture_output=True).returncode:
        pytest.skip("no way to make a file undeletable here (root without chattr +i)")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", *map(str, files)], check=True)


def test_an_offload_file_that_cannot_be_deleted_loses_nothing(tiny, tmp_path):
    """A session's offload file that cannot be deleted once it is no longer needed (a read-only offload directory)
    is left behind, and the restore, reset, close or detach goes through: the restore lost the session from the
    pool and leaked its row (every later use: PoolFullError), a reset zeroed B but kept its version and stats,
    and detach() left the model's MLPs replaced (it warns of the files it leaves)."""
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        bare = tiny(input_ids=ids).logits
    pool = SessionPool(tiny, capacity=1, backend="torch", offload="disk", offload_dir=tmp_path)
    states = {}
    for s in "abc":
        pool.open(s)
        pool.write_examples_many({s: examples(3, ord(s))}, Recipe(lr=1e-2, epochs=2))
        states[s] = pool.state_dict(s)  # "a" then "b" go to disk
    files = sorted(tmp_path.iterdir())
    assert len(files) == 2
    version_b = pool.version("b")
    with undeletable(files):
        pool.reset("b")  # away: its file dropped
        assert pool.version("b") != version_b and pool.stats["b"].writes == 0
        pool.close("c")  # resident: its row freed
        assert all(torch.equal(pool.state_dict("a")[k], v) for k, v in states["a"].items())  # restored from disk
        assert pool.sessions == ["a", "b"] and pool.counters()["resident"] == 1
    assert len(list(tmp_path.glob(f"{pool.residency.file_prefix}-*"))) == 2  # left behind, as they were
    assert all(v.abs().sum() == 0 for k, v in pool.state_dict("b").items() if k.endswith("lora_B"))
    pool.write_examples_many({"a": examples(2, 9)}, Recipe(lr=1e-2, epochs=1))  # "b" out, "a" in again
    with undeletable(sorted(tmp_path.iterdir())), pytest.warns(UserWarning, match="could not be deleted"):
        pool.detach()
    assert getattr(tiny, "_tmem_fast_weights", None) is None
    with torch.no_grad():
        torch.testing.assert_close(tiny(input_ids=ids).logits, bare, rtol=0, atol=0)
    for f in tmp_path.iterdir():
        f.unlink()


def test_a_load_into_an_offloaded_session_does_not_read_its_old_copy(tiny, tmp_path):
    """A session whose offload file was truncated on disk cannot be read (AdapterFileError, nothing changed), but
    a load, a swap or an import_peft replaces its whole B, so they go through without reading that file (they
    failed on it, so the session could only be reset or closed); a state that does not fit is refused before
    any session moves."""
    from tmem_runtime.adapter_file import AdapterFileError
    from tmem_runtime.peft_export import export_peft, import_peft

    pool = SessionPool(tiny, capacity=1, backend="torch", offload="disk", offload_dir=tmp_path / "off")
    for s in "abc":
        pool.open(s)
        pool.write_examples_many({s: examples(3, ord(s))}, Recipe(lr=1e-2, epochs=2))
    pool.save("c", tmp_path / "c.safetensors")
    export_peft((pool, "c"), tmp_path / "c-peft")
    want = pool.state_dict("c")
    for s in "ab":
        path = pool.residency.away[s]
        path.write_bytes(path.read_bytes()[:100])  # truncated while offloaded
    with pytest.raises(AdapterFileError, match="cannot read"):
        pool.state_dict("a")
    bad = {k: v[..., :-1] if k.endswith("lora_B") else v for k, v in want.items()}
    before, where = pool.counters(), pool.residency.ids
    with pytest.raises(ValueError, match="shape"):
        pool.load_state_dict("a", bad)
    assert pool.counters() == before and pool.residency.ids == where
    pool.load("a", tmp_path / "c.safetensors")
    import_peft((pool, "b"), tmp_path / "c-peft")
    for s in "ab":
        got = pool.state_dict(s)
        assert all(torch.equal(got[k], v) for k, v in want.items()), s
    pool.detach()


def residency_state(pool: SessionPool) -> dict:
    """Everything residency decides: rows, LRU order, kept copies, free rows, pins, counters, the B rows themselves,
    and the offload files' bytes."""
    r = pool.residency
    return {
        "resident": list(r.resident.items()),  # (in LRU order)
        "away": dict(r.away),
        "free": list(r.free),
        "pins": dict(r.pins),
        "counters": pool.counters(),
        "b": r.engine.b.clone(),
        "initial": list(r.engine.initial),
        "files": {f.name: f.read_bytes() for f in r.offload_dir.iterdir()},
    }


def assert_same_residency(got: dict, want: dict) -> None:
    assert torch.equal(got.pop("b"), want["b"])
    assert got == {k: v for k, v in want.items() if k != "b"}


def test_a_failed_restore_moves_no_other_session(tiny, tmp_path):
    """Restoring a session whose offload file is corrupt or missing is refused before a row is taken for it: no
    other session is evicted for it (the resident set, LRU order, kept copies, counters and files are exactly
    as they were), through every path that restores (a state dict, a write, a forward's rows, a reading block),
    and a group with one unreadable session restores none of the others. It evicted the least recently used
    session, then failed."""
    from tmem_runtime.adapter_file import AdapterFileError

    pool = SessionPool(tiny, capacity=2, backend="torch", offload="disk", offload_dir=tmp_path / "off")
    states = {}
    for s in "abcde":
        pool.open(s)
        pool.write_examples_many({s: examples(3, ord(s))}, Recipe(lr=1e-2, epochs=1))
        states[s] = pool.state_dict(s)
    pool.open("f")  # never written: away in its initial state
    assert list(pool.residency.resident) == ["d", "e"]
    corrupt, missing = pool.residency.away["a"], pool.residency.away["b"]
    corrupt.write_bytes(corrupt.read_bytes()[:100])
    missing.unlink()
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(0))

    def forward(sessions: list[str]) -> None:
        with pool.rows(sessions), torch.no_grad():
            tiny(input_ids=ids)

    def reading(sessions: list[str]) -> None:
        with pool.reading(sessions):
            pass

    before = residency_state(pool)
    attempts = {
        "state_dict corrupt": lambda: pool.state_dict("a"),
        "state_dict missing": lambda: pool.state_dict("b"),
        "write": lambda: pool.write_examples_many({"a": examples(2, 9)}, Recipe(lr=1e-2, epochs=1)),
        "write with a good one": lambda: pool.write_examples_many(
            {"c": examples(2, 9), "b": examples(2, 8)}, Recipe(lr=1e-2, epochs=1)),
        "rows": lambda: forward(["c", "a"]),
        "rows with an initial one": lambda: forward(["f", "b"]),
        "reading": lambda: reading(["c", "b"]),
    }
    for name, attempt in attempts.items():
        with pytest.raises(AdapterFileError, match="cannot read"):
            attempt()
            pytest.fail(name)
        assert_same_residency(residency_state(pool), before)
    for s in "cde":  # the others are all there, bit for bit
        got = pool.state_dict(s)
        assert all(torch.equal(got[k], v) for k, v in states[s].items()), s
    pool.reset("a")  # what is left to do with an unreadable session
    pool.close("b")
    assert all(v.abs().sum() == 0 for k, v in pool.state_dict("a").items() if k.endswith("lora_B"))
    pool.detach()


def test_an_acquire_without_rows_for_all_its_sessions_moves_none(tiny, tmp_path):
    """An acquire of two away sessions with one row to be had (the other pinned by a running batch) raises
    PoolFullError before it restores the first (which evicted the last unpinned session, then failed)."""
    pool = SessionPool(tiny, capacity=2, backend="torch", offload="disk", offload_dir=tmp_path / "off")
    for s in "abcd":
        pool.open(s)
        pool.write_examples_many({s: examples(3, ord(s))}, Recipe(lr=1e-2, epochs=1))
    residency = pool.residency
    residency.acquire(["c"])  # pinned, as by a batch running on another thread
    before = residency_state(pool)
    with pytest.raises(PoolFullError, match="in use by running batches"):
        residency.acquire(["a", "b"])
    assert_same_residency(residency_state(pool), before)
    residency.release(["c"])
    assert residency.acquire(["a", "b"]) == [residency.resident["a"], residency.resident["b"]]
    residency.release(["a", "b"])
    pool.detach()


def test_an_acquire_whose_second_eviction_cannot_be_written_moves_no_session(tiny, tmp_path, monkeypatch):
    """An acquire of two away sessions that must evict two others, the second's offload file failing to be
    written (a full disk), is refused with every session as it was: resident set, LRU order, kept copies,
    counters, B rows and offload files (the first victim's file deleted again), through every path that
    acquires several sessions (a batched write, a forward's rows, a reading block). It had evicted the first
    victim and restored the first session into its row, then failed. Once the disk has room the same acquire
    goes through and every session comes back bit for bit."""
    import errno

    from tmem_runtime import residency as residency_module

    pool = SessionPool(tiny, capacity=2, backend="torch", offload="disk", offload_dir=tmp_path / "off")
    states = {}
    for s in "abcd":
        pool.open(s)
        pool.write_examples_many({s: examples(3, ord(s))}, Recipe(lr=1e-2, epochs=1))
        states[s] = pool.state_dict(s)
    assert list(pool.residency.resident) == ["c", "d"] and set(pool.residency.away) == {"a", "b"}
    save_adapter, writes = residency_module.save_adapter, []

    def disk_full_at_the_second_write(path, tensors, metadata):
        writes.append(Path(path).name)
        if len(writes) % 2 == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        save_adapter(path, tensors, metadata)

    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(0))

    def forward() -> None:
        with pool.rows(["a", "b"]), torch.no_grad():
            tiny(input_ids=ids)

    def reading() -> None:
        with pool.reading(["b", "a"]):
            pass

    attempts = {
        "write": lambda: pool.write_examples_many({"a": examples(2, 9), "b": examples(2, 8)},
                                                  Recipe(lr=1e-2, epochs=1)),
        "rows": forward,
        "reading": reading,
    }
    before = residency_state(pool)
    monkeypatch.setattr(residency_module, "save_adapter", disk_full_at_the_second_write)
    for name, attempt in attempts.items():
        with pytest.raises(OSError, match="cannot offload session 'd' .*No space left on device") as info:
            attempt()
            pytest.fail(name)
        assert info.value.errno == errno.ENOSPC, name
        assert_same_residency(residency_state(pool), before)
    assert len(writes) == 2 * len(attempts)
    monkeypatch.setattr(residency_module, "save_adapter", save_adapter)
    forward()  # the disk has room again: "c" and "d" out, "a" and "b" in
    assert sorted(pool.residency.resident) == ["a", "b"]
    assert pool.counters()["disk_writes"] == before["counters"]["disk_writes"] + 2
    for s, want in states.items():
        got = pool.state_dict(s)
        assert all(torch.equal(got[k], v) for k, v in want.items()), s
    pool.detach()


def test_a_relative_offload_dir_survives_a_change_of_working_directory(tiny, tmp_path, monkeypatch):
    """offload_dir="offload" names the directory it named when the pool was made: after the process changed its
    working directory, an offloaded session came back as AdapterFileError (its file looked for under the new one)
    and detach() left the file behind."""
    (tmp_path / "start").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "start")
    pool = SessionPool(tiny, capacity=1, backend="torch", offload="disk", offload_dir="offload")
    pool.open("a")
    pool.open("b")
    pool.write_examples_many({"a": examples(3, 1)}, Recipe(lr=1e-2, epochs=2))
    want = pool.state_dict("a")
    pool.write_examples_many({"b": examples(2, 2)}, Recipe(lr=1e-2, epochs=1))  # "a" to disk
    monkeypatch.chdir(tmp_path / "elsewhere")
    got = pool.state_dict("a")  # "b" to disk, under the same directory
    assert all(torch.equal(got[k], v) for k, v in want.items())
    assert pool.counters()["disk_reads"] == 1 and len(list((tmp_path / "start" / "offload").iterdir())) == 1
    pool.detach()
    assert not any((tmp_path / "start" / "offload").iterdir()) and not any((tmp_path / "elsewhere").iterdir())


def test_a_long_session_id_is_offloaded_to_disk(tiny, tmp_path):
    """A session id whose hex would pass a file name's 255 bytes is offloaded under its SHA-256."""
    pool = SessionPool(tiny, capacity=1, backend="torch", offload="disk", offload_dir=tmp_path)
    long_id = "tenant/" + "x" * 200
    for s in (long_id, "b"):
        pool.open(s)
    pool.write_examples_many({long_id: examples(3, 1)}, Recipe(lr=1e-2, epochs=1))
    want = pool.state_dict(long_id)
    pool.write_examples_many({"b": examples(2, 2)}, Recipe(lr=1e-2, epochs=1))  # the long one goes to disk
    assert pool.counters()["disk_writes"] == 1
    got = pool.state_dict(long_id)
    assert all(torch.equal(got[k], want[k]) for k in want)
    pool.detach()


@pytest.mark.parametrize("offload", ["host", "disk"])
def test_an_offloaded_session_survives_a_change_of_the_base_weights(tiny, tmp_path, offload):
    """A session offloaded before the model's base weights changed in place (an optimizer step on the model,
    e.g. a policy update) comes back as it was, from disk as from host memory (its offload file was refused as
    an adapter of other weights: the session could never be used again)."""
    pool = SessionPool(tiny, capacity=1, backend="torch", offload=offload, offload_dir=tmp_path)
    for s in "ab":
        pool.open(s)
    pool.write_examples_many({"a": examples(3, 1)}, Recipe(lr=1e-2, epochs=1))
    want = pool.state_dict("a")
    pool.write_examples_many({"b": examples(2, 2)}, Recipe(lr=1e-2, epochs=1))  # "a" is offloaded
    with torch.no_grad():
        pool.engine.mlps[-1][1].gate_proj.weight.mul_(1.01)
    got = pool.state_dict("a")
    assert pool.counters()["restores"] == 1 and all(torch.equal(got[k], want[k]) for k in want)
    pool.detach()


def test_offloaded_files_belong_to_one_pool(tmp_path):
    """Two pools offloading to one directory, and a copy of a model whose pool has a session on disk,
    each get their own sessions back exactly (same ids, different weights; the copy's restore does not
    take the original's file)."""
    import copy

    from tmem_runtime.fast_weights import fast_weights_of

    pools = [SessionPool(load_model("tiny-llama")[0], capacity=1, backend="torch", offload="disk",
                         offload_dir=tmp_path) for _ in range(2)]  # fmt: skip
    states = []
    for k, pool in enumerate(pools):
        pool.open("a")
        pool.open("b")
        pool.write_examples_many({"a": examples(3, 10 + k)}, Recipe(lr=1e-2, epochs=2))
        states.append(pool.state_dict("a"))
        pool.write_examples_many({"b": examples(2, 20 + k)}, Recipe(lr=1e-2, epochs=1))  # "a" goes to disk
    copied = fast_weights_of(copy.deepcopy(pools[0].model))
    for pool, want in [(copied, states[0]), *zip(pools, states)]:
        got = pool.state_dict("a")
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert [p.counters()["disk_reads"] for p in pools] == [1, 1]
    everyone = [*pools, copied]
    files = [{f.name for f in tmp_path.glob(f"{p.residency.file_prefix}-*")} for p in everyone]
    assert all(len(f) == 1 for f in files)  # each one's "b" is on disk now (the copy's in a file of its own)
    pools[0].detach()  # a pool going away deletes its own offload files, not the others'
    assert {f.name for f in tmp_path.iterdir()} == files[1] | files[2]
    pools[1].detach(), copied.detach()
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resident_bytes_count_every_buffer_the_engine_holds(dtype):
    """counters()["bytes_resident_total"] is what the engine's buffers take: for a bf16 model the compute
    copies of A and B beside their float32 masters too; it stays the same across writes and evictions."""
    model, _ = load_model("tiny-llama", dtype=dtype)
    pool = SessionPool(model, capacity=3, backend="torch")
    e = pool.engine
    lay, extra = e.layout, 2 if dtype == torch.bfloat16 else 0  # bytes per number of a compute copy
    want = (lay.a_numel * 2 + lay.b_numel * 4) * 4 + (lay.a_numel + 3 * lay.b_numel) * extra
    assert pool.counters()["bytes_resident_total"] == want
    for s in "abcd":
        pool.open(s)
        pool.write_examples_many({s: examples(2, ord(s))}, Recipe(lr=1e-2, epochs=1))
    assert pool.counters()["evictions"] == 1 and pool.counters()["bytes_resident_total"] == want
    pool.detach()


def test_a_sessions_version_changes_with_its_weights_only(tiny):
    """version(s) changes on open, write, reset and load (never repeating), not on reads or on a move to
    host memory and back; another session's write leaves it alone; closed or unknown ids are refused."""
    pool = SessionPool(tiny, capacity=1, backend="torch")
    pool.open("a")
    pool.open("b")  # capacity 1: "a" and "b" take turns on the engine's one row
    seen = {pool.version("a"), pool.version("b")}
    v = pool.version("a")
    pool.write_examples_many({"a": examples(3, 1)}, Recipe(lr=1e-2, epochs=2))
    assert pool.version("a") not in seen
    seen.add(v := pool.version("a"))
    state = pool.state_dict("a")
    b = pool.version("b")
    pool.write_examples_many({"b": examples(2, 2)}, Recipe(lr=1e-2, epochs=1))  # "a" moves out and back
    assert pool.version("a") == v and pool.version("b") not in seen | {b}
    assert pool.counters()["evictions"] >= 1
    with torch.no_grad(), pool.rows(["a"]):
        tiny(input_ids=torch.randint(3, 500, (1, 5)))
    assert pool.version("a") == v
    for change in (lambda: pool.reset("a"), lambda: pool.load_state_dict("a", state)):
        change()
        assert pool.version("a") not in seen
        seen.add(pool.version("a"))
    pool.close("a")
    with pytest.raises(UnknownSessionError):
        pool.version("a")
    pool.open("a")
    assert pool.version("a") not in seen
    pool.detach()


def test_bad_input_is_refused_and_changes_nothing(tiny):
    pool = SessionPool(tiny, capacity=2, backend="torch")
    pool.open("a")
    pool.open("b")
    pool.write_examples_many({"a": examples(3, 1)}, Recipe(lr=1e-2, epochs=2))
    before = pool.state_dict("a")
    with pytest.raises(UnknownSessionError, match="unknown session 'nope'"):
        pool.write_examples_many({"nope": examples(2, 1)}, Recipe())
    with pytest.raises(UnknownSessionError):
        with pool.rows(["a", "nope"]):
            pass
    for call in (pool.rows, pool.reading):  # one id, not a list: not read as the ids "a", "b", ...
        with pytest.raises(TypeError, match=r"takes a list of session ids, got one string: \w+\(\['ab'\]\)"):
            call("ab")
    with pytest.raises(ValueError, match="already open"):
        pool.open("a")
    ids = torch.randint(3, 500, (3, 5))
    with pytest.raises(ValueError, match="rows"), torch.no_grad(), pool.rows(["a", "b"]):
        tiny(input_ids=ids)  # two sessions named for a batch of three
    # the same with rows that read nothing yet (a fresh session at B0, the bare model, no row at all):
    # refused as well, not only once a write has made the session differ from the bare model
    for rows in (["b"], [None], [], ["b", None, "b", "b"]):
        with pytest.raises(ValueError, match="rows"), torch.no_grad(), pool.rows(rows):
            tiny(input_ids=ids)
    pool.open("c")
    # more sessions at once than the pool has rows, nothing else running: said as such
    with pytest.raises(PoolFullError, match="3 sessions at once .* this pool has 2: use groups of at most 2"):
        pool.write_examples_many({s: examples(2, 5) for s in "abc"}, Recipe())
    with pytest.raises(PoolFullError, match="3 sessions at once"), pool.rows(["a", "b", "c"]):
        pass
    assert all(torch.equal(pool.state_dict("a")[k], v) for k, v in before.items())
    with pool.rows(["a", "b"]):  # both rows pinned by a running batch: "c" cannot get one
        with pytest.raises(PoolFullError):
            pool.state_dict("c")
        with pytest.raises(FastWeightsError, match="wait for itself"):
            pool.write_examples_many({"a": examples(2, 5)}, Recipe())
    assert all(torch.equal(pool.state_dict("a")[k], v) for k, v in before.items())
    with pytest.raises(ValueError, match="train_a"):
        pool.write_examples_many({"a": examples(2, 5)}, Recipe(), train_a=True)
    pool.detach()


def test_a_malformed_example_in_a_batched_write_is_refused_naming_its_session(tiny):
    """An example whose labels are not one per input id (here one more: alone a shape error deep in collate, but
    beside a longer example of another session it trained a target past its end, silently), float ids (truncated)
    or a bare string: ValueError naming the session and example, no session changed; the same write with the
    example fixed trains both sessions as FastWeights writes each alone."""
    recipe = Recipe(optimizer="sgd", lr=5e-2, epochs=2)
    good = examples(3, 1)  # (longer than the bad example: its padding held the extra label)
    fixed = [([5, 6, 7, 8], [IGNORE_INDEX, 6, 7, 8])]
    pool = SessionPool(tiny, capacity=2, backend="torch")
    pool.open("a")
    pool.open("b")
    pool.write_examples_many({"b": examples(2, 2)}, recipe)
    before = {s: pool.state_dict(s) for s in "ab"}
    for bad, match in (([([5, 6, 7], [IGNORE_INDEX, 6, 7, 8])], "3 input ids and 4 labels"),
                       ([([5.0, 6.5, 7.0], [5, 6, 7])], "input_ids is not a sequence of integer"),
                       (["5 6 7"], "not an .input_ids, labels. pair")):  # fmt: skip
        with pytest.raises(ValueError, match=f"session 'b' example 0.*{match}"):
            pool.write_examples_many({"a": good, "b": bad}, recipe)
    for s in "ab":
        assert all(torch.equal(pool.state_dict(s)[k], v) for k, v in before[s].items()), s
        assert pool.stats[s].writes == (s == "b")
    pool.write_examples_many({"a": good, "b": fixed}, recipe)
    got = {s: pool.state_dict(s) for s in "ab"}
    pool.detach()
    for s, ex in (("a", good), ("b", fixed)):
        fw = FastWeights(tiny, backend="torch")
        if s == "b":
            fw.load_state_dict(before["b"])
        fw.write_examples(ex, recipe)
        for k, v in fw.state_dict().items():
            assert (got[s][k] - v).norm() <= 1e-5 * v.norm().clamp_min(1e-12), (s, k)
        fw.detach()


@pytest.mark.parametrize("bad", [dict(offload="gpu"), dict(offload="disk")])  # (disk: without offload_dir)
def test_a_pool_refused_at_construction_leaves_the_model_as_it_was(tiny, bad):
    """A bad offload argument is found once the engine has attached: the refusal undoes the attach (it left the
    model's MLPs replaced and the model marked as having fast weights, so nothing could attach to it again)."""
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        bare = tiny(input_ids=ids).logits
    with pytest.raises(ValueError, match="offload"):
        SessionPool(tiny, capacity=2, backend="torch", **bad)
    assert getattr(tiny, "_tmem_fast_weights", None) is None
    assert all("forward" not in layer.mlp.__dict__ for layer in tiny.model.layers)
    pool = SessionPool(tiny, capacity=2, backend="torch")  # attaches as to a fresh model
    pool.open("a")
    pool.write_examples_many({"a": examples(3, 1)}, Recipe(lr=1e-2, epochs=1))
    pool.detach()
    with torch.no_grad():
        torch.testing.assert_close(tiny(input_ids=ids).logits, bare, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_capacity_past_the_devices_memory_is_refused_before_any_row_is_allocated(dtype):
    """A capacity whose B rows cannot fit in the device's available memory (`tmem rl --group-size 10**12`, a
    serve config's capacity) is refused at once with a ValueError naming the capacity and the bytes, the model
    left as it was: every row was allocated up front (torch's allocator error, or on the CPU the OOM killer once
    they were written). The bytes per row are what the engine allocates per row: the pool's bytes_per_session
    (the float32 master) and, for a bf16 model, its compute copy."""
    from tmem_runtime.device_memory import available_bytes
    from tmem_runtime.engine import row_bytes

    model, _ = load_model("tiny-llama", dtype=dtype)
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        bare = model(input_ids=ids).logits
    sizes = []
    for capacity in (2, 3):
        pool = SessionPool(model, capacity=capacity, backend="torch")
        sizes.append(pool.counters()["bytes_resident_total"])
        per_session, layout = pool.bytes_per_session(), pool.layout
        pool.detach()
    row = row_bytes(layout, dtype)
    assert row == sizes[1] - sizes[0] == per_session == layout.b_numel * (4 if dtype == torch.float32 else 6)
    # (10**12 first: without the check it fails in torch's allocator; twice what is available would be written)
    for capacity in (10**12, 2 * available_bytes(torch.device("cpu")) // row + 1):
        start = time.perf_counter()
        with pytest.raises(ValueError, match=rf"capacity={capacity} \(B rows of {row} bytes each\) needs "
                                             rf"{capacity * row} bytes .* on cpu, which has \d+ bytes"):
            SessionPool(model, capacity=capacity, backend="torch")
        assert time.perf_counter() - start < 5
        assert getattr(model, "_tmem_fast_weights", None) is None
    pool = SessionPool(model, capacity=2, backend="torch")  # attaches as to a fresh model
    pool.detach()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, bare, rtol=0, atol=0)


def test_gradient_checkpointing_over_pool_rows_is_refused_at_the_forward(tiny):
    """Gradient checkpointing runs each layer again in the backward, outside the rows() block (or on autograd's
    device thread), where the rows are unbound: a backward after the block raised torch's CheckpointError. Such
    a forward is refused at once, nothing held; without checkpointing the base weights' gradient through row 0
    equals the model's with only that session attached (FastWeights, whose one session stays bound: checkpointed,
    backward after its forward)."""
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    weight = tiny.model.layers[-1].mlp.down_proj.weight
    enable = getattr(tiny, "activation_checkpointing_enable", None) or tiny.gradient_checkpointing_enable
    disable = getattr(tiny, "activation_checkpointing_disable", None) or tiny.gradient_checkpointing_disable
    pool = SessionPool(tiny, capacity=2, backend="torch")
    pool.open("a")
    pool.write_examples_many({"a": examples(4, 1)}, Recipe(lr=3e-2, epochs=3))
    state = pool.state_dict("a")
    tiny.train()
    weight.requires_grad_(True)
    try:
        enable()
        for rows in (["a", None], [None, None]):  # (refused whatever the rows read)
            with pytest.raises(FastWeightsError, match="gradient checkpointing"), pool.rows(rows):
                tiny(input_ids=ids)
        assert not pool.residency.pins and not pool._locks._reads
        with torch.no_grad(), pool.rows(["a", None]):  # no backward: nothing to recompute
            tiny(input_ids=ids)
        disable()
        with pool.rows(["a", None]):
            out = tiny(input_ids=ids).logits
        out[0].sum().backward()  # after the block
        pooled, weight.grad = weight.grad.clone(), None
        pool.detach()
        fw = FastWeights(tiny, backend="torch")
        fw.load_state_dict(state)
        enable()
        tiny(input_ids=ids[:1]).logits[0].sum().backward()
        fw.detach()
        torch.testing.assert_close(pooled, weight.grad, rtol=1e-5, atol=1e-5)
        assert pooled.abs().sum() > 0
    finally:
        disable()
        tiny.eval()
        weight.requires_grad_(False)
        weight.grad = None


def test_a_session_with_no_card_in_a_batched_write_is_left_as_written_alone(tiny):
    """A batched write naming a session with no example trains the others as if alone (B of FastWeights
    writing them one by one) and leaves that one as a write of it alone does: no row taken (it made a full
    pool refuse the write: 3 sessions on 2 rows), no write counted, its version unchanged. An unknown id
    with no example is still refused, nothing changed."""
    recipe = Recipe(optimizer="sgd", lr=5e-2, epochs=2, batch_size=4)
    cards = {"c": examples(3, 3), "d": examples(5, 4)}  # 2 and 4 steps
    want = {}
    for s, ex in cards.items():
        fw = FastWeights(tiny, backend="torch")
        fw.write_examples(ex, recipe, seed=5)
        want[s] = fw.state_dict()
        fw.detach()
    pool = SessionPool(tiny, capacity=2, backend="torch")
    for s in "abcd":
        pool.open(s)
    pool.write_examples_many({"a": examples(2, 1)}, recipe)
    a, version_b = pool.state_dict("a"), pool.version("b")
    with pytest.raises(UnknownSessionError):
        pool.write_examples_many({"nope": [], **cards}, recipe, seed=5)
    losses = pool.write_examples_many({"b": [], **cards}, recipe, seed=5)
    assert losses["b"] == [] and len(losses["c"]) == 2 and len(losses["d"]) == 4
    assert pool.stats["b"].writes == 0 and pool.version("b") == version_b
    assert "b" not in pool.residency.resident
    for s, ref in want.items():
        got = pool.state_dict(s)
        for k, v in ref.items():
            assert (got[k] - v).norm() <= 1e-5 * v.norm().clamp_min(1e-12), (s, k)
    assert all(torch.equal(pool.state_dict("a")[k], v) for k, v in a.items())  # evicted, back exactly
    assert all(v.abs().sum() == 0 for k, v in pool.state_dict("b").items() if k.endswith("lora_B"))
    pool.detach()


def test_a_bad_session_in_a_batched_write_rolls_back_alone(tiny):
    pool = SessionPool(tiny, capacity=2, backend="torch")
    pool.open("good")
    pool.open("bad")
    bad = examples(3, 2)
    bad = [(ids[:-1] + [511], lab) for ids, lab in bad]
    with torch.no_grad():
        tiny.model.embed_tokens.weight[511] = float("inf")  # only "bad" reads this token
    versions = {s: pool.version(s) for s in ("good", "bad")}
    with pytest.raises(WriteError) as info:
        pool.write_examples_many({"good": examples(3, 1), "bad": bad}, Recipe(lr=1e-2, epochs=2))
    assert set(info.value.errors) == {"bad"} and len(info.value.losses["good"]) == 2
    assert pool.version("bad") == versions["bad"] != pool.version("good")  # (rolled back: its weights unchanged)
    assert pool.stats["good"].writes == 1 and pool.stats["bad"].rollbacks == 1
    assert all(v.abs().sum() == 0 for k, v in pool.state_dict("bad").items() if k.endswith("lora_B"))
    assert any(v.abs().sum() > 0 for k, v in pool.state_dict("good").items() if k.endswith("lora_B"))
    pool.detach()


@pytest.mark.slow  # the real tokenizer
def test_a_rolled_back_flashcard_write_counts_no_cards():
    """Stats count the cards of committed writes only: in a batched write whose one session rolls back,
    that session's cards are not counted; the other's are."""
    _, tokenizer = load_model("smollm2-135m")
    model, _ = load_model("tiny-llama")
    with torch.no_grad():  # the tiny model's vocabulary is small: map the real tokenizer's ids into it
        model.resize_token_embeddings(len(tokenizer))
    pool = SessionPool(model, capacity=2, backend="torch")
    pool.open("good")
    pool.open("bad")
    good = [("Where does Nina work?", "the city library"), ("Who is Mira?", "a painter")]
    bad = [("What is the zyzzyva's quorum?", "xylophonic")]
    ids = lambda cards: {t for q, a in cards for t in tokenizer(q + " " + a)["input_ids"]}  # noqa: E731
    with torch.no_grad():
        model.model.embed_tokens.weight[sorted(ids(bad) - ids(good) - ids([("", "")]))] = float("inf")
    with pytest.raises(WriteError) as info:
        pool.write_qa_many(tokenizer, {"good": good, "bad": bad}, Recipe(lr=1e-2, epochs=1))
    assert set(info.value.errors) == {"bad"}
    assert (pool.stats["good"].cards, pool.stats["bad"].cards) == (2, 0)
    assert (pool.stats["good"].writes, pool.stats["bad"].rollbacks) == (1, 1)
    with pytest.raises(FastWeightsError):  # a single session's rolled-back write: no cards either
        pool.write_qa("bad", tokenizer, bad, Recipe(lr=1e-2, epochs=1))
    assert pool.stats["bad"].cards == 0 and pool.stats["bad"].rollbacks == 2
    pool.detach()


def test_concurrent_writes_and_generates_match_serial_runs(tiny):
    """Threads writing some sessions while others generate with other sessions: every result equals
    the same call made alone (writes serialise; a generate sees each session before or after a write)."""
    pool = SessionPool(tiny, capacity=4, backend="torch")
    for s in ("w1", "w2", "g1", "g2"):
        pool.open(s)
    pool.write_examples_many({"g1": examples(3, 1), "g2": examples(3, 2)}, Recipe(lr=3e-2, epochs=4))
    prompt = torch.tensor([[5, 6, 7, 8, 9]])
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False, pad_token_id=0)

    def generate(s):
        with pool.rows([s]):
            return tiny.generate(prompt, **kw)

    want_gen = {s: generate(s) for s in ("g1", "g2")}
    recipe = Recipe(lr=1e-2, epochs=2)
    results, errors = {}, []

    def run(name, fn):
        try:
            results[name] = fn()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    jobs = [("w1", lambda: pool.write_examples_many({"w1": examples(4, 5)}, recipe)["w1"]),
            ("w2", lambda: pool.write_examples_many({"w2": examples(4, 6)}, recipe)["w2"])]  # fmt: skip
    jobs += [(f"{s}-{k}", lambda s=s: generate(s)) for s in ("g1", "g2") for k in range(3)]
    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for s in ("g1", "g2"):
        for k in range(3):
            assert torch.equal(results[f"{s}-{k}"], want_gen[s])
    pool.detach()
    serial = SessionPool(tiny, capacity=2, backend="torch")
    for s, seed in (("w1", 5), ("w2", 6)):
        serial.open(s)
        want = serial.write_examples_many({s: examples(4, seed)}, recipe)[s]
        torch.testing.assert_close(torch.tensor(results[s]), torch.tensor(want), rtol=1e-6, atol=0)
    serial.detach()


# ---------------------------------------------------------------- trunk outputs kept between writes
REPLAY_RECIPE = Recipe(optimizer="adamw", lr=1e-2, epochs=3, batch_size=4)


def replaying_writes(model, trunk_cache_bytes: int) -> tuple[list[list[float]], dict, TrunkRows | None, dict]:
    """Three writes of one session, each its new examples plus every earlier one (replay), as the agent does:
    (losses, state, the pool's TrunkRows, its counters' trunk rows entries)."""
    pool = SessionPool(model, capacity=2, trunk_cache_bytes=trunk_cache_bytes)
    pool.open("s")
    seen, losses = [], []
    for k in range(3):
        new = examples(4, seed=k)
        losses.append(pool.write_examples_many({"s": new + seen}, REPLAY_RECIPE, seed=k)["s"])
        seen += new
    state = pool.state_dict("s")
    rows = pool.trunk_rows
    if rows is not None:  # what is kept is counted, within its bytes
        kept = [h for _, h in rows.rows.values()]
        kept += [t for h, kv, _ in rows.prefixes.values() for t in kv_tensors(h, kv)]
        assert rows.bytes == sum(t.numel() * t.element_size() for t in kept) <= rows.max_bytes
    counters = {k: v for k, v in pool.counters().items() if k.startswith("trunk_rows")}
    pool.detach()
    return losses, state, rows, counters


def kv_tensors(hidden, kv) -> list[torch.Tensor]:
    return [hidden, *(t for pair in kv.kv.values() for t in pair)]


def test_replayed_examples_reuse_their_trunk_and_train_the_same(tiny):
    want_losses, want_state, none, off = replaying_writes(tiny, 0)
    got_losses, got_state, rows, on = replaying_writes(tiny, 1 << 20)
    assert none is None and off == {"trunk_rows_bytes": 0, "trunk_rows_hits": 0, "trunk_rows_misses": 0}
    assert on["trunk_rows_hits"] == 12 and on["trunk_rows_misses"] == 12 and on["trunk_rows_bytes"] > 0
    assert (rows.hits, rows.misses) == (4 + 8, 12)  # writes 2 and 3 ran the trunk over their 4 new examples only
    assert not rows.rows and rows.bytes == 0  # detach() let them go
    # room for about half of them: rows dropped (least recently used) between writes and run again
    half_losses, half_state, half, _ = replaying_writes(tiny, on["trunk_rows_bytes"] // 2)
    assert 0 < half.hits < 12 and half.hits + half.misses == 24
    for losses, state in ((got_losses, got_state), (half_losses, half_state)):
        torch.testing.assert_close(torch.tensor(sum(losses, [])), torch.tensor(sum(want_losses, [])), rtol=1e-5,
                                   atol=1e-6)  # fmt: skip
        for k, v in want_state.items():
            assert (state[k] - v).norm() <= 5e-5 * v.norm(), k  # AdamW: rounding of other GEMM sizes


@pytest.mark.parametrize("change", ["in place", "replaced"])
@pytest.mark.parametrize("where", ["trunk layer", "first adapted attention"])
def test_a_changed_trunk_weight_forgets_every_kept_row(tiny, change, where):
    pool = SessionPool(tiny, capacity=1)
    pool.open("s")
    cards = examples(3, seed=5)
    pool.write_examples_many({"s": cards}, REPLAY_RECIPE)["s"]
    # the trunk: the layers below the adapted ones (the last 4), and the first adapted layer's attention half
    first = len(tiny.model.layers) - 4
    linear = tiny.model.layers[0].mlp.up_proj if where == "trunk layer" else tiny.model.layers[first].self_attn.o_proj
    with torch.no_grad():
        if change == "in place":
            linear.weight.mul_(1.5)
        else:  # a new Parameter object (e.g. load_state_dict(..., assign=True))
            linear.weight = torch.nn.Parameter(linear.weight * 1.5, requires_grad=False)
    pool.reset("s")
    after = pool.write_examples_many({"s": cards}, REPLAY_RECIPE)["s"]
    assert pool.trunk_rows.hits == 0 and pool.trunk_rows.misses == 6
    assert (pool.trunk_rows.prefix_hits, pool.trunk_rows.prefix_misses) == (0, 2)  # the second ran it again
    pool.detach()
    fresh = SessionPool(tiny, capacity=1, trunk_cache_bytes=0)
    fresh.open("s")
    want = fresh.write_examples_many({"s": cards}, REPLAY_RECIPE)["s"]
    torch.testing.assert_close(torch.tensor(after), torch.tensor(want))


def test_a_shared_prefix_runs_the_trunk_once_across_writes_and_trains_the_same(tiny):
    """Writes of new cards that share the chat preamble: the first runs the trunk over it, later ones read
    its output and keys/values back (bit-identical losses and B to a pool that keeps nothing); a prefix
    of other tokens runs again; at most MAX_PREFIXES are kept, counted in the bytes."""
    recipe = Recipe(optimizer="adamw", lr=1e-2, epochs=2, batch_size=4)
    results = []
    for cache_bytes in (1 << 20, 0):
        pool = SessionPool(tiny, capacity=1, trunk_cache_bytes=cache_bytes)
        pool.open("s")
        losses = [pool.write_examples_many({"s": examples(4, seed=k)}, recipe, seed=k)["s"] for k in range(3)]
        results.append((losses, pool.state_dict("s")))
        if cache_bytes:
            pool.detach()
    (got, got_state), (want, want_state) = results
    assert got == want and all(torch.equal(got_state[k], v) for k, v in want_state.items())
    pool.detach()
    pool = SessionPool(tiny, capacity=1)
    pool.open("s")
    for k in range(3):
        pool.write_examples_many({"s": examples(4, seed=k)}, recipe, seed=k)
    kept = pool.trunk_rows
    assert (kept.prefix_hits, kept.prefix_misses) == (2, 1) and len(kept.prefixes) == 1
    counters = pool.counters()
    assert (counters["trunk_prefix_hits"], counters["trunk_prefix_misses"]) == (2, 1)
    h, kv, size = next(iter(kept.prefixes.values()))
    assert h.shape[:2] == (1, 9) and size == sum(t.numel() * t.element_size() for t in kv_tensors(h, kv))
    for k in range(MAX_PREFIXES + 1):  # other preambles: each runs once, the oldest kept goes first
        other = [([7 + k] * 9 + ids[9:], labels) for ids, labels in examples(4, seed=10 + k)]
        pool.write_examples_many({"s": other}, recipe)
    assert len(kept.prefixes) == MAX_PREFIXES and kept.prefix_misses == 1 + MAX_PREFIXES + 1
    assert tuple([7 + MAX_PREFIXES] * 9) in kept.prefixes and tuple(examples(1, 0)[0][0][:9]) not in kept.prefixes
    pool.detach()


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


def test_a_state_dict_waits_for_a_commit_in_progress(tiny):
    """A commit (write, swap, reset) writes B rows holding the pool's lock: a state_dict from another thread
    waits for it, so it never reads a row half written. (Here the wait is at pinning the session; the copy
    itself also runs under the lock, for a commit that starts between the two.)"""
    pool = SessionPool(tiny, capacity=2)
    pool.open("s")
    out = []
    with pool._locks.commit(["s"]):  # what a commit holds while it writes the rows
        reader = threading.Thread(target=lambda: out.append(pool.state_dict("s")))
        reader.start()
        reader.join(0.5)
        assert reader.is_alive() and not out
    reader.join(30)
    assert len(out) == 1
    pool.detach()


@pytest.mark.parametrize("change", ["reset", "swap"])
def test_a_reset_or_swap_during_a_write_of_the_session_commits_after_it(tiny, change):
    """A reset (or swap) of a session, from another thread while a write of it trains, waits for that write
    to commit and then applies: the session ends as after the write and then the reset (B0) or swap (the
    loaded state), never as the write trained from the state before it (the reset was lost). A reset of
    another session does not wait."""
    pool = SessionPool(tiny, capacity=3, backend="torch")
    for s in ("a", "b", "other"):
        pool.open(s)
    pool.write_examples_many({"b": examples(3, 7)}, Recipe(lr=1e-2, epochs=1))
    swapped = pool.state_dict("b")
    pool.write_examples_many({"a": examples(3, 1), "other": examples(2, 3)}, Recipe(lr=1e-2, epochs=1))
    changer, during = [], {}

    def on_step(step, n_steps, loss):
        if changer:
            return
        other = threading.Thread(target=pool.reset, args=("other",))
        other.start()
        other.join(30)
        during["other"] = not other.is_alive()  # a reset of a session not being written runs at once
        act = (lambda: pool.reset("a")) if change == "reset" else (lambda: pool.load_state_dict("a", swapped))
        changer.append(threading.Thread(target=act))
        changer[0].start()
        changer[0].join(0.5)
        during["a"] = not changer[0].is_alive()

    losses = pool.write_examples_many({"a": examples(3, 2)}, Recipe(lr=1e-2, epochs=2), on_step=on_step)
    changer[0].join(30)
    assert len(losses["a"]) == 2 and during == {"other": True, "a": False}
    want = {"reset": {k: torch.zeros_like(v) for k, v in swapped.items()}, "swap": swapped}[change]
    got = pool.state_dict("a")
    for k, v in want.items():
        if k.endswith("lora_B"):
            assert torch.equal(got[k], v), k
    assert pool.stats["a"].writes == (0 if change == "reset" else 2)
    with pytest.raises(FastWeightsError, match="wait for itself"):  # from the write's own thread: refused
        pool.write_examples_many({"a": examples(3, 2)}, Recipe(lr=1e-2, epochs=1), on_step=lambda *_: pool.reset("a"))
    pool.detach()


def test_a_close_during_a_write_of_the_session_waits_for_its_commit(tiny):
    """pool.close("a") from another thread while a write of "a" trains (its on_step held on an Event) waits for
    that write to commit, then closes (it raised "in use by a running batch"): the write returns the losses of
    the same write run alone and its stats are counted before the close, "a" is gone, its row is free (two
    new sessions fit the capacity-2 pool with nothing evicted, both at B0). A close of another session meanwhile
    runs at once; close(wait=False) and a close from the write's own on_step callback are clear errors and
    close nothing."""
    recipe, cards = Recipe(lr=1e-2, epochs=3), examples(3, 2)
    alone = SessionPool(tiny, capacity=1, backend="torch")
    alone.open("a")
    want = alone.write_examples_many({"a": cards}, recipe)["a"]
    alone.detach()

    pool = SessionPool(tiny, capacity=2, backend="torch")
    pool.open("a")
    pool.open("other")
    stats = pool.stats["a"]  # (counted in place by the write; the close drops the pool's entry)
    in_step, resume = threading.Event(), threading.Event()

    def on_step(step, n_steps, loss):
        if step == 1:
            in_step.set()
            assert resume.wait(60)

    written, closed = {}, {}

    def write():
        written["losses"] = pool.write_examples_many({"a": cards}, recipe, on_step=on_step)

    def close():
        try:
            pool.close("a")
            closed["ok"] = True
        except Exception as exc:  # (the failure this test is about: recorded, asserted below)
            closed["error"] = exc

    writer, closer = threading.Thread(target=write), threading.Thread(target=close)
    writer.start()
    assert in_step.wait(60)
    pool.close("other")  # another session: closed at once, mid-write
    assert "other" not in pool.sessions
    closer.start()
    closer.join(0.5)
    assert closer.is_alive() and "a" in pool.sessions  # waiting for the write's commit
    with pytest.raises(FastWeightsError, match="would wait for its commit"):  # wait=False: refused, not waited
        pool.close("a", wait=False)
    assert "a" in pool.sessions
    resume.set()
    writer.join(60)
    closer.join(60)
    assert not writer.is_alive() and not closer.is_alive()
    assert closed == {"ok": True}
    assert written["losses"]["a"] == want  # the whole write ran and committed
    assert (stats.writes, stats.steps) == (1, len(want))
    assert pool.sessions == [] and "a" not in pool.stats
    c = pool.counters()
    assert (c["open"], c["resident"]) == (0, 0)
    for s in ("new1", "new2"):  # both rows free again: no eviction, each new session starts at B0
        pool.open(s)
        assert all(v.abs().sum() == 0 for k, v in pool.state_dict(s).items() if k.endswith("lora_B"))
    assert pool.counters()["evictions"] == c["evictions"] and pool.counters()["resident"] == 2

    with pytest.raises(FastWeightsError, match="wait for itself"):  # from the write's own thread: refused
        pool.write_examples_many({"new1": cards}, recipe, on_step=lambda *_: pool.close("new1"))
    assert "new1" in pool.sessions
    pool.detach()


# ---------------------------------------------------------------- read blocks across forwards
def wait_for_a_waiting_commit(pool: SessionPool, writer: threading.Thread) -> None:
    """Until `writer` (a thread writing, swapping or resetting) waits for a read block to end."""
    deadline = time.monotonic() + 120
    while not pool._locks.commits_waiting:
        assert writer.is_alive() and time.monotonic() < deadline, "the commit never waited"
        time.sleep(0.01)


def test_a_reading_block_reads_copies_while_writes_commit(tiny):
    """Inside pool.reading(["s", "t"]) (e.g. around a decode loop that binds its rows per forward), the
    rows() blocks read copies of the sessions' rows taken when it began: a write of "s" from another
    thread commits at once (pool.version and a forward outside the block see it), while every forward
    inside still reads the state the block began with. Its scratch rows are free again after."""
    pool = SessionPool(tiny, capacity=4, backend="torch")
    for s in ("s", "t"):
        pool.open(s)
    pool.write_examples_many({"s": examples(3, 1), "t": examples(3, 2)}, Recipe(lr=3e-2, epochs=2))
    ids = torch.tensor([[5, 6, 7, 8, 9]] * 3)

    def logits(sessions):
        with torch.no_grad(), pool.rows(sessions):
            return tiny(input_ids=ids[: len(sessions)]).logits

    before = logits(["s", "t", None])
    free = len(pool.residency.free)
    with pool.reading(["s", "t"]) as versions:
        assert versions == {"s": pool.version("s"), "t": pool.version("t")}
        assert len(pool.residency.free) == free - 2  # the copies' rows
        write = threading.Thread(target=lambda: pool.write_examples_many({"s": examples(4, 3)}, Recipe(lr=3e-2)))
        write.start()
        write.join(timeout=120)
        assert not write.is_alive() and pool.version("s") != versions["s"]  # committed, not held back
        assert torch.equal(logits(["s", "t", None]), before)  # this block still reads the copies
        after = threading.Thread(target=lambda: outside.append(logits(["s"])))
        outside = []
        after.start()
        after.join(timeout=60)
        assert not torch.allclose(outside[0][0], before[0], atol=1e-4)  # another thread reads the new "s"
    assert len(pool.residency.free) == free and pool.counters()["commit_waits"] == 0
    assert torch.equal(logits(["s"])[0], outside[0][0])
    pool.detach()


def test_a_reading_block_without_a_free_row_holds_its_sessions_commits_back(tiny):
    """With no free row for a copy, a reading block reads its session in place: a write of it trains
    but commits only when the block ends (every forward inside reads one state); a write of another
    session commits meanwhile, and a reset of a session no block reads never waits."""
    pool = SessionPool(tiny, capacity=2, backend="torch")
    for s in ("s", "t"):
        pool.open(s)
    pool.write_examples_many({"s": examples(3, 1), "t": examples(3, 4)}, Recipe(lr=3e-2, epochs=2))
    assert not pool.residency.free  # both rows hold sessions
    ids = torch.tensor([[5, 6, 7, 8, 9]])

    def logits(session):
        with torch.no_grad(), pool.rows([session]):
            return tiny(input_ids=ids).logits

    recipe = Recipe(lr=3e-2, epochs=3)
    write_s = threading.Thread(target=lambda: pool.write_examples_many({"s": examples(4, 2)}, recipe))
    with pool.reading(["s"]) as versions:
        before = logits("s")
        write_s.start()
        wait_for_a_waiting_commit(pool, write_s)
        version_t = pool.version("t")
        write_t = threading.Thread(target=lambda: pool.write_examples_many({"t": examples(4, 3)}, recipe))
        write_t.start()  # (it waits for the write of "s" to end: writes run one at a time)
        assert torch.equal(logits("s"), before) and pool.version("s") == versions["s"]
        assert pool.version("t") == version_t
    write_s.join(timeout=120)
    write_t.join(timeout=120)
    assert not write_s.is_alive() and not write_t.is_alive()
    assert pool.version("s") != versions["s"] and pool.version("t") != version_t
    assert not torch.allclose(logits("s"), before, atol=1e-4)
    version = pool.version("s")
    with pool.reading(["t"]):  # a block reading other sessions does not hold a commit of "s" back
        reset = threading.Thread(target=pool.reset, args=("s",))
        reset.start()
        reset.join(timeout=60)
        assert not reset.is_alive() and pool.version("s") != version
    pool.detach()


def test_a_plain_forward_and_greedy_generate_read_one_state_of_fast_weights(tiny):
    """A forward of a model with FastWeights, outside generate(), is a read block of its own: a hot swap
    from another thread landing mid-forward waits for it to end, so the forward reads the old state
    in all four layers. Likewise every token of a greedy_generate without `bind`."""
    from tmem_runtime.decoding import greedy_generate

    fw = FastWeights(tiny, backend="torch")
    fw.write_examples(examples(4, 1), Recipe(lr=3e-2, epochs=3))
    old = fw.state_dict()
    other = FastWeights(load_model("tiny-llama")[0], backend="torch")  # same weights, another memory
    other.write_examples(examples(4, 2), Recipe(lr=3e-2, epochs=3))
    new = other.state_dict()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        want_old = tiny(input_ids=ids).logits
    want_tokens = greedy_generate(tiny, [ids[0].tolist()], 6, eos_ids=[])
    fw.load_state_dict(new)
    with torch.no_grad():
        want_new = tiny(input_ids=ids).logits
    fw.load_state_dict(old)

    def swapped_during(read, pause: threading.Event, resume: threading.Event):
        """read() on a thread until it sets `pause`; then a hot swap to `new` from another thread, which
        must wait for the read to end (it is resumed once the swap waits); read()'s result."""
        out = {}
        reader = threading.Thread(target=lambda: out.update(result=read()))
        reader.start()
        assert pause.wait(60)
        swap = threading.Thread(target=fw.load_state_dict, args=(new,))
        swap.start()
        wait_for_a_waiting_commit(fw.store, swap)
        resume.set()
        reader.join(timeout=60)
        swap.join(timeout=60)
        return out["result"]

    middle, resume = threading.Event(), threading.Event()

    def pause(*_):  # a forward halfway through its layers
        middle.set()
        assert resume.wait(60)

    hook = tiny.model.layers[len(tiny.model.layers) // 2].register_forward_hook(pause)
    got = swapped_during(lambda: tiny(input_ids=ids).logits.detach(), middle, resume)
    hook.remove()
    torch.testing.assert_close(got, want_old, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(tiny(input_ids=ids).logits, want_new, rtol=0, atol=0)

    fw.load_state_dict(old)
    first, resume = threading.Event(), threading.Event()

    def stop(tokens):  # called after each new token: the first one pauses the decode
        if len(tokens) == 1:
            first.set()
            assert resume.wait(60)
        return False

    got = swapped_during(lambda: greedy_generate(tiny, [ids[0].tolist()], 6, eos_ids=[], stop=stop), first, resume)
    assert got == want_tokens
    fw.detach()
    other.detach()


def test_row_bindings_bound_from_many_threads_are_each_their_rows(tiny):
    """The engine keeps the bindings of recent row lists (a decode loop binds its rows per step): threads
    binding more distinct row lists than it keeps, at once, each get a binding of exactly their rows."""
    pool = SessionPool(tiny, capacity=4, backend="torch")
    engine = pool.engine
    lists = [tuple((i + j) % 5 - 1 for j in range(1 + i % 6)) for i in range(3 * engine.bindings.ROW_BINDINGS)]
    errors: list = []

    def bind(offset: int) -> None:
        try:
            for k in range(1000):
                rows = lists[(offset + k) % len(lists)]
                b = engine.bindings.for_rows([None if r < 0 else r for r in rows])
                per_row = [s for s, lo, hi in zip(b.host_slots, b.indptr[:-1], b.indptr[1:]) for _ in range(hi - lo)]
                assert tuple(per_row) == rows and b.host_rows == len(rows)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=bind, args=(7 * t,)) for t in range(6)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often: the races show (without the engine's lock: KeyError)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    pool.detach()
    assert not errors, errors[0]
    assert len(engine.bindings._recent) <= engine.bindings.ROW_BINDINGS


def test_recent_items_keep_the_most_recently_used_and_copies_start_empty():
    import copy
    import pickle

    from tmem_runtime.recent_items import RecentItems

    kept = RecentItems(2)
    kept.put("a", 1)
    kept.put("b", 2)
    assert kept.get("a") == 1  # "a" is now the most recent: "b" goes first
    kept.put("c", 3)
    assert (kept.get("b"), kept.get("a"), kept.get("c"), len(kept)) == (None, 1, 3, 2)
    for twin in (copy.deepcopy(kept), pickle.loads(pickle.dumps(kept))):
        assert len(twin) == 0 and twin.size == 2
        twin.put("d", 4)
        assert twin.get("d") == 4 and kept.get("d") is None


@pytest.mark.parametrize("name", ["tiny-olmo2", "tiny-gemma2"])  # SiLU (the fused ops), GELU (the composed MLP)
def test_a_batched_write_through_the_models_own_forward_equals_sequential_writes(name):
    """A model the piecewise Decoder does not drive writes through its own forward (the generic path), whose
    segments name rows of the padded batch, not tokens: two sessions written at once equal each written alone
    (the batched write failed to reshape its MLP output: the row segments were read as token segments)."""
    model, _ = load_model(name)
    recipe = Recipe(optimizer="adamw", lr=1e-2, epochs=2, batch_size=2)
    sessions = {"a": examples(3, 1), "b": examples(2, 2)}
    pool = SessionPool(model, capacity=2, backend="torch")
    assert pool.engine.decoder is None  # (the generic path)
    for s in sessions:
        pool.open(s)
    batched = pool.write_examples_many(sessions, recipe)
    states = {s: pool.state_dict(s) for s in sessions}
    pool.detach()
    pool = SessionPool(model, capacity=2, backend="torch")
    for s, ex in sessions.items():
        pool.open(s)
        alone = pool.write_examples_many({s: ex}, recipe)[s]
        torch.testing.assert_close(torch.tensor(batched[s]), torch.tensor(alone), rtol=1e-5, atol=1e-6)
        for k, v in pool.state_dict(s).items():
            torch.testing.assert_close(states[s][k], v, rtol=1e-4, atol=1e-6)
    pool.detach()


def test_a_bf16_row_of_the_torch_pool_is_its_session_alone_bit_for_bit():
    """The torch backend's segmented expand (`reference.lora_expand_segmented`, one addmm per segment) rounds as
    the one-session composition (`reference.lora_linear`'s addmm): a bf16 pool's row of session a, beside a row of
    session b and a bare row, gives exactly the logits of the model with only a attached. (An expand of
    `y + scaling * (xa @ b.T)` beside the one-session addmm differed by 0.017 here.)"""
    model, _ = load_model("tiny-llama", dtype=torch.bfloat16)
    ids = torch.randint(3, 500, (3, 12), generator=torch.Generator().manual_seed(0))
    pool = SessionPool(model, capacity=2, backend="torch")
    pool.open("a")
    pool.open("b")
    pool.write_examples_many({"a": prefixed_examples(2, 1), "b": prefixed_examples(2, 2)}, Recipe(lr=0.5, epochs=3))
    with torch.no_grad(), pool.rows(["a", "b", None]):
        rows = model(input_ids=ids).logits
    state = pool.state_dict("a")
    pool.detach()
    fw = FastWeights(model, backend="torch")
    fw.load_state_dict(state)
    assert any((v != 0).any() for v in state.values() if isinstance(v, torch.Tensor))
    with torch.no_grad():
        alone = model(input_ids=ids[:1]).logits
    fw.detach()
    with torch.no_grad():
        bare = model(input_ids=ids[2:]).logits
    torch.testing.assert_close(rows[:1], alone, rtol=0, atol=0)
    torch.testing.assert_close(rows[2:], bare, rtol=0, atol=0)
