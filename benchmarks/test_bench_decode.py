"""Decode with a written adapter vs the bare model: per MLP call (the decode dispatch) and per token.

Per MLP call, inference, N = 1, 4, 16 rows at SmolLM2-135M and Qwen3-4B widths, rank 6:

    bare     the model's own MLP: three torch.nn.functional.linear (cuBLAS) + SiLU * up, no adapter
    cublas   `lora_mlp` with decode="cublas": the torch composition (cuBLAS base products + LoRA terms)
    fused    `lora_mlp` with decode="fused": the Triton kernels at decode tiles with split-K (CUDA only)

The summary says, per shape, which of cublas / fused wins (the rule in `tmem_kernels.tiles.decode_path`
picks cublas for N <= 16 on CUDA), each one's overhead over the bare MLP and its share of the bandwidth
bound (the three weight matrices streamed once; peaks from benchmarks.common.PEAKS).

Per token: greedy generation of 32 tokens (batch 1, a 16-token prompt) on a random-weight model at the
real shapes, bare and after one write (paper recipe, 512 tokens, so B != 0): "adapter" is the runtime's
own choice, "adapter-fused" / "adapter-cublas" force each side of the dispatch ($TMEM_DECODE_PATH).
Goal (issue 9): decode with a written adapter within 10% of the bare model. bf16 on CUDA; on CPU fp32,
SmolLM2 only, without the fused side (the interpreter is far too slow to time).

    .venv/bin/python -m pytest benchmarks/test_bench_decode.py --benchmark-columns=median,rounds
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from benchmarks.common import (
    DEVICE,
    RANK,
    SHAPES,
    device_name,
    device_peaks,
    flashcard_examples,
    random_model,
    sync,
)
from tmem_kernels.lora_mlp import lora_mlp, select_config
from tmem_kernels.tiles import num_sms
from tmem_runtime import FastWeights
from tmem_runtime.recipes import RECIPES

CUDA = DEVICE.type == "cuda"
DTYPE = torch.bfloat16 if CUDA else torch.float32
ROWS = (1, 4, 16)
MLP_IMPLS = ["bare", "cublas", "fused"] if CUDA else ["bare", "cublas"]
TOKEN_IMPLS = ["bare", "adapter", "adapter-fused", "adapter-cublas"] if CUDA else ["bare", "adapter"]
TOKEN_MODELS = list(SHAPES) if CUDA else ["smollm2"]
NEW_TOKENS, PROMPT = 32, 16

_mlp: dict[str, dict[str, float]] = {}  # case -> impl -> median seconds per call
_tok: dict[str, dict[str, float]] = {}  # model -> impl -> median seconds per token
_state: dict[str, object] = {}  # the current model and its fast weights (one model at a time)


def _mlp_tensors(model: str, n: int) -> dict[str, torch.Tensor]:
    h, i = SHAPES[model]
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(DEVICE, DTYPE)
    return dict(x=rnd(n, h), w_gate=rnd(i, h, scale=h**-0.5), w_up=rnd(i, h, scale=h**-0.5),
                w_down=rnd(h, i, scale=i**-0.5), a_gate=rnd(RANK, h, scale=h**-0.5), b_gate=rnd(i, RANK, scale=1e-2),
                a_up=rnd(RANK, h, scale=h**-0.5), b_up=rnd(i, RANK, scale=1e-2), a_down=rnd(RANK, i, scale=i**-0.5),
                b_down=rnd(h, RANK, scale=1e-2))  # fmt: skip


@pytest.mark.parametrize("impl", MLP_IMPLS)
@pytest.mark.parametrize("model, n", [pytest.param(m, n, id=f"{m}-N{n}") for m in SHAPES for n in ROWS])
def test_decode_mlp(benchmark, model: str, n: int, impl: str) -> None:
    t = _mlp_tensors(model, n)
    x = t.pop("x")
    if impl == "bare":
        call = lambda: F.linear(F.silu(F.linear(x, t["w_gate"])) * F.linear(x, t["w_up"]), t["w_down"])
    else:
        h, i = SHAPES[model]
        cfg = dataclasses.replace(select_config(n, h, i, DTYPE, num_sms(DEVICE)), decode=impl)
        call = lambda: lora_mlp(x, **t, config=cfg)

    def run() -> None:
        with torch.no_grad():
            call()
        sync()

    benchmark.group = f"decode MLP {model}-N{n}"
    benchmark.extra_info.update(impl=impl, device=device_name(), dtype=str(DTYPE))
    benchmark.pedantic(run, rounds=200 if CUDA else 20, iterations=1, warmup_rounds=5)
    if benchmark.stats is not None:  # None under --benchmark-disable
        _mlp.setdefault(f"{model}-N{n}", {})[impl] = benchmark.stats.stats.median


def _model_with_adapter(name: str, written: bool):
    """The random-weight model (kept while the same name is asked for), bare or with a written adapter."""
    if _state.get("name") != name:
        if "fw" in _state:
            _state.pop("fw").detach()
        _state.clear()
        _state.update(name=name, model=random_model(name, DTYPE))
    model = _state["model"]
    if written and "fw" not in _state:
        fw = FastWeights(model)
        fw.write_examples(flashcard_examples(512, model.config.vocab_size), RECIPES["paper"])
        _state["fw"] = fw
    if not written and "fw" in _state:
        _state.pop("fw").detach()
    return model


@pytest.mark.parametrize("model_name, impl", [pytest.param(m, k, id=f"{m}-{k}") for m in TOKEN_MODELS
                                               for k in TOKEN_IMPLS])  # fmt: skip
def test_decode_tokens(benchmark, monkeypatch, model_name: str, impl: str) -> None:
    model = _model_with_adapter(model_name, written=impl != "bare")
    if impl.startswith("adapter-"):
        monkeypatch.setenv("TMEM_DECODE_PATH", impl.split("-")[1])
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(DEVICE)

    def generate() -> torch.Tensor:
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)  # fmt: skip
        sync()
        return out

    benchmark.group = f"decode {NEW_TOKENS} tokens {model_name}"
    benchmark.extra_info.update(impl=impl, device=device_name(), dtype=str(DTYPE))
    out = benchmark.pedantic(generate, rounds=3 if CUDA else 2, iterations=1, warmup_rounds=1)
    assert out.shape == (1, PROMPT + NEW_TOKENS)
    if benchmark.stats is not None:
        _tok.setdefault(model_name, {})[impl] = benchmark.stats.stats.median / NEW_TOKENS


def summary_lines() -> list[str]:
    """The side-by-side table (empty when nothing ran); printed by benchmarks/conftest.py."""
    if not (_mlp or _tok):
        return []
    _, peak_bw = device_peaks(DTYPE)
    elt = torch.finfo(DTYPE).bits // 8
    lines = ["", f"decode, one MLP call (inference), rank {RANK}, {DTYPE}, on {device_name()}: median us"]
    lines.append(f"{'case':<18}" + "".join(f"{k:>10}" for k in MLP_IMPLS) + "   winner   overhead vs bare"
                 + ("   share of bandwidth bound" if peak_bw else ""))  # fmt: skip
    for case, r in _mlp.items():
        row = f"{case:<18}" + "".join(f"{r[k] * 1e6:10.1f}" if k in r else f"{'-':>10}" for k in MLP_IMPLS)
        sides = {k: v for k, v in r.items() if k != "bare"}
        winner = min(sides, key=sides.get) if sides else "-"
        over = ", ".join(f"{k} {100 * (v / r['bare'] - 1):+.0f}%" for k, v in sides.items()) if "bare" in r else ""
        row += f"   {winner:<8} {over}"
        if peak_bw:
            h, i = SHAPES[case.split("-N")[0]]
            bound = 3 * h * i * elt / peak_bw
            row += "   " + ", ".join(f"{k} {100 * bound / v:.0f}%" for k, v in r.items())
        lines.append(row)
    if _tok:
        lines += ["", f"decode, greedy, {NEW_TOKENS} new tokens, batch 1: median ms per token "
                  "(goal: adapter <= 1.10x bare)"]  # fmt: skip
        for model, r in _tok.items():
            ratios = ", ".join(f"{k} {v / r['bare']:.2f}x" for k, v in r.items() if k != "bare" and "bare" in r)
            times = "".join(f" {k} {v * 1e3:.2f}" for k, v in r.items())
            lines.append(f"{model:<10}{times}   vs bare: {ratios}")
    return lines


@pytest.fixture(scope="module", autouse=True)
def _release_model():
    yield
    if "fw" in _state:
        _state.pop("fw").detach()
    _state.clear()
