"""Long-episode soak: many writes, sessions and turns, and what grows with them.

    PYTHONPATH=. .venv/bin/python tools/soak.py                       # every phase, tiny models (minutes)
    PYTHONPATH=. .venv/bin/python tools/soak.py --phases fw pool --writes 300 --model smollm2-135m
    PYTHONPATH=. .venv/bin/python tools/soak.py --json runs/soak.json

Phases (each on a fresh model):

- fw: `--writes` writes into one FastWeights session, with a state_dict / load_state_dict, a save / load
  and a generate every few writes (and a reset every `--reset-every`, 0: never).
- pool: a SessionPool of a small capacity with churn: sessions opened, written, read in batched generates
  (`pool.rows`), saved and loaded, offloaded to host (`--offload host`) or disk, reset and closed,
  `--writes` writes in all.
- agent: the memory agent over a long conversation (`--turns` turns, a deterministic card writer), every
  trigger a write whose context is then cleared.
- serve: the in-process server (uvicorn in a thread, as tests/test_serve.py) over `--turns` turns of a few
  sessions, with answers, explicit memories, resets, releases and removals.

Each phase samples, every `--every` operations: the process's RSS, the live torch tensors (count and
bytes, found through the garbage collector) and the size of every cache the runtime keeps (see `probe`).
The report gives each figure at the first sample after warm-up and at the end, and its growth per 100
operations over the second half of the run (a least-squares slope): a bounded cache shows 0 there.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from tmem_runtime import FastWeights, SessionPool

QUESTIONS = ("What is {name}'s favourite colour?", "Where does {name} live?", "What does {name} do for work?",
             "What is the name of {name}'s pet?")
ANSWERS = ("teal", "in Porto near the river", "repairs old clocks", "a cat called Biscuit")
NAMES = ("Mira", "Nina", "Leo", "Ana", "Tom", "Ines", "Rui", "Eva", "Joao", "Lia")


def cards(k: int, n: int = 3) -> list[tuple[str, str]]:
    """n flashcards, different for every k (names and facts cycle, the k makes them unique)."""
    out = []
    for j in range(n):
        i = k * n + j
        name = NAMES[i % len(NAMES)]
        out.append((QUESTIONS[i % len(QUESTIONS)].format(name=name) + f" (#{k})", ANSWERS[(i // 3) % len(ANSWERS)]))
    return out


def turn_cards(context: str) -> str:
    """The card writer of the agent and serve phases (no generation: they are about the loop): per turn
    "Speaker: My clock N was repaired PLACE on day D.", the card (where was clock N repaired?, its end)."""
    out = []
    for line in context.splitlines():
        words = line.partition(": ")[2].split()
        if not line.startswith("DATE:") and len(words) >= 5:
            out.append({"instruction": f"Where was {' '.join(words[1:3])} repaired?",
                        "output": " ".join(words[-3:]).strip(".")})
    return json.dumps(out)


# ---------------------------------------------------------------- what is measured
def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def live_tensors() -> tuple[int, float]:
    """(count, MB) of the torch tensors the garbage collector can see (parameters included)."""
    gc.collect()
    n, size, seen = 0, 0, set()
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                n += 1
                if obj.device.type != "meta":
                    st = obj.untyped_storage()
                    if st.data_ptr() not in seen:
                        seen.add(st.data_ptr())
                        size += st.nbytes()
        except Exception:  # (objects whose isinstance check raises)
            pass
    return n, size / 2**20


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def files_under(path: Path | None) -> int:
    if path is None or not path.exists():
        return 0
    return sum(1 for p in path.rglob("*") if p.is_file())


def pool_caches(pool: SessionPool) -> dict[str, float]:
    """The sizes of what a SessionPool keeps."""
    kept = pool.trunk_rows
    res = pool.residency
    static = pool._static
    out = {
        "trunk_rows": 0 if kept is None else len(kept.rows),
        "trunk_prefixes": 0 if kept is None else len(kept.prefixes),
        "trunk_mb": 0 if kept is None else kept.bytes / 2**20,
        "static_buckets": 0 if static is None else len(static.buckets),
        "versions": len(pool._versions),
        "stats": len(pool.stats),
        "open": len(res.ids),
        "away": len(res.away),
        "away_tensors": sum(isinstance(v, torch.Tensor) for v in res.away.values()),
        "pins": len(res.pins),
        "free_rows": len(res.free),
        "a_snapshot": 0 if pool._swap.a_snapshot is None else len(pool._swap.a_snapshot),
    }
    if res.offload_dir is not None:
        out["offload_files"] = files_under(res.offload_dir)
    return out


class Probe:
    """Samples taken every `every` operations: RSS, live tensors, caches (`extra()`)."""

    def __init__(self, name: str, every: int, extra: Callable[[], dict[str, float]]) -> None:
        self.name, self.every, self.extra = name, every, extra
        self.samples: list[dict[str, float]] = []
        self.finals: dict[str, dict[str, float]] = {}
        self.t0 = time.perf_counter()

    def __call__(self, ops: int) -> None:
        if ops % self.every == 0:
            self.samples.append(self.sample(ops))

    def sample(self, ops: int) -> dict[str, float]:
        n, mb = live_tensors()
        sample = {"ops": ops, "seconds": round(time.perf_counter() - self.t0, 1), "rss_mb": round(rss_mb(), 1),
                  "tensors": n, "tensor_mb": round(mb, 2), "fds": open_fds(), "threads": threading.active_count()}
        sample.update(self.extra())
        print(f"[{self.name}] " + " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in sample.items()), flush=True)
        return sample

    def final(self, ops: int, label: str = "after_close") -> None:
        """A last sample outside the growth figures (e.g. after every session was closed)."""
        self.finals[label] = self.sample(ops)

    def report(self) -> dict:
        """Per figure: first (after warm-up: the second sample), last, and growth per 100 ops over the
        second half (least squares)."""
        s = self.samples
        if len(s) < 3:
            return {"samples": s}
        warm, half = s[1], s[len(s) // 2 :]
        growth = {}
        for key in s[0]:
            if key in ("ops", "seconds"):
                continue
            xs, ys = [p["ops"] for p in half], [p[key] for p in half]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            var = sum((x - mx) ** 2 for x in xs)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
            growth[key] = {"after_warmup": warm[key], "end": s[-1][key], "per_100_ops": round(100 * slope, 3)}
        return {"ops": s[-1]["ops"], "seconds": s[-1]["seconds"], "growth": growth, "samples": s, **self.finals}


# ---------------------------------------------------------------- phases
def phase_fw(args, model, tok) -> dict:
    fw = FastWeights(model)
    pool = fw.store
    _cap_trunk_rows(pool, args)
    probe = Probe("fw", args.every, lambda: pool_caches(pool))
    ask = tok.apply_chat_template([{"role": "user", "content": "Where does Mira live?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "fw.safetensors"
        for k in range(1, args.writes + 1):
            fw.write_qa(tok, cards(k), recipe=args.recipe, seed=k)
            if k % 5 == 0:
                fw.load_state_dict(fw.state_dict())
                fw.save(path)
                fw.load(path)
            if k % 10 == 0:
                model.generate(**ask, max_new_tokens=4, do_sample=False)
            if args.reset_every and k % args.reset_every == 0:
                fw.reset()
            probe(k)
    fw.detach()
    return probe.report()


def phase_pool(args, model, tok) -> dict:
    with tempfile.TemporaryDirectory() as d:
        offload_dir = Path(d) / "offload" if args.offload == "disk" else None
        pool = SessionPool(model, capacity=args.capacity, offload=args.offload, offload_dir=offload_dir,
                           trunk_cache_bytes=int(args.trunk_cache_mb * 2**20))
        probe = Probe("pool", args.every, lambda: pool_caches(pool))
        live: list[str] = []
        prompt = tok.apply_chat_template([{"role": "user", "content": "Where does Mira live?"}],
                                         add_generation_prompt=True, return_tensors="pt", return_dict=True)
        serial = 0
        for k in range(1, args.writes + 1):
            if len(live) < args.sessions:  # churn: keep `sessions` open, replace the oldest every few writes
                serial += 1
                live.append(f"s{serial}")
                pool.open(live[-1])
            names = live[-3:] if k % 3 == 0 else [live[k % len(live)]]
            pool.write_qa_many(tok, {s: cards(k + i) for i, s in enumerate(names)}, recipe=args.recipe, seed=k)
            if k % 4 == 0:
                batch = {key: v.expand(2, -1) for key, v in prompt.items()}
                with pool.rows([live[0], live[-1]]):
                    model.generate(**batch, max_new_tokens=3, do_sample=False)
            if k % 5 == 0:
                s = live[k % len(live)]
                pool.load_state_dict(s, pool.state_dict(s))
                pool.save(s, Path(d) / "s.safetensors")
                pool.load(live[0], Path(d) / "s.safetensors")
            if k % 7 == 0:
                pool.reset(live[-1])
            if k % 3 == 0:
                pool.close(live.pop(0))
            probe(k)
        for s in live:
            pool.close(s)
        probe.final(args.writes)
        pool.detach()
        return probe.report()


def phase_agent(args, model, tok) -> dict:
    from tmem_runtime.agent.agent import MemoryAgent
    from tmem_runtime.agent.channels import make_channel
    from tmem_runtime.agent.generation import Generator
    from tmem_runtime.agent.locomo import Conversation, Session, Turn

    fw = FastWeights(model)
    _cap_trunk_rows(fw.store, args)
    gen = Generator(model, tok)
    channel = make_channel("tmem", gen, fw, recipe=args.recipe, replay=8)
    channel.writer = turn_cards
    agent = MemoryAgent(gen, channel, l_max=args.l_max)
    writes = [0]
    probe = Probe("agent", args.every, lambda: {
        **pool_caches(fw.store), "context_lines": len(agent.lines), "context_tokens": agent.context_tokens,
        "triggers": len(agent.triggers), "written": len(channel.written), "gen_prefixes": len(gen._prefixes),
        "fw_writes": fw.stats.writes})
    turns = []
    for i in range(args.turns):
        name = NAMES[i % len(NAMES)]
        place = ("near the river", "by the old bridge", "at the market", "in the north tower")[i % 4]
        turns.append(Turn(name, f"My clock {i} was repaired {place} on day {i % 7}.", f"t{i}"))
    conv = Conversation("soak", "Mira", "Nina", [Session(1, "1:00 pm on 1 May, 2023", turns)], [])

    def on_trigger(_) -> None:
        writes[0] += 1
        probe(writes[0])

    agent.read(conv, on_trigger=on_trigger)
    agent.answer(["Where was clock 3 repaired?"])
    agent.reset()
    probe.final(writes[0], "after_reset")
    report = probe.report()
    fw.detach()
    return report


def phase_serve(args, model_name: str) -> dict:
    import httpx

    from tmem_runtime.serve.launch import serve_in_thread
    from tmem_runtime.serve.main import load_serving_model
    from tmem_runtime.serve.service import MemoryService, ServeConfig
    from tmem_runtime.serve.store import Store

    torch.manual_seed(0)
    model, tok = load_serving_model(model_name)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "store"
        config = ServeConfig(capacity=8, l_max=48, max_rows=8, max_write_sessions=4, max_tokens=32,
                             card_writer=turn_cards, recipe=args.recipe, max_loaded=args.max_loaded)
        service = MemoryService(model, tok, Store(root), config)
        _cap_trunk_rows(service.pool, args)

        def serve_caches() -> dict[str, float]:
            files = [p for p in root.rglob("*") if p.is_file()]
            metrics = service.metrics
            return {
                "store_files": len(files),
                "tmp_files": sum(".tmp" in p.name or p.name.startswith(("state.json.", "lease.json.")) for p in files),
                "state_json_kb": max((p.stat().st_size for p in files if p.name == "state.json"), default=0) / 1024,
                "convs": len(service.convs),
                "loading": len(service._loading),
                "batcher_prefixes": len(service.batcher.prefixes),
                "writer_waiting": len(service.writer.waiting),
                "metric_series": sum(len(t) for t in (*metrics.counters.values(), *metrics.gauges.values())),
                **pool_caches(service.pool),
            }

        probe = Probe("serve", args.every, serve_caches)
        sessions = []  # every user so far; a new one every `new_user_every` turns, the last few talking
        with serve_in_thread(service, model_name, {"key": "acme"}, 64 * 1024) as url, \
                httpx.Client(base_url=url, headers={"Authorization": "Bearer key"}, timeout=300) as c:
            for k in range(1, args.turns + 1):
                if k % args.new_user_every == 1 or args.new_user_every == 1:
                    sessions.append(f"user{len(sessions)}")
                    _ok(c.post("/v1/sessions", json={"id": sessions[-1]}))
                talking = sessions[-args.serve_sessions :]
                s = talking[k % len(talking)]
                name = NAMES[k % len(NAMES)]
                turn = {"name": name, "content": f"My clock {k} was repaired by the river on day {k % 7}."}
                _ok(c.post(f"/v1/sessions/{s}/messages", json={"messages": [turn]}))
                if k % 3 == 0:
                    body = {"messages": [{"role": "user", "content": f"What did {name} say?"}], "max_tokens": 4,
                            "session": s, "stream": k % 6 == 0}
                    _ok(c.post("/v1/chat/completions", json=body))
                if k % 10 == 0:
                    _ok(c.post(f"/v1/sessions/{s}/memories",
                               json={"memories": [{"question": f"What is clock {k}?", "answer": f"tower {k}"}]}))
                if k % 25 == 0:
                    _ok(c.post(f"/v1/sessions/{s}/release"))
                if k % 40 == 0:
                    _ok(c.delete(f"/v1/sessions/{s}"))
                if k % 50 == 0:  # a session removed and made again
                    _ok(c.delete(f"/v1/sessions/{s}", params={"remove": "true"}))
                    _ok(c.post("/v1/sessions", json={"id": s}))
                probe(k)
            deadline = time.time() + 120  # let the queued writes finish
            while time.time() < deadline and any(c.get(f"/v1/sessions/{s}").json()["pending_writes"] for s in talking):
                time.sleep(0.2)
            probe.final(args.turns, "writes_done")
        report = probe.report()
        report["after_stop_threads"] = threading.active_count()
        return report


def _ok(response) -> None:
    if response.status_code >= 300:
        raise RuntimeError(f"{response.request.method} {response.request.url}: {response.status_code} {response.text}")


def _cap_trunk_rows(pool: SessionPool, args) -> None:
    if pool.trunk_rows is not None:
        pool.trunk_rows.max_bytes = int(args.trunk_cache_mb * 2**20)


def _recipe(name: str):
    from tmem_runtime.agent.write_formats import resolve_recipe

    return resolve_recipe(name)


PHASES = ("fw", "pool", "agent", "serve")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    p.add_argument("--model", default="tiny-llama", help="tiny-<type> or smollm2-135m")
    p.add_argument("--writes", type=int, default=300, help="writes in the fw and pool phases")
    p.add_argument("--turns", type=int, default=300, help="turns in the agent and serve phases")
    p.add_argument("--every", type=int, default=20, help="operations between samples")
    p.add_argument("--recipe", default="agent", help="write recipe (agent, default, paper)")
    p.add_argument("--epochs", type=int, help="the recipe's epochs (fewer: a faster soak of as many writes)")
    p.add_argument("--reset-every", type=int, default=0)
    p.add_argument("--capacity", type=int, default=4)
    p.add_argument("--sessions", type=int, default=8, help="sessions open at once in the pool phase")
    p.add_argument("--offload", choices=("host", "disk"), default="disk")
    p.add_argument("--l-max", type=int, default=96)
    p.add_argument("--trunk-cache-mb", type=float, default=0.5,
                   help="the pools' trunk_cache_bytes (small, so the soak sees the cache reach its bound)")
    p.add_argument("--serve-sessions", type=int, default=4, help="serve: users talking at once")
    p.add_argument("--new-user-every", type=int, default=5, help="serve: turns between new users")
    p.add_argument("--max-loaded", type=int, default=12, help="serve: ServeConfig.max_loaded")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="write the report here")
    args = p.parse_args(argv)
    args.recipe = _recipe(args.recipe)
    if args.epochs:
        args.recipe = args.recipe.with_(epochs=args.epochs)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    report = {"model": args.model, "args": {k: str(v) for k, v in vars(args).items()}}
    for phase in args.phases:
        t0 = time.perf_counter()
        if phase == "serve":
            report[phase] = phase_serve(args, args.model)
        else:
            from tmem_runtime.serve.main import load_serving_model

            torch.manual_seed(0)
            model, tok = load_serving_model(args.model)  # (a tiny model gets the embedded tokenizer)
            report[phase] = {"fw": phase_fw, "pool": phase_pool, "agent": phase_agent}[phase](args, model, tok)
            del model
        print(f"[{phase}] {time.perf_counter() - t0:.0f} s", flush=True)
        for key, g in report[phase].get("growth", {}).items():
            print(f"  {key:>16}: {g['after_warmup']:>10} -> {g['end']:>10}  ({g['per_100_ops']:+} per 100 ops)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
