"""The memory-writing policy: the full model, or a slow LoRA over all layers, saved on its own.

"full" trains every weight of the model (the paper's setting, lr 1e-6). "lora" injects a PEFT LoRA
(`peft.inject_adapter_in_model`: the model keeps its class, only the named Linear modules are
wrapped) on the attention projections q/k/v/o of every decoder layer and on gate/up/down of every
layer that carries **no** fast weights. The MLPs of the fast-weight layers are left out on purpose:
the fast weights replace those MLPs' `forward`, and whenever a session is bound the engine reads the
base weights (`mlp.gate_proj.weight`) directly, so a LoRA inside them would be skipped while the
model answers from its memory and applied while it writes: the writer and the reader would be
different models. Left out, the slow LoRA is the same in every pass, and it never touches what the
fast weights adapt (A0 = the SVD of those MLPs' base weights stays right).

The policy reads no fast weights: it writes flashcards with no session bound (the bare model plus
its slow LoRA), as the agent writes "with the base" (write_formats.write_to_weights).

A policy file is one safetensors file of the trainable tensors with a header naming the mode, the
LoRA shape and targets, and the model it fits (architecture, sizes); a file that does not fit the
model, or is damaged, is refused (`PolicyFileError`) and changes nothing.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from tmem_runtime.adapter_file import WeightsFingerprint, save_adapter
from tmem_runtime.models import MLP_TARGETS as FAST_WEIGHT_TARGETS
from tmem_runtime.models import decoder_layers, target_mlps

POLICY_MODES = ("full", "lora")
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
FORMAT = "tmem-policy-1"


class PolicyFileError(ValueError):
    """A policy file that is damaged or does not fit this model; nothing was changed."""


@dataclass(frozen=True)
class PolicySpec:
    """mode: "full" | "lora". LoRA: rank, alpha (scaling alpha / rank). fast_layers: decoder layers whose
    MLP carries fast weights (no slow LoRA there); None: those of the model's attached fast weights,
    else the last 4 (the engine's default)."""

    mode: str = "lora"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    fast_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.mode not in POLICY_MODES:
            raise ValueError(f"policy must be one of {POLICY_MODES}, got {self.mode!r}")
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, got {self.lora_rank}")


def fast_weight_layers(model: nn.Module, default: int = 4) -> tuple[int, ...]:
    """Indices of the decoder layers whose MLP has fast weights attached (else the last `default`)."""
    from tmem_runtime.fast_weights import fast_weights_of

    store = fast_weights_of(model)
    if store is not None:
        return tuple(idx for idx, _ in store.engine.mlps)
    return tuple(idx for idx, _ in target_mlps(model, default))


def lora_targets(model: nn.Module, fast_layers: Sequence[int]) -> list[str]:
    """Full module names of the slow LoRA: q/k/v/o of every layer, gate/up/down outside `fast_layers`."""
    names = {id(m): n for n, m in model.named_modules()}
    found = []
    for i, layer in enumerate(decoder_layers(model)):
        parts = [(getattr(layer, "self_attn", None), ATTENTION_TARGETS)]
        if i not in set(fast_layers):
            parts.append((getattr(layer, "mlp", None), MLP_TARGETS))
        for parent, targets in parts:
            for t in targets:
                module = getattr(parent, t, None)
                if isinstance(module, nn.Linear):
                    found.append(names[id(module)])
    if not found:
        raise ValueError(f"{type(model).__name__} has none of {ATTENTION_TARGETS + MLP_TARGETS} to put a LoRA on")
    return found


def _model_identity(model: nn.Module) -> dict[str, str]:
    cfg, text = model.config, model.config.get_text_config()  # (sizes of a multimodal model's text decoder)
    return {"model_type": str(cfg.model_type), "hidden_size": str(text.hidden_size),
            "num_hidden_layers": str(text.num_hidden_layers), "vocab_size": str(text.vocab_size)}


def base_weights_sha256(model: nn.Module, fast_layers: Sequence[int]) -> str:
    """SHA-256 of the base weights of the MLPs in `fast_layers` (gate/up/down), hashed as an adapter file's header
    hashes them (`adapter_file.WeightsFingerprint`: a SessionPool on those layers records the same digest): it
    tells apart two models of one architecture and size (and one model in two dtypes)."""
    mlps = target_mlps(model, list(fast_layers))
    return WeightsFingerprint([getattr(m, t).weight for _, m in mlps for t in FAST_WEIGHT_TARGETS]).hexdigest()


class Policy:
    """The trainable part of `model` for RL (see the module docstring). The model is changed in place:
    "lora" wraps its target Linear modules; "full" sets requires_grad on every weight. A LoRA rank above a
    target matrix's smaller side is a ValueError (nothing changed)."""

    def __init__(self, model: nn.Module, spec: PolicySpec = PolicySpec()) -> None:
        self.model = model
        fast = spec.fast_layers if spec.fast_layers is not None else fast_weight_layers(model)
        self.spec = PolicySpec(spec.mode, spec.lora_rank, spec.lora_alpha, tuple(fast))
        self.targets: list[str] = []
        if self.spec.mode == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            self.targets = lora_targets(model, self.spec.fast_layers)
            for name in self.targets:  # (a rank past a matrix is wasted numbers: at --lora-rank 100000, tens of GB)
                m = model.get_submodule(name)
                if self.spec.lora_rank > min(m.in_features, m.out_features):
                    raise ValueError(f"lora_rank {self.spec.lora_rank} exceeds {name}'s smaller side "
                                     f"({m.out_features} x {m.in_features})")
            config = LoraConfig(r=self.spec.lora_rank, lora_alpha=self.spec.lora_alpha, lora_dropout=0.0,
                                target_modules=self.targets, bias="none")
            inject_adapter_in_model(config, model)
            for name, p in model.named_parameters():
                p.requires_grad_("lora_" in name)
        else:
            model.requires_grad_(True)
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named]

    @contextmanager
    def adapters_off(self) -> Iterator[None]:
        """LoRA policies: the base model inside the block (the reference policy); full: not available."""
        if self.spec.mode != "lora":
            raise ValueError("only a LoRA policy has its reference inside the model; keep a copy for 'full'")
        from peft.tuners.tuners_utils import BaseTunerLayer

        layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        ours = {id(p) for p in self.parameters()}
        for m in layers:
            m.enable_adapters(False)
        try:
            yield
        finally:
            for m in layers:
                m.enable_adapters(True)
                for p in m.parameters():  # enable_adapters(True) marks them trainable: keep exactly ours
                    p.requires_grad_(id(p) in ours)

    # ---------------------------------------------------------------- files
    @functools.cached_property
    def base_sha256(self) -> str | None:
        """What a "lora" policy's file records of the base it trains on (`base_weights_sha256`; the policy never
        changes those weights, so they are hashed once, at the first save); None for "full" (its file holds every
        weight)."""
        return base_weights_sha256(self.model, self.spec.fast_layers) if self.spec.mode == "lora" else None

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT, "mode": self.spec.mode, "lora_rank": str(self.spec.lora_rank),
                "lora_alpha": str(self.spec.lora_alpha), "fast_layers": json.dumps(list(self.spec.fast_layers)),
                "targets": json.dumps(self.targets), **_model_identity(self.model),
                **({"base_weights_sha256": self.base_sha256, "base_dtype": _base_dtype(self.model, self.spec)}
                   if self.base_sha256 else {})}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors by name (copies on the CPU)."""
        return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in self.named}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy `tensors` into the trainable weights; every name and shape must match, else PolicyFileError
        and nothing changes."""
        mine = dict(self.named)
        missing, unknown = sorted(set(mine) - set(tensors)), sorted(set(tensors) - set(mine))
        if missing or unknown:
            raise PolicyFileError(f"policy tensors do not match: missing {missing[:3]}, unknown {unknown[:3]}")
        for n, t in tensors.items():
            if tuple(t.shape) != tuple(mine[n].shape):
                raise PolicyFileError(f"policy tensor {n} has shape {tuple(t.shape)}, expected {tuple(mine[n].shape)}")
            if not torch.isfinite(t).all():
                raise PolicyFileError(f"policy tensor {n} holds NaN/inf")
        with torch.no_grad():
            for n, t in tensors.items():
                mine[n].copy_(t)

    def save(self, path: str | os.PathLike) -> None:
        """One safetensors file, written atomically (a temporary file, then renamed)."""
        save_adapter(path, self.state_dict(), self.metadata())


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(header, tensors on the CPU) of a safetensors file, read through one open."""
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}


def policy_path(path: str | os.PathLike) -> Path:
    """The policy file `path` names (the file, or a checkpoint directory holding policy.safetensors), its
    header checked (no tensor read: cheap, before a model loads); PolicyFileError saying what is wrong."""
    path = Path(path)
    if path.is_dir():
        if not (path / "policy.safetensors").is_file():
            found = sorted(path.glob("step-*/policy.safetensors")) or sorted(path.glob("*/step-*/policy.safetensors"))
            hint = f"; the newest checkpoint under it is {found[-1].parent}" if found else ""
            raise PolicyFileError(f"{path}: a directory without policy.safetensors (a checkpoint directory is "
                                  f"OUT/checkpoints/step-N){hint}")
        path = path / "policy.safetensors"
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        raise PolicyFileError(f"{path}: not a readable policy file ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise PolicyFileError(f"{path}: not a tmem policy file (format {meta.get('format')!r})")
    return path


def read_policy_file(path: str | os.PathLike) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(header, tensors) of a policy file; PolicyFileError if it is not one or is damaged."""
    path = policy_path(path)
    try:
        meta, tensors = read_safetensors(path)
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        raise PolicyFileError(f"{path}: not a readable policy file ({exc})") from exc
    if meta.get("format") != FORMAT:
        raise PolicyFileError(f"{path}: not a tmem policy file (format {meta.get('format')!r})")
    return meta, tensors


def check_policy_model(path: str | os.PathLike, meta: dict[str, str], model: nn.Module) -> None:
    """PolicyFileError unless a policy file's header (`meta`) names `model` (type and sizes): tensors of the
    same names and shapes trained on another model would load, and mean nothing there."""
    wrong = {k: (meta.get(k), v) for k, v in _model_identity(model).items() if meta.get(k) != v}
    if wrong:
        raise PolicyFileError(f"{path} was trained on another model: {wrong} (file, this model)")


def _base_dtype(model: nn.Module, spec: PolicySpec) -> str:
    return str(target_mlps(model, list(spec.fast_layers))[0][1].gate_proj.weight.dtype).removeprefix("torch.")


def check_policy_base(path: str | os.PathLike, meta: dict[str, str], model: nn.Module, spec: PolicySpec) -> None:
    """PolicyFileError if a LoRA policy's header records another base than `model` of the same dtype (the SHA-256
    of its fast-weight layers' MLP weights); a warning if it records none (an older file) or one of another dtype
    (a writer trained in float32 may be evaluated in bfloat16: the weights cannot be compared)."""
    saved, dtype = meta.get("base_weights_sha256"), meta.get("base_dtype")
    if saved is None:
        warnings.warn(f"{path} records no fingerprint of its base model's weights (saved by an older tmem): "
                      "loaded on the model's type and sizes alone", stacklevel=3)
    elif dtype != _base_dtype(model, spec):
        warnings.warn(f"{path} was trained on a {dtype} model and this one is {_base_dtype(model, spec)}: its base "
                      "weights are not compared", stacklevel=3)
    elif saved != (mine := base_weights_sha256(model, spec.fast_layers)):
        raise PolicyFileError(f"{path} was trained on another model: same type and sizes, other weights (SHA-256 of "
                              f"its fast-weight layers' MLP weights {saved[:12]}..., this model's {mine[:12]}...)")


def load_policy(model: nn.Module, path: str | os.PathLike, num_layers: int | None = None) -> Policy:
    """Make `model` the trained writer saved at `path` (a policy file, or a checkpoint directory holding
    policy.safetensors): inject the same slow LoRA (lora) or load every weight (full). num_layers: the
    fast weights the model will carry (the last N layers); a policy trained beside other fast-weight
    layers is refused (its LoRA would sit in their MLPs)."""
    meta, tensors = read_policy_file(path)
    check_policy_model(path, meta, model)
    spec = PolicySpec(meta["mode"], int(meta["lora_rank"]), float(meta["lora_alpha"]),
                      tuple(json.loads(meta["fast_layers"])))
    fast = tuple(i for i, _ in target_mlps(model, num_layers)) if num_layers is not None else spec.fast_layers
    if spec.mode == "lora" and spec.fast_layers != fast:
        raise PolicyFileError(f"{path} was trained with fast weights on layers {list(spec.fast_layers)}, "
                              f"not the last {num_layers}")
    if spec.mode == "lora" and json.loads(meta["targets"]) != lora_targets(model, spec.fast_layers):
        raise PolicyFileError(f"{path}: its LoRA targets are not this model's")
    if spec.mode == "lora":
        check_policy_base(path, meta, model, spec)
    policy = Policy(model, spec)
    policy.load_state_dict(tensors)
    model.requires_grad_(False)
    return policy
