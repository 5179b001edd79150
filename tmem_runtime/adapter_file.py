"""One session's adapter as a safetensors file: atomic writes, and a header that says what it fits.

The header identifies the model by what it is, not where it was loaded from: the architecture, the
adapter's layout (rank, layers, targets, shapes), the init, the scaling, and a SHA-256 of the targeted
base weights' bytes. The same weights loaded from any directory, on any host, accept the file; another
model (or the same one fine-tuned since) refuses it. The header also carries a SHA-256 of the tensors'
own bytes: a file damaged after it was written (a flipped bit that is still a finite number) is refused.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tmem_runtime.tensor_stamp import tensors_stamp

FILE_FORMAT = "tmem-fast-weights/2"
# (checked in this order: the layout before the hash of the weights it targets, so the first difference named
# is the one to fix: another num_layers targets other weights too)
IDENTITY_KEYS = ("format", "architecture", "rank", "layers", "targets", "init", "shapes", "weights_sha256")
# what names the model and the adapter B rows fit, whatever file holds them (a store's record: serve/store.py)
MODEL_KEYS = (*IDENTITY_KEYS[1:], "weights_dtype", "scaling")


class AdapterFileError(RuntimeError):
    """An adapter file or state is corrupt or does not match this model/adapter; nothing was changed."""


def architecture(model: nn.Module) -> str:
    """model_type, class and sizes (of the text decoder, for a multimodal model): what the adapter's shapes
    mean."""
    cfg = model.config
    text = cfg.get_text_config()  # (the config itself for a text-only model)
    return (
        f"{cfg.model_type}:{type(model).__name__}:layers={text.num_hidden_layers}:hidden={text.hidden_size}"
        f":intermediate={getattr(text, 'intermediate_size', '?')}:vocab={text.vocab_size}"
    )


class WeightsFingerprint:
    """SHA-256 of the targeted base weights' bytes, recomputed only when a weight changed in place.

    A weight's autograd version counter moves with every in-place change (an optimizer step on the
    base model, PiSSA's residual), so the cached digest is reused while no counter moved.
    """

    def __init__(self, weights: Sequence[torch.Tensor]) -> None:
        self.weights = list(weights)
        self._key: tuple | None = None
        self._digest = ""

    def hexdigest(self) -> str:
        key = tensors_stamp(self.weights)
        if key != self._key:
            h = hashlib.sha256()
            for w in self.weights:
                data = w.detach().contiguous().cpu()
                h.update(str((data.dtype, tuple(data.shape))).encode())
                h.update(data.view(torch.uint8).numpy().data)
            self._digest, self._key = h.hexdigest(), key
        return self._digest


def adapter_metadata(
    model: nn.Module, fingerprint: WeightsFingerprint, init: str, layout, scaling: float
) -> dict[str, str]:
    """The header of an adapter of `layout` (an AdapterLayout) on `model`: see IDENTITY_KEYS, the scaling B
    is applied with (checked where a file records it) and the base weights' dtype (which only explains a
    refusal: it is part of their hash)."""
    return {
        "format": FILE_FORMAT,
        "architecture": architecture(model),
        "weights_sha256": fingerprint.hexdigest(),
        "weights_dtype": str(fingerprint.weights[0].dtype).removeprefix("torch."),
        "init": init,
        "scaling": repr(float(scaling)),
        **layout.describe(),
    }


def model_identity(metadata: Mapping[str, str]) -> dict[str, str]:
    """The MODEL_KEYS of an adapter header (`adapter_metadata`'s, or a file's: those it has): the model and
    adapter its B rows fit (architecture, layout, init, base weights' hash and dtype, scaling), without the
    file's own format."""
    return {key: metadata[key] for key in MODEL_KEYS if key in metadata}


def read_header(path: str | os.PathLike) -> dict[str, str]:
    """An adapter file's header (its metadata), without its tensors; AdapterFileError if it cannot be read."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises several types for a corrupt or missing file
        raise AdapterFileError(f"cannot read adapter file {path}: {exc}") from exc


def data_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named CPU tensors: each one's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Replace `path` by the file `write(tmp)` writes, atomically: a temp file in the same directory,
    fsynced, then renamed over `path`, then the directory fsynced, so the rename too survives a power
    loss (the temp file is removed if anything fails)."""
    path = Path(path)
    # (the temp file's name is the target's cut short: a name of up to 255 bytes still gets its temp file)
    fd, tmp = tempfile.mkstemp(prefix=path.name[:128] + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_directory(directory: Path) -> None:
    """Flush a directory's entries to disk (POSIX; elsewhere a rename is as durable as the platform makes it)."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_adapter(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write `tensors` and `metadata` (+ "data_sha256", the tensors' checksum) to one safetensors file
    atomically (`atomic_write`)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {**metadata, "data_sha256": data_sha256(cpu)}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def read_adapter(
    path: str | os.PathLike, expected: dict[str, str], device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """The tensors of an adapter file on `device`, after checking its header against `expected` and its data
    against its checksum (files written before there was one: the header only). AdapterFileError otherwise."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for a corrupt or missing file
        raise AdapterFileError(f"cannot read adapter file {path}: {exc}") from exc
    if meta.get("format") != expected["format"]:
        raise AdapterFileError(
            f"adapter file {path} has format {meta.get('format')!r}; this tmem reads {expected['format']!r}"
        )
    for key in IDENTITY_KEYS:
        if meta.get(key) != expected[key]:
            raise AdapterFileError(f"adapter file {path} is for {_what_differs(key, meta, expected)}")
    if meta.get("scaling", expected["scaling"]) != expected["scaling"]:  # (older files do not say: taken)
        raise AdapterFileError(
            f"adapter file {path} was written with scaling={meta['scaling']}; this adapter applies B with "
            f"scaling={expected['scaling']} (attach with the file's scaling)"
        )
    if "data_sha256" in meta and meta["data_sha256"] != data_sha256(tensors):
        raise AdapterFileError(f"adapter file {path} is corrupt: its tensors do not match their checksum")
    return {k: v.to(device) for k, v in tensors.items()}


def _what_differs(key: str, meta: dict[str, str], expected: dict[str, str]) -> str:
    if key != "weights_sha256":
        return f"{key}={meta.get(key)!r}; this adapter has {key}={expected[key]!r}"
    theirs, ours = meta.get("weights_dtype"), expected.get("weights_dtype")
    if theirs and ours and theirs != ours:  # the same model in another dtype hashes differently: say so
        return (f"base weights in {theirs}, and this model's are {ours}: load it into the model in {theirs} "
                "(or write the memory again)")  # fmt: skip
    return f"different base weights (SHA-256 {meta.get(key, '?')[:12]}..., this model's {expected[key][:12]}...)"
