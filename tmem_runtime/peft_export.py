"""A session's fast weights as a PEFT LoRA adapter directory, and back.

    export_peft(fw, "out/alice")                 # or export_peft((pool, "alice"), "out/alice")
    PeftModel.from_pretrained(base_model, "out/alice")       # same logits as tmem (fp32: 1e-5)
    vllm: LLM(model=..., enable_lora=True, max_lora_rank=8)  # rank 6 fits vLLM's smallest bucket, 8
    import_peft((pool, "bob"), "out/alice")      # the inverse, into any session of the same model

The directory is what PEFT's `save_pretrained` writes: `adapter_config.json` (peft_type LORA, `r`,
`lora_alpha = scaling * r`, `target_modules`, `layers_to_transform`) and `adapter_model.safetensors`
with `base_model.model.<module path>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r]. The SVD
and random inits are plain LoRAs (the base weights are untouched); PiSSA replaces the base weights
by residuals, which a LoRA file cannot carry, so it is refused.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from safetensors import safe_open
from transformers import PreTrainedModel

from tmem_runtime.adapter_file import AdapterFileError, atomic_write, save_adapter
from tmem_runtime.fast_weights import FastWeights
from tmem_runtime.sessions import SessionStore

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
Source = FastWeights | tuple[SessionStore, str]
PEFT_DEFAULT_ALPHA = 8  # LoraConfig's lora_alpha where a config leaves it out
# LoraConfig options that make an adapter more than B A on the targeted modules at one scaling
UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (a magnitude vector per module)",
    "rank_pattern": "a rank per module",
    "alpha_pattern": "a scaling per module",
    "bias": "trained biases",
    "lora_bias": "a bias on lora_B",
    "modules_to_save": "whole trained modules",
    "trainable_token_indices": "trained token embeddings",
    "layer_replication": "replicated layers",
}


def _store(source: Source) -> tuple[SessionStore, str, PreTrainedModel, str, float]:
    """(store, session, model, init, scaling) of a FastWeights or a (pool, session) pair."""
    if isinstance(source, FastWeights):
        source._check()
        from tmem_runtime.fast_weights import SESSION

        return source.store, SESSION, source.model, source.init, source.scaling
    store, session = source
    engine = store.engine
    return store, session, engine.model, engine.init, engine.scaling


def _module_paths(model: PreTrainedModel, layout) -> list[str]:
    """The qualified module name of every adapter slot (e.g. "model.layers.27.mlp.gate_proj")."""
    names = {id(m): n for n, m in model.named_modules()}
    from tmem_runtime.models import decoder_layers

    layers = decoder_layers(model)
    return [names[id(getattr(layers[s.layer].mlp, s.target))] for s in layout.slots]


def peft_config(layout, scaling: float) -> dict:
    """The adapter_config.json of a tmem adapter with this layout."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": layout.rank,
        "lora_alpha": scaling * layout.rank,
        "lora_dropout": 0.0,
        "target_modules": sorted({s.target for s in layout.slots}),
        "layers_to_transform": sorted({s.layer for s in layout.slots}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }


def export_peft(source: Source, directory: str | os.PathLike) -> Path:
    """Write one session's adapter as a PEFT LoRA directory (see the module docstring); returns it."""
    store, session, model, init, scaling = _store(source)
    if init == "pissa":
        raise ValueError(
            "a PiSSA adapter cannot be exported as a plain LoRA: PiSSA replaces the base weights by "
            "residuals, which a PEFT LoRA file does not carry (use init='svd' or 'random')"
        )
    layout = store.layout
    state = store.state_dict(session)
    paths = _module_paths(model, layout)
    tensors = {}
    for i, path in enumerate(paths):
        tensors[f"base_model.model.{path}.lora_A.weight"] = state[layout.a_name(i)]
        tensors[f"base_model.model.{path}.lora_B.weight"] = state[layout.b_name(i)]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_adapter(directory / WEIGHTS_FILE, tensors, {"format": "pt"})
    config = json.dumps(peft_config(layout, scaling), indent=2)
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(config))
    return directory


def import_peft(target: Source, directory: str | os.PathLike) -> None:
    """Load a PEFT LoRA directory of this model (same rank, targets, layers, scaling and A) into a
    session: lora_A must be the A every session shares (a directory export_peft wrote, its lora_B trained
    anywhere; PEFT's own init draws another A). Anything else, and any PEFT option a plain B A on these
    modules cannot carry (DoRA, per-module ranks or alphas, biases, modules_to_save, ...), raises
    AdapterFileError and changes nothing. use_rslora is read as PEFT reads it (scaling lora_alpha / sqrt(r))."""
    store, session, model, _, scaling = _store(target)
    directory = Path(directory)
    layout = store.layout
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        with safe_open(str(directory / WEIGHTS_FILE), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # OSError, JSON errors, and safetensors' own types on a corrupt file
        raise AdapterFileError(f"cannot read PEFT adapter {directory}: {exc}") from exc
    want = peft_config(layout, scaling)
    for key in ("peft_type", "r", "target_modules", "layers_to_transform"):
        got = config.get(key)
        if key == "layers_to_transform" and isinstance(got, int):
            got = [got]  # PEFT takes one layer index as an int
        if key in ("target_modules", "layers_to_transform") and isinstance(got, list):
            got = sorted(got)
        if got != want[key]:
            raise AdapterFileError(
                f"PEFT adapter {directory} has {key}={config.get(key)!r}; this adapter needs {want[key]!r}"
            )
    for key, what in UNSUPPORTED_OPTIONS.items():
        if config.get(key) not in (None, False, {}, [], "none"):
            raise AdapterFileError(
                f"PEFT adapter {directory} has {key}={config[key]!r}: {what}, which tmem's fast weights (one "
                "B A per targeted module, one scaling) cannot carry"
            )
    alpha = config.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise AdapterFileError(f"PEFT adapter {directory} has lora_alpha={alpha!r}: not a number")
    theirs = alpha / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])  # PEFT's scaling
    if abs(theirs - scaling) > 1e-6 * max(1.0, abs(scaling)):
        raise AdapterFileError(
            f"PEFT adapter {directory} has scaling {theirs} (lora_alpha={alpha}, r={config['r']}, "
            f"use_rslora={bool(config.get('use_rslora'))}); tmem uses {scaling}"
        )
    state = {}
    for i, path in enumerate(_module_paths(model, layout)):
        for kind, name in (("lora_A", layout.a_name(i)), ("lora_B", layout.b_name(i))):
            key = f"base_model.model.{path}.{kind}.weight"
            if key not in tensors:
                raise AdapterFileError(f"PEFT adapter {directory} has no {key}: it is for another model")
            state[name] = tensors.pop(key)
    if tensors:  # trained tensors beyond B A (biases, magnitudes, saved modules): a LoRA of this layout has none
        raise AdapterFileError(
            f"PEFT adapter {directory} holds tensors a LoRA of these fast weights does not: {sorted(tensors)[:3]}"
        )
    try:
        store.load_state_dict(session, state)
    except ValueError as exc:
        raise AdapterFileError(f"PEFT adapter {directory} does not fit this model's fast weights: {exc}") from exc
