"""`tmem serve`: the model, the store and the HTTP API on uvicorn.

    tmem serve --model smollm2-135m --host 127.0.0.1 --port 8000 --capacity 64 --store ./tmem-store
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tmem_runtime.backends import resolve_backend
from tmem_runtime.cli import apply_threads, command_parser, device_arg, int_in
from tmem_runtime.models import DEFAULT_MODEL, DTYPES, _tiny_tokenizer, load_model, model_tokenizer
from tmem_runtime.serve.service import MemoryService, ServeConfig
from tmem_runtime.serve.store import Store, StoreFormatError, StoreModelError


def load_serving_tokenizer(name: str, tokenizer: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer `load_serving_model` gives model `name`, loaded alone (no weight): `tokenizer` (a directory,
    or the embedded model's name) if given, else the model's own, else (a tiny random model) the embedded one."""
    if tokenizer is None:
        tok = model_tokenizer(name)
        if tok is not None:
            return tok
    embedded = tokenizer in (None, DEFAULT_MODEL)
    return _tiny_tokenizer() if embedded else AutoTokenizer.from_pretrained(Path(tokenizer))


def load_serving_model(name: str, tokenizer: str | PreTrainedTokenizerBase | None = None, device: str = "cpu",
                       dtype: str = "float32") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and its tokenizer (`load_serving_tokenizer`'s, or `tokenizer` if it is one already loaded). A
    tiny random model ("tiny-llama") takes the embedded model's tokenizer (or `tokenizer`) and gets its
    vocabulary, seeded, so every load is the same model."""
    loaded = isinstance(tokenizer, PreTrainedTokenizerBase)
    tok = tokenizer if loaded else load_serving_tokenizer(name, tokenizer)
    model, _ = load_model(name, dtype=DTYPES[dtype], device=device, load_tokenizer=False)
    if model.get_input_embeddings().num_embeddings < len(tok):
        torch.manual_seed(0)
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        model.requires_grad_(False)
    return model, tok


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (OSError if it cannot be: in use, no such address; OverflowError for a
    port out of range), made before anything starts: a second server started on the address of a running
    one fails here, before it claims the leases of that server's id or resumes its writes."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)  # as uvicorn binds host:port
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def read_api_keys(path: str | None) -> dict[str, str]:
    """{key: tenant} from a JSON file (None: no keys, no auth)."""
    if path is None:
        return {}
    try:
        keys = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): expected an object {{\"api key\": \"tenant\"}}") from None
    if not isinstance(keys, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in keys.items()):
        raise ValueError(f"{path}: expected a JSON object {{\"api key\": \"tenant\"}}")
    return keys


def build_parser():
    p = command_parser("tmem serve", "an HTTP server where every conversation keeps its own fast-weight memory")
    p.add_argument("--model", default=DEFAULT_MODEL, help="smollm2-135m, tiny-<type>, or a local HF directory")
    p.add_argument("--served-model-name", default=None,
                   help="the model name /v1/models lists and requests must name (default: --model's last part)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (none: the model's; tiny models: "
                   "the embedded model's)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--store", default="tmem-store", help="directory of every session's files (shared by servers)")
    p.add_argument("--capacity", type=int, default=64, help="sessions' fast weights held on the device at once")
    p.add_argument("--l-max", type=int, default=1024, help="working-context token budget before a memory write")
    p.add_argument("--max-batch", type=int, default=32, help="rows (answers, flashcard prompts) per batched generate")
    p.add_argument("--max-write-batch", type=int, default=None, help="sessions per batched memory write "
                   "(none: a quarter of --capacity, at most 16)")
    p.add_argument("--max-tokens", type=int, default=256, help="largest max_tokens a completion may ask for")
    p.add_argument("--replay", type=int, default=32, help="earlier flashcards trained again with each write")
    p.add_argument("--api-keys", default=None, help="JSON file {\"key\": \"tenant\"}; none: no auth, one tenant")
    p.add_argument("--server-id", default=None, help="this server's name in session leases (none: host:port)")
    p.add_argument("--url", default=None, help="where clients reach this server (none: http://host:port)")
    p.add_argument("--lease-ttl", type=float, default=30.0, help="seconds a session lease lasts unrenewed")
    p.add_argument("--max-loaded", type=int, default=1024, help="sessions loaded at once; past it the least "
                   "recently used idle ones are released to the store (and loaded again on their next request)")
    p.add_argument("--max-loaded-wait", type=float, default=10.0, help="seconds a request for a session not "
                   "loaded waits, at --max-loaded with every loaded session busy, for one to be idle; then 503")
    p.add_argument("--idle-unload-seconds", type=float, default=600.0,
                   help="seconds a session goes unused (no request, no pending write) before it is unloaded from this "
                   "server; its next request loads it again (0: never)")
    p.add_argument("--max-body", type=int_in(1), default=1 << 20, help="largest request body in bytes")
    p.add_argument("--naive", action="store_true", help="the baseline: one request and one session at a time")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "native", "torch"),
                   help="fast-weight kernels")
    p.add_argument("--device", type=device_arg(), default="cpu", help="torch device of the model and the pool")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="the model's dtype")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level")
    return p


def served_model_name(args: argparse.Namespace) -> str:
    """The name clients use: --served-model-name, else the last part of --model (a directory's name)."""
    return args.served_model_name or os.path.basename(args.model.rstrip("/"))


def main(argv: list[str]) -> int:
    import uvicorn

    from tmem_runtime.serve.app import create_app

    parser = build_parser()
    args = parser.parse_args(argv)
    apply_threads(args)
    logging.basicConfig(level=args.log_level.upper())
    address = f"{args.host}:{args.port}"
    write_batch = args.max_write_batch or min(16, max(1, args.capacity // 4))
    try:  # checked before the model loads
        config = ServeConfig(
            server_id=args.server_id or address, url=args.url or f"http://{address}", capacity=args.capacity,
            l_max=args.l_max, max_rows=args.max_batch, max_write_sessions=write_batch,
            max_tokens=args.max_tokens, replay=args.replay, lease_ttl=args.lease_ttl,
            idle_unload=args.idle_unload_seconds, max_loaded=args.max_loaded, max_loaded_wait=args.max_loaded_wait,
            naive=args.naive, backend=args.backend, model_name=args.model,
        )
    except ValueError as exc:
        parser.error(str(exc))
    try:  # a backend that cannot run this device and dtype (Triton on the CPU, native for bf16)
        resolve_backend(args.backend, torch.device(args.device), DTYPES[args.dtype], sessions=config.capacity)
    except (ValueError, RuntimeError) as exc:
        parser.error(f"--backend {args.backend}: {exc}")
    try:  # the keys file, and a store of a newer format or that cannot be a directory, before the model loads
        api_keys = read_api_keys(args.api_keys)
    except ValueError as exc:
        raise SystemExit(f"tmem serve: --api-keys {exc}") from None
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise  # (said as the command line says every missing file)
        raise SystemExit(f"tmem serve: --api-keys {args.api_keys}: {exc.strerror or exc}") from None
    try:
        store = Store(args.store)
    except StoreFormatError as exc:
        raise SystemExit(f"tmem serve: {exc}") from None
    except OSError as exc:  # a file there, no permission, ...
        why = exc.strerror or exc
        raise SystemExit(f"tmem serve: --store {args.store} cannot be the store's directory ({why})") from None
    if not 0 <= args.port <= 65535:
        parser.error(f"argument --port: must be in 0..65535, got {args.port}")
    try:  # bound before the model loads and the service starts (uvicorn binds only after its start-up)
        sock = listening_socket(args.host, args.port)
    except (OSError, OverflowError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise SystemExit(f"tmem serve: cannot listen on {address} ({why})") from None
    with sock:
        model, tokenizer = load_serving_model(args.model, args.tokenizer, args.device, args.dtype)
        try:
            service = MemoryService(model, tokenizer, store, config)
        except StoreModelError as exc:  # another model's sessions: refused before anything there changes
            raise SystemExit(f"tmem serve: {exc}") from None
        app = create_app(service, served_model_name(args), api_keys, args.max_body)
        app.router.on_startup.append(service.start)
        app.router.on_shutdown.append(service.stop)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                               timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
    return 0
