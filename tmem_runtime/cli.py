"""`tmem demo`, `tmem demo-weights`, `tmem eval`, `tmem make-conversations`, `tmem bench`."""

from __future__ import annotations

import os
import subprocess
import sys

USAGE = """usage: tmem COMMAND [ARGS]

commands:
  demo           the memory agent on the embedded model: writes, clears, answers (vs no memory)
  demo-weights   fast weights alone: 10 made-up facts written, recalled, then reset
  eval           LoCoMo-format evaluation of the memory channels (tmem eval --help)
  make-conversations  seeded long conversations in LoCoMo's format: facts early, chit-chat after
  bench          the pytest-benchmark suites in benchmarks/ (extra args go to pytest)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
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
    elif command == "bench":
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.call([sys.executable, "-m", "pytest", os.path.join(root, "benchmarks"), "-s", *rest])
    else:
        print(f"tmem: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return run(rest)


if __name__ == "__main__":
    raise SystemExit(main())
