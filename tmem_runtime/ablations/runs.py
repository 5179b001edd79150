"""One ablation run on made-up facts: an adapter configuration, a write, recall, drift, cost.

Results go to a JSON checkpoint (`ResultStore`) as each run finishes; a rerun skips what is there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tmem_runtime.ablations.drift import drift, neutral_answers_right, next_token_logprobs
from tmem_runtime.adapter_file import atomic_write
from tmem_runtime.cli import changed_settings
from tmem_runtime.fact_sets import Fact
from tmem_runtime.fast_weights import FastWeights
from tmem_runtime.recall import write_and_recall
from tmem_runtime.recipes import Recipe, get_recipe
from tmem_runtime.sessions import pad_id

MIDDLE_LAYERS = (13, 14, 15, 16)  # four middle decoder layers of SmolLM2-135M's 30


@dataclass(frozen=True)
class AdapterConfig:
    """Where the fast weights sit and how they start and train.

    init: "svd" | "random" | "pissa" (FastWeights). scaled_random: A's rows are random directions with
    the SVD's row norms (sigma_i): the random init with the SVD's scale, to tell direction from scale.
    """

    init: str = "svd"
    rank: int = 6
    layers: int | tuple[int, ...] = 4
    train_a: bool = False
    scaled_random: bool = False

    def describe(self) -> str:
        where = f"last {self.layers}" if isinstance(self.layers, int) else f"layers {list(self.layers)}"
        init = "random directions, SVD row norms" if self.scaled_random else self.init
        return f"{init}, rank {self.rank}, {where}{', A trained' if self.train_a else ''}"


CONFIGS: dict[str, AdapterConfig] = {
    "svd": AdapterConfig(),
    "random": AdapterConfig(init="random"),
    "random-scaled": AdapterConfig(scaled_random=True),
    "pissa": AdapterConfig(init="pissa"),
    "pissa-train-a": AdapterConfig(init="pissa", train_a=True),  # PiSSA as PEFT trains it: both factors
    "rank2": AdapterConfig(rank=2),
    "rank16": AdapterConfig(rank=16),
    "middle4": AdapterConfig(layers=MIDDLE_LAYERS),
    "last8": AdapterConfig(layers=8),
    "train-a": AdapterConfig(train_a=True),
}


class ResultStore:
    """A JSON file {"runs": {key: record}, "settings": {...}}: saved atomically after every `put`.

    settings: what its records depend on beyond their keys (the model, a study's sizes). A file whose
    records were made with other settings is refused (SystemExit naming them): resuming would mix two
    experiments in one table. None: not checked (reading a report). A file that is not such a checkpoint (not
    JSON, another layout) is refused the same way, and left as it is."""

    def __init__(self, path: Path, settings: dict | None = None) -> None:
        self.path = Path(path)
        self.data: dict = {"runs": {}}
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
                if not isinstance(self.data, dict) or not isinstance(self.data.get("runs"), dict):
                    raise ValueError('not an object with a "runs" object')
            except (ValueError, OSError) as exc:  # JSONDecodeError, UnicodeDecodeError, a directory, ...
                raise SystemExit(f"tmem ablate: {self.path} is not a tmem ablate checkpoint ({exc}): use another "
                                 "--out, or delete that file to start its studies over") from None
        if settings is not None:
            saved = self.data.get("settings")
            if saved is not None and self.data["runs"] and saved != settings:
                changed = ", ".join(
                    f"{k} {saved.get(k)!r} -> {settings.get(k)!r}" for k in changed_settings(saved, settings)
                )
                raise SystemExit(f"tmem ablate: {self.path} holds results made with other settings ({changed}): "
                                 "use another --out, or delete that file to start its studies over")  # fmt: skip
            self.data["settings"] = settings

    def __contains__(self, key: str) -> bool:
        return key in self.data["runs"]

    def get(self, key: str) -> dict | None:
        return self.data["runs"].get(key)

    def put(self, key: str, record: dict) -> None:
        self.data["runs"][key] = record
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.data, indent=1)
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(text))

    def runs(self, **match) -> list[dict]:
        """Records whose fields equal every `match` item."""
        return [r for r in self.data["runs"].values() if all(r.get(k) == v for k, v in match.items())]


def attach(model: PreTrainedModel, config: AdapterConfig, seed: int) -> FastWeights:
    """Fast weights on `model` as `config` says (A set once here; see `restore_a`)."""
    init = "svd" if config.scaled_random else config.init
    fw = FastWeights(model, rank=config.rank, num_layers=config.layers, init=init, seed=seed)
    if config.scaled_random:
        engine = fw.store.engine
        engine.set_a(scaled_random_a(engine.a, fw.layout, seed))
    return fw


def scaled_random_a(a: torch.Tensor, layout, seed: int) -> torch.Tensor:  # noqa: ANN001
    """A [a_numel] with each row of each slot replaced by a random Gaussian direction of the same norm."""
    gen = torch.Generator().manual_seed(seed)
    out = a.detach().clone()
    for i in range(len(layout.slots)):
        rows = layout.a_view(out, i)
        rand = torch.randn(rows.shape, generator=gen)
        rows.copy_(rand / rand.norm(dim=1, keepdim=True) * rows.norm(dim=1, keepdim=True))
    return out


def restore_a(fw: FastWeights, a_start: torch.Tensor) -> None:
    """Put A back (a `train_a` write changed it; reset() only restores B)."""
    fw.store.engine.set_a(a_start)


def session_bytes(fw: FastWeights, train_a: bool) -> int:
    """What one session adds in memory: its float32 B row, and its own A when A is trained."""
    lay = fw.layout
    return 4 * (lay.b_numel + (lay.a_numel if train_a else 0))


def seed_changes_write(config: AdapterConfig, recipe: Recipe, n_cards: int) -> bool:
    """Whether the seed changes anything: a random A, or a shuffle that changes the batches (with one
    batch per epoch holding every card the order inside it changes nothing; the randomized SVD's seed
    moves A0 by ~1e-4 relative)."""
    return config.init == "random" or config.scaled_random or recipe.batch_size < n_cards


def recall_run(
    fw: FastWeights,
    tokenizer: PreTrainedTokenizerBase,
    facts: Sequence[Fact],
    recipe: str | Recipe,
    seed: int,
    train_a: bool,
    neutral: tuple[list[list[int]], list[str], torch.Tensor, list[bool]],
) -> dict:
    """Write `facts` from the current state, then ask them (and their paraphrases) and the neutral
    prompts. neutral: (prompt ids, groups, the bare model's next-token log-probabilities, whether the
    bare model answers each neutral chat question right).
    Returns the record: hits, losses per step, write wall/CPU seconds, drift (with the neutral chat
    questions' answers after the write), bytes per session."""
    prompts, groups, before, right_before = neutral
    wall, cpu = time.perf_counter(), time.process_time()
    run = write_and_recall(fw, tokenizer, facts, recipe, seed, train_a=train_a)
    after = next_token_logprobs(fw.model, prompts, pad_id(tokenizer))
    neutral_answers, right_after = neutral_answers_right(fw.model, tokenizer)
    return {
        "hits": run.hits,
        "paraphrase_hits": run.paraphrase_hits,
        "answers": run.answers,
        "losses": [round(x, 5) for x in run.losses],
        "steps": len(run.losses),
        "write_s": round(run.write_seconds, 3),
        "write_cpu_s": round(run.write_cpu_seconds, 3),
        "run_cpu_s": round(time.process_time() - cpu, 3),
        "run_s": round(time.perf_counter() - wall, 3),
        "drift": {
            **drift(before, after, groups).as_dict(),
            "neutral_answers": neutral_answers,
            "neutral_right_before": right_before,
            "neutral_right_after": right_after,
        },
        "bytes_per_session": session_bytes(fw, train_a),
        "recipe_steps": get_recipe(recipe).epochs,
    }
