"""Host time of one pool decode step, on the CPU: what the pool adds to the model's own step (issue 10).

    python -m benchmarks.decode_host                      # 36 layers, 64 rows of 1,000 sessions
    python -m benchmarks.decode_host --profile 20         # + cProfile of the pool's step, top 20 functions

On a GPU the bare decode step of Qwen3-4B at batch 64 is host-bound (~40 ms of eager launches for ~2 ms of
weight reads), so whatever Python the pool adds per step shows in full. This runs the step as
benchmarks/test_bench_pool.py times it (one forward of one token per row, 64 rows each reading its own
session out of 1,000 open ones, inside one pool.rows() block, the cache cropped back after each round) on
a model of Qwen3-4B's 36 layers with tiny widths, so that the time is host work, and prints the bare and
the pool step side by side (rounds interleaved: the box is noisy), with the host syncs the pool's step
would do on CUDA (benchmarks/host_syncs.py).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch
from transformers import DynamicCache

from benchmarks.host_syncs import census_of
from tmem_runtime import SessionPool

PROMPT = 48


def host_model(layers: int = 36) -> torch.nn.Module:
    """tiny-qwen3 (random weights, float32, unpacked linears as on a GPU) with `layers` decoder layers."""
    from tmem_runtime import models

    config = models.tiny_config("tiny-qwen3", num_hidden_layers=layers)
    torch.manual_seed(0)
    model = models.AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    return model


def filled_pool(
    model: torch.nn.Module, rows: int, resident: int, backend: str = "auto", adapted: int = 4
) -> tuple[SessionPool, list[str]]:
    """A pool of capacity `resident` with `resident` open sessions, the first `rows` of them written (random,
    distinct B rows: no session at B0); returns (pool, the written sessions' ids)."""
    pool = SessionPool(model, capacity=resident, backend=backend, num_layers=adapted)
    names = [f"s{i}" for i in range(rows)]
    g = torch.Generator().manual_seed(2)
    for s in names:
        pool.open(s)
        state = pool.state_dict(s)
        pool.load_state_dict(s, {k: torch.randn(v.shape, generator=g) * 0.01 if "lora_B" in k else v
                                 for k, v in state.items()})  # fmt: skip
    for i in range(resident - rows):
        pool.open(f"idle{i}")
    return pool, names


def prefilled(model: torch.nn.Module, rows: int) -> tuple[torch.Tensor, DynamicCache]:
    """(last tokens [rows, 1], cache of a PROMPT-token prefix) for timing one decode step."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (rows, PROMPT + 1), generator=gen)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :PROMPT], past_key_values=cache, use_cache=True)
    return ids[:, PROMPT:], cache


def step(model: torch.nn.Module, last: torch.Tensor, cache: DynamicCache) -> None:
    """One decode step of every row, then the cache cropped back (the same step again next time)."""
    with torch.no_grad():
        model(input_ids=last, past_key_values=cache, use_cache=True)
    cache.crop(-1)


def one_block(pool: SessionPool, names: list[str], model: torch.nn.Module, last: torch.Tensor,
              cache: DynamicCache) -> None:  # fmt: skip
    """One decode step in a rows() block of its own (a decode loop that binds its rows per step)."""
    with pool.rows(names):
        step(model, last, cache)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=36)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--resident", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--adapted", type=int, default=4, help="adapted layers (the pool's num_layers)")
    parser.add_argument("--profile", type=int, default=0, help="print cProfile's top N functions of the pool step")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    bare_model, model = host_model(args.layers), host_model(args.layers)  # the same weights; the pool on one
    last, cache = prefilled(bare_model, args.rows)
    pool, names = filled_pool(model, args.rows, args.resident, args.backend, args.adapted)
    times: dict[str, list[float]] = {"bare": [], "pool": [], "pool, rows() per step": []}
    with pool.rows(names):
        p_last, p_cache = prefilled(model, args.rows)
    warm = [lambda: step(bare_model, last, cache), lambda: one_block(pool, names, model, p_last, p_cache)]
    for _ in range(3):
        for run in warm:
            run()
    kv = [t for layer in p_cache.layers for t in (layer.keys, layer.values)]  # (on the device on a GPU)
    census = census_of(lambda: one_block(pool, names, model, p_last, p_cache), model, pool, p_last, kv)
    for _ in range(args.rounds):  # interleaved: noise hits every variant alike
        t0 = time.perf_counter()
        step(bare_model, last, cache)
        t1 = time.perf_counter()
        with pool.rows(names):  # (the block's own cost outside the timing: the benchmark's step)
            t2 = time.perf_counter()
            step(model, p_last, p_cache)
            t3 = time.perf_counter()
        one_block(pool, names, model, p_last, p_cache)
        t4 = time.perf_counter()
        times["bare"].append(t1 - t0)
        times["pool"].append(t3 - t2)
        times["pool, rows() per step"].append(t4 - t3)
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(10):
            one_block(pool, names, model, p_last, p_cache)
        prof.disable()
    b = statistics.median(times["bare"])
    print(f"decode step, {args.rows} rows of {args.resident} open sessions, {args.layers} layers "
          f"({args.adapted} adapted), backend "
          f"{pool.engine.backend}, median (min) of {args.rounds} rounds:")  # fmt: skip
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:24s} {m * 1e3:7.2f} ms ({min(ts) * 1e3:.2f})  {m / b:.3f}x bare, +{(m - b) * 1e3:.2f} ms")
    print("host syncs of the pool's step (a rows() block of its own) on CUDA:")
    print("\n".join(census.lines()))
    if args.profile:
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)
    pool.detach()


if __name__ == "__main__":
    main()
