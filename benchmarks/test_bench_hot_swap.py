"""Hot swap of one session's adapter, side by side in one run (one pytest-benchmark group):

    copy_B         a bare `copy_` of the bytes that differ between sessions (B; A0 is shared)
    fastweights    `FastWeights.load_state_dict` (validate, then one copy into the preallocated row)
    pool           `SessionPool.load_state_dict` into another session of a pool
    peft_hotswap   PEFT's `hotswap_adapter_from_state_dict` of the same state (A and B)

On SmolLM2-135M (CPU; a random-weight model at its shapes where the package is missing). The goal
(issue 8): the swap within 5x of `copy_B`, with no allocation (tests/test_hot_swap.py).

    pytest benchmarks/test_bench_hot_swap.py
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from benchmarks.common import median_s
from benchmarks.test_bench_write import PAIRS, _model
from tmem_runtime import FastWeights, SessionPool
from tmem_runtime.recipes import RECIPES

HAS_PEFT = importlib.util.find_spec("peft") is not None
RESULTS: dict[str, float] = {}
IMPLS = ["copy_B", "fastweights", "pool", pytest.param("peft_hotswap", marks=pytest.mark.skipif(
    not HAS_PEFT, reason="PEFT is not installed"))]  # fmt: skip


@pytest.fixture(scope="module")
def session():
    """(model, tokenizer) of SmolLM2."""
    torch.manual_seed(0)
    return _model()


def _written(store, tokenizer, session=None) -> dict:
    """A session written with 8 cards (one epoch of the paper recipe): its state dict."""
    args = (tokenizer, PAIRS[:8]) if session is None else (session, tokenizer, PAIRS[:8])
    store.write_qa(*args, recipe=RECIPES["paper"].with_(epochs=1))
    return store.state_dict() if session is None else store.state_dict(session)


def _peft_swap(model, state):
    from peft.utils.hotswap import hotswap_adapter_from_state_dict

    ref = FastWeights(model, backend="peft")
    kinds = {"lora_A": "lora_A.default.weight", "lora_B": "lora_B.default.weight"}
    peft_sd = {}
    for k, v in state.items():
        stem, kind = k.rsplit(".", 1)
        peft_sd[f"base_model.model.model.{stem}.{kinds[kind]}"] = v
    config = ref.store.peft_model.peft_config["default"]

    def swap():
        hotswap_adapter_from_state_dict(ref.store.peft_model, peft_sd, adapter_name="default", config=config)

    def check():
        torch.testing.assert_close(ref.state_dict(), state)

    return swap, check, ref.detach


def _setup(impl, model, tokenizer):
    """(swap, check, done, state): the swap to time, a check of its result, the clean-up, the state."""
    if impl in ("copy_B", "peft_hotswap"):
        fw = FastWeights(model, backend="torch")
        state = _written(fw, tokenizer)
        fw.detach()
        if impl == "peft_hotswap":
            return (*_peft_swap(model, state), state)
        src = torch.cat([v.reshape(-1) for k, v in state.items() if k.endswith("lora_B")])
        dst = torch.empty_like(src)
        return (lambda: dst.copy_(src)), (lambda: None), (lambda: None), state
    if impl == "fastweights":  # the session's state was saved by this handle; it wrote on since
        fw = FastWeights(model, backend="torch")
        state = _written(fw, tokenizer)
        fw.reset()
        ptr = fw.store.engine.b.data_ptr()

        def check():
            assert fw.store.engine.b.data_ptr() == ptr
            assert all(torch.equal(fw.state_dict()[k], v) for k, v in state.items())

        return (lambda: fw.load_state_dict(state)), check, fw.detach, state
    pool = SessionPool(model, capacity=4, backend="torch")  # one session's state into another's row
    pool.open("a")
    pool.open("b")
    state = _written(pool, tokenizer, "a")

    def check():
        assert all(torch.equal(pool.state_dict("b")[k], v) for k, v in state.items())

    return (lambda: pool.load_state_dict("b", state)), check, pool.detach, state


@pytest.mark.parametrize("impl", IMPLS)
def test_hot_swap(benchmark, session, impl):
    model, tokenizer = session
    swap, check, done, state = _setup(impl, model, tokenizer)
    try:
        benchmark.group = "hot swap of one session (SmolLM2-135M shapes)"
        benchmark.pedantic(swap, rounds=2000, iterations=1, warmup_rounds=100)
        check()
    finally:
        done()
    if (median := median_s(benchmark)) is not None:
        RESULTS[impl] = median
    RESULTS["b_bytes"] = sum(v.numel() * 4 for k, v in state.items() if k.endswith("lora_B"))


def summary_lines() -> list[str]:
    """Every row's median and its ratio to the bare copy, in one table (printed by benchmarks/conftest.py)."""
    base = RESULTS.get("copy_B")
    if base is None:
        return []
    lines = [f"[hot swap] B = {RESULTS.get('b_bytes', 0) / 1e3:.0f} kB; median per swap, vs a bare copy of B "
             f"({base * 1e6:.1f} us):"]  # fmt: skip
    rows = {k: v for k, v in RESULTS.items() if k not in ("copy_B", "b_bytes")}
    return lines + [f"  {k:<13} {v * 1e6:8.1f} us  {v / base:6.1f}x" for k, v in rows.items()]
