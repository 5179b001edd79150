"""Write time of the recall study's recipes, side by side: one write of ten held-out facts on SmolLM2-135M.

The issue's time budget for a better-recalling recipe is at most 2x the earlier default's write
(AdamW 3e-3, 10 epochs). Each round resets the adapter and writes the same ten facts
(`people_and_pets`, a held-out set); the ratio to the earlier default is printed at the end.

    TMEM_BENCH_THREADS=1 pytest benchmarks/test_bench_recipes.py -s
"""

from __future__ import annotations

import pytest

from benchmarks.common import median_s
from benchmarks.recall_study import BASELINE, CANDIDATES
from tmem_runtime import FastWeights, load_model
from tmem_runtime.fact_sets import load_fact_set
from tmem_runtime.recipes import RECIPES

TIMED = {BASELINE: CANDIDATES[BASELINE], "default": RECIPES["default"]}
RESULTS: dict[str, tuple[float, int]] = {}


@pytest.fixture(scope="module")
def smollm2_fast_weights():
    model, tokenizer = load_model("smollm2-135m")
    fw = FastWeights(model)
    yield fw, tokenizer
    fw.detach()


@pytest.mark.parametrize("name", list(TIMED))
def test_write_ten_held_out_facts(benchmark, smollm2_fast_weights, name):
    fw, tokenizer = smollm2_fast_weights
    pairs = load_fact_set("people_and_pets").pairs

    def write() -> list[float]:
        fw.reset()
        return fw.write_qa(tokenizer, pairs, recipe=TIMED[name])

    benchmark.group = "write: 10 held-out facts, SmolLM2-135M"
    losses = benchmark.pedantic(write, rounds=5, warmup_rounds=1)
    assert losses[-1] < losses[0]
    if (median := median_s(benchmark)) is not None:
        RESULTS[name] = (median, len(losses))
    if name != BASELINE and {BASELINE, name} <= RESULTS.keys():
        (base, base_steps), (t, steps) = RESULTS[BASELINE], RESULTS[name]
        print(f"\n{name}: {t:.2f}s ({steps} steps) vs {BASELINE} {base:.2f}s ({base_steps} steps): {t / base:.2f}x")
