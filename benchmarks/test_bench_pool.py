"""The session pool, side by side in one run (issue 10):

    decode step, 16 sessions:  one batch of 16 rows, each reading its own session (pool.rows)
                               vs 16 one-row steps with a swap (load_state_dict) before each
                               vs the bare model's step at batch 16 (no fast weights)
    batched write:             8 sessions x 8 flashcards in one write_qa_many vs 8 write_qa one by one

On SmolLM2-135M (CPU, float32); on a GPU, random weights at its shapes in bfloat16 (the GPU image has no
SmolLM2 package: TMEM_BENCH_TOKENIZER names a tokenizer directory for the flashcards). Goals: the
batched decode step >= 4x faster than 16 swapped steps and <= 1.3x the bare step; the batched write
>= 1.5x faster than sequential writes. Memory per resident session is printed.

    pytest benchmarks/test_bench_pool.py
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import DynamicCache

from benchmarks.common import DEVICE, random_model, write_summary
from benchmarks.test_bench_write import PAIRS, _model
from tmem_runtime import FastWeights, SessionPool
from tmem_runtime.recipes import RECIPES

SESSIONS = 16
PROMPT = 48
RESULTS: dict[str, float] = {}
RECIPE = RECIPES["paper"].with_(epochs=2, batch_size=8)


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    if DEVICE.type == "cuda":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.environ["TMEM_BENCH_TOKENIZER"])
        return random_model("smollm2", torch.bfloat16), tokenizer
    return _model()


@pytest.fixture(scope="module")
def states(smollm2):
    """16 written sessions' state dicts (one pool write of 4 cards each)."""
    model, tokenizer = smollm2
    pool = SessionPool(model, capacity=SESSIONS, backend="auto")
    names = [f"s{i}" for i in range(SESSIONS)]
    for s in names:
        pool.open(s)
    pool.write_qa_many(tokenizer, {s: PAIRS[2 * i : 2 * i + 4] for i, s in enumerate(names)}, recipe=RECIPE)
    out = {s: pool.state_dict(s) for s in names}
    pool.detach()
    return out


def _prefilled(model, rows: int):
    """(last tokens [rows, 1], cache of a PROMPT-token prefix, its length) for timing one decode step."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(100, 40000, (rows, PROMPT + 1), generator=gen).to(model.device)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :PROMPT], past_key_values=cache, use_cache=True)
    return ids[:, PROMPT:], cache


def _step(model, last, cache):
    with torch.no_grad():
        model(input_ids=last, past_key_values=cache, use_cache=True)
    cache.crop(-1)  # drop the step's token: the same step again next round


def _synced(fn):
    """`fn`, then a wait for the device: a timed round ends when its kernels have run."""

    def run(*args):
        fn(*args)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("impl", ["bare_batch16", "pool_batch16", "swap_16x1"])
def test_decode_step(benchmark, smollm2, states, impl):
    model, _ = smollm2
    names = list(states)
    benchmark.group = f"one decode step, {SESSIONS} sessions (SmolLM2-135M, {PROMPT}-token context)"
    if impl == "bare_batch16":
        last, cache = _prefilled(model, SESSIONS)
        benchmark.pedantic(_synced(_step), args=(model, last, cache), rounds=30, warmup_rounds=3)
    elif impl == "pool_batch16":
        pool = SessionPool(model, capacity=SESSIONS, backend="auto")
        for s in names:
            pool.open(s)
            pool.load_state_dict(s, states[s])
        with pool.rows(names):
            last, cache = _prefilled(model, SESSIONS)
            benchmark.pedantic(_synced(_step), args=(model, last, cache), rounds=30, warmup_rounds=3)
        RESULTS["bytes_per_session"] = pool.bytes_per_session()
        RESULTS["bytes_writing"] = pool.bytes_per_session(writing=True)
        pool.detach()
    else:
        fw = FastWeights(model, backend="auto")
        caches = []
        for s in names:
            fw.load_state_dict(states[s])
            caches.append(_prefilled(model, 1))

        def sixteen_swapped_steps():
            for s, (last, cache) in zip(names, caches):
                fw.load_state_dict(states[s])
                _step(model, last, cache)

        benchmark.pedantic(_synced(sixteen_swapped_steps), rounds=10, warmup_rounds=1)
        fw.detach()
    RESULTS[impl] = benchmark.stats.stats.median


@pytest.mark.parametrize("impl", ["batched_8x8", "sequential_8x8"])
def test_write_8_sessions(benchmark, smollm2, impl):
    model, tokenizer = smollm2
    names = [f"w{i}" for i in range(8)]
    cards = {s: PAIRS[4 * i : 4 * i + 8] if 4 * i + 8 <= len(PAIRS) else PAIRS[-8:] for i, s in enumerate(names)}
    pool = SessionPool(model, capacity=8, backend="auto")
    for s in names:
        pool.open(s)

    def batched():
        return pool.write_qa_many(tokenizer, cards, recipe=RECIPE)

    def sequential():
        return {s: pool.write_qa(s, tokenizer, cards[s], recipe=RECIPE) for s in names}

    benchmark.group = "write: 8 sessions x 8 flashcards (SmolLM2-135M)"
    losses = benchmark.pedantic(batched if impl == "batched_8x8" else sequential, rounds=3, warmup_rounds=1)
    assert len(losses) == 8
    pool.detach()
    RESULTS[impl] = benchmark.stats.stats.median


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    r = RESULTS
    lines = ["[pool]"]
    if {"bare_batch16", "pool_batch16", "swap_16x1"} <= r.keys():
        lines.append(
            f"  decode step: pool {r['pool_batch16'] * 1e3:.1f} ms, bare {r['bare_batch16'] * 1e3:.1f} ms "
            f"({r['pool_batch16'] / r['bare_batch16']:.2f}x bare), 16 swapped steps {r['swap_16x1'] * 1e3:.1f} ms "
            f"(pool {r['swap_16x1'] / r['pool_batch16']:.1f}x faster)"
        )
    if {"batched_8x8", "sequential_8x8"} <= r.keys():
        lines.append(
            f"  write 8x8: batched {r['batched_8x8']:.2f} s, sequential {r['sequential_8x8']:.2f} s "
            f"({r['sequential_8x8'] / r['batched_8x8']:.2f}x)"
        )
    if "bytes_per_session" in r:
        lines.append(
            f"  memory per resident session: {r['bytes_per_session'] / 1e3:.0f} kB (B, fp32); "
            f"{r['bytes_writing'] / 1e3:.0f} kB while written (+ grad, AdamW moments)"
        )
    write_summary(request.config, lines)
