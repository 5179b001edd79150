"""`tmem serve`: an HTTP server where every conversation keeps its own fast-weight memory.

    store.py          the session files of one model (atomic commits, leases) that several servers share
    leases.py         one lease record per server, renewed by one write, that its sessions' leases point to
    turn_log.py       a session's appended turns, one line each, until its state is next written whole
    loaded.py         the sessions loaded in one server: loaded once, held while in use, unloaded when idle,
                      at most max_loaded (a load waits for an idle one to take the place of, then 503)
    conversation.py   one served session: working context (the agent's budget trigger), queued writes
    batcher.py        the decode thread: waiting requests answered in one batched generate, a memory per row
    writer.py         the write thread: flashcards through the decode thread, batched training, commits
    cores.py          on a CPU, training borrows the decode thread's cores while it is idle
    service.py        sessions of tenants on one SessionPool, loaded from and persisted to the store
    app.py            the HTTP API (FastAPI): OpenAI chat completions + session endpoints
    metrics.py        Prometheus text
    worker.py         the threads' common start/stop
    main.py           the `tmem serve` command
    launch.py         a server subprocess, for scripts, tests and benchmarks
"""
