"""What `tmem serve`'s store costs as sessions and contexts grow (tiny random Llama, CPU, a local disk):

    lease round   one lease-renewal round of a server holding `--sessions` loaded sessions
    append turn   appending one turn to a session whose working context holds `--lines` turns and
                  whose memory holds `--cards` flashcards (no write triggered)

Each reports its median time and the bytes the store wrote per operation (files replaced or appended to).

    python -m benchmarks.test_bench_serve_store --sessions 2000 --lines 1000 --cards 2000
    pytest benchmarks/test_bench_serve_store.py       # 500 sessions, 500 lines, 500 cards
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import pytest

from tmem_runtime.serve.main import load_serving_model
from tmem_runtime.serve.service import MemoryService, ServeConfig
from tmem_runtime.serve.store import Store


def bytes_written() -> int:
    """Bytes this process has handed to write(2) so far (Linux: /proc/self/io's wchar)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


def timed(op: Callable[[], object], rounds: int) -> tuple[float, float]:
    """(median seconds, bytes written) per call of `op`."""
    times, before = [], bytes_written()
    for _ in range(rounds):
        t0 = time.perf_counter()
        op()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), (bytes_written() - before) / rounds


def service(root: str) -> MemoryService:
    model, tokenizer = load_serving_model("tiny-llama")
    return MemoryService(model, tokenizer, Store(root), ServeConfig(capacity=4, max_write_sessions=1,
                                                                     l_max=1 << 30, idle_unload=0))


def lease_round(sessions: int, rounds: int = 5) -> dict:
    with tempfile.TemporaryDirectory() as root:
        s = service(root)
        for i in range(sessions):
            s.create("t", f"s{i}")
        seconds, written = timed(s._renew_leases, rounds)
        assert len(s.convs) == sessions
    return {"sessions": sessions, "round_ms": seconds * 1e3, "bytes_per_round": written}


def append_turn(lines: int, cards: int, rounds: int = 50) -> dict:
    with tempfile.TemporaryDirectory() as root:
        s = service(root)
        s.create("t", "long")
        conv = s.get("t", "long")
        conv.written = [(f"What is fact number {i}?", f"value {i}") for i in range(cards)]
        s.append("t", "long", [f"Nina: this is turn number {i} of a long conversation." for i in range(lines)])
        seconds, written = timed(lambda: s.append("t", "long", ["Leo: one more short turn."]), rounds)
        assert s.store.read("t", "long")[0].stats["turns"] == lines + rounds
    return {"lines": lines, "cards": cards, "append_ms": seconds * 1e3, "bytes_per_append": written}


@pytest.mark.parametrize("case", ["lease_round", "append_turn"])
def test_serve_store(case):
    print(lease_round(500) if case == "lease_round" else append_turn(500, 500))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=2000)
    p.add_argument("--lines", type=int, default=1000)
    p.add_argument("--cards", type=int, default=2000)
    args = p.parse_args()
    print(lease_round(args.sessions))
    print(append_turn(args.lines, args.cards))


if __name__ == "__main__":
    main()
