"""`tmem serve`: every endpoint, streaming, batching, tenants, bad input, kill-and-restart, two processes.

The in-process server (uvicorn in a thread) runs the tiny random Llama with the embedded model's
tokenizer; its flashcards come from a deterministic card writer (one card per turn), so a write
triggered by the budget trains known cards. Answers are checked token for token against an
independent reference: a fresh copy of the model with `FastWeights` loaded from the session's file
in the store. The durability and scale-out tests run real `tmem serve` subprocesses.
"""

# ruff: noqa: E402  (the serve extra is checked before the modules that import it)
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

for _package in ("fastapi", "uvicorn", "httpx", "openai"):  # the `serve` extra
    pytest.importorskip(_package)

import httpx
import openai
import torch

from tmem_runtime import FastWeights
from tmem_runtime.agent.flashcards import TURN_PREFILL, turn_flashcard_messages
from tmem_runtime.agent.generation import Generator
from tmem_runtime.agent.write_formats import write_flashcards, writing_prompts
from tmem_runtime.chat import generate_greedy
from tmem_runtime.decoding import common_prefix_length
from tmem_runtime.serve.batcher import CARDS as CARD_PRIORITY
from tmem_runtime.serve.batcher import AnswerBatcher, Request, Row
from tmem_runtime.serve.cores import CoreLoan
from tmem_runtime.serve.launch import ServerProcess, free_port, serve_in_thread
from tmem_runtime.serve.main import load_serving_model
from tmem_runtime.serve.metrics import Metrics
from tmem_runtime.serve.service import MemoryService, ServeConfig, SessionGoneError, UnknownSessionError
from tmem_runtime.serve.store import MAX_ID_LENGTH, LeaseLostError, SessionRecord, Store
from tmem_runtime.serve.worker import Worker
from tmem_runtime.serve.writer import DecodeThreadGenerator

KEYS = {"key-acme": "acme", "key-globex": "globex"}
ACME = {"Authorization": "Bearer key-acme"}
GLOBEX = {"Authorization": "Bearer key-globex"}
CARDS = [("What is the name of Mira's cat?", "Biscuit"), ("Where does Nina work?", "the city library")]


def turn_cards(context: str) -> str:
    """A deterministic flashcard writer: one card per turn of 5+ words, answer = the turn's last word."""
    cards = []
    for line in context.splitlines():
        speaker, _, text = line.partition(": ")
        if not line.startswith("DATE:") and len(text.split()) >= 5:
            cards.append({"instruction": f"What did {speaker} say about {text.split()[0]}?",
                          "output": text.split()[-1].strip(".")})
    return json.dumps(cards)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base url, service) of an in-process server with two tenants."""
    torch.manual_seed(0)
    model, tokenizer = load_serving_model("tiny-llama")
    config = ServeConfig(capacity=8, l_max=48, max_rows=8, max_write_sessions=4, max_tokens=64,
                         card_writer=turn_cards)
    service = MemoryService(model, tokenizer, Store(tmp_path_factory.mktemp("store")), config)
    with serve_in_thread(service, "tiny-llama", KEYS, max_body=64 * 1024) as url:
        yield url, service


def test_a_model_saved_without_its_tokenizer_serves_with_the_one_named(tmp_path):
    """`tmem serve --model DIR --tokenizer TOK`: a model directory with no tokenizer of its own loads with
    the one named (it failed: the model's own tokenizer was loaded first, and there was none)."""
    from transformers import AutoModelForCausalLM

    from tmem_runtime.models import tiny_config

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("tiny-llama")).save_pretrained(tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()
    model, tokenizer = load_serving_model(str(tmp_path), "smollm2-135m")
    assert len(tokenizer) == 49152 and model.get_input_embeddings().num_embeddings == len(tokenizer)


@pytest.fixture(scope="module")
def reference_model():
    """A second, independent copy of the served model (same seed) for reference answers."""
    return load_serving_model("tiny-llama")


@pytest.fixture()
def acme(served):
    with httpx.Client(base_url=served[0], headers=ACME, timeout=120) as c:
        yield c


@pytest.fixture()
def globex(served):
    with httpx.Client(base_url=served[0], headers=GLOBEX, timeout=120) as c:
        yield c


def ask(client: httpx.Client, question: str, session: str | None = None, max_tokens: int = 8) -> str:
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens}
    if session is not None:
        body["session"] = session
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def reference_answer(reference_model, weights: Path | None, question: str, max_tokens: int = 8) -> str:
    """Greedy answer of a fresh model copy with FastWeights loaded from a session's weights file."""
    model, tokenizer = reference_model
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    fw = FastWeights(model)
    try:
        if weights is not None:
            fw.load(weights)
        row = generate_greedy(model, [ids], max_tokens, tokenizer.pad_token_id, Generator(model, tokenizer).eos_ids)[0]
    finally:
        fw.detach()
    return tokenizer.decode(row, skip_special_tokens=True)


def weights_file(store: Store, tenant: str, session: str) -> Path | None:
    return store.read(tenant, session)[1]


def create(client: httpx.Client, session: str) -> dict:
    r = client.post("/v1/sessions", json={"id": session})
    assert r.status_code == 201, r.text
    return r.json()


def remember(client: httpx.Client, session: str, cards, wait: bool = True) -> httpx.Response:
    return client.post(f"/v1/sessions/{session}/memories",
                       json={"memories": [{"question": q, "answer": a} for q, a in cards], "wait": wait})


# ---------------------------------------------------------------------------------------------- endpoints
def test_health_models_and_metrics(served, acme):
    assert acme.get("/health").json()["status"] == "ok"
    assert acme.get("/v1/models").json()["data"][0]["id"] == "tiny-llama"
    assert acme.get("/v1/models/tiny-llama").json() == acme.get("/v1/models").json()["data"][0]  # models.retrieve
    missing = acme.get("/v1/models/gpt-4o")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    create(acme, "metrics-probe")
    ask(acme, "Hello?", "metrics-probe")
    text = acme.get("/metrics").text
    for name in ("tmem_queue_depth{queue=\"answer\"}", "tmem_queue_depth{queue=\"write\"}", "tmem_resident_sessions",
                 "tmem_batch_rows_bucket", "tmem_batch_sessions_count", "tmem_write_seconds_sum",
                 "tmem_answer_tokens_total", "tmem_trunk_rows_bytes"):
        assert name in text, name
    samples = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert all(len(ln.rsplit(" ", 1)) == 2 and float(ln.rsplit(" ", 1)[1]) >= 0 for ln in samples)
    types = dict(ln.split()[2:4] for ln in text.splitlines() if ln.startswith("# TYPE"))
    assert all(kind == "counter" for name, kind in types.items() if name.endswith("_total"))
    assert types["tmem_trunk_rows_examples_total"] == "counter" and types["tmem_trunk_rows_bytes"] == "gauge"
    assert "metrics-probe" not in text and "acme" not in text  # no session or tenant names


def test_metrics_render_every_sample_exactly_and_escape_labels():
    """A busy server's counters pass a million: every increment must still show (no 6-digit rounding)."""
    m = Metrics()
    m.inc("generated_tokens_total", 1_234_567)
    before = m.render()
    m.inc("generated_tokens_total")
    m.set_gauge("trunk_rows_bytes", 268_435_456)
    m.set_gauge("writes_training", 0.25)
    m.inc("requests_total", route='a\\b"c\nd', code="200")
    samples = [ln for ln in m.render().splitlines() if ln and not ln.startswith("#")]
    assert "tmem_generated_tokens_total 1234567" in before.splitlines()
    assert {"tmem_generated_tokens_total 1234568", "tmem_trunk_rows_bytes 268435456",
            "tmem_writes_training 0.25"} <= set(samples)
    assert 'tmem_requests_total{code="200",route="a\\\\b\\"c\\nd"} 1' in samples  # one line, escaped


def test_session_lifecycle_and_exact_answers(served, acme, reference_model):
    url, service = served
    stats = create(acme, "alice")
    assert stats["writes"] == 0 and stats["memories"] == 0 and stats["weights_bytes"] > 0
    assert acme.post("/v1/sessions", json={"id": "alice"}).status_code == 409
    bare = ask(acme, CARDS[0][0])
    assert ask(acme, CARDS[0][0], "alice") == bare  # B = 0: the bare model exactly

    r = remember(acme, "alice", CARDS)
    assert r.status_code == 200 and r.json()["status"] == "committed"
    assert r.json()["steps"] == service.config.recipe.epochs  # 2 cards: one batch per epoch
    assert acme.get("/v1/sessions/alice/memories").json()["data"] == [{"question": q, "answer": a} for q, a in CARDS]
    stats = acme.get("/v1/sessions/alice").json()
    assert (stats["writes"], stats["cards"], stats["pending_writes"]) == (1, 2, 0)
    assert {"id": "alice", "server": service.config.server_id} in acme.get("/v1/sessions").json()["data"]

    answer = ask(acme, CARDS[0][0], "alice")
    assert answer == reference_answer(reference_model, weights_file(service.store, "acme", "alice"), CARDS[0][0])
    header = acme.post("/v1/chat/completions", headers={"X-Tmem-Session": "alice"},
                       json={"messages": [{"role": "user", "content": CARDS[0][0]}], "max_tokens": 8})
    assert header.json()["choices"][0]["message"]["content"] == answer

    reset = acme.delete("/v1/sessions/alice").json()
    assert reset["reset"] and reset["writes"] == 0 and reset["memories"] == 0
    assert acme.get("/v1/sessions/alice/memories").json()["data"] == []
    assert ask(acme, CARDS[0][0], "alice") == bare
    assert acme.delete("/v1/sessions/alice", params={"remove": "true"}).json()["removed"]
    assert acme.get("/v1/sessions/alice").status_code == 404


def test_messages_trigger_a_batched_write(served, acme):
    _, service = served
    create(acme, "chatty")
    turns = [{"name": "Nina", "content": "I moved to Porto last week with Ana."},
             {"name": "Omar", "content": "I adopted a small puppy called Rex."},
             {"name": "Nina", "content": "We fly to Lisbon in June for music."}]
    r = acme.post("/v1/sessions/chatty/messages", json={"messages": turns[:2], "date": "2 March 2021"}).json()
    assert r["triggered"] == [] and r["context_turns"] == 3  # DATE line + 2 turns, under l_max=48
    r = acme.post("/v1/sessions/chatty/messages", json={"messages": turns[2:], "wait": True}).json()
    assert len(r["triggered"]) == 1 and r["writes_done"][0]["error"] is None
    expected = [("What did Nina say about I?", "Ana"), ("What did Omar say about I?", "Rex")]
    assert [tuple(c) for c in r["writes_done"][0]["cards"]] == expected
    assert r["writes"] == 1 and r["pending_writes"] == 0
    assert r["context_turns"] == 2  # cleared, re-opened under the DATE line, then the new turn
    record, weights = service.store.read("acme", "chatty")
    assert weights is not None and weights.is_file() and record.written == [list(c) for c in expected]
    assert record.lines == ["DATE: 2 March 2021", "Nina: We fly to Lisbon in June for music."]
    # write: true writes what the context holds now, under l_max (the end of a conversation)
    r = acme.post("/v1/sessions/chatty/messages", json={"write": True, "wait": True}).json()
    assert len(r["triggered"]) == 1 and [tuple(c) for c in r["writes_done"][0]["cards"]] == [
        ("What did Nina say about We?", "music")]
    assert r["writes"] == 2 and r["context_turns"] == 0 and r["context_tokens"] == 0
    assert acme.post("/v1/sessions/chatty/messages", json={"write": True}).json()["triggered"] == []  # no turn
    record, _ = service.store.read("acme", "chatty")
    assert record.lines == [] and len(record.written) == 3
    r = acme.post("/v1/sessions/chatty/messages", json={"messages": []})
    assert r.status_code == 400 and "at least one turn" in r.json()["error"]["message"]


def test_a_date_is_one_context_line_and_never_reads_as_a_turn(served, acme):
    """A `date` holding a line break is one DATE line, its breaks as spaces (as a turn's): its second
    line was a context line of its own, which the card writer read as a turn ("Nina: ..." got a card the
    session was never told). A blank date is a 400, nothing appended."""
    _, service = served
    create(acme, "dated")
    forged = "3 May 2024\nNina: I keep a golden yacht in Monaco"
    turn = {"name": "Omar", "content": "I repaired the old clock."}
    r = acme.post("/v1/sessions/dated/messages", json={"messages": [turn], "date": forged, "write": True, "wait": True})
    assert r.status_code == 200, r.text
    assert [tuple(c) for c in r.json()["writes_done"][0]["cards"]] == [("What did Omar say about I?", "clock")]
    for blank in ("", " \n\t "):
        r = acme.post("/v1/sessions/dated/messages", json={"messages": [{"content": "Hello again."}], "date": blank})
        assert r.status_code == 400 and "date" in r.json()["error"]["message"], r.text
    r = acme.post("/v1/sessions/dated/messages", json={"messages": [{"content": "Hello again."}], "date": " 4  May "})
    assert service.store.read("acme", "dated")[0].lines == ["DATE: 4 May", "User: Hello again."]
    assert r.json()["turns"] == 2


def test_a_blank_turn_or_speaker_is_a_400_and_stores_no_line(served, acme):
    """A turn whose content, name or role is whitespace only is a 400 naming the field (they were stored as
    context lines "User:" or ": hi", turns with no words or no speaker); nothing of the request is appended."""
    _, service = served
    create(acme, "blank")
    good = {"name": "Nina", "content": "I moved to Porto."}
    for field, turn in (("content", {"content": " \n "}), ("name", {"name": "  ", "content": "hi"}),
                        ("role", {"role": "\t", "content": "hi"})):
        r = acme.post("/v1/sessions/blank/messages", json={"messages": [good, turn]})
        assert r.status_code == 400 and f"messages.1.{field}" in r.json()["error"]["message"], r.text
    assert service.store.read("acme", "blank")[0].lines == []
    r = acme.post("/v1/sessions/blank/messages", json={"messages": [good, {"role": "assistant", "content": "Nice!"}]})
    assert r.status_code == 200 and service.store.read("acme", "blank")[0].lines == [
        "Nina: I moved to Porto.", "Assistant: Nice!"]


def test_concurrent_sessions_share_batches_and_match_alone(served, acme, reference_model):
    _, service = served
    names = [f"batch{i}" for i in range(4)]
    for s in names:
        create(acme, s)
    cards = {s: [(f"What is code {i}?", f"number {i * 7 + 3}")] for i, s in enumerate(names)}
    with ThreadPoolExecutor(4) as ex:  # four writes at once: batched into fewer pool writes
        outcomes = list(ex.map(lambda s: remember(acme, s, cards[s]).json(), names))
    assert all(o["status"] == "committed" for o in outcomes)
    question = "What is code 2?"
    alone = {s: ask(acme, question, s) for s in names}
    multi = service.metrics.histograms["batch_sessions"]
    before = multi.count - multi.counts[0]  # batches that held two sessions or more
    with ThreadPoolExecutor(9) as ex:
        busy = ex.submit(ask, acme, "Keep the decode thread busy.", None, 64)  # the 8 below queue up meanwhile
        time.sleep(0.3)
        together = list(ex.map(lambda s: ask(acme, question, s), names * 2))
        busy.result()
    assert together == [alone[s] for s in names * 2]
    assert multi.count - multi.counts[0] > before
    for s in names:
        assert alone[s] == reference_answer(reference_model, weights_file(service.store, "acme", s), question)
    assert len(set(alone.values())) > 1  # different memories, different answers


def test_answers_go_on_while_a_write_trains(served, acme):
    _, service = served
    create(acme, "writer")
    create(acme, "reader")
    big = [(f"What is item {i} of the list?", f"entry {i}") for i in range(64)]  # 40 write steps
    steps = service.metrics.counters["write_steps_total"]
    before = {c: steps[(("cores", c),)] for c in ("own", "both")}
    assert remember(acme, "writer", big, wait=False).status_code == 202
    deadline = time.monotonic() + 60
    while not service.metrics.gauges["writes_training"].get((), 0):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    answered = 0
    while acme.get("/v1/sessions/writer").json()["pending_writes"] and answered < 3:
        ask(acme, "Are you there?", "reader", max_tokens=2)  # another session, answered mid-write
        answered += 1
    assert answered == 3 and acme.get("/v1/sessions/writer").json()["pending_writes"] == 1
    while acme.get("/v1/sessions/writer").json()["pending_writes"]:
        time.sleep(0.1)
    assert acme.get("/v1/sessions/writer").json()["memories"] == len(big)
    ran = {c: steps[(("cores", c),)] - before[c] for c in ("own", "both")}
    assert ran["own"] + ran["both"] == 40  # CPU: steps while no answer waited borrowed the decode thread's core,
    assert ran["own"] >= 1 and ran["both"] >= 1  # those while one waited or decoded did not


def test_a_stopping_server_stops_a_write_at_its_next_step_and_keeps_it_pending(tmp_path):
    """SIGTERM (the ASGI shutdown calls service.stop) during a long CPU write: stop returns after one more
    step, not after the write; the write is not committed, stays pending in the store, and a server
    started on the store trains it."""
    from tmem_runtime.recipes import Recipe

    model, tokenizer = load_serving_model("tiny-llama")
    long = Recipe(optimizer="adamw", lr=1e-3, epochs=2000, batch_size=16)  # 8,000 steps: minutes
    service = MemoryService(model, tokenizer, Store(tmp_path), ServeConfig(capacity=4, max_write_sessions=2,
                                                                           recipe=long))  # fmt: skip
    service.start()
    service.create("t", "s")
    cards = [(f"What is item {i} of the list?", f"entry {i}") for i in range(64)]
    job = service.remember("t", "s", cards)
    steps = service.writer.cores.steps  # counted at each step's end
    deadline = time.monotonic() + 60
    while sum(steps.values()) < 3:  # the write is training
        assert time.monotonic() < deadline, "the write never started"
        time.sleep(0.01)
    t0 = time.monotonic()
    service.stop()
    stopped_in = time.monotonic() - t0
    assert stopped_in < 5 and not service.writer.thread.is_alive()
    assert sum(steps.values()) < 8000 and not job.done.done()
    record, weights = Store(tmp_path).read("t", "s")
    assert weights is None and len(record.pending) == 1 and not record.written
    service.pool.detach()

    service = MemoryService(model, tokenizer, Store(tmp_path), ServeConfig(capacity=4, max_write_sessions=2,
                                                                           recipe=Recipe(epochs=1)))  # fmt: skip
    service.start()  # reclaims its session (same server id) and resumes the pending write
    deadline = time.monotonic() + 60
    while service.stats("t", "s")["pending_writes"]:
        assert time.monotonic() < deadline, "the resumed write never finished"
        time.sleep(0.05)
    assert service.stats("t", "s")["memories"] == len(cards)
    service.stop()


def test_a_corrupt_session_in_the_store_fails_alone_keeps_its_files_and_holds_no_row(tmp_path):
    """A session whose weights file or state.json is truncated (a bad copy, a full disk): the server starts
    (one such session of its own made start-up fail) and serves the others; a request for it gets a 500
    saying so (code session_corrupt; a bad state.json was a 400, as if the client's fault), its files are
    kept as they were, and no failed load keeps a pool row (each request for it leaked one). So does a state.json
    or log line that reads as JSON but holds values of other types than a server writes (a hand edit): it failed
    inside the load (TypeError), and the server holding it could not start."""
    from tmem_runtime.serve.store import CorruptSessionError

    model, tokenizer = load_serving_model("tiny-llama")
    config = ServeConfig(capacity=4, max_write_sessions=1, card_writer=turn_cards)
    service = MemoryService(model, tokenizer, Store(tmp_path), config)
    service.start()
    broken = ("bad-weights", "bad-state", "bad-types", "bad-log")
    for s in (*broken, "fine"):
        service.create("default", s)
        assert service.remember("default", s, CARDS[:1]).done.result(timeout=120)["error"] is None
    service.append("default", "bad-log", ["Nina: hello there"])
    service.stop()
    service.pool.detach()
    store = Store(tmp_path)
    weights = store.read("default", "bad-weights")[1]
    state = store.session_dir("default", "bad-state") / "state.json"
    weights.write_bytes(weights.read_bytes()[:1000])
    state.write_bytes(state.read_bytes()[:50])
    typed = store.session_dir("default", "bad-types") / "state.json"
    typed.write_text(json.dumps({**json.loads(typed.read_text()), "lines": None}))
    log = next(store.session_dir("default", "bad-log").glob("turns-*.log"))
    log.write_text(log.read_text().replace('"stats": {', '"stats": 5, "was": {'))
    kept = {p: p.read_bytes() for d in broken for p in store.session_dir("default", d).iterdir()
            if p.name != "lease.json"}  # fmt: skip

    service = MemoryService(model, tokenizer, Store(tmp_path), config)
    with serve_in_thread(service, "tiny-llama") as url, httpx.Client(base_url=url, timeout=120) as client:
        loaded = service.pool.sessions
        assert [s.split("#")[0] for s in loaded] == ["default/fine"]  # (started: the two others logged, not loaded)
        for _ in range(3):
            for s in broken:
                r = client.get(f"/v1/sessions/{s}")
                assert r.status_code == 500 and r.json()["error"]["code"] == "session_corrupt", r.text
                assert f"session {s!r} cannot be loaded" in r.json()["error"]["message"]
                with pytest.raises(CorruptSessionError):
                    service.get("default", s)
        assert service.pool.sessions == loaded  # no row kept by the failed loads
        r = client.post("/v1/chat/completions", json={"session": "fine", "max_tokens": 3,
                                                      "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200 and client.get("/v1/sessions/fine").json()["memories"] == 1
    assert {p: p.read_bytes() for p in kept} == kept  # nothing of the broken sessions removed or rewritten


def openmp_max_threads() -> int | None:
    """omp_get_max_threads() of the calling thread, from the OpenMP runtime torch loaded (Linux), or None."""
    import ctypes

    maps = Path("/proc/self/maps")
    libs = {line.split()[-1] for line in maps.read_text().splitlines() if "libgomp" in line} if maps.exists() else set()
    return ctypes.CDLL(sorted(libs)[0]).omp_get_max_threads() if libs else None


def test_server_threads_run_the_servers_torch_threads():
    """OpenMP keeps its thread count per thread: a thread started after torch.set_num_threads(n) runs
    OpenMP's default (OMP_NUM_THREADS, else every core), so `--threads` must be applied in each worker."""
    if openmp_max_threads() is None:
        pytest.skip("no libgomp loaded (not Linux, or torch built without OpenMP)")

    class Probe(Worker):
        def _loop(self) -> None:
            seen.append(openmp_max_threads())

    seen, threads = [], torch.get_num_threads()
    torch.set_num_threads(3)  # differs from every default here (OMP_NUM_THREADS unset or 1; 2 cores)
    try:
        probe = Probe("probe")
    finally:
        torch.set_num_threads(threads)
    probe.start()
    probe.thread.join(10)
    plain = threading.Thread(target=lambda: seen.append(openmp_max_threads()))
    plain.start()
    plain.join(10)
    assert seen[0] == 3 and seen[1] != 3  # the worker runs what its builder ran; a plain thread would not


def test_a_batch_waits_for_a_wide_write_step_and_no_step_goes_wide_while_it_decodes():
    threads = torch.get_num_threads()
    cores = CoreLoan(threads, cores=2 * threads)
    entered, leave = threading.Event(), threading.Event()

    def batch():
        with cores.decoding():
            entered.set()
            leave.wait(30)

    decode = threading.Thread(target=batch)
    try:
        cores.before_training()  # nothing waits to decode: the first step runs on both threads' shares
        assert cores.wide and torch.get_num_threads() == 2 * threads
        decode.start()
        assert not entered.wait(0.3)  # the batch is held while the wide step runs ...
        cores.after_step(1, 3, 0.0)
        assert entered.wait(10) and not cores.wide and torch.get_num_threads() == threads  # ... and no longer
        cores.after_step(2, 3, 0.0)  # still decoding: step 3 runs on the write thread's own share too
        assert not cores.wide
        leave.set()
        decode.join(10)
        cores.after_step(3, 3, 0.0)  # the last step: nothing after it to widen
        assert not cores.wide and cores.steps == {"own": 2, "both": 1}
    finally:
        leave.set()
        cores.training_done()
    assert torch.get_num_threads() == threads
    off = CoreLoan(threads, enabled=False)  # a GPU server: nothing is lent, nothing waits
    off.before_training()
    with off.decoding():
        assert not off.wide and torch.get_num_threads() == threads
    assert not CoreLoan(threads, cores=threads).enabled  # no core beyond its own: nothing to borrow
    with pytest.raises(ValueError, match="at least 1"):
        CoreLoan(0)


def sse_chunks(client: httpx.Client, body: dict) -> list[dict]:
    """The chunks of a streamed completion (each `data:` event's JSON), checking it ends with `[DONE]`."""
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return [json.loads(e) for e in events[:-1]]


def test_streaming_sends_usage_only_when_asked_as_openai_does(served, acme):
    """Without stream_options.include_usage no chunk has a `usage` field; with it every chunk has
    `"usage": null` but one extra last chunk (before [DONE]) with no choice and the usage, equal to
    the non-streamed answer's. The text and finish reason are the non-streamed answer's either way."""
    create(acme, "usage")
    remember(acme, "usage", CARDS)
    body = {"model": "tiny-llama", "session": "usage", "max_tokens": 12,
            "messages": [{"role": "user", "content": CARDS[1][0]}]}
    r = acme.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    whole = r.json()
    prompt = len(served[1].prompt_ids(body["messages"]))  # the whole chat-templated prompt, its cached preamble too
    assert whole["usage"] == {"prompt_tokens": prompt, "completion_tokens": whole["usage"]["completion_tokens"],
                              "total_tokens": prompt + whole["usage"]["completion_tokens"]}
    assert whole["usage"]["completion_tokens"] == 12 or whole["choices"][0]["finish_reason"] == "stop"

    def check_choices(chunks: list[dict]) -> None:
        assert all(len(c["choices"]) == 1 for c in chunks) and len(chunks) > 3
        deltas = [c["choices"][0]["delta"] for c in chunks]
        finishes = [c["choices"][0]["finish_reason"] for c in chunks]
        assert deltas[0] == {"role": "assistant", "content": ""} and deltas[-1] == {}
        assert "".join(d["content"] for d in deltas[1:-1]) == whole["choices"][0]["message"]["content"]
        assert finishes[:-1] == [None] * (len(chunks) - 1) and finishes[-1] == whole["choices"][0]["finish_reason"]
        assert {c["id"] for c in chunks} == {chunks[0]["id"]}

    for options in ({}, {"stream_options": None}, {"stream_options": {}}, {"stream_options": {"include_usage": False}},
                    {"stream_options": {"include_usage": None}}):
        chunks = sse_chunks(acme, {**body, **options})
        check_choices(chunks)
        assert not any("usage" in c for c in chunks), options
    *chunks, usage_only = sse_chunks(acme, {**body, "stream_options": {"include_usage": True}})
    check_choices(chunks)
    assert all(c["usage"] is None for c in chunks)
    assert usage_only["choices"] == [] and usage_only["usage"] == whole["usage"]
    assert usage_only["id"] == chunks[0]["id"]
    with acme.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:  # a proxy (nginx) in
        assert r.headers["x-accel-buffering"] == "no"  # front passes each event on at once instead of buffering it
        assert r.headers["content-type"].startswith("text/event-stream")


def test_streaming_with_the_openai_client(served, acme):
    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="key-acme")
    create(acme, "streamer")
    remember(acme, "streamer", CARDS)
    messages = [{"role": "user", "content": CARDS[1][0]}]
    whole = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=12,
                                           extra_body={"session": "streamer"})
    pieces, finish = [], None
    for chunk in client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=12, stream=True,
                                                extra_body={"session": "streamer"}):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        assert chunk.usage is None and chunk.choices
    assert len(pieces) > 1 and "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    *_, last, usage_only = client.chat.completions.create(  # OpenAI's layout: usage in a chunk with no choice
        model="tiny-llama", messages=messages, max_tokens=12, stream=True, stream_options={"include_usage": True},
        extra_body={"session": "streamer"})
    assert last.choices[0].finish_reason == finish and last.usage is None
    assert usage_only.choices == [] and usage_only.usage == whole.usage


def test_stream_options_are_checked_as_openai_does(served, acme):
    """stream_options must be an object whose include_usage is a boolean (or null), and is a 400 without
    `stream: true` (OpenAI: "only allowed when 'stream' is enabled"); null counts as absent."""
    messages = [{"role": "user", "content": "Name a colour."}]
    refused = [{"stream": True, "stream_options": "usage"}, {"stream": True, "stream_options": [True]},
               {"stream": True, "stream_options": {"include_usage": "true"}},
               {"stream": True, "stream_options": {"include_usage": 1}},
               {"stream_options": {"include_usage": True}}, {"stream": False, "stream_options": {}},
               {"stream": None, "stream_options": {"include_usage": False}}]
    for options in refused:
        r = acme.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4, **options})
        assert r.status_code == 400 and "stream_options" in r.json()["error"]["message"], (options, r.text)
    r = acme.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4, "stream_options": None})
    assert r.status_code == 200 and "usage" in r.json()


def test_openai_options_are_honoured_or_refused_never_ignored(served, acme):
    """Greedy decoding: sampling options change nothing; options it cannot honour get a 400 naming them."""
    client = openai.OpenAI(base_url=f"{served[0]}/v1", api_key="key-acme", max_retries=0)
    messages = [{"role": "user", "content": "Name a colour."}]
    greedy = ask(acme, messages[0]["content"])
    accepted = [{"temperature": 0.9, "top_p": 0.5, "seed": 7, "user": "u-1", "n": 1}, {"n": None, "stream": None},
                {"response_format": {"type": "text"}, "tool_choice": "none", "logprobs": False, "top_logprobs": 0},
                {"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "modalities": ["text"]}]
    for options in accepted:
        r = acme.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, **options})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == greedy, (options, r.text)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    refused = {"n": {"n": 2}, "logprobs": {"logprobs": True}, "tools": {"tools": [tool]},
               "response_format": {"response_format": {"type": "json_object"}},
               "logit_bias": {"logit_bias": {"5": 100}},
               "frequency_penalty": {"frequency_penalty": 0.5}, "presence_penalty": {"presence_penalty": -1},
               "audio": {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}}
    for name, options in refused.items():
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=8, **options)
        assert name in err.value.body["message"], (name, err.value.body)
    r = acme.post("/v1/chat/completions", json={"messages": messages, "tool_choice": "required", "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("invalid request: logprobs, tools: ")
    for options in ({"temperature": "hot"}, {"temperature": 3}, {"top_p": 1.5}, {"seed": "x"}):  # as OpenAI: 400
        r = acme.post("/v1/chat/completions", json={"messages": messages, **options})
        assert r.status_code == 400 and next(iter(options)) in r.json()["error"]["message"], (options, r.text)


def test_a_trailing_slash_is_the_same_route_never_a_redirect(served, acme):
    """POST /v1/chat/completions/ (and every other path with a trailing slash) is answered by the route without
    it, as OpenAI's API does: it was FastAPI's 307 redirect, which clients do not follow with a POST's body."""
    _, service = served
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8}
    answers = service.metrics.counters["requests_total"]
    key = (("code", "200"), ("route", "/v1/chat/completions"))
    before = answers[key]
    plain, slashed = (acme.post(path, json=body) for path in ("/v1/chat/completions", "/v1/chat/completions/"))
    assert slashed.status_code == 200, slashed.text
    assert slashed.json()["choices"] == plain.json()["choices"] and slashed.json()["usage"] == plain.json()["usage"]
    assert answers[key] == before + 2  # (counted under the route's own path)
    r = acme.post("/v1/sessions/", json={"id": "slashed"})
    assert r.status_code == 201 and r.json()["id"] == "slashed"
    r = acme.post("/v1/sessions/slashed/memories/", json={"memories": [{"question": "Q?", "answer": "A"}]})
    assert r.status_code == 200 and r.json()["status"] == "committed", r.text
    for path in ("/v1/models", "/v1/models/tiny-llama", "/v1/sessions", "/v1/sessions/slashed",
                 "/v1/sessions/slashed/memories", "/health"):
        got, slashed = acme.get(path), acme.get(path + "/")
        assert (slashed.status_code, slashed.json()) == (got.status_code, got.json()), path
    r = acme.get("/v1/nowhere/")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_a_model_this_server_does_not_serve_is_refused(served, acme):
    """A chat completion naming another model than the one /v1/models lists is OpenAI's 404 model_not_found
    (param "model"), streamed or not; it was answered by the served model. Naming none is the served one."""
    url, _ = served
    listed = [m["id"] for m in acme.get("/v1/models").json()["data"]]
    assert listed == ["tiny-llama"]
    messages = [{"role": "user", "content": "Name a colour."}]
    for model in ("gpt-4o", "tiny-llama ", "TINY-LLAMA", ""):
        for stream in (False, True):
            r = acme.post("/v1/chat/completions", json={"model": model, "messages": messages, "stream": stream})
            assert r.status_code == 404 and r.headers["content-type"] == "application/json", (model, r.text)
            assert r.json() == {"error": {
                "message": f"the model {model!r} does not exist here: this server serves 'tiny-llama' (GET /v1/models)",
                "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="key-acme", max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=4)
    assert err.value.code == "model_not_found" and err.value.param == "model"
    for model in listed:
        assert client.chat.completions.create(model=model, messages=messages, max_tokens=4).model == model
    r = acme.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4})  # (no model: the served one)
    assert r.status_code == 200 and r.json()["model"] == "tiny-llama"


def test_an_assistant_message_with_null_content_is_an_empty_assistant_turn(served, acme):
    """OpenAI's assistant message with `content: null` (or none: one that called tools, or refused) is an empty
    assistant turn, answered as content "" is (it was a 400); a user, system or developer message without content
    is a 400 that says so."""
    def answer(assistant: dict) -> httpx.Response:
        messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", **assistant},
                    {"role": "user", "content": "Another one?"}]
        return acme.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": messages, "max_tokens": 8})

    empty = answer({"content": ""})
    assert empty.status_code == 200, empty.text
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    for assistant in ({"content": None}, {}, {"content": None, "tool_calls": calls},
                      {"content": None, "refusal": "No."}):
        r = answer(assistant)
        assert r.status_code == 200, (assistant, r.text)
        assert r.json()["choices"] == empty.json()["choices"] and r.json()["usage"] == empty.json()["usage"], assistant
    for role in ("user", "system", "developer"):
        for message in ({"role": role, "content": None}, {"role": role}):
            r = acme.post("/v1/chat/completions", json={"messages": [message, {"role": "user", "content": "Hi"}]})
            assert r.status_code == 400, (message, r.text)
            assert r.json()["error"]["message"] == (
                f"invalid request: messages.0: content: a {role} message needs content (a string or a list of text "
                "parts); only an assistant message may have null content"), r.text
            assert r.json()["error"]["param"] == "messages.[0]"  # OpenAI's form of the field at fault


def test_a_value_of_the_wrong_json_type_is_a_400_never_coerced(served, acme):
    """As OpenAI: "3" or true for max_tokens, "yes" or 1 for stream, "7" for seed are 400s naming the field;
    they were read as 3 tokens, 1 token, a stream, seed 7 (and a session's `wait: "no"` as a wait). An
    integer where a number goes is taken; a decimal where an integer goes is not (OpenAI's "got a decimal")."""
    create(acme, "typed")
    chat = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 3}
    for field, value in (("max_tokens", "3"), ("max_tokens", True), ("max_completion_tokens", "2"),
                         ("stream", "yes"), ("stream", 1), ("n", True), ("seed", "7"), ("temperature", "0.5"),
                         ("top_p", True), ("session", 7), ("model", ["tiny-llama"]), ("max_tokens", 3.0)):
        r = acme.post("/v1/chat/completions", json={**chat, field: value})
        assert r.status_code == 400 and field in r.json()["error"]["message"], (field, value, r.text)
        assert r.json()["error"]["param"] == field, (field, r.text)
    r = acme.post("/v1/chat/completions", json={**chat, "temperature": 1, "top_p": 1, "seed": 7})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
    turn = {"content": "I repaired the old clock."}
    for body in ({"messages": [turn], "wait": "no"}, {"messages": [turn], "write": 1}, {"messages": [{"content": 5}]}):
        r = acme.post("/v1/sessions/typed/messages", json=body)
        assert r.status_code == 400, (body, r.text)
    cards = [{"question": "Q?", "answer": "A"}]
    r = acme.post("/v1/sessions/typed/memories", json={"memories": cards, "wait": "false"})
    assert r.status_code == 400 and "wait" in r.json()["error"]["message"]
    assert acme.get("/v1/sessions/typed").json()["turns"] == 0  # nothing half-applied


def test_stop_texts_end_the_answer_where_the_first_begins(served, acme):
    """OpenAI's `stop`: the answer is the greedy text up to the first stop text (excluded), finish_reason
    "stop"; streamed pieces never show part of a stop text."""
    client = openai.OpenAI(base_url=f"{served[0]}/v1", api_key="key-acme", max_retries=0)
    messages = [{"role": "user", "content": "Describe the sea."}]
    greedy = ask(acme, messages[0]["content"], max_tokens=24)
    n = len(greedy)
    assert n > 12
    for stop in (greedy[n // 2 : n // 2 + 4], [greedy[-4:], greedy[3:6]], ["never in the answer"]):
        stops = [stop] if isinstance(stop, str) else stop
        found = [greedy.find(s) for s in stops if s in greedy]
        expected = greedy[: min(found)] if found else greedy  # the first occurrence of any of them ends it
        whole = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=24, stop=stop)
        assert whole.choices[0].message.content == expected, stop
        assert whole.choices[0].finish_reason == ("length" if expected == greedy else "stop")
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="tiny-llama", messages=messages, max_tokens=24, stop=stop, stream=True) if c.choices]
        assert "".join(pieces) == expected
    for bad in ([], [""], ["a", "b", "c", "d", "e"]):
        r = acme.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4, "stop": bad})
        assert r.status_code == (200 if bad == [] else 400), (bad, r.text)


def hold_the_decode_thread(service: MemoryService, tokens: int = 2) -> tuple[Request, threading.Event]:
    """A bare row whose batch holds the decode thread (from its first piece of text) until the returned
    event is set. Returns once that batch runs, so requests made after it queue for the next batch
    (under load the decode thread may take a while to start it, and then takes whatever else waits)."""
    gate, running = threading.Event(), threading.Event()

    def hold(_: str) -> None:
        running.set()
        gate.wait(300)

    hello = service.prompt_ids([{"role": "user", "content": "Hold on."}])
    blocker = service.batcher.submit([Row(hello, None, tokens, on_text=hold)])
    assert running.wait(300)
    return blocker, gate


def test_a_completion_whose_client_left_is_never_generated(served):
    """A non-streaming client that disconnects while its completion waits for the decode thread: the
    completion is dropped, not generated for nobody (and the decode thread goes on)."""
    url, service = served
    generated = service.metrics.counters["generated_tokens_total"]
    blocker, gate = hold_the_decode_thread(service, 4)
    left = service.metrics.counters["requests_total"]
    key = (("code", "499"), ("route", "/v1/chat/completions"))
    before, tokens = left[key], generated[()]
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(f"{url}/v1/chat/completions", headers=ACME, timeout=1,
                   json={"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 64})
    deadline = time.monotonic() + 30
    while left[key] == before:  # the server saw the disconnect
        assert time.monotonic() < deadline
        time.sleep(0.05)
    gate.set()
    assert blocker.future.result(timeout=60)[0].tokens <= 4
    with httpx.Client(base_url=url, headers=ACME, timeout=120) as client:
        assert ask(client, "Still there?", max_tokens=3)
    assert generated[()] - tokens <= 4 + 3  # the blocker and the last answer, nothing for the client that left


def test_removing_a_session_mid_batch_fails_its_answer_and_leaves_the_others_streams_whole(served, acme):
    """A session removed while its answer streams in a batch with another session's: its answer fails
    (session_gone); the other's stream is its answer once, exactly as asked alone (the batch is not redone).
    (Waits return when their event fires: their long timeouts only matter on a box loaded many times over.)"""
    _, service = served
    for s in ("leaving", "staying"):
        create(acme, s)
    remember(acme, "staying", CARDS[1:])
    messages = [{"role": "user", "content": "Tell me about the library."}]
    alone = ask(acme, messages[0]["content"], "staying", max_tokens=24)
    first = threading.Event()
    blocker, gate = hold_the_decode_thread(service)  # until both answers queue
    pieces = []
    def leaving_text(_: str) -> None:  # after its first piece, the answer waits for the removal to reach it
        first.set()
        leaving.cancelled.wait(300)

    leaving = service.answer("acme", "leaving", messages, 24, on_text=leaving_text)
    staying = service.answer("acme", "staying", messages, 24, on_text=pieces.append)
    gate.set()  # both run in the next batch
    blocker.future.result(timeout=300)
    assert first.wait(300)
    remove = threading.Thread(target=service.remove, args=("acme", "leaving"))
    remove.start()
    with pytest.raises(SessionGoneError):
        leaving.future.result(timeout=300)
    assert staying.future.result(timeout=300)[0].text == "".join(pieces) == alone
    remove.join(timeout=300)
    assert acme.get("/v1/sessions/leaving").status_code == 404


def test_a_card_prompt_past_the_window_fails_no_answer_batched_with_it(served, acme):
    """A very long turn's card prompt does not fit the model's window: it gets no card text, and neither
    it nor a row submitted past the window ever joins a batch (there it failed every other session's answer)."""
    _, service = served
    create(acme, "neighbour")
    messages = [{"role": "user", "content": "Tell me about the library."}]
    alone = ask(acme, messages[0]["content"], "neighbour", max_tokens=8)
    window = service.generator.window
    blocker, gate = hold_the_decode_thread(service)
    answer = service.answer("acme", "neighbour", messages, 8)  # waits for the next batch
    long_turn = "Nina: " + " ".join(["seven"] * window)
    prompts = [service.generator.chat_prompt([{"role": "user", "content": t}]) for t in ("Nina: hi there", long_turn)]
    cards = ThreadPoolExecutor(1).submit(service.generator.generate, prompts, 4)
    with pytest.raises(ValueError, match="window"):
        service.batcher.submit([Row([1] * window, None, 1)], CARD_PRIORITY)
    deadline = time.monotonic() + 300
    while service.batcher.depth() < 2:  # the card request's short row is queued with the answer
        assert time.monotonic() < deadline, "the card request never reached the queue"
        time.sleep(0.01)
    gate.set()
    blocker.future.result(timeout=300)
    assert answer.future.result(timeout=300)[0].text == alone
    short, long = cards.result(timeout=300)
    assert long == "" and short == service.generator.generate(prompts[:1], 4)[0]


def test_flashcard_prompts_share_a_cached_prefix_in_mixed_batches(served, acme):
    """Card prompts of the model's flashcard writer: their common prefix is prefilled once and cached; in
    one batch with a session's answer row, every row equals that row generated alone, unprefixed."""
    _, service = served
    create(acme, "mixer")
    assert remember(acme, "mixer", CARDS).json()["status"] == "committed"
    gen = DecodeThreadGenerator(service.model, service.tokenizer, service.batcher)
    turns = [("DATE: 2 May 2024", "Nina: I adopted a puppy called Rex last week."),
             ("DATE: 2 May 2024", "Omar: My sister works as a nurse in Porto now.")]
    prompts = [gen.chat_prompt(turn_flashcard_messages(h, t), prefill=TURN_PREFILL) for h, t in turns]
    ids = [gen.encode(p) for p in prompts]
    shared = common_prefix_length(ids)
    assert shared > 100 and ids[0][:shared] == ids[1][:shared]
    pid = service.get("acme", "mixer").pool_id
    question = service.prompt_ids([{"role": "user", "content": CARDS[0][0]}])
    alone = [service.batcher.submit([Row(x, None, 12)]).future.result()[0].text for x in ids]
    alone.append(service.batcher.submit([Row(question, pid, 12)]).future.result()[0].text)
    with service.batcher.cond:  # queue both requests before the decode thread looks: one batch
        cards = Request([Row(x[shared:], None, 12) for x in ids], CARD_PRIORITY, tuple(ids[0][:shared]))
        answer = Request([Row(question, pid, 12)])
        service.batcher.queue += [cards, answer]
        service.batcher.cond.notify_all()
    together = [r.text for r in cards.future.result()] + [answer.future.result()[0].text]
    assert together == alone
    assert (tuple(ids[0][:shared]), None, 0) in service.batcher.prefixes  # bare rows: no session, no version


def test_card_writes_of_different_dates_reuse_one_cached_prefix(served):
    """The flashcard prompt's fixed part (`shared` of writing_prompts) is the cached prefix: one-turn writes
    under different DATE lines reuse one entry, and each card equals its prompt decoded whole, unprefixed."""
    _, service = served
    gen = DecodeThreadGenerator(service.model, service.tokenizer, service.batcher)
    contexts = ["DATE: 2 May 2024\nNina: I adopted a puppy called Rex last week.",
                "DATE: 9 June 2025\nOmar: My sister works as a nurse in Porto now."]
    before = set(service.batcher.prefixes)
    raws, prefilled = [], []
    for c in contexts:
        raws.append(write_flashcards(gen, c, max_new_tokens=12, mode="per-turn")[0])
        prefilled.append(gen.counts.prefilled - sum(prefilled))
    prompts, shared = writing_prompts(gen, contexts[0], "per-turn")
    fixed = tuple(gen.encode(shared))
    key = (fixed, None, 0)
    suffixes = [len(gen.encode(writing_prompts(gen, c, "per-turn")[0][0])) - len(fixed) for c in contexts]
    assert prefilled[0] == suffixes[0] + (0 if key in before else len(fixed))
    assert prefilled[1] == suffixes[1]  # the second write found the prefix cached: only its own tokens ran
    assert len(fixed) > 100 and set(service.batcher.prefixes) - before <= {key} and key in service.batcher.prefixes
    alone = []
    for c in contexts:
        ids = gen.encode(writing_prompts(gen, c, "per-turn")[0][0])
        assert tuple(ids[: len(fixed)]) == fixed
        alone.append(service.batcher.submit([Row(ids, None, 12, stop_at_newline=True)]).future.result()[0].text)
    assert raws == [TURN_PREFILL + a for a in alone]


def test_answers_reuse_a_sessions_preamble_until_its_weights_change(served, acme, reference_model):
    """An answer's chat preamble (system text, user header) is prefilled under its session's weights once per
    version of them: a second question prefills only its own tokens; after a write (or a reset) the
    preamble is prefilled again, and every answer equals a fresh model's, prompt decoded whole."""
    _, service = served
    create(acme, "pre")
    pid = service.get("acme", "pre").pool_id
    preamble = tuple(service.preamble)
    assert len(preamble) >= 8

    def answer(question: str) -> tuple[str, int, int]:
        request = service.answer("acme", "pre", [{"role": "user", "content": question}], 8)
        own = len(service.prompt_ids([{"role": "user", "content": question}])) - len(preamble)
        return request.future.result()[0].text, request.prefilled, own

    def check(question: str, cached: bool) -> None:
        text, prefilled, own = answer(question)
        assert prefilled == own + (0 if cached else len(preamble))
        assert text == reference_answer(reference_model, weights_file(service.store, "acme", "pre"), question)

    check(CARDS[0][0], cached=False)  # B0: first use of this version
    check(CARDS[1][0], cached=True)
    version = service.pool.version(pid)
    assert (preamble, pid, version) in service.batcher.prefixes
    assert remember(acme, "pre", CARDS).json()["status"] == "committed"
    assert service.pool.version(pid) != version
    check(CARDS[0][0], cached=False)  # the write changed B: the old keys/values are not reused
    check(CARDS[1][0], cached=True)
    kept = [k for k in service.batcher.prefixes if k[1] == pid]
    assert kept == [(preamble, pid, service.pool.version(pid))]  # the superseded version's entry is gone
    acme.delete("/v1/sessions/pre")
    check(CARDS[0][0], cached=False)
    create(acme, "pre-gone")
    ask(acme, CARDS[0][0], "pre-gone")
    gone = service.get("acme", "pre-gone").pool_id
    assert acme.post("/v1/sessions/pre-gone/release").status_code == 200
    assert any(k[1] == gone for k in service.batcher.prefixes)
    create(acme, "pre-next")
    ask(acme, CARDS[0][0], "pre-next")  # the next prefill drops entries of sessions no longer loaded
    assert not any(k[1] == gone for k in service.batcher.prefixes)


def test_line_tokens_find_the_first_newline_as_the_decoded_text_does():
    """One-line rows end when their new token is one of `Generator.line_ids`: over SmolLM2's tokenizer
    that is exactly when the decoded text (special tokens skipped) first holds a newline."""
    import random

    from tmem_runtime import load_model

    model, tokenizer = load_model("smollm2-135m")
    line_ids = set(Generator(model, tokenizer).line_ids())
    vocab = len(tokenizer)
    assert line_ids == {i for i in range(vocab) if "\n" in tokenizer.decode([i], skip_special_tokens=True)}
    rng = random.Random(0)
    text = "Nina: I moved to Porto \u2014 caf\u00e9s, \u6e2f\u53e3 and \U0001f431 cats.\n\nOmar:  ok\r\n\tdone"
    sequences = [tokenizer(text, add_special_tokens=False)["input_ids"]]
    sequences += [[rng.randrange(vocab) for _ in range(48)] for _ in range(40)]  # partial UTF-8 bytes too
    sequences += [[rng.choice(sorted(line_ids)) if rng.random() < 0.05 else rng.randrange(vocab) for _ in range(48)]
                  for _ in range(40)]
    checked = 0
    for seq in sequences:
        for n in range(1, len(seq) + 1):
            by_text = "\n" in tokenizer.decode(seq[:n], skip_special_tokens=True)
            assert by_text == any(t in line_ids for t in seq[:n]), seq[:n]
            checked += by_text
    assert checked > 100  # both outcomes seen


# ---------------------------------------------------------------------------------------------- isolation
def test_a_drop_racing_another_drop_of_one_session_returns(served, acme, monkeypatch):
    """Two threads may drop one session (the lease renewer, a persist, an unload): the later one can find
    it closed between its check and its close. It must return, not raise: raised inside the renewer,
    that killed the lease thread, and no lease was renewed after."""
    _, service = served
    create(acme, "raced")
    conv = service.get("acme", "raced")
    service.pool.close(conv.pool_id)  # the other drop, done in between
    stale = _StaleFirstCheck(service.pool)
    monkeypatch.setattr(service, "pool", stale)
    service._drop(conv)  # its first check still sees the session
    monkeypatch.undo()
    assert stale.checks == 1 and conv.pool_id not in service.pool
    assert ("acme", "raced") not in service.convs
    assert service.get("acme", "raced").pool_id != conv.pool_id  # the store kept it: it loads again


def test_a_request_arriving_during_a_release_or_remove_never_loads_the_session_under_it(served, acme, monkeypatch):
    """A request for a session while its release gives the lease up (or its removal deletes its files): the
    session had left the table first, so the request loaded it again, and then the release deleted that
    load's lease (its next commit failed: 409 session_gone, the session dropped; a write queued meanwhile
    could commit from the stale load and its client wait for ever) or the removal its files (a removed
    session answered). Now the request finds the session on its way out (409, retry), and a request after
    the release loads it with its lease; after the removal it is gone (404)."""
    _, service = served
    store, real_release, real_remove = service.store, service.store.release, service.store.remove
    during = []

    def request_meanwhile(real):
        def call(tenant: str, session: str, *args) -> None:
            r = acme.post(f"/v1/sessions/{session}/messages", json={"messages": [{"content": "meanwhile"}]})
            during.append(r.status_code)  # (served by another thread)
            real(tenant, session, *args)
        return call

    for session in ("handed", "removed"):
        create(acme, session)
    monkeypatch.setattr(store, "release", request_meanwhile(real_release))
    assert acme.post("/v1/sessions/handed/release").status_code == 200
    monkeypatch.setattr(store, "remove", request_meanwhile(real_remove))
    assert acme.delete("/v1/sessions/removed", params={"remove": "true"}).status_code == 200
    monkeypatch.undo()
    r = acme.post("/v1/sessions/handed/messages", json={"messages": [{"content": "still here"}]})
    assert r.status_code == 200 and r.json()["turns"] == 1, r.text
    assert store.lease("acme", "handed").owner == service.config.server_id
    assert acme.get("/v1/sessions/removed").status_code == 404
    assert not store.session_dir("acme", "removed").exists()
    assert during == [409, 409]  # (the session on its way out: retry)


class _StaleFirstCheck:
    """A pool whose first membership check answers as it did before another thread closed the session."""

    def __init__(self, pool) -> None:
        self.pool, self.checks = pool, 0

    def __contains__(self, session: str) -> bool:
        self.checks += 1
        return self.checks == 1 or session in self.pool

    def __getattr__(self, name: str):
        return getattr(self.pool, name)


def test_a_failed_load_never_lets_two_requests_load_one_session(served, monkeypatch):
    """A load that fails (no such session yet) while another request waits to load the same id: the
    waiting request and a third one load it once, as one Conversation (two loads trained and
    committed each pending write twice, each from its own copy of the session)."""
    _, service = served
    exists, calls = service.store.exists, []
    first, failed_load, third = threading.Event(), threading.Event(), threading.Event()

    def slow_exists(tenant: str, session: str) -> bool:
        calls.append(session)
        if len(calls) == 1:  # the first load: it finds no session, once the second request waits for it
            first.set()
            failed_load.wait(60)
            return False
        if len(calls) == 2:  # the second load: the third request gets a chance to load beside it
            third.wait(2)
        else:
            third.set()
        return exists(tenant, session)

    monkeypatch.setattr(service.store, "exists", slow_exists)
    results: dict[str, object] = {}

    def get(name: str) -> None:
        try:
            results[name] = service.get("acme", "latecomer")
        except Exception as exc:
            results[name] = exc

    one, two, three = (threading.Thread(target=get, args=(n,)) for n in ("one", "two", "three"))
    one.start()
    assert first.wait(60)
    service.store.create("acme", "latecomer")
    two.start()
    time.sleep(0.3)  # two waits for one's load
    failed_load.set()
    one.join(60)
    three.start()
    two.join(60), three.join(60)
    assert isinstance(results["one"], UnknownSessionError)
    assert results["two"] is results["three"] is service.convs[("acme", "latecomer")]
    assert [s for s in service.pool.sessions if s.startswith("acme/latecomer#")] == [results["two"].pool_id]


def test_a_card_that_cannot_be_trained_fails_its_own_write_only(served, acme, globex):
    """Two sessions' writes in one batch, one of them with a card whose answer alone is over max_length
    (e.g. resumed from a store an older server wrote; the API refuses such a card): the other commits."""
    _, service = served
    create(acme, "overlong")
    create(globex, "neighbour")
    bad, good = service.get("acme", "overlong"), service.get("globex", "neighbour")
    with bad.busy, good.busy:  # the write thread cannot take either until both are queued
        with bad.lock:
            bad_job = bad.remember([("What is this?", "\U0001f436" * 400)])
        service.writer.submit(bad, [bad_job])
        good_job = service.remember("globex", "neighbour", CARDS[:1])
    service.writer.wake()
    assert good_job.done.result(timeout=120)["error"] is None
    assert "flashcard too long" in bad_job.done.result(timeout=120)["error"]
    assert globex.get("/v1/sessions/neighbour/memories").json()["data"] == [{"question": CARDS[0][0],
                                                                           "answer": CARDS[0][1]}]
    assert acme.get("/v1/sessions/overlong").json()["rollbacks"] == 1


def test_tenants_cannot_reach_each_others_sessions(served, acme, globex):
    create(acme, "secret")
    assert remember(acme, "secret", CARDS[:1]).json()["status"] == "committed"
    before = acme.get("/v1/sessions/secret").json()
    attempts = [
        globex.get("/v1/sessions/secret"),
        globex.get("/v1/sessions/secret/memories"),
        globex.post("/v1/sessions/secret/messages", json={"messages": [{"content": "I am someone else today."}]}),
        remember(globex, "secret", CARDS[1:]),
        globex.delete("/v1/sessions/secret"),
        globex.delete("/v1/sessions/secret", params={"remove": "true"}),
        globex.post("/v1/sessions/secret/release"),
        globex.post("/v1/chat/completions", json={"session": "secret", "messages": [{"role": "user", "content": "x"}]}),
        globex.post("/v1/chat/completions", headers={"X-Tmem-Session": "secret"},
                    json={"messages": [{"role": "user", "content": "hi"}]}),
    ]
    assert [a.status_code for a in attempts] == [404] * len(attempts)
    assert all(a.json()["error"]["code"] == "session_not_found" for a in attempts)
    assert "secret" not in [s["id"] for s in globex.get("/v1/sessions").json()["data"]]
    create(globex, "secret")  # the same id in another tenant is another session
    assert globex.get("/v1/sessions/secret/memories").json()["data"] == []
    after = acme.get("/v1/sessions/secret").json()
    assert {**after, "store_bytes": 0} == {**before, "store_bytes": 0}  # (a lease renewal rewrites lease.json's expiry)
    assert acme.get("/v1/sessions/secret/memories").json()["data"] == [{"question": CARDS[0][0], "answer": CARDS[0][1]}]
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "key-acme"}):
        r = httpx.get(f"{served[0]}/v1/sessions/secret", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_bad_input_gets_a_clear_4xx(served, acme):
    create(acme, "sturdy")
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = [
        (acme.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}), 400),
        (acme.post("/v1/chat/completions", json={}), 400),
        (acme.post("/v1/chat/completions", json={"messages": []}), 400),
        (acme.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]}), 400),
        (acme.post("/v1/chat/completions", json={"messages": "hello"}), 400),
        (acme.post("/v1/chat/completions", json={**chat, "max_tokens": 0}), 400),
        (acme.post("/v1/chat/completions", json={**chat, "max_tokens": 10_000}), 400),
        (acme.post("/v1/chat/completions", json={**chat, "n": 3}), 400),
        (acme.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "word " * 700}]}), 400),
        (acme.post("/v1/chat/completions", json={**chat, "session": "nobody"}), 404),
        (acme.post("/v1/chat/completions", json={**chat, "session": "../../etc"}), 400),
        (acme.post("/v1/chat/completions", json={**chat, "session": ""}), 400),
        (acme.post("/v1/chat/completions", json=chat, headers={"X-Tmem-Session": ""}), 400),
        (acme.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 70_000}]}), 413),
        (acme.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
                   headers={"content-type": "application/json"}), 400),  # a lone surrogate: no text to tokenize
        (acme.post("/v1/sessions", json={"id": "has space"}), 400),
        (acme.post("/v1/sessions", json={"id": 7}), 400),
        (acme.get("/v1/sessions/" + "x" * 200), 400),
        (acme.post("/v1/sessions/sturdy/messages", json={"messages": []}), 400),
        (acme.post("/v1/sessions/sturdy/messages", json={"messages": [{"content": ""}]}), 400),
        (acme.post("/v1/sessions/sturdy/messages", json={"turns": ["hi"]}), 400),
        (acme.post("/v1/sessions/sturdy/memories", json={"memories": []}), 400),
        (acme.post("/v1/sessions/sturdy/memories", json={"memories": [{"question": "q"}]}), 400),
        (acme.post("/v1/sessions/sturdy/memories", json={"memories": [{"question": " ", "answer": " "}]}), 400),
        (acme.post("/v1/sessions/sturdy/memories", json={"memories": [{"question": "q", "answer": "🐶" * 400}]}),
         400),  # ~1200 answer tokens: no training example of max_length holds it
        (acme.post("/v1/sessions/nobody/memories", json={"memories": [{"question": "q", "answer": "a"}]}), 404),
        (acme.post("/v1/sessions/nobody/messages", json={"messages": [{"content": "hello there"}]}), 404),
        (acme.delete("/v1/sessions/nobody"), 404),
        (acme.get("/v1/nothing-here"), 404),
    ]
    for response, status in cases:
        assert response.status_code == status, (response.request.url, response.text)
        assert response.json()["error"]["message"], response.text
    assert "max_tokens" in cases[6][0].json()["error"]["message"]
    assert "window" in cases[8][0].json()["error"]["message"]
    for headers in ({"content-type": "text/plain"}, {"content-type": ""}):  # e.g. curl -d without -H content-type
        r = acme.post("/v1/sessions/sturdy/messages", content=b'{"messages": [{"content": "hello"}]}', headers=headers)
        assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"]["message"], r.text
    sturdy = acme.get("/v1/sessions/sturdy").json()
    assert (sturdy["turns"], sturdy["pending_writes"], sturdy["rollbacks"]) == (0, 0, 0)  # nothing half-applied
    assert ask(acme, "still alive?", "sturdy")


def test_an_answer_without_max_tokens_fits_what_room_the_prompt_leaves_in_the_window(served, acme):
    """No max_tokens: the answer stops where the model's window ends (as OpenAI's default); a long prompt
    got a 400 naming a max_tokens=64 the client never sent. A prompt that fills the window, or a max_tokens
    given past it, is still a 400."""
    window = served[1].generator.window

    def words(n: int) -> list[dict]:
        return [{"role": "user", "content": " ".join(["word"] * n)}]

    overhead = len(served[1].prompt_ids(words(100))) - 100  # (one token a word)
    for room in (5, 1):
        messages = words(window - overhead - room)
        prompt = len(served[1].prompt_ids(messages))
        assert prompt == window - room
        r = acme.post("/v1/chat/completions", json={"messages": messages})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] == prompt and usage["total_tokens"] <= window
        assert usage["completion_tokens"] == room or r.json()["choices"][0]["finish_reason"] == "stop"
        r = acme.post("/v1/chat/completions", json={"messages": messages, "max_tokens": room + 1})
        assert r.status_code == 400 and "max_tokens=" in r.json()["error"]["message"], r.text
        assert r.json()["error"]["code"] == "context_length_exceeded"  # (OpenAI's code: clients branch on it)
    full = words(window - overhead)
    r = acme.post("/v1/chat/completions", json={"messages": full, "stream": True})
    assert r.status_code == 400 and "no room" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"
    short = acme.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Go on."}]}).json()
    assert short["usage"]["completion_tokens"] == 64 or short["choices"][0]["finish_reason"] == "stop"  # --max-tokens


GEMMA_LIKE_TEMPLATE = (  # Gemma's checks (its template raises these), in the ChatML the tiny model's tokenizer knows
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_messages_the_models_chat_template_refuses_get_a_400_naming_why(tmp_path):
    """A served model whose chat template raises on some messages (Gemma's: no system role, alternating
    roles): such a completion is a 400 with the template's reason, streamed or not (it was a 500
    "internal error: TemplateError", logged as a server bug); the messages it takes are answered."""
    model, tokenizer = load_serving_model("tiny-llama")
    tokenizer.chat_template = GEMMA_LIKE_TEMPLATE
    config = ServeConfig(capacity=4, max_write_sessions=2, max_tokens=8)
    service = MemoryService(model, tokenizer, Store(tmp_path), config)
    with serve_in_thread(service, "tiny-llama") as url, httpx.Client(base_url=url, timeout=120) as client:
        refused = {"alternate": [{"role": "user", "content": "Hi."}, {"role": "user", "content": "Hello?"}],
                   "System role": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."}]}
        for reason, messages in refused.items():
            for stream in (False, True):
                r = client.post("/v1/chat/completions", json={"messages": messages, "stream": stream})
                assert r.status_code == 400 and reason in r.json()["error"]["message"], r.text
                assert r.json()["error"]["type"] == "invalid_request_error"
        taken = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
                 {"role": "user", "content": "How are you?"}]
        r = client.post("/v1/chat/completions", json={"messages": taken, "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(service.prompt_ids(taken))
        assert {dict(k)["code"] for k in service.metrics.counters["requests_total"]} == {"200", "400"}


def test_head_answers_as_get_and_a_405_says_which_methods_the_path_allows(served, acme):
    """HEAD of a GET route (a load balancer's `HEAD /health`) is its GET's status and headers with no body
    (it was a 405); a method a path does not answer is a JSON 405 with the Allow header HTTP requires."""
    create(acme, "headed")
    for path in ("/health", "/metrics", "/v1/models", "/v1/sessions", "/v1/sessions/headed",
                 "/v1/sessions/headed/memories", "/v1/sessions/nobody"):
        got, head = acme.get(path), acme.head(path)
        assert (head.status_code, head.content) == (got.status_code, b""), path
        assert head.headers["content-type"] == got.headers["content-type"], path
    assert acme.head("/v1/sessions/nobody").status_code == 404
    for method, path, allowed in (("GET", "/v1/chat/completions", {"POST"}), ("OPTIONS", "/health", {"GET", "HEAD"}),
                                  ("PUT", "/v1/sessions/headed", {"GET", "HEAD", "DELETE"})):
        r = acme.request(method, path)
        assert r.status_code == 405 and r.json()["error"]["message"] == "Method Not Allowed", (method, path)
        assert set(r.headers["allow"].split(", ")) == allowed, (method, path, r.headers)


def test_an_unexpected_error_is_a_counted_json_500_on_a_connection_that_stays_open(served, monkeypatch):
    url, service = served

    def broken(tenant: str, session: str) -> dict:
        raise RuntimeError("a bug")

    monkeypatch.setattr(service, "stats", broken)
    errors = service.metrics.counters["requests_total"]
    key = (("code", "500"), ("route", "/v1/sessions/{session}"))
    before = errors[key]
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:  # two requests on one keep-alive connection
        replies = []
        for path in ("/v1/sessions/anyone", "/health"):
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-acme\r\n\r\n".encode())
            replies.append(_read_response(s))
    (status, body), (health, _) = replies
    assert status == 500 and json.loads(body)["error"] == {"message": "internal error: RuntimeError",
                                                           "type": "server_error", "param": None, "code": None}
    assert health == 200 and errors[key] == before + 1


def _read_response(s: socket.socket) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 response with a content-length, read from a socket (0, b"" if it closed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return 0, b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")))
    while len(body) < length:
        body += s.recv(65536)
    return int(head.split()[1]), body


# ---------------------------------------------------------------------------------------------- store
def test_store_commit_is_atomic(tmp_path):
    store = Store(tmp_path)
    store.create("t", "s")
    record, _ = store.read("t", "s")
    record.lines = ["first"]
    store.commit("t", "s", record, lambda path: path.write_bytes(b"weights one"))
    assert store.read("t", "s")[1].read_bytes() == b"weights one"

    def killed(path: Path) -> None:  # the new weights file is written, then the process dies
        path.write_bytes(b"weights two")
        raise KeyboardInterrupt

    crashed = SessionRecord(**{**record.__dict__, "lines": ["second"]})
    with pytest.raises(KeyboardInterrupt):
        store.commit("t", "s", crashed, killed)
    d = store.session_dir("t", "s")
    (d / "state.json.x1y2.tmp").write_bytes(b'{"truncat')  # a state.json cut short before its rename
    after, weights = store.read("t", "s")
    assert after.lines == ["first"] and weights.read_bytes() == b"weights one"
    assert sorted(f.name for f in d.iterdir()) == [".lock", "state.json", weights.name]
    with pytest.raises(ValueError):
        store.session_dir("t", "../escape")


def test_files_in_the_store_that_name_no_tenant_or_session_are_passed_over(tmp_path):
    """A file or directory in STORE/tenants or a tenant's directory that the store did not write there (a
    .DS_Store, a note, a session directory copied under a readable name): the sessions are listed and a
    restarting server finds the sessions it held as before (a file made its start-up fail, NotADirectoryError;
    a directory of another name holding a state.json made the session list a 400)."""
    store = Store(tmp_path)
    for session in ("alice", "bob"):
        store.create("acme", session)
    store.claim("acme", "alice", "srv", "http://a", 30)
    (tmp_path / "tenants" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (store.tenant_dir("acme") / "notes.txt").write_text("backup on Friday")
    shutil.copytree(store.session_dir("acme", "alice"), store.tenant_dir("acme") / "alice-copy")
    assert store.sessions("acme") == ["alice", "bob"]
    assert list(store.leased_to("srv")) == [("acme", "alice")]


def test_store_size_while_commits_replace_files(tmp_path):
    """GET /v1/sessions/{id} sums the session's files while a write commits (which removes the old
    weights file): a file gone between the listing and its stat is not an error (it was a 500)."""
    store = Store(tmp_path)
    store.create("t", "s")
    record, _ = store.read("t", "s")
    commits = 400

    def commit() -> None:
        for _ in range(commits):
            store.commit("t", "s", record, lambda path: path.write_bytes(b"w" * 1000))

    writer = threading.Thread(target=commit)
    writer.start()
    sizes = []
    while writer.is_alive():
        sizes.append(store.size("t", "s"))
    writer.join()
    assert record.seq == commits and len(sizes) > commits and all(s > 0 for s in sizes)
    d = store.session_dir("t", "s")
    assert store.size("t", "s") == sum(f.stat().st_size for f in d.iterdir())


def test_a_claim_removes_the_temp_file_of_a_claim_killed_before_its_rename(tmp_path):
    store = Store(tmp_path)
    store.create("t", "s")
    d = store.session_dir("t", "s")
    (d / "lease.json.k1ll3d.tmp").write_bytes(b'{"owner": "a"')  # a renewal SIGKILLed mid-write
    store.claim("t", "s", "b", "http://b", ttl=30)
    assert sorted(f.name for f in d.iterdir()) == [".lock", "lease.json", "state.json"]
    assert store.lease("t", "s").owner == "b"


def test_a_claim_of_an_expired_lease_waits_for_the_holders_commit_and_then_it_cannot_commit(tmp_path):
    """Server a's lease ran out (its renewal was late) while a write of it commits: server b, taking the
    session over, must read that commit, and a must commit nothing after b's claim (it would overwrite
    b's state and weights file: same seq)."""
    store = Store(tmp_path)
    store.create("t", "s")
    store.claim("t", "s", "a", "http://a", ttl=0.01)
    time.sleep(0.05)
    record, _ = store.read("t", "s")
    claimed: list = []
    b = threading.Thread(target=lambda: claimed.append(store.claim("t", "s", "b", "http://b", ttl=30)))

    def save(path: Path) -> None:  # b asks for the session while a's commit is under way
        b.start()
        b.join(timeout=0.5)
        assert not claimed, "b claimed the session in the middle of a's commit"
        path.write_bytes(b"a's write")

    store.commit("t", "s", record, save, owner="a")
    b.join()
    assert claimed[0].owner == "b" and store.read("t", "s")[1].read_bytes() == b"a's write"
    with pytest.raises(LeaseLostError):
        store.commit("t", "s", record, lambda path: path.write_bytes(b"a's late write"), owner="a")
    assert store.read("t", "s")[1].read_bytes() == b"a's write" and record.seq == 1


def test_a_failed_lease_renewal_is_retried_and_the_renewals_go_on(tmp_path, monkeypatch):
    """A renewal that fails with an unexpected error (a full disk) is retried next period: it stopped the
    renewal thread, and every lease of the server then ran out."""
    model, tokenizer = load_serving_model("tiny-llama")
    store = Store(tmp_path)
    service = MemoryService(model, tokenizer, store, ServeConfig(capacity=3, max_write_sessions=1, lease_ttl=0.3))
    service.start()
    try:
        service.create("t", "s")
        renew, failures = store.renew, [OSError(28, "No space left on device")]

        def failing_renew(*args, **kwargs):
            if failures:
                raise failures.pop()
            return renew(*args, **kwargs)

        monkeypatch.setattr(store, "renew", failing_renew)
        deadline = time.monotonic() + 60
        while failures or store.lease("t", "s").expires < time.time() + 0.25:  # renewed after the failure
            assert time.monotonic() < deadline, "the lease was never renewed again"
            time.sleep(0.02)
        time.sleep(0.6)  # two ttls: still ours
        assert store.lease("t", "s").expires > time.time() and service.stats("t", "s")["server"] == "local"
    finally:
        service.stop()


def test_the_longest_ids_name_sessions_and_longer_ones_get_400(served, acme):
    """Ids are stored hex-encoded, one file name each: the longest valid id must still fit one (255 bytes)."""
    longest = "L" * MAX_ID_LENGTH
    assert create(acme, longest)["id"] == longest
    assert remember(acme, longest, CARDS[:1]).json()["status"] == "committed"
    assert acme.get(f"/v1/sessions/{longest}").json()["memories"] == 1
    assert longest in [s["id"] for s in acme.get("/v1/sessions").json()["data"]]
    store = Store(served[1].store.root)
    store.create("t" * MAX_ID_LENGTH, longest)
    assert store.sessions("t" * MAX_ID_LENGTH) == [longest]
    for response in (acme.post("/v1/sessions", json={"id": longest + "L"}), acme.get(f"/v1/sessions/{longest}L")):
        assert response.status_code == 400 and f"1-{MAX_ID_LENGTH} characters" in response.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- processes
def tiny_server(store: Path, port: int, log: Path, *extra: str, cpus: list[int] | None = None) -> ServerProcess:
    return ServerProcess(["--model", "tiny-llama", "--store", str(store), "--capacity", "8", "--max-write-batch", "4",
                          "--max-batch", "8", *extra], port, log, cpus)


def stored_sessions(root: Path) -> dict[tuple[str, str], tuple[SessionRecord, Path | None]]:
    """Every session's stored state (state.json and its log) and weights file, by (tenant, session)."""
    store = Store(root)
    tenants = [bytes.fromhex(t.name).decode() for t in (root / "tenants").iterdir()]
    return {(t, s): store.read(t, s) for t in tenants for s in store.sessions(t)}


def check_store_files(root: Path) -> int:
    """Every state parses and names a readable weights file; returns the number of sessions."""
    from safetensors import safe_open

    sessions = stored_sessions(root)
    for _, weights in sessions.values():
        if weights is not None:
            with safe_open(str(weights), framework="pt") as f:
                assert f.metadata()["format"].startswith("tmem-fast-weights")
    return len(sessions)


def test_sigkill_mid_write_and_mid_answer_loses_no_acknowledged_write(tmp_path, reference_model):
    store, port = tmp_path / "store", free_port()
    server = tiny_server(store, port, tmp_path / "server.log").wait_ready()
    c = server.client
    assert c.post("/v1/sessions", json={"id": "durable"}).status_code == 201
    acked = []
    for card in CARDS:
        r = remember(c, "durable", [card])
        assert r.json()["status"] == "committed"
        acked.append(card)
    metrics = server.metrics()  # one scrape, every sample
    assert metrics['tmem_writes_total{outcome="committed"}'] == len(acked) == server.metric("tmem_flashcards_total")
    assert metrics["tmem_write_seconds_count"] == len(acked) and "tmem_resident_sessions" in metrics
    question = CARDS[0][0]
    answer = ask(c, question, "durable", max_tokens=12)
    big = [(f"What is fact number {i}?", f"value {i}") for i in range(64)]
    assert remember(c, "durable", big, wait=False).status_code == 202  # acknowledged: persisted as pending
    with c.stream("POST", "/v1/chat/completions", json={
            "session": "durable", "stream": True, "max_tokens": 250,
            "messages": [{"role": "user", "content": "Tell me everything."}]}) as stream:
        lines = stream.iter_lines()
        assert next(lines).startswith("data: ")
        deadline = time.monotonic() + 60
        while server.metric("tmem_writes_training") < 1:  # the big write is training now
            assert time.monotonic() < deadline, "the write never started"
            time.sleep(0.01)
        server.kill()  # mid-write, mid-answer
        with pytest.raises(httpx.HTTPError):
            rest = list(lines)
            assert "data: [DONE]" not in rest, "the answer had finished before the kill"
    assert check_store_files(store) == 1
    ((record, _),) = stored_sessions(store).values()
    assert [tuple(c) for c in record.written] == acked and len(record.pending) == 1  # the big write not committed

    server = tiny_server(store, port, tmp_path / "server.log").wait_ready()  # same id: reclaims, resumes
    c = server.client
    deadline = time.monotonic() + 120
    while (stats := c.get("/v1/sessions/durable").json())["pending_writes"]:
        assert time.monotonic() < deadline, "the resumed write never finished"
        time.sleep(0.2)
    assert stats["writes"] == 3 and stats["memories"] == len(acked) + len(big)
    memories = [(m["question"], m["answer"]) for m in c.get("/v1/sessions/durable/memories").json()["data"]]
    assert memories == acked + big
    assert check_store_files(store) == 1
    resumed = ask(c, question, "durable", max_tokens=12)
    server.kill()
    server = tiny_server(store, port, tmp_path / "server.log").wait_ready()
    after = ask(server.client, question, "durable", max_tokens=12)
    server.kill()
    assert after == resumed == reference_answer(reference_model, weights_file(Store(store), "default", "durable"),
                                                question, 12)
    assert answer == reference_answer(reference_model, None, question, 12) or answer != after


def test_a_server_started_on_the_address_of_a_running_one_exits_before_touching_its_sessions(tmp_path):
    """Started by mistake on a running server's host:port (so with its server id), `tmem serve` cannot
    listen: it must say so and exit before its start-up renews that id's lease, claims its sessions or
    resumes their writes (uvicorn binds only after the app's start-up)."""
    store, port = Store(tmp_path / "store"), free_port()
    server_id = f"127.0.0.1:{port}"
    store.create("default", "busy")
    store.claim("default", "busy", server_id, f"http://{server_id}", 30)
    before = {p: p.read_bytes() for p in store.root.rglob("*") if p.is_file()}
    with socket.socket() as running:  # the running server's socket
        running.bind(("127.0.0.1", port))
        running.listen()
        log = tmp_path / "second.log"
        second = tiny_server(store.root, port, log)
        assert second.proc.wait(timeout=300) == 1
    assert f"tmem serve: cannot listen on 127.0.0.1:{port} (Address already in use)" in log.read_text()
    assert {p: p.read_bytes() for p in store.root.rglob("*") if p.is_file()} == before  # no lease renewed


def test_two_processes_share_the_store_and_hand_a_session_over(tmp_path):
    store = tmp_path / "store"
    a = tiny_server(store, free_port(), tmp_path / "a.log", "--lease-ttl", "3")
    b = tiny_server(store, free_port(), tmp_path / "b.log", "--lease-ttl", "3", cpus=[0])
    a.wait_ready(), b.wait_ready()
    try:
        threads = list(Path(f"/proc/{b.proc.pid}/task").iterdir())  # b pinned: every thread it started, too
        assert len(threads) > 1 and all(os.sched_getaffinity(int(t.name)) == {0} for t in threads)
        assert a.client.post("/v1/sessions", json={"id": "roamer"}).status_code == 201
        assert remember(a.client, "roamer", CARDS).json()["status"] == "committed"
        answer = ask(a.client, CARDS[0][0], "roamer", max_tokens=12)

        refused = b.client.get("/v1/sessions/roamer")
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "session_elsewhere"
        assert refused.headers["X-Tmem-Server"] == a.url
        assert b.client.post("/v1/chat/completions", json={
            "session": "roamer", "messages": [{"role": "user", "content": "hi"}]}).status_code == 409
        assert b.client.get("/v1/sessions").json()["data"] == [{"id": "roamer", "server": f"127.0.0.1:{a.port}"}]

        assert a.client.post("/v1/sessions/roamer/release").json()["released"]
        assert b.client.get("/v1/sessions/roamer").json()["memories"] == len(CARDS)
        assert ask(b.client, CARDS[0][0], "roamer", max_tokens=12) == answer  # same weights on the other process
        assert a.client.get("/v1/sessions/roamer").status_code == 409
        r = b.client.post("/v1/sessions/roamer/messages", json={"messages": [{"content": "short turn here ok"}]})
        assert r.json()["context_turns"] == 1

        b.kill()  # B dies holding the lease: A takes over once it expires, with B's acknowledged turn
        deadline = time.monotonic() + 30
        while (r := a.client.get("/v1/sessions/roamer")).status_code == 409:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert r.status_code == 200 and r.json()["context_turns"] == 1 and r.json()["memories"] == len(CARDS)
        assert ask(a.client, CARDS[0][0], "roamer", max_tokens=12) == answer
    finally:
        for p in (a, b):
            if p.proc.poll() is None:
                p.kill()


@pytest.mark.parametrize("capacity", [2, 1])
def test_an_answer_reads_one_state_of_its_session_while_a_write_of_it_commits(capacity):
    """Every token of an answer reads the weights its batch began with, while a write of its session
    commits: at once (the batch reads a copy of the session's row, in a free row: capacity 2), or once
    the batch ends (no free row: capacity 1, the session is read in place and the commit waits)."""
    from tmem_runtime import Recipe, SessionPool

    model, tokenizer = load_serving_model("tiny-llama")
    pool = SessionPool(model, capacity=capacity, backend="torch")
    pool.open("s")
    recipe = Recipe(lr=3e-2, epochs=2)
    pool.write_qa_many(tokenizer, {"s": CARDS}, recipe=recipe)
    batcher = AnswerBatcher(pool, Generator(model, tokenizer), Metrics())
    batcher.start()
    try:
        ids = tokenizer("Where does Nina work?", add_special_tokens=False)["input_ids"]
        want = batcher.submit([Row(ids, "s", 8)]).future.result(timeout=60)[0]
        assert want.tokens == 8
        first, resume = threading.Event(), threading.Event()

        def on_text(_text):  # the first piece of the answer's text pauses the decode thread
            if not first.is_set():
                first.set()
                assert resume.wait(60)

        paused = batcher.submit([Row(ids, "s", 8, on_text=on_text)])
        assert first.wait(60)
        version = pool.version("s")
        more = [(f"What is item {i}?", f"entry {i}") for i in range(4)]
        write = threading.Thread(target=lambda: pool.write_qa_many(tokenizer, {"s": more}, recipe=recipe))
        write.start()
        if capacity == 2:
            write.join(timeout=120)  # committed while the answer is paused mid-way
            assert not write.is_alive() and pool.version("s") != version
        else:
            deadline = time.monotonic() + 120
            while not pool._locks.commits_waiting:  # trained, waiting for the answer's batch to end
                assert write.is_alive() and time.monotonic() < deadline
                time.sleep(0.01)
            assert pool.version("s") == version
        resume.set()
        got = paused.future.result(timeout=60)[0]
        write.join(timeout=60)
        assert (got.text, got.tokens) == (want.text, want.tokens)
        assert not write.is_alive() and pool.version("s") != version
        assert pool.counters()["commit_waits"] == (capacity == 1)
        after = batcher.submit([Row(ids, "s", 8)]).future.result(timeout=60)[0]
        assert after.text != want.text  # (the new weights answer otherwise: the pause read the old ones)
    finally:
        resume.set()
        batcher.stop()
        pool.detach()


def test_the_served_model_name_is_the_model_directorys_unless_named():
    """Requests must name the served model (404 model_not_found otherwise): `--served-model-name` (vLLM's flag)
    lets a server answer to the name its clients already send."""
    from tmem_runtime.serve.main import build_parser, served_model_name

    parse = build_parser().parse_args
    assert served_model_name(parse(["--model", "/models/Qwen3-4B/"])) == "Qwen3-4B"
    assert served_model_name(parse(["--model", "tiny-llama"])) == "tiny-llama"
    assert served_model_name(parse(["--model", "/models/Qwen3-4B", "--served-model-name", "qwen"])) == "qwen"
