"""Hot swap (tmem_runtime/hot_swap.py): one copy of B, no allocation, nothing changed on bad input."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LogitsProcessor, LogitsProcessorList

from tmem_runtime import AdapterFileError, FastWeights, Recipe, SessionPool, load_model
from tmem_runtime.write import IGNORE_INDEX


def _examples(seed: int) -> list[tuple[list[int], list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, 500, (12,), generator=gen).tolist() for _ in range(3)]
    return [(x, [IGNORE_INDEX] * 4 + x[4:]) for x in ids]


@pytest.fixture
def written():
    model, _ = load_model("tiny-llama")
    fw = FastWeights(model, backend="torch")
    fw.write_examples(_examples(0), Recipe(lr=1e-2, epochs=2))
    yield fw
    fw.detach()


def _allocated_bytes(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0)


def test_a_swap_allocates_nothing(written):
    state = written.state_dict()
    written.reset()
    written.load_state_dict(state)  # warm
    assert _allocated_bytes(lambda: torch.empty(1000)) >= 4000  # the profiler does see allocations
    assert _allocated_bytes(lambda: written.load_state_dict(state)) == 0
    assert all(torch.equal(written.state_dict()[k], v) for k, v in state.items())


def test_b_from_anywhere_takes_the_general_path(written):
    state = written.state_dict()
    loose = {k: v.clone() if k.endswith("lora_B") else v for k, v in state.items()}  # not one flat row
    written.reset()
    written.load_state_dict(loose)
    assert all(torch.equal(written.state_dict()[k], v) for k, v in state.items())
    as_double = {k: v.double() if k.endswith("lora_B") else v for k, v in state.items()}
    written.reset()
    written.load_state_dict(as_double)
    assert all(torch.equal(written.state_dict()[k], v) for k, v in state.items())


def test_tensors_that_require_grad_load_as_values_and_later_swaps_still_work(written):
    """A state whose tensors require grad (B being trained elsewhere, A from a trainable copy) loads its
    values; the general path's scratch row is not made part of a graph, so the swaps after it work too."""
    state = written.state_dict()
    trained = {k: v.clone().requires_grad_(True) for k, v in state.items()}  # not one flat row: general path
    written.reset()
    written.load_state_dict(trained)
    assert all(torch.equal(written.state_dict()[k], v) for k, v in state.items())
    loose = {k: v.clone() if k.endswith("lora_B") else v for k, v in state.items()}
    written.reset()
    written.load_state_dict(loose)
    assert all(torch.equal(written.state_dict()[k], v) for k, v in state.items())


def test_a_refused_state_changes_nothing(written):
    state = written.state_dict()
    before = written.state_dict()
    b_name = next(k for k in state if k.endswith("lora_B"))
    last_b = [k for k in state if k.endswith("lora_B")][-1]
    a_name = next(k for k in state if k.endswith("lora_A"))
    cases = {
        "missing": {k: v for k, v in state.items() if k != b_name},
        "shape": {**state, b_name: state[b_name][:-1]},
        "finite": {**state, b_name: state[b_name] * float("inf")},
        f"{b_name}: not a floating-point tensor": {**state, b_name: state[b_name].tolist()},
        f"{last_b}: not a floating-point tensor": {**state, last_b: state[last_b].numpy()},
        f"{a_name}: not a floating-point tensor": {**state, a_name: state[a_name].tolist()},
    }
    for match, bad in cases.items():
        with pytest.raises(AdapterFileError, match=match):
            written.load_state_dict(bad)
        assert all(torch.equal(written.state_dict()[k], v) for k, v in before.items())
    flat_nan = written.state_dict()  # one flat row with a NaN: the fast path refuses it too
    flat_nan[b_name][0, 0] = float("nan")
    with pytest.raises(AdapterFileError, match="finite"):
        written.load_state_dict(flat_nan)
    assert all(torch.equal(written.state_dict()[k], v) for k, v in before.items())


def test_a_state_moves_between_pool_sessions():
    model, _ = load_model("tiny-llama")
    pool = SessionPool(model, capacity=2, backend="torch")
    pool.open("a")
    pool.open("b")
    pool.write_examples_many({"a": _examples(1)}, Recipe(lr=1e-2, epochs=2))
    pool.load_state_dict("b", pool.state_dict("a"))
    assert all(torch.equal(pool.state_dict("b")[k], v) for k, v in pool.state_dict("a").items())
    pool.detach()


def test_a_swap_from_another_thread_waits_for_a_running_generate():
    """A load while generate() runs on another thread waits for it to end: every token reads the weights
    it started with (logits to 1e-5 of a run with no swap), and after it the swapped-in ones (those of
    a fresh attach loading that state)."""
    model, _ = load_model("tiny-llama")
    written = FastWeights(model, backend="torch")
    written.write_examples(_examples(0), Recipe(lr=1e-2, epochs=2))
    first = written.state_dict()
    written.write_examples(_examples(5), Recipe(lr=3e-2, epochs=3))
    second = written.state_dict()
    written.load_state_dict(first)
    ids = torch.randint(3, 500, (2, 7), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    want = model.generate(ids, **kw)
    swapper = threading.Thread(target=written.load_state_dict, args=(second,))

    class SwapMidway(LogitsProcessor):
        def __init__(self) -> None:
            self.calls = 0

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == 2:
                swapper.start()
                swapper.join(0.5)  # (returns at once where the swap does not wait)
            return scores

    got = model.generate(ids, logits_processor=LogitsProcessorList([SwapMidway()]), **kw)
    swapper.join()
    for a, b in zip(got.logits, want.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    after = model.generate(ids, **kw)
    written.detach()
    fresh = FastWeights(model, backend="torch")
    fresh.load_state_dict(second)
    for a, b in zip(after.logits, model.generate(ids, **kw).logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(after.logits[-1], want.logits[-1], atol=1e-3)
    fresh.detach()
