"""Training checkpoints: the policy, the optimizer state and the trainer's state, checked on resume.

    OUT/checkpoints/step-000040/
        policy.safetensors      the trainable tensors (see policy.py; `tmem eval --policy` reads it)
        optimizer.safetensors   AdamW's moments and step counts per parameter (param groups in its header)
        trainer.json            step, configuration, settings, the SHA-256 of both files and of the base
                                model's fast-weight MLP weights (`policy.base_weights_sha256`)

A checkpoint directory is written under a temporary name and renamed when complete, so a crash never
leaves a half-written one under its real name. Loading verifies everything before changing anything:
JSON, hashes, the model it was trained on (type, sizes, weights), tensor names, shapes and finiteness;
any mismatch raises `CheckpointError` and leaves the policy and optimizer as they were. Rollouts are
seeded by (seed, step, task, member), so the step number, the weights and the optimizer state are all a
run needs to continue exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from tmem_runtime.cli import changed_settings
from tmem_runtime.rl.policy import Policy, PolicyFileError, check_policy_model, read_policy_file, read_safetensors

STATE_FILE = "trainer.json"
POLICY_FILE = "policy.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
CHECKPOINT_NAME = re.compile(r"step-(\d{6,})")  # checkpoint_dir's names


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, damaged or does not fit this run; nothing was changed."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_dir(out: str | os.PathLike, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step-{step:06d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoint directories in `root` (OUT/checkpoints), lowest step first: named exactly
    step-NNNNNN (not a step-NNNNNN.tmp left by a crash) and holding trainer.json."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found) if p.is_dir() and (p / STATE_FILE).is_file()]


def remove_checkpoints(out: str | os.PathLike) -> None:
    """Every checkpoint under OUT/checkpoints, complete or not: a run started over there (`tmem rl --fresh`),
    so that a kill before its own first save never resumes the run it replaced."""
    shutil.rmtree(Path(out) / "checkpoints", ignore_errors=True)


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step under OUT/checkpoints (None if there is none)."""
    done = complete_checkpoints(Path(out) / "checkpoints")
    return done[-1] if done else None


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    sd = optimizer.state_dict()
    tensors = {f"state/{i}/{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
               for i, st in sd["state"].items() for k, v in st.items()}
    return tensors, {"param_groups": json.dumps(sd["param_groups"])}


def save_checkpoint(out: str | os.PathLike, step: int, policy: Policy, optimizer: torch.optim.Optimizer,
                    state: dict, keep: int = 2) -> Path:
    """Write OUT/checkpoints/step-NNNNNN (atomically) and keep only the newest `keep` checkpoints up to it.
    Checkpoints of a later step are removed: they belong to a run this one replaced (`tmem rl --fresh`, or a
    resume from an older checkpoint), and the next resume would otherwise pick them over this run's."""
    final = checkpoint_dir(out, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    policy.save(tmp / POLICY_FILE)
    tensors, meta = _optimizer_tensors(optimizer)
    save_file(tensors, str(tmp / OPTIMIZER_FILE), metadata=meta)
    record = dict(state, step=step, files={f: sha256(tmp / f) for f in (POLICY_FILE, OPTIMIZER_FILE)})
    (tmp / STATE_FILE).write_text(json.dumps(record, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    old = complete_checkpoints(final.parent)
    mine = old[: old.index(final) + 1]
    for p in old[len(mine):] + (mine[:-keep] if keep > 0 else []):
        shutil.rmtree(p, ignore_errors=True)
    return final


# settings that fingerprint the run's inputs (tmem rl's training data and tokenizer), recorded since 2026-11-27: a
# checkpoint saved before is resumed without them, with a warning
FINGERPRINTS = ("data_sha256", "tokenizer_sha256")


def load_checkpoint(path: str | os.PathLike, policy: Policy, optimizer: torch.optim.Optimizer,
                    config: dict | None = None, settings: dict | None = None,
                    weights_sha256: str | None = None) -> dict:
    """Verify a checkpoint directory, then load it into `policy` and `optimizer`; returns trainer.json.

    CheckpointError (and nothing changed) on a missing file, bad JSON, a hash mismatch, tensors that
    do not fit the policy or the optimizer, a policy trained on another model (see `check_policy_model`), a
    saved "config" that differs from `config` (if given)
    in any of its keys, saved "settings" (the environment's, recorded since they were saved) that
    differ from `settings` in any of theirs, or (if given) a saved "weights_sha256" other than
    `weights_sha256` (`policy.base_weights_sha256` of the model as loaded: same type and sizes, other
    weights). A checkpoint saved before it was recorded is loaded with a warning (type and sizes only), as is
    one saved before the FINGERPRINTS settings were (they are left unchecked)."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
        files = state["files"]
        step = int(state["step"])
        saved = dict(state.get("config", {}))
        saved_settings = state.get("settings")
        saved_settings = None if saved_settings is None else dict(saved_settings)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: no readable {STATE_FILE} ({exc})") from exc
    changed = [f"{k} {saved.get(k)} -> {v}" for k, v in (config or {}).items() if saved.get(k) != v]
    unrecorded = []  # fingerprints this checkpoint is older than
    if saved_settings is not None:  # (older checkpoints recorded none: nothing to compare)
        mine = json.loads(json.dumps(settings or {}))  # as JSON holds them (tuples are lists)
        unrecorded = [k for k in FINGERPRINTS if k in mine and k not in saved_settings]
        mine = {k: v for k, v in mine.items() if k not in unrecorded}
        changed += [f"{k} {saved_settings.get(k)} -> {mine.get(k)}" for k in changed_settings(saved_settings, mine)]
    if changed:
        raise CheckpointError(f"{path} was trained with other settings ({', '.join(changed)}): resume with "
                              "the same ones, or start over (--fresh)")
    for name in (POLICY_FILE, OPTIMIZER_FILE):
        f = path / name
        if not f.is_file() or sha256(f) != files.get(name):
            raise CheckpointError(f"{path}: {name} is missing or does not match its recorded SHA-256 (corrupt)")
    try:
        policy_meta, policy_tensors = read_policy_file(path / POLICY_FILE)
        check_policy_model(path, policy_meta, policy.model)
        opt_meta, opt_tensors = read_safetensors(path / OPTIMIZER_FILE)
        groups = json.loads(opt_meta["param_groups"])
    except (PolicyFileError, OSError, SafetensorError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    saved_weights = state.get("weights_sha256")
    if weights_sha256 is not None and saved_weights is not None and saved_weights != weights_sha256:
        raise CheckpointError(f"{path} was trained on another model: same type and sizes, other weights (SHA-256 of "
                              f"its fast-weight layers' MLP weights {str(saved_weights)[:12]}..., this model's "
                              f"{weights_sha256[:12]}..., which another dtype changes too): resume with the model "
                              "it was trained on, or start over (--fresh)")
    opt_state = _rebuild_optimizer_state(path, opt_tensors, groups, optimizer)
    before = policy.state_dict()
    try:
        policy.load_state_dict(policy_tensors)
        optimizer.load_state_dict(opt_state)
    except (PolicyFileError, ValueError, RuntimeError) as exc:
        policy.load_state_dict(before)
        raise CheckpointError(f"{path}: {exc}") from exc
    if weights_sha256 is not None and saved_weights is None:
        warnings.warn(f"{path} records no fingerprint of its model's weights (saved by an older tmem): resumed on "
                      "the model's type and sizes alone", stacklevel=2)
    if unrecorded:
        warnings.warn(f"{path} records no {', '.join(unrecorded)} (saved by an older tmem): resumed without "
                      "checking them", stacklevel=2)
    state["step"] = step
    return state


def _rebuild_optimizer_state(path: Path, tensors: dict[str, torch.Tensor], groups: list,
                             optimizer: torch.optim.Optimizer) -> dict:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if sum(len(g["params"]) for g in groups) != len(params):
        raise CheckpointError(f"{path}: the optimizer state is for {sum(len(g['params']) for g in groups)} "
                              f"tensors, this policy has {len(params)}")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        _, i, name = key.split("/", 2)
        state.setdefault(int(i), {})[name] = t
    for i, st in state.items():
        if not 0 <= i < len(params):
            raise CheckpointError(f"{path}: optimizer state for tensor {i} of {len(params)}")
        for name, t in st.items():
            if name != "step" and tuple(t.shape) != tuple(params[i].shape):
                raise CheckpointError(f"{path}: optimizer {name} of tensor {i} has shape {tuple(t.shape)}, "
                                      f"expected {tuple(params[i].shape)}")
            if not torch.isfinite(t).all():
                raise CheckpointError(f"{path}: optimizer {name} of tensor {i} holds NaN/inf")
    return {"state": state, "param_groups": groups}
