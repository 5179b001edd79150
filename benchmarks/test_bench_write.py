"""End to end: one memory write, fast path vs the PEFT reference path.

One write = 32 QA flashcards with the paper's recipe (SGD, lr 5e-4, 5 epochs, batch 16 -> 10 steps)
on SmolLM2-135M (CPU) — or a random-weight model at its shapes where the package is missing (GPU
image). Both paths run in the same process, side by side; the ratio is printed with the ratio of
the two paths' floating-point operation counts (torch's FlopCounterMode), so the distance to the
bound is visible.

    pytest benchmarks/test_bench_write.py -s
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import impl_params, median_s, mm_rate, random_model
from tmem_runtime import FastWeights, SessionPool, load_model
from tmem_runtime.agent.write_formats import AGENT_RECIPE
from tmem_runtime.recipes import RECIPES

RESULTS: dict[str, float] = {}
NAMES = ["Ada", "Bruno", "Chiara", "Dmitri", "Esme", "Farid", "Greta", "Hugo"]
ATTRIBUTES = [
    ("Which city did {n} move to in 2031?", ["Porto", "Tartu", "Lyon", "Quito", "Osaka", "Perth", "Split", "Ghent"]),
    ("What is {n}'s favourite tea?", ["Oolong", "Rooibos", "Sencha", "Assam", "Chai", "Mint", "Earl Grey", "Pu-erh"]),
    (
        "What does {n} keep as a pet?",
        ["A ferret", "A parrot", "A tortoise", "A goat", "Two cats", "A gecko", "A rabbit", "A hamster"],
    ),
    ("What instrument does {n} play?", ["Oboe", "Banjo", "Harp", "Viola", "Tuba", "Sitar", "Cello", "Drums"]),
]
PAIRS = [(q.format(n=n), vals[i]) for q, vals in ATTRIBUTES for i, n in enumerate(NAMES)]  # 32 pairs


def _model(shapes: str = "smollm2", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer): SmolLM2-135M itself (or TMEM_BENCH_MODEL) in float32 on the CPU where it is
    installed; otherwise random weights at `shapes` in `dtype` on `device`, with the tokenizer in the
    directory TMEM_BENCH_TOKENIZER names (the GPU image has no SmolLM2 package and reaches no hub)."""
    if shapes == "smollm2" and dtype == torch.float32 and torch.device(device).type == "cpu":
        try:
            return load_model(os.environ.get("TMEM_BENCH_MODEL", "smollm2-135m"))
        except FileNotFoundError:
            pass
    from transformers import AutoTokenizer

    return random_model(shapes, dtype, device), AutoTokenizer.from_pretrained(os.environ["TMEM_BENCH_TOKENIZER"])


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    return _model()


def _write_once(model, tokenizer, backend: str):
    fw = FastWeights(model, backend=backend)
    try:
        return fw.write_qa(tokenizer, PAIRS, recipe=RECIPES["paper"])
    finally:
        fw.detach()


def _flops(model, tokenizer, backend: str) -> int:
    with FlopCounterMode(display=False) as counter:
        _write_once(model, tokenizer, backend)
    return counter.get_total_flops()


@pytest.mark.parametrize("backend", impl_params(["auto", "torch", "peft"]))
def test_write_32_pairs_paper_recipe(benchmark, smollm2, backend):
    model, tokenizer = smollm2
    benchmark.group = "write: 32 QA pairs, paper recipe (10 steps)"
    losses = benchmark.pedantic(_write_once, args=(model, tokenizer, backend), rounds=3, warmup_rounds=1)
    assert len(losses) == 10
    if (median := median_s(benchmark)) is not None:
        RESULTS[backend] = median
    RESULTS[f"flops:{backend}"] = _flops(model, tokenizer, backend)
    if "peft" in RESULTS:
        peft = RESULTS["peft"]
        for b in ("auto", "torch"):
            if b in RESULTS:
                ms = RESULTS[b] * 1e3
                print(
                    f"\n[write] {b}: {ms:.0f} ms, PEFT {peft * 1e3:.0f} ms -> {peft / RESULTS[b]:.2f}x faster;"
                    f" FLOPs {RESULTS[f'flops:{b}'] / 1e9:.1f} G vs PEFT {RESULTS['flops:peft'] / 1e9:.1f} G"
                    f" -> FLOP ratio {RESULTS['flops:peft'] / RESULTS[f'flops:{b}']:.2f}x"
                )


def test_write_share_of_matmul_throughput(smollm2):
    """The whole write's FLOP rate as a share of torch.mm's fp32 rate at its shapes, in one run."""
    model, tokenizer = smollm2
    flops = RESULTS.get("flops:auto") or _flops(model, tokenizer, "auto")
    t = time.perf_counter()
    _write_once(model, tokenizer, "auto")
    write_rate = flops / (time.perf_counter() - t) / 1e9
    cfg = model.config
    mm_gflops = mm_rate(16 * 48, cfg.hidden_size, cfg.intermediate_size) / 1e9
    print(
        f"\n[write share] write {write_rate:.1f} GFLOP/s, torch.mm {mm_gflops:.1f} GFLOP/s "
        f"-> {100 * write_rate / mm_gflops:.0f}% of the fp32 matrix-product rate"
    )
    assert write_rate > 0


def _replaying_pool(model, tokenizer, kept: bool):
    """A pool whose session "s" holds the 32 PAIRS (one write), trunk outputs kept or not."""
    pool = SessionPool(model, capacity=1, trunk_cache_bytes=(256 << 20) if kept else 0)
    pool.open("s")
    pool.write_qa("s", tokenizer, PAIRS, recipe=RECIPES["paper"])
    return pool


@pytest.mark.parametrize("kept", ["kept", "recomputed"])
def test_write_replaying_32_cards(benchmark, smollm2, kept):
    """A write as the agent and `tmem serve` make them: 4 new cards plus the 32 written before (the agent's
    recipe, 30 steps), with the earlier cards' trunk outputs kept from their write vs run again."""
    model, tokenizer = smollm2
    pool, fresh = _replaying_pool(model, tokenizer, kept == "kept"), iter(range(10_000))

    def new_cards():
        pool.reset("s")
        return (tokenizer, [(f"What is the code of locker {k}?", f"{k * 37 % 1000:03d}") for k in
                            [next(fresh) for _ in range(4)]] + PAIRS), {"recipe": AGENT_RECIPE}  # fmt: skip

    benchmark.group = "write: 4 new + 32 replayed cards, agent recipe (30 steps)"
    try:
        losses = benchmark.pedantic(lambda tok, cards, recipe: pool.write_qa("s", tok, cards, recipe=recipe),
                                    setup=new_cards, rounds=3, warmup_rounds=1)  # fmt: skip
    finally:
        pool.detach()
    assert len(losses) == 30
    if (median := median_s(benchmark)) is not None:
        RESULTS[f"replay:{kept}"] = median
    if {"replay:kept", "replay:recomputed"} <= RESULTS.keys():
        kept_s, recomputed_s = RESULTS["replay:kept"], RESULTS["replay:recomputed"]
        print(f"\n[write replaying 32 cards] trunk kept {kept_s * 1e3:.0f} ms, run again {recomputed_s * 1e3:.0f} ms"
              f" -> {recomputed_s / kept_s:.2f}x")
