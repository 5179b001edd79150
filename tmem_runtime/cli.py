"""`tmem demo`, `tmem demo-weights`, `tmem eval`, `tmem make-conversations`, `tmem ablate`, `tmem bench`,
`tmem serve`, `tmem rl` (and `tmem --version`).

Every command takes `--threads` (torch's CPU threads) and shows its defaults in `--help`; the
commands build their parsers with `command_parser`.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

USAGE = """usage: tmem [--version] COMMAND [ARGS]   (tmem COMMAND --help: the command's options and defaults)

commands:
  demo           the memory agent on the embedded model: writes, clears, answers (vs no memory)
  demo-weights   fast weights alone: 10 made-up facts written, recalled, then reset
  eval           LoCoMo-format evaluation of the memory channels (tmem eval --help)
  make-conversations  seeded long conversations in LoCoMo's format: facts early, chit-chat after
  ablate         the paper's design claims re-measured: init, rank, layers, format, capacity
  bench          the pytest-benchmark suites in benchmarks/ (extra args go to pytest)
  serve          an HTTP server (OpenAI-compatible) where every conversation keeps its own fast weights
  rl             GRPO on the memory writer: flashcards rewarded by the answers they enable (torchrun-ready)
"""


def version() -> str:
    """tmem's version with the versions of what it runs on."""
    from importlib.metadata import version as installed

    import torch
    import transformers

    return f"tmem {installed('tmem')} (torch {torch.__version__}, transformers {transformers.__version__})"


def command_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """A command's parser: defaults shown in --help, and --threads (applied by `apply_threads`)."""
    formatter = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=formatter)
    p.add_argument("--threads", type=int_in(1), default=1, help="torch CPU threads (1: fastest on a shared CPU)")
    return p


def add_fast_weight_options(p: argparse.ArgumentParser) -> None:
    """--rank and --num-layers: the fast weights' LoRA rank and how many last decoder layers they adapt."""
    p.add_argument("--rank", type=int_in(1), default=6, help="fast weights: LoRA rank")
    p.add_argument("--num-layers", type=int_in(1), default=4, help="fast weights: last N decoder layers")


def device_arg(auto: bool = False) -> Callable[[str], str]:
    """An argparse `type`: a torch device this machine has, returned as given ("auto" too if `auto`);
    "cuda" where torch has no CUDA or sees no GPU is a usage error, not a traceback once the model loads."""

    def parse(text: str) -> str:
        from tmem_runtime.models import check_device

        if auto and text == "auto":
            return text
        try:
            check_device(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    parse.__name__ = "device"
    return parse


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse `type`: an int in [low, high] (high None: no bound); anything else is a usage error."""

    def parse(text: str) -> int:
        value = int(text)
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in {low}..{high}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in "invalid int value"
    return parse


def float_above(low: float, inclusive: bool = False) -> Callable[[str], float]:
    """An argparse `type`: a finite float > low (>= low if `inclusive`); nan, inf and anything else are
    usage errors (a learning rate, temperature or weight that would only fail, or train NaN, after loading)."""

    def parse(text: str) -> float:
        value = float(text)
        if not math.isfinite(value) or value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if inclusive else '>'} {low:g}, "
                                             f"got {text}")
        return value

    parse.__name__ = "float"  # argparse names the type in "invalid float value"
    return parse


def changed_settings(saved: Mapping, current: Mapping) -> list[str]:
    """The keys, sorted, whose values differ between a saved run's settings and this run's (a key only one
    side has counts): what refuses a resume that would mix two experiments."""
    return sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))


def check_out_dir(command: str, out: Path) -> None:
    """SystemExit "COMMAND: cannot make --out OUT: why" if `out` cannot be made as a directory, or "COMMAND:
    cannot write in --out OUT: ..." if it is one this process cannot write in (its results would fail to save
    only once the first one is done). Checked before a model loads, and the directory made only after
    (`make_out_dir`): a failed load leaves nothing behind."""
    if out.exists():
        if not out.is_dir():
            raise SystemExit(f"{command}: cannot make --out {out}: it is a file")
        if not os.access(out, os.W_OK | os.X_OK):
            raise SystemExit(f"{command}: cannot write in --out {out}: Permission denied")
        return
    above = next(p for p in out.absolute().parents if p.exists())
    if not above.is_dir() or not os.access(above, os.W_OK | os.X_OK):
        why = "Not a directory" if not above.is_dir() else "Permission denied"
        raise SystemExit(f"{command}: cannot make --out {out}: {why} ({above})")


def make_out_dir(command: str, out: Path) -> None:
    """`out` made (with its parents), or SystemExit "COMMAND: cannot make --out OUT: why"."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"{command}: cannot make --out {out}: {exc.strerror or exc}") from None


def require_tokenizer(command: str, model: str, tokenizer: object) -> None:
    """SystemExit "COMMAND: MODEL has no tokenizer ..." where `load_model` returned none (the random-weight
    tiny-<type> and shapes-<model>): the commands that tokenize text need a real model."""
    if tokenizer is None:
        raise SystemExit(f"{command}: {model} has no tokenizer (tiny-<type> and shapes-<model> are random weights "
                         "without one): this command needs a real model (smollm2-135m or a local model directory)")


def apply_threads(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(max(1, args.threads))


def _bench(argv: list[str]) -> int:
    p = command_parser("tmem bench", "the pytest-benchmark suites in benchmarks/ (unknown args go to pytest)")
    args, rest = p.parse_known_args(argv)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TMEM_BENCH_THREADS": str(args.threads)}
    return subprocess.call([sys.executable, "-m", "pytest", os.path.join(root, "benchmarks"), *rest], env=env)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        print(version())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from tmem_runtime.agent.demo import main as run
    elif command == "demo-weights":
        from tmem_runtime.demo import main as run
    elif command == "eval":
        from tmem_runtime.agent.evaluate import main as run
    elif command == "make-conversations":
        from tmem_runtime.agent.long_conversations import main as run
    elif command == "ablate":
        from tmem_runtime.ablations.command import main as run
    elif command == "bench":
        return _bench(rest)
    elif command == "serve":
        from tmem_runtime.serve.main import main as run
    elif command == "rl":
        from tmem_runtime.rl.command import main as run
    else:
        print(f"tmem: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from tmem_runtime.models import ModelNotSupportedError

    try:
        return run(rest)
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback (eval, ablate and rl resume from --out on a rerun)
        print(f"\ntmem {command}: interrupted", file=sys.stderr)
        return 130
    except FileNotFoundError as exc:  # a --model or other path that is not there: its message, no traceback
        print(f"tmem {command}: {exc.strerror if exc.filename else exc}"
              + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        return 2
    except ModelNotSupportedError as exc:  # a --model of a family fast weights cannot attach to: one line
        print(f"tmem {command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
