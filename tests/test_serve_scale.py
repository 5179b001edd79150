"""`tmem serve` at scale: idle sessions unloaded, lease renewal in O(1) store operations, turns appended in O(turn).

The services here run in-process (no HTTP) on the tiny random Llama, with the deterministic card
writer of test_serve; answers are checked token for token against the same independent reference.
"""

# ruff: noqa: E402  (the serve extra is checked before the modules that import it)
from __future__ import annotations

import gc
import json
import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

for _package in ("fastapi", "uvicorn", "httpx"):  # the `serve` extra
    pytest.importorskip(_package)

import httpx

from tests.test_serve import CARDS, ask, reference_answer, remember, tiny_server, turn_cards, weights_file
from tmem_runtime.adapter_file import model_identity
from tmem_runtime.agent.agent import Trigger
from tmem_runtime.serve.conversation import TriggerCount
from tmem_runtime.serve.launch import ServerProcess, free_port, serve_in_thread
from tmem_runtime.serve.main import load_serving_model
from tmem_runtime.serve.service import MemoryService, ServeConfig
from tmem_runtime.serve.store import (
    STORE_FORMAT,
    LeaseHeldError,
    LeaseLostError,
    SessionRecord,
    Store,
    StoreFormatError,
    StoreModelError,
)

QUESTION = [{"role": "user", "content": CARDS[0][0]}]


@pytest.fixture(scope="module")
def reference_model():
    """An independent copy of the served model, for reference answers (test_serve's)."""
    return load_serving_model("tiny-llama")


@pytest.fixture()
def model():
    """A fresh copy of the tiny model per service (a model holds one pool)."""
    return load_serving_model("tiny-llama")


def start_service(model, store: Store, **config) -> MemoryService:
    config = {"capacity": 4, "max_write_sessions": 1, "l_max": 48, "max_tokens": 16, **config}
    service = MemoryService(*model, store, ServeConfig(card_writer=turn_cards, **config))
    service.start()
    return service


@pytest.fixture()
def idle_service(model, tmp_path):
    service = start_service(model, Store(tmp_path), idle_unload=1.0)
    yield service
    service.stop()


def answer(service: MemoryService, session: str) -> str:
    return service.answer("t", session, QUESTION, 8).future.result(timeout=60)[0].text


def wait_until(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def unloaded_total(service: MemoryService) -> float:
    lines = [ln for ln in service.metrics_text().splitlines() if ln.startswith("tmem_sessions_unloaded_total")]
    return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0


# ---------------------------------------------------------------------------------------------- idle unload

def paused_release(store: Store, monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Make `store.release` pause: (set when a release begins, set it to let the release go on)."""
    releasing, go_on, release = threading.Event(), threading.Event(), store.release

    def slow_release(*args) -> None:
        releasing.set()
        go_on.wait(60)
        release(*args)

    monkeypatch.setattr(store, "release", slow_release)
    return releasing, go_on

def test_an_idle_session_is_unloaded_and_its_next_request_loads_it_as_it_was(idle_service, reference_model):
    """Unused for idle_unload seconds, a session leaves the process (conversation, pool session, lease);
    its next request loads it from the store and answers exactly as before, with its context and counters."""
    s = idle_service
    s.create("t", "idle")
    assert s.remember("t", "idle", CARDS).done.result(timeout=60)["error"] is None
    s.append("t", "idle", ["Nina: a short turn"], date="2 March 2024")
    before, stats = answer(s, "idle"), s.stats("t", "idle")
    conv = s.convs[("t", "idle")]
    wait_until(lambda: s.upkeep.unloaded == 1, "the idle session was never unloaded")
    assert ("t", "idle") not in s.convs and unloaded_total(s) == 1
    assert not conv.active and conv.pool_id not in s.pool and s.store.lease("t", "idle") is None
    assert s.pool.counters()["open"] == 0

    after = answer(s, "idle")
    again = s.convs[("t", "idle")]
    assert again is not conv and again.pool_id != conv.pool_id and s.store.lease("t", "idle").owner == "local"
    assert after == before == reference_answer(reference_model, weights_file(s.store, "t", "idle"), CARDS[0][0])
    assert {**s.stats("t", "idle"), "store_bytes": 0} == {**stats, "store_bytes": 0}
    assert again.agent.lines == conv.agent.lines == ["DATE: 2 March 2024", "Nina: a short turn"]


def test_a_session_with_a_pending_write_or_an_answer_in_progress_is_never_unloaded(idle_service):
    """A write pending (its training not started), an answer streaming, an answer queued behind it: each
    session stays loaded however long that lasts; once they are over, each is unloaded."""
    s = idle_service
    for name in ("writing", "streaming", "queued"):
        s.create("t", name)
    writing = s.get("t", "writing")
    gate, first = threading.Event(), threading.Event()

    def stream(_: str) -> None:
        first.set()
        gate.wait(60)

    with writing.busy:  # the write thread cannot take its write until this ends
        job = s.remember("t", "writing", CARDS[:1])
        streaming = s.answer("t", "streaming", QUESTION, 4, on_text=stream)
        assert first.wait(60)
        queued = s.answer("t", "queued", QUESTION, 4)  # waits for the decode thread, which waits for the gate
        time.sleep(2.5)  # over two idle periods
        assert s.upkeep.unload_idle() == 0 and s.upkeep.unloaded == 0
        assert {("t", "writing"), ("t", "streaming"), ("t", "queued")} <= set(s.convs)
        gate.set()
    s.writer.wake()  # (it found the write's session busy)
    assert streaming.future.result(timeout=60)[0].tokens > 0 and queued.future.result(timeout=60)[0].tokens > 0
    assert job.done.result(timeout=60)["error"] is None
    wait_until(lambda: s.upkeep.unloaded == 3, "the sessions were never unloaded once their work ended")
    assert not s.convs and s.stats("t", "writing")["memories"] == 1


def test_a_request_during_an_unload_waits_and_loads_the_session_after_its_lease_is_given_up(model, tmp_path,
                                                                                            monkeypatch):
    """The unload gives the lease up last: a request that arrives meanwhile must not load the session
    before that (its claim would be given up under it: every later commit refused)."""
    store = Store(tmp_path)
    s = start_service(model, store, idle_unload=0)  # unloaded here by hand
    try:
        s.create("t", "s")
        s.append("t", "s", ["Nina: one turn"])
        releasing, go_on = paused_release(store, monkeypatch)
        s.convs[("t", "s")].last_used -= 10
        s.config.idle_unload = 1
        unloading = threading.Thread(target=lambda: wait_until(lambda: s.upkeep.unload_idle() == 1, "never unloaded"))
        # (a sweep skips a session whose lock another thread holds a moment, e.g. the write thread's look at it)
        unloading.start()
        assert releasing.wait(60)
        got: list = []
        getter = threading.Thread(target=lambda: got.append(s.append("t", "s", ["Nina: another turn"])))
        getter.start()
        getter.join(0.5)
        assert not got, "a request loaded the session while its unload was giving its lease up"
        go_on.set()
        unloading.join(300), getter.join(300)
        assert got[0][0]["context_turns"] == 2 and store.lease("t", "s").owner == "local"
        assert store.read("t", "s")[0].stats["turns"] == 2 and s.upkeep.unloaded == 1
    finally:
        s.stop()


def test_a_request_for_the_session_released_for_max_loaded_waits_and_gets_it_as_it_was(model, tmp_path,
                                                                                    monkeypatch):
    """A request that loads a session past `max_loaded` unloads the least recently used idle one on its
    own thread; a request for that one arriving meanwhile (its lease not given up yet) waits for the
    release, then loads it from the store: no 409, the same answer, context and counters."""
    store = Store(tmp_path)
    s = start_service(model, store, idle_unload=0, max_loaded=1)
    try:
        s.create("t", "lru")
        assert s.remember("t", "lru", CARDS).done.result(timeout=60)["error"] is None
        s.append("t", "lru", ["Nina: a short turn"], date="2 March 2024")
        before, stats, conv = answer(s, "lru"), s.stats("t", "lru"), s.convs[("t", "lru")]
        releasing, go_on = paused_release(store, monkeypatch)
        newcomer = threading.Thread(target=s.create, args=("t", "new"))  # past max_loaded: "lru" is released
        newcomer.start()
        assert releasing.wait(60) and ("t", "lru") not in s.convs and not conv.active
        got: list = []
        request = threading.Thread(target=lambda: got.append((answer(s, "lru"), s.stats("t", "lru"))))
        request.start()
        request.join(0.5)
        assert not got, "a request loaded the session before its release gave the lease up"
        go_on.set()
        newcomer.join(60), request.join(120)
        (after, stats_after), again = got[0], s.convs.get(("t", "lru"))
        assert after == before and {**stats_after, "store_bytes": 0} == {**stats, "store_bytes": 0}
        assert again is not None and again is not conv and again.agent.lines == conv.agent.lines
        assert store.lease("t", "lru").owner == "local" and s.upkeep.unloaded >= 1
    finally:
        s.stop()


def test_a_failed_release_neither_strands_the_other_unloads_nor_fails_the_request_that_made_room(model, tmp_path,
                                                                                                monkeypatch):
    """Three sessions taken for `max_loaded` in one sweep, the first one's lease release failing (a full
    disk): the request whose load made the sweep still succeeds, and the other two are unloaded and
    load again on their next request (their gates were let go: that request does not wait forever)."""
    store = Store(tmp_path)
    s = start_service(model, store, idle_unload=0, max_loaded=3)
    try:
        for name in ("a", "b", "c"):
            s.create("t", name)
        release = store.release

        def failing_release(tenant: str, session: str, owner: str) -> None:
            if session == "a":
                raise OSError(28, "No space left on device")
            release(tenant, session, owner)

        monkeypatch.setattr(store, "release", failing_release)
        s.config.max_loaded = 1
        s.create("t", "d")  # loads a fourth: a, b and c (least recently used) are taken
        assert set(s.convs) == {("t", "d")} and s.upkeep.unloaded == 3
        text = s.metrics_text()  # counted as what they were: past max_loaded, not unused for idle_unload
        assert 'tmem_sessions_unloaded_total{reason="max_loaded"} 3\n' in text and 'reason="idle"' not in text
        assert store.lease("t", "b") is None and store.lease("t", "c") is None
        assert store.lease("t", "a").owner == "local"  # (kept: this server loads it on its next request)
        got: list = []
        request = threading.Thread(target=lambda: got.extend(s.stats("t", n)["server"] for n in ("b", "c", "a")))
        request.start()
        request.join(60)
        assert got == ["local"] * 3, "a request for a session taken in the failed sweep never returned"
    finally:
        s.stop()


def test_a_late_renewals_claim_never_lands_after_an_unload_gave_the_lease_up(model, tmp_path, monkeypatch):
    """After a late renewal the upkeep claims each loaded session again; an idle unload of one of them at
    that moment must not end with its lease this server's and the session loaded nowhere (refused to
    every other server for good): either the claim comes first and the session stays, or the unload."""
    store = Store(tmp_path)
    s = start_service(model, store, idle_unload=0)
    try:
        s.create("t", "s")
        claim, claiming, go_on = store.claim, threading.Event(), threading.Event()

        def slow_claim(*args, **kwargs):
            if threading.current_thread().name == "renewer":
                claiming.set()
                go_on.wait(60)
            return claim(*args, **kwargs)

        monkeypatch.setattr(store, "claim", slow_claim)
        store.servers._write(replace(store.servers.read("local"), expires=time.time() - 1))  # a late renewal
        renewer = threading.Thread(target=s.leases.renew, name="renewer")
        renewer.start()
        assert claiming.wait(60)
        s.convs[("t", "s")].last_used -= 10
        s.config.idle_unload = 1
        unloaded = s.upkeep.unload_idle()
        go_on.set()
        renewer.join(60)
        loaded, lease = ("t", "s") in s.convs, store.lease("t", "s")
        assert loaded == (lease is not None and lease.expires > time.time()), (unloaded, loaded, lease)
        assert unloaded == 0 and s.convs[("t", "s")].lease_epoch == lease.epoch  # (the claim held it)
        assert s.upkeep.unload_idle() == 1 and store.lease("t", "s") is None
    finally:
        s.stop()


def test_a_load_at_max_loaded_with_every_session_busy_waits_for_one_to_be_idle_then_takes_its_place(model, tmp_path):
    """At `max_loaded` with the loaded session busy (a write pending), a request for another session loads
    nothing and unloads nothing while it waits (it loaded it past the bound, or loaded it and unloaded it at
    once); once the write has committed, the waiting request unloads the now idle one and gets its own."""
    s = start_service(model, Store(tmp_path), idle_unload=0, max_loaded=1, max_loaded_wait=60)
    try:
        s.create("t", "writing")
        got: list = []
        with s.get("t", "writing").busy:  # the write cannot start, so the session cannot be unloaded
            job = s.remember("t", "writing", CARDS[:1])
            s.store.create("t", "newcomer")
            request = threading.Thread(target=lambda: got.append(s.stats("t", "newcomer")))
            request.start()
            request.join(0.5)
            assert not got and set(s.convs) == {("t", "writing")} and s.upkeep.unloaded == 0
            assert s.store.lease("t", "newcomer") is None and len(s.pool.sessions) == 1  # (never claimed, no row)
        s.writer.wake()
        assert job.done.result(timeout=60)["error"] is None
        request.join(60)
        assert got and got[0]["context_turns"] == 0 and set(s.convs) == {("t", "newcomer")} and s.upkeep.unloaded == 1
        assert 'tmem_sessions_unloaded_total{reason="max_loaded"} 1\n' in s.metrics_text()
        assert s.stats("t", "writing")["memories"] == 1 and set(s.convs) == {("t", "writing")}  # (idle: swapped)
    finally:
        s.stop()


def test_a_load_at_max_loaded_with_every_session_busy_gets_a_503_with_retry_after_and_changes_nothing(model, tmp_path):
    """No loaded session becomes idle within --max-loaded-wait: a request for a session not loaded gets 503
    (OpenAI-style body, code server_busy, Retry-After), counted in tmem_requests_total; nothing is loaded,
    unloaded, claimed or written. A create is not left half done (no session made), an unknown session is
    still a 404, and once the busy session is let go the same request is answered."""
    store = Store(tmp_path)
    s = MemoryService(*model, store, ServeConfig(capacity=4, max_write_sessions=1, max_tokens=16, idle_unload=0,
                                                 max_loaded=1, max_loaded_wait=0.3, card_writer=turn_cards))
    body = {"session": "other", "max_tokens": 4, "messages": QUESTION}
    with serve_in_thread(s, "tiny-llama") as url, httpx.Client(base_url=url, timeout=120) as client:
        for name in ("other", "busy"):  # ("other" is unloaded to make room for "busy")
            assert client.post("/v1/sessions", json={"id": name}).status_code == 201
        busy = s.get("default", "busy", hold=True)  # a request of it in progress
        files = {p: p.read_bytes() for p in (tmp_path / "tenants").rglob("*") if p.is_file()}
        t0 = time.monotonic()
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 503 and time.monotonic() - t0 >= 0.3, r.text
        assert r.json()["error"]["type"] == "server_error" and r.json()["error"]["code"] == "server_busy"
        assert "1 loaded sessions" in r.json()["error"]["message"] and r.headers["Retry-After"] == "1"
        r = client.post("/v1/sessions", json={"id": "third"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy", r.text
        assert client.get("/v1/sessions/nobody").status_code == 404
        assert set(s.convs) == {("default", "busy")} and s.upkeep.unloaded == 1 and len(s.pool.sessions) == 1
        assert {p: p.read_bytes() for p in (tmp_path / "tenants").rglob("*") if p.is_file()} == files  # (no lease,
        assert store.sessions("default") == ["busy", "other"] and store.lease("default", "other") is None  # no "third")
        text = s.metrics_text()
        assert 'tmem_requests_total{code="503",route="/v1/chat/completions"} 1\n' in text
        assert 'tmem_sessions_unloaded_total{reason="max_loaded"} 1\n' in text
        s.loaded.let_go(busy)
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and set(s.convs) == {("default", "other")}, r.text


def test_a_short_idle_unload_checks_often_but_renews_the_lease_every_third_of_its_ttl(model, tmp_path, monkeypatch):
    """Each renewal is an fsynced store write: it follows --lease-ttl, not --idle-unload-seconds."""
    store, renewals = Store(tmp_path), []
    renew = store.renew
    monkeypatch.setattr(store, "renew", lambda *args: renewals.append(time.monotonic()) or renew(*args))
    s = start_service(model, store, idle_unload=0.02, lease_ttl=1.5)
    try:
        s.create("t", "brief")
        wait_until(lambda: ("t", "brief") not in s.convs, "the idle session was never unloaded", timeout=10)
        time.sleep(2.0 - (time.monotonic() - renewals[0]))  # 2 s from the start's renewal: 4 periods of 0.5 s
        assert 4 <= len(renewals) <= 6, f"{len(renewals)} lease renewals in 2 s"  # (was one per 10 ms)
    finally:
        s.stop()


def test_idle_unload_zero_never_unloads(model, tmp_path):
    s = start_service(model, Store(tmp_path), idle_unload=0, lease_ttl=0.3)
    try:
        s.create("t", "kept")
        time.sleep(0.5)
        assert ("t", "kept") in s.convs and s.upkeep.unloaded == 0
    finally:
        s.stop()
    with pytest.raises(ValueError):
        ServeConfig(idle_unload=-1)


def test_tmem_serve_unloads_an_idle_session_and_answers_its_next_request_from_the_same_state(tmp_path):
    """`tmem serve --idle-unload-seconds 1` as a process: a session used, then left alone, is unloaded
    (resident sessions 0, its lease given up); its next request loads it and gets what it had: the same
    greedy answer, context, writes and cards."""
    store = tmp_path / "store"
    server = tiny_server(store, free_port(), tmp_path / "serve.log", "--idle-unload-seconds", "1").wait_ready()
    try:
        c = server.client
        assert c.post("/v1/sessions", json={"id": "napper"}).status_code == 201
        assert remember(c, "napper", CARDS).json()["status"] == "committed"
        turns = {"date": "2 March 2024", "messages": [{"name": "Nina", "content": "a short turn"}]}
        assert c.post("/v1/sessions/napper/messages", json=turns).json()["context_turns"] == 2
        before, stats = ask(c, CARDS[0][0], "napper"), c.get("/v1/sessions/napper").json()
        assert server.metric("tmem_resident_sessions") == 1 and stats["writes"] == 1 and stats["memories"] == 2
        assert stats["context_tokens"] > 0 and Store(store).lease("default", "napper").owner == server.url[7:]

        wait_until(lambda: c.get("/health").json()["sessions_unloaded_idle"] == 1, "never unloaded", timeout=30)
        metrics = server.metrics()  # (neither scrape loads the session)
        assert metrics["tmem_resident_sessions"] == metrics["tmem_open_sessions"] == 0
        assert metrics['tmem_sessions_unloaded_total{reason="idle"}'] == 1
        assert c.get("/health").json()["sessions_loaded"] == 0 and Store(store).lease("default", "napper") is None

        assert ask(c, CARDS[0][0], "napper") == before  # loaded again, from the store
        after = c.get("/v1/sessions/napper").json()
        assert {**after, "store_bytes": 0} == {**stats, "store_bytes": 0}
        assert server.metric("tmem_resident_sessions") == 1 and c.get("/health").json()["sessions_loaded"] == 1
    finally:
        server.kill()


def test_a_session_keeps_the_count_of_its_writes_not_a_record_of_each(model, tmp_path):
    """A long-lived session's agent triggers write after write; the server keeps their count alone (it
    numbers each write, seeding its replay sample): no trigger record after N writes, the same numbers
    and counters as before, in the store too, after a reload and after a reset."""
    store = Store(tmp_path)
    s = start_service(model, store, idle_unload=0)
    try:
        s.create("t", "long")
        n, jobs = 6, []
        for i in range(n):
            jobs += s.append("t", "long", [f"Nina: turn number {i} has six words"], write=True)[1]
        assert [j.trigger for j in jobs] == list(range(n))
        assert all(j.done.result(timeout=120)["error"] is None for j in jobs)
        triggers = s.convs[("t", "long")].agent.triggers
        assert len(triggers) == n and not any(isinstance(o, Trigger) for o in gc.get_referents(triggers))
        assert s.stats("t", "long")["writes"] == n and store.read("t", "long")[0].triggers == n
        explicit = s.remember("t", "long", CARDS[:1])
        assert explicit.trigger == n and explicit.done.result(timeout=120)["error"] is None  # (the next number)

        s.convs[("t", "long")].last_used -= 10
        s.config.idle_unload = 1
        assert s.upkeep.unload_idle() == 1
        again = s.get("t", "long")  # loaded from the store: the count, no records
        assert len(again.agent.triggers) == n and not any(isinstance(o, Trigger)
                                                          for o in gc.get_referents(again.agent.triggers))
        assert s.append("t", "long", ["Nina: one more turn of six"], write=True)[1][0].trigger == n
        s.reset("t", "long")
        assert len(again.agent.triggers) == 0 and isinstance(again.agent.triggers, TriggerCount)
    finally:
        s.stop()


# ---------------------------------------------------------------------------------------------- leases
def file_versions(root) -> dict[str, int]:
    """{path: mtime in ns} of every file under `root` but the lock files."""
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")}


def test_a_renewal_round_writes_one_file_whatever_the_number_of_sessions(model, tmp_path):
    """A server holding 40 sessions renews every one of their leases by one write: its own lease record."""
    store = Store(tmp_path)
    s = start_service(model, store, idle_unload=0)  # (its upkeep thread renews every 10 s: not during this test)
    try:
        for i in range(40):
            s.create("t", f"s{i}")
        before, expiry = file_versions(tmp_path), [store.lease("t", f"s{i}").expires for i in range(40)]
        time.sleep(0.01)
        s.leases.renew()
        after = file_versions(tmp_path)
        changed = [p for p in after if before.get(p) != after[p]]
        assert changed == [str(tmp_path / "servers" / (b"local".hex() + ".json"))]
        assert all(store.lease("t", f"s{i}").expires > expiry[i] for i in range(40))
        assert all(store.lease("t", f"s{i}").owner == "local" for i in range(40))
    finally:
        s.stop()


def test_after_a_late_renewal_the_sessions_another_server_took_are_dropped_and_the_rest_claimed_again(
        model, tmp_path):
    """This server's lease ran out (its renewal came late): another server took one of its sessions
    meanwhile. The next renewal starts a new epoch and claims every loaded session again: the taken one
    is dropped here (its commits refused), the other kept, its lease live again."""
    store = Store(tmp_path)
    s = start_service(model, store, idle_unload=0)
    try:
        for name in ("kept", "taken"):
            s.create("t", name)
        old = store.lease("t", "kept")
        store.servers._write(replace(store.servers.read("local"), expires=time.time() - 1))  # ran out
        assert store.lease("t", "kept").expires < time.time()
        store.claim("t", "taken", "other", "http://other", ttl=30)
        taken = s.convs[("t", "taken")]
        s.leases.renew()
        assert ("t", "taken") not in s.convs and not taken.active and taken.pool_id not in s.pool
        kept = store.lease("t", "kept")
        assert kept.owner == "local" and kept.epoch != old.epoch and kept.expires > time.time()
        assert s.convs[("t", "kept")].lease_epoch == kept.epoch
        with pytest.raises(LeaseLostError):
            store.commit("t", "taken", store.read("t", "taken")[0], owner="local")
        with pytest.raises(LeaseHeldError):
            s.get("t", "taken")
    finally:
        s.stop()


def test_a_renewal_whose_write_lands_after_its_lease_ran_out_starts_a_new_epoch(tmp_path, monkeypatch):
    """A server paused in the middle of its renewal until its lease ran out: another server claimed its
    session then. The renewal's write lands after that: it must not extend the old epoch (the session
    would then look leased to both), so the server finds the session lost when it claims it again."""
    store = Store(tmp_path)
    store.create("t", "s")
    first = store.claim("t", "s", "a", "http://a", ttl=0.3)
    write, paused = store.servers._write, []

    def paused_write(lease):
        if lease.owner == "a" and not paused:  # a pauses before its write lands; b claims the session meanwhile
            paused.append(lease)
            time.sleep(max(0.0, first.expires - time.time()) + 0.05)
            assert store.claim("t", "s", "b", "http://b", ttl=30).owner == "b"
        return write(lease)

    monkeypatch.setattr(store.servers, "_write", paused_write)
    renewed = store.renew("a", "http://a", ttl=30)
    assert paused and renewed.epoch != first.epoch and renewed.expires > time.time()
    held = store.lease("t", "s")
    assert held.owner == "b" and held.expires > time.time()
    with pytest.raises(LeaseHeldError):
        store.claim("t", "s", "a", "http://a", ttl=30)
    with pytest.raises(LeaseLostError):
        store.commit("t", "s", store.read("t", "s")[0], owner="a")


def test_a_lease_written_by_an_older_server_is_honoured(tmp_path):
    store = Store(tmp_path)
    store.create("t", "s")
    lease = store.session_dir("t", "s") / "lease.json"
    lease.write_text(json.dumps({"owner": "old", "url": "http://old", "expires": time.time() + 30}))
    with pytest.raises(LeaseHeldError):
        store.claim("t", "s", "new", "http://new", ttl=30)
    lease.write_text(json.dumps({"owner": "old", "url": "http://old", "expires": time.time() - 1}))
    assert store.claim("t", "s", "new", "http://new", ttl=30).owner == store.lease("t", "s").owner == "new"
    epoch = store.servers.read("new").epoch  # format 1's last lease files: {"owner", "epoch"}
    lease.write_text(json.dumps({"owner": "new", "epoch": epoch}))
    with pytest.raises(LeaseHeldError):
        store.claim("t", "s", "newer", "http://newer", ttl=30)
    lease.write_text(json.dumps({"owner": "new", "epoch": "an-ended-epoch"}))
    assert store.claim("t", "s", "newer", "http://newer", ttl=30).owner == "newer"


@dataclass(frozen=True)
class LeaseBeforeEpochs:
    """store.Lease at commit 35e037e (the last before epochs, 3347c17), verbatim."""

    owner: str
    url: str
    expires: float


def held_for_a_server_before_epochs(path: Path, owner: str) -> bool:
    """Whether a server from commit 35e037e refuses to claim the session of lease file `path` (its
    `_read_lease` and `Store.claim`'s check, verbatim): a file of any other form reads as no lease."""

    def _read_lease(path: Path) -> LeaseBeforeEpochs | None:
        try:
            return LeaseBeforeEpochs(**json.loads(path.read_bytes()))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    held = _read_lease(path)
    return held is not None and held.owner != owner and held.expires > time.time()


def test_a_lease_file_reads_as_held_to_a_server_from_before_epochs(tmp_path):
    """A server from before epochs sharing the store (a rolling upgrade, a downgrade) must never take a
    session a new server holds: the lease file this code writes reads to it as a live lease of that
    server (which it names to the client); the previous lease form, {"owner", "epoch"}, read as free."""
    store = Store(tmp_path)
    store.create("t", "s")
    lease = store.session_dir("t", "s") / "lease.json"
    claimed = store.claim("t", "s", "new", "http://new", ttl=30)
    assert held_for_a_server_before_epochs(lease, "old")
    assert json.loads(lease.read_bytes())["url"] == "http://new"  # where the old server sends the client
    assert not held_for_a_server_before_epochs(lease, "new")  # (its own, to a server of the same id)
    assert store.lease("t", "s") == claimed and claimed.epoch == store.servers.read("new").epoch
    lease.write_text(json.dumps({"owner": "new", "epoch": claimed.epoch}))
    assert not held_for_a_server_before_epochs(lease, "old"), "the previous form reads as held after all"
    store.claim("t", "s", "new", "http://new", ttl=30)  # (rewritten in this form)
    assert held_for_a_server_before_epochs(lease, "old")

    store.servers._write(replace(store.servers.read("new"), expires=time.time() - 1))  # "new" died: its lease
    assert store.lease("t", "s").expires < time.time()  # ran out, so a new server takes the session; one from
    assert held_for_a_server_before_epochs(lease, "old")  # before epochs never does (held for good, to it)
    assert store.claim("t", "s", "other", "http://other", ttl=30).owner == store.lease("t", "s").owner == "other"
    with pytest.raises(LeaseHeldError):
        store.claim("t", "s", "new", "http://new", ttl=30)


def test_a_store_of_a_newer_format_is_refused_at_startup_and_an_older_one_opened_and_marked(tmp_path):
    older = tmp_path / "older"  # a store from before the marker, with a session in it
    Store(older).create("t", "s")
    (older / "format.json").unlink()
    store = Store(older)
    assert store.read("t", "s")[0].triggers == 0
    assert store.format == 1 and not (older / "format.json").exists()  # (opened: read, nothing written yet)
    store.create("t", "s2")  # marked before this server writes in it
    assert json.loads((older / "format.json").read_bytes()) == {"format": STORE_FORMAT} == {"format": store.format}
    assert Store(tmp_path / "fresh").format == STORE_FORMAT and (tmp_path / "fresh" / "format.json").is_file()

    newer = tmp_path / "newer"
    Store(newer).create("t", "s")
    (newer / "format.json").write_text(json.dumps({"format": 2}))
    opened = Store(newer)
    marker = json.dumps({"format": STORE_FORMAT + 1}).encode()
    (newer / "format.json").write_bytes(marker)  # (a newer server marked it since: it is not marked back)
    with pytest.raises(StoreFormatError, match=f"format {STORE_FORMAT + 1}, newer than this server knows"):
        opened.create("t", "s2")
    assert (newer / "format.json").read_bytes() == marker and not opened.exists("t", "s2")
    with pytest.raises(StoreFormatError, match=f"format {STORE_FORMAT + 1}, newer than this server knows"):
        Store(newer)
    server = ServerProcess(["--model", "tiny-llama", "--store", str(newer)], free_port(), tmp_path / "serve.log")
    with pytest.raises(RuntimeError, match="exited"):
        server.wait_ready(120)
    server.kill()
    log = (tmp_path / "serve.log").read_text()
    assert server.proc.returncode == 1 and f"format {STORE_FORMAT + 1}, newer than this server knows" in log, log
    assert (newer / "format.json").read_bytes() == marker and "Traceback" not in log


def store_contents(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of a store (but the servers' lease records): its bytes and modification time."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and p.parent.name != "servers"}


def test_a_store_records_its_model_and_a_server_of_another_model_refuses_it_at_startup(model, tmp_path):
    """The first server on a store records its model (model.json); `tmem serve` of another model exits
    with status 1 and one line naming both models, before it changes anything in the store (each
    session moved there was a 500 session_corrupt, the mismatch said in the log alone); the model's
    own servers go on serving it."""
    root = tmp_path / "store"
    s = start_service(model, Store(root), idle_unload=0, model_name="tiny-llama")
    try:
        s.create("t", "s")
        assert s.remember("t", "s", CARDS).done.result(timeout=60)["error"] is None
        metadata = s.pool.metadata()
    finally:
        s.stop()
        s.pool.detach()
    record = json.loads((root / "model.json").read_text())
    assert record == {"name": "tiny-llama", "identity": model_identity(metadata)}
    assert record["identity"]["architecture"].startswith("llama:") and "format" not in record["identity"]
    before = store_contents(root)

    server = ServerProcess(["--model", "tiny-qwen2", "--store", str(root)], free_port(), tmp_path / "serve.log")
    with pytest.raises(RuntimeError, match="exited"):
        server.wait_ready(120)
    server.kill()
    log = (tmp_path / "serve.log").read_text()
    said = [line for line in log.splitlines() if line.startswith("tmem serve:")]
    assert server.proc.returncode == 1 and len(said) == 1 and "Traceback" not in log, log
    assert said[0].startswith(f"tmem serve: store {root} holds the sessions of model tiny-llama (llama:Llama"), said[0]
    assert "not of this server's model tiny-qwen2 (qwen2:Qwen2ForCausalLM" in said[0], said[0]
    assert store_contents(root) == before  # (not a byte nor a modification time)

    saved = str(tmp_path / "tiny-llama-saved")  # (the same weights under another name: compared, not named)
    s = start_service(model, Store(root), idle_unload=0, model_name=saved)
    try:
        assert s.memories("t", "s") == CARDS and json.loads((root / "model.json").read_text()) == record
    finally:
        s.stop()


def test_a_store_from_before_the_model_record_gets_it_at_its_next_start_from_its_weights(model, tmp_path):
    """A store without model.json (written before it existed): a server of another model than its weights
    files' refuses it, naming the file, and records nothing; its model's server records it and serves it.
    A store with no weights file yet is recorded as the server's model."""
    root = tmp_path / "store"
    s = start_service(model, Store(root), idle_unload=0)
    try:
        s.create("t", "s")
        assert s.remember("t", "s", CARDS).done.result(timeout=60)["error"] is None
        s.create("t", "blank")
        identity = model_identity(s.pool.metadata())
    finally:
        s.stop()
        s.pool.detach()
    (root / "model.json").unlink()
    weights = weights_file(Store(root), "t", "s").relative_to(root)
    before = store_contents(root)
    other, tokenizer = load_serving_model("tiny-qwen2")
    with pytest.raises(StoreModelError, match=rf"holds the sessions of model \(llama:.*, as its {weights} says\), "
                                              r"not of this server's model tiny-qwen2 \(qwen2:"):
        MemoryService(other, tokenizer, Store(root), ServeConfig(capacity=4, max_write_sessions=1,
                                                                 model_name="tiny-qwen2"))
    assert store_contents(root) == before

    s = start_service(model, Store(root), idle_unload=0, model_name="tiny-llama")
    try:
        assert s.memories("t", "s") == CARDS and s.stats("t", "blank")["memories"] == 0
    finally:
        s.stop()
    assert json.loads((root / "model.json").read_text()) == {"name": "tiny-llama", "identity": identity}

    fresh = tmp_path / "blank"  # sessions, none with a weights file: nothing says another model
    Store(fresh).create("t", "s")
    config = ServeConfig(capacity=4, max_write_sessions=1, model_name="q")
    MemoryService(other, tokenizer, Store(fresh), config).pool.detach()
    assert json.loads((fresh / "model.json").read_text())["identity"]["architecture"].startswith("qwen2:")
    (fresh / "model.json").write_text('{"name": "q", "ident')  # (a garbled record is refused, not replaced)
    with pytest.raises(StoreModelError, match="unreadable model record"):
        MemoryService(other, tokenizer, Store(fresh), config)
    assert (fresh / "model.json").read_text() == '{"name": "q", "ident'


def every_path(root: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every file and directory of a store (the servers' lease records too): its bytes (None: a directory) and
    modification time."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


@pytest.mark.parametrize("older", [1, 2])
def test_a_server_of_another_model_leaves_an_older_store_exactly_as_it_was(model, tmp_path, older):
    """A format 1 (no marker) or 2 store of another model is refused with every file and directory as it was:
    its marker was rewritten as this server's format (3) before the model was checked, so the store's own
    format 2 servers refused it from then on. Its model's server then opens it and marks it."""
    root = tmp_path / "store"
    s = start_service(model, Store(root), idle_unload=0, model_name="tiny-llama")
    try:
        s.create("t", "s")
        assert s.remember("t", "s", CARDS).done.result(timeout=60)["error"] is None
    finally:
        s.stop()
        s.pool.detach()
    if older == 1:
        (root / "format.json").unlink()
    else:
        (root / "format.json").write_text(json.dumps({"format": 2}))
    before = every_path(root)
    other, tokenizer = load_serving_model("tiny-qwen2")
    with pytest.raises(StoreModelError, match="not of this server's model tiny-qwen2"):
        MemoryService(other, tokenizer, Store(root), ServeConfig(capacity=4, max_write_sessions=1,
                                                                 model_name="tiny-qwen2"))
    assert every_path(root) == before  # (not a byte, a modification time, nor a new file or directory)

    s = start_service(model, Store(root), idle_unload=0, model_name="tiny-llama")
    try:
        assert s.memories("t", "s") == CARDS
    finally:
        s.stop()
    assert json.loads((root / "format.json").read_text()) == {"format": STORE_FORMAT}


# ---------------------------------------------------------------------------------------------- turns log
def session_files(store: Store, session: str) -> dict[str, bytes]:
    d = store.session_dir("t", session)
    return {f.name: f.read_bytes() for f in d.iterdir() if f.name not in (".lock", "lease.json")}


def log_lines(files: dict[str, bytes]) -> list[dict]:
    """The entries of the session's one log (asserting it has exactly one)."""
    (log,) = [name for name in files if name.startswith("turns-")]
    return [json.loads(line) for line in files[log].splitlines()]


def test_turns_remembers_and_writes_each_append_one_line_to_the_log_and_a_compaction_folds_it(model, tmp_path,
                                                                                              monkeypatch):
    """However long the context and the memory, an appended turn, a remember and a write's commit each add
    one line of their change alone to the session's log (state.json untouched); a restart reads every
    change back; once the log outgrows the state, the next persist writes the state whole and starts a
    new log."""
    import tmem_runtime.serve.service as service_module

    store = Store(tmp_path)
    s = start_service(model, store, idle_unload=0, l_max=1 << 20)
    try:
        s.create("t", "long")
        s.append("t", "long", [f"Nina: this is turn number {i} of a long day." for i in range(300)], date="1 May")
        created = session_files(store, "long")["state.json"]
        for i in range(3):  # (each write replays the cards before it: every card trains, the memory grows)
            job = s.remember("t", "long", [(f"{q} ({i})", a) for q, a in CARDS])
            assert job.done.result(timeout=60)["error"] is None
        before = session_files(store, "long")
        s.append("t", "long", ["Leo: short."])
        after = session_files(store, "long")
        assert before["state.json"] == after["state.json"] == created  # (the initial state)
        turns, *changes, short = log_lines(after)
        assert len(turns["lines"]) == 301 and len(changes) == 6 and short["lines"] == ["Leo: short."]
        weights = [f for f in after if f.startswith("weights-")]
        for i, (queued, trained) in enumerate(zip(changes[::2], changes[1::2], strict=True)):
            cards = [[f"{q} ({i})", a] for q, a in CARDS]
            assert queued["queued"] == [{"id": queued["queued"][0]["id"], "trigger": 0, "context": "", "cards": cards}]
            assert trained["done"] == [queued["queued"][0]["id"]] and trained["written"] == cards
            assert trained["seq"] == i + 1 and trained["weights"] == f"weights-{i + 1:08d}.safetensors"
            assert queued["lines"] == trained["lines"] == [] and queued["at"] == trained["at"] == 301
        assert weights == [changes[-1]["weights"]]  # (the older weights files were removed)
        sizes = [len(line) for line in after[next(f for f in after if f.startswith("turns-"))].splitlines()]
        assert sizes[0] > 14_000 and max(sizes[1:]) < 400  # a change's line holds the change alone
        conv = s.get("t", "long")
        expected = {"lines": conv.agent.lines, "context_tokens": conv.agent.context_tokens, "stats": conv.stats,
                    "written": [list(c) for c in conv.written], "pending": [], "weights": weights[0], "seq": 3}
    finally:
        s.stop()

    def stored(record) -> dict:
        return {name: getattr(record, name) for name in expected}

    assert stored(Store(tmp_path).read("t", "long")[0]) == expected
    assert expected["lines"][-1] == "Leo: short." and expected["stats"]["turns"] == 301
    assert len(expected["lines"]) == 302 and len(expected["written"]) == 6

    monkeypatch.setattr(service_module, "MIN_LOG_BYTES", 1024)  # the log (15 kB) is over it and the state's size
    model2 = load_serving_model("tiny-llama")
    s = start_service(model2, store, idle_unload=0, l_max=1 << 20)  # restarted: loads state + log
    try:
        assert s.stats("t", "long")["context_turns"] == 302 and s.memories("t", "long") == [
            tuple(c) for c in expected["written"]]
        assert s.remember("t", "long", CARDS[:1]).done.result(timeout=60)["error"] is None
        files = session_files(store, "long")
        state = json.loads(files["state.json"])  # the remember compacted: the state holds it all
        assert state["lines"] == expected["lines"] and state["written"] == expected["written"]
        assert [len(state["pending"]), state["log"]] == [1, 1]
        (trained,) = log_lines(files)  # (the new log: the write after it)
        assert trained["written"] == [list(CARDS[0])] and trained["done"] == [state["pending"][0]["id"]]
    finally:
        s.stop()
    assert stored(Store(tmp_path).read("t", "long")[0]) == {
        **expected, "written": [*expected["written"], list(CARDS[0])], "weights": "weights-00000004.safetensors",
        "seq": 4, "stats": {**expected["stats"], "writes": 4, "cards": 7,
                            "steps": Store(tmp_path).read("t", "long")[0].stats["steps"]}}


def test_a_torn_last_line_of_the_turns_log_is_ignored_and_the_next_append_starts_on_its_own_line(tmp_path):
    """A SIGKILL in the middle of an append leaves any prefix of its line: every cut loads the turns
    before it, and the next append's turn loads after them."""
    store = Store(tmp_path)
    store.create("t", "s")
    for i in range(3):
        store.append_turns("t", "s", 0, {"at": i, "lines": [f"turn {i}"], "header": None, "context_tokens": i + 1,
                                         "stats": {"turns": i + 1}})
    log = store.session_dir("t", "s") / "turns-00000000.log"
    whole = log.read_bytes()
    last = whole.rindex(b"\n", 0, len(whole) - 1) + 1  # where the last line begins
    for cut in range(last, len(whole)):
        log.write_bytes(whole[:cut])
        record, _ = store.read("t", "s")
        assert record.lines == ["turn 0", "turn 1"] and record.stats == {"turns": 2}, cut
    log.write_bytes(whole[: last + 7])
    store.append_turns("t", "s", 0, {"at": 2, "lines": ["turn 2 again"], "header": None, "context_tokens": 3,
                                     "stats": {"turns": 3}})
    record, _ = store.read("t", "s")
    assert record.lines == ["turn 0", "turn 1", "turn 2 again"] and record.context_tokens == 3


KILLED_APPENDER = """
import sys
from tmem_runtime.serve.store import Store
store = Store(sys.argv[1])
for i in range(100000):
    store.append_turns("t", "s", 0, {"at": i, "lines": [f"turn {i} " + "x" * 2000], "header": None,
                                     "context_tokens": i, "stats": {"turns": i + 1}})
    print(i, flush=True)  # acknowledged
"""


def test_every_acknowledged_turn_survives_a_sigkill_in_the_middle_of_appends(tmp_path):
    import subprocess
    import sys

    store = Store(tmp_path)
    store.create("t", "s")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_APPENDER, str(tmp_path)], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    acked = -1
    while acked < 200:
        acked = int(proc.stdout.readline())
    proc.kill()
    proc.wait()
    acked = max([acked, *(int(x) for x in proc.stdout.read().split())])
    record, _ = store.read("t", "s")
    assert len(record.lines) > acked and record.stats == {"turns": len(record.lines)}
    assert [line.split()[1] for line in record.lines] == [str(i) for i in range(len(record.lines))]


def test_after_a_failed_append_the_next_one_commits_the_whole_state(model, tmp_path, monkeypatch):
    """An append that fails mid-line (a full disk) leaves its turn in the session but maybe not in the
    log: the next append must not log an entry the store cannot place; it commits the state whole."""
    import tmem_runtime.serve.store as store_module

    store = Store(tmp_path)
    s = start_service(model, store, idle_unload=0)
    try:
        s.create("t", "s")
        s.append("t", "s", ["Nina: first"])
        append_entry = store_module.append_entry

        def full_disk(path, entry) -> None:
            with open(path, "ab") as f:
                f.write(b'{"at": 1, "lines": ["Nina: sec')
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(store_module, "append_entry", full_disk)
        with pytest.raises(OSError):
            s.append("t", "s", ["Nina: second"])
        monkeypatch.setattr(store_module, "append_entry", append_entry)
        s.append("t", "s", ["Nina: third"])
        assert store.read("t", "s")[0].lines == ["Nina: first", "Nina: second", "Nina: third"]
        s.append("t", "s", ["Nina: fourth"])  # (logged again)
        assert store.read("t", "s")[0].lines[-1] == "Nina: fourth" and s.get("t", "s").logged == 1
    finally:
        s.stop()


def test_a_store_written_before_turns_logs_loads_and_takes_appends(model, tmp_path):
    store = Store(tmp_path)
    d = store.session_dir("t", "old")
    d.mkdir(parents=True)
    (d / "state.json").write_text(json.dumps({
        "lines": ["DATE: 1 May", "Nina: hello there"], "header": "DATE: 1 May", "context_tokens": 12, "triggers": 0,
        "pending": [], "written": [list(CARDS[0])], "stats": {"turns": 1, "writes": 1, "cards": 1}, "seq": 0,
        "weights": None, "version": 1}))
    s = start_service(model, store, idle_unload=0)
    try:
        assert s.stats("t", "old")["context_turns"] == 2 and s.memories("t", "old") == [CARDS[0]]
        s.append("t", "old", ["Leo: hi"])
        assert (d / "turns-00000000.log").is_file()
        record, _ = store.read("t", "old")
        assert record.lines == ["DATE: 1 May", "Nina: hello there", "Leo: hi"] and record.stats["turns"] == 2
    finally:
        s.stop()


# ---------------------------------------------------------------------------------------------- store commits
def card(i: int) -> list[str]:
    return [f"What did Nina say about the trip number {i} to Porto?", f"She took the train {i}"]


def queued_job(i: int) -> dict:
    return {"id": f"job{i}", "trigger": 0, "context": "", "cards": [card(i)]}


def store_files(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under the store: (inode, size, mtime in ns)."""
    out = {}
    for f in root.rglob("*"):
        if f.is_file():
            st = f.stat()
            out[str(f.relative_to(root))] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def test_a_remember_or_a_write_commit_touches_its_session_log_alone_whatever_the_store_and_memory_hold(tmp_path):
    """A commit with the stored state as its base appends its change to the session's log and touches no
    other file: the bytes written are the same with 1 or 1000 sessions in the store and with 0 or 3000
    cards learnt (a whole commit, as before, rewrote every card)."""
    appended = {}
    for sessions, cards in ((1, 0), (1000, 0), (1, 3000)):
        store = Store(tmp_path / f"{sessions}-{cards}")
        for i in range(sessions):
            store.create("t", f"s{i}")
        record, _ = store.read("t", "s0")
        record.written = [card(i) for i in range(cards)]
        store.commit("t", "s0", record)
        whole = store.state_sizes("t", "s0", record.log)[0]
        for change in ("remember", "write"):
            base = replace(record, pending=list(record.pending), written=list(record.written))
            if change == "remember":
                record.pending.append(queued_job(9))
                save = None
            else:
                record.written.append(record.pending.pop(0)["cards"][0])
                record.stats = {"writes": 1}

                def save(path: Path) -> None:
                    path.write_bytes(b"weights")

            files = store_files(store.root)
            commit = store.commit("t", "s0", record, save, base=base)
            changed = {name: (files.get(name), st) for name, st in store_files(store.root).items()
                       if files.get(name) != st}
            removed = set(files) - set(store_files(store.root))
            session = str(store.session_dir("t", "s0").relative_to(store.root))
            log = f"{session}/turns-00000001.log"
            expected = {log} | ({f"{session}/weights-00000001.safetensors"} if save else set())
            assert set(changed) == expected and not removed and commit.logged, (sessions, cards, change)
            (before, after) = changed[log]
            grown = after[1] - (before[1] if before else 0)
            assert grown == commit.bytes < 400 and (before is None or before[0] == after[0])  # (appended in place)
            appended.setdefault(change, set()).add(grown)
        assert whole > 200_000 if cards else whole < 300
        assert store.read("t", "s0")[0] == record and record.weights == "weights-00000001.safetensors"
    assert all(len(sizes) == 1 for sizes in appended.values()), appended  # the same bytes every time


def test_a_delta_says_each_change_and_is_refused_where_it_cannot():
    base = SessionRecord(lines=["DATE: 1 May", "Nina: hi"], header="DATE: 1 May", context_tokens=9,
                         pending=[queued_job(0), queued_job(1)], written=[card(7)], stats={"turns": 1}, log=3)
    changes = {
        "turns": dict(lines=[*base.lines, "Leo: yo"], context_tokens=12, stats={"turns": 2}),
        "write triggered": dict(lines=[], context_tokens=0, triggers=1, pending=[*base.pending, queued_job(2)]),
        "context replaced": dict(lines=["DATE: 2 May", "Ana: new"], header="DATE: 2 May"),
        "written": dict(pending=[queued_job(1)], written=[card(7), card(0)], seq=4,
                        weights="weights-00000004.safetensors"),
        "rolled back": dict(pending=[queued_job(0)]),
        "everything": dict(lines=["x"], pending=[queued_job(1), queued_job(5)], written=[card(7), card(0), card(1)]),
    }
    for name, change in changes.items():
        new = replace(base, **change)
        entry = new.delta(base)
        applied = replace(base, lines=list(base.lines), pending=list(base.pending), written=list(base.written))
        assert entry is not None and applied.extend(json.loads(json.dumps(entry))) and applied == new, name
    assert set(changes["turns"]) | {"at", "header"} >= set(replace(base, **changes["turns"]).delta(base)) - {"lines"}
    refused = {"memory reset": dict(written=[]), "other memory": dict(written=[card(8)]),
               "pending reordered": dict(pending=[queued_job(1), queued_job(0)]), "next log": dict(log=4)}
    for name, change in refused.items():
        assert replace(base, **change).delta(base) is None, name


def test_a_failure_mid_commit_leaves_the_sessions_previous_state_and_every_other_session_intact(tmp_path, monkeypatch):
    """A log append cut short, a state.json written part way, a weights file cut short (each then failing,
    as a full disk does): the session reads back its previous state (its weights file too), every other
    session its own, and the next whole commit (the service's after a failure) is read back."""
    import tmem_runtime.adapter_file as adapter_file
    import tmem_runtime.serve.store as store_module

    store = Store(tmp_path)
    records = {}
    for name in ("a", "b", "c"):
        store.create("t", name)
        record, _ = store.read("t", name)
        base = replace(record)
        record.written, record.pending = [card(0), card(1)], [queued_job(2)]
        store.commit("t", name, record, lambda path: path.write_bytes(b"w1"), base=base)
        records[name] = record
    files = {name: session_files(store, name) for name in "bc"}

    def read(name: str) -> tuple[SessionRecord, bytes]:
        record, weights = store.read("t", name)
        return record, weights.read_bytes()

    previous = read("a")
    assert previous == (records["a"], b"w1")

    def failing_append(path: Path, entry: dict) -> int:
        with open(path, "ab") as f:
            f.write(json.dumps(entry).encode()[:40])
        raise OSError(28, "No space left on device")

    def failing_state(path, write) -> None:
        with open(f"{path}.x1y2.tmp", "wb") as f:
            f.write(b'{"lines": ["cut')
        raise OSError(28, "No space left on device")

    def failing_weights(path: Path) -> None:
        path.write_bytes(b"w")
        raise OSError(28, "No space left on device")

    for failure in ("append", "state", "weights"):
        record = replace(records["a"], pending=[], written=[*records["a"].written, card(2)], stats={"writes": 1})
        with monkeypatch.context() as m:
            if failure == "append":
                m.setattr(store_module, "append_entry", failing_append)
            elif failure == "state":
                m.setattr(store_module, "atomic_write", failing_state)
                m.setattr(adapter_file, "atomic_write", failing_state)
            with pytest.raises(OSError, match="No space"):
                store.commit("t", "a", record, failing_weights if failure == "weights" else None,
                             base=None if failure == "state" else records["a"])
        assert read("a") == previous, failure
        assert {name: session_files(store, name) for name in "bc"} == files, failure
        assert not [f for f in session_files(store, "a") if f.endswith(".tmp") or f == "weights-00000002.safetensors"]
    record = replace(records["a"], pending=[], written=[*records["a"].written, card(2)], stats={"writes": 1})
    store.commit("t", "a", record, lambda path: path.write_bytes(b"w3"))  # (whole: after a failure)
    assert read("a") == (record, b"w3") and record.weights == "weights-00000002.safetensors"  # (the failed ones gone)
    assert [read(name) for name in "bc"] == [(records[name], b"w1") for name in "bc"]


KILLED_COMMITTER = """
import sys
from dataclasses import replace
from tmem_runtime.serve.store import Store
store = Store(sys.argv[1])
record, _ = store.read("t", "s")
for i in range(100000):
    base = replace(record, pending=list(record.pending), written=list(record.written))
    record.pending.append({"id": f"job{i}", "trigger": 0, "context": "", "cards": [["q" * 500, f"a{i}"]]})
    if i % 2:  # a write: the job before trained, with a new weights file
        record.written.append(record.pending.pop(0)["cards"][0])
    save = (lambda path: path.write_bytes(b"w%d" % i)) if i % 2 else None
    store.commit("t", "s", record, save, base=base if i % 50 else None)  # (every 50th whole: a compaction)
    print(i, flush=True)  # acknowledged
"""


def test_every_acknowledged_remember_and_write_survives_a_sigkill_in_the_middle_of_commits(tmp_path):
    """Remembers and writes committed to the log (and whole now and then) by a process killed mid-way:
    each acknowledged one is there, in order, with the weights file of the last write; the other session is
    untouched."""
    import subprocess
    import sys

    store = Store(tmp_path)
    for name in ("s", "other"):
        store.create("t", name)
    other = session_files(store, "other")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_COMMITTER, str(tmp_path)], stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    acked = -1
    while acked < 300:
        acked = int(proc.stdout.readline())
    proc.kill()
    proc.wait()
    acked = max([acked, *(int(x) for x in proc.stdout.read().split())])
    record, weights = store.read("t", "s")
    done = len(record.written) + len(record.pending)  # the commits in the store: those acknowledged, maybe one more
    assert done - 1 in (acked, acked + 1)
    assert [a for _, a in record.written] == [f"a{i}" for i in range(len(record.written))]
    assert [job["id"] for job in record.pending] == [f"job{i}" for i in range(len(record.written), done)]
    assert weights.read_bytes() == b"w%d" % (done - 1 if (done - 1) % 2 else done - 2)
    assert session_files(store, "other") == other


def test_a_format_2_store_opens_marked_as_its_own_and_takes_remembers_and_writes(model, tmp_path):
    """A store written by a format 2 server (state.json and a turns log of turns): this server reads it,
    marks it with its format, logs remembers and writes to it, and reads them all back after a restart."""
    root = tmp_path / "store"
    d = Store(root).session_dir("t", "old")
    d.mkdir(parents=True)
    (root / "format.json").write_text(json.dumps({"format": 2}))
    (d / "state.json").write_text(json.dumps({
        "lines": ["DATE: 1 May", "Nina: hello there"], "header": "DATE: 1 May", "context_tokens": 12, "triggers": 0,
        "pending": [], "written": [list(CARDS[0])], "stats": {"turns": 1, "writes": 1, "cards": 1}, "seq": 0,
        "weights": None, "log": 5, "version": 1}))
    (d / "turns-00000005.log").write_text(json.dumps({"at": 2, "lines": ["Leo: hi"], "header": "DATE: 1 May",
                                                      "context_tokens": 15,
                                                      "stats": {"turns": 2, "writes": 1, "cards": 1}}) + "\n")
    store = Store(root)
    assert store.format == 2
    s = start_service(model, store, idle_unload=0)  # (marked once its model is checked)
    assert json.loads((root / "format.json").read_text()) == {"format": STORE_FORMAT} and STORE_FORMAT == 3
    try:
        assert s.stats("t", "old")["context_turns"] == 3 and s.memories("t", "old") == [CARDS[0]]
        assert s.remember("t", "old", CARDS[1:]).done.result(timeout=60)["error"] is None
        state = json.loads((d / "state.json").read_text())
        assert state["log"] == 5 and state["written"] == [list(CARDS[0])]  # (not rewritten: logged)
        assert len((d / "turns-00000005.log").read_text().splitlines()) == 3
    finally:
        s.stop()
    record, weights = Store(root).read("t", "old")
    assert record.lines == ["DATE: 1 May", "Nina: hello there", "Leo: hi"] and record.stats["writes"] == 2
    assert record.written == [list(c) for c in CARDS] and record.pending == [] and weights.is_file()
    s = start_service(load_serving_model("tiny-llama"), Store(root), idle_unload=0)
    try:
        assert s.memories("t", "old") == CARDS and s.stats("t", "old")["context_turns"] == 3
    finally:
        s.stop()
