"""FastWeights on tiny random-weight models: parity with PEFT, exactness of attach/reset/detach, bad input.

The models live on the `device` fixture's device (conftest.py): CUDA on a GPU machine (the Triton backend
then runs the compiled kernels), else the CPU (Triton under its interpreter, and the native extension).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from tmem_kernels.ops import available
from tmem_runtime import (
    AdapterFileError,
    FastWeights,
    ModelNotSupportedError,
    NonFiniteLossError,
    load_model,
)
from tmem_runtime.examples import write_schedule
from tmem_runtime.recipes import Recipe

# the native extension is a CPU backend: on a CUDA machine the models (and so these tests) are on the GPU
KERNEL_BACKENDS = [b for b in ("torch", "native", "triton") if available(b)
                   and not (b == "native" and torch.cuda.is_available())]  # fmt: skip


def make_batch(seed: int = 0, rows: int = 3, width: int = 23, shared: int = 7) -> dict[str, torch.Tensor]:
    """Right-padded rows sharing a `shared`-token prefix, loss on the tail of each row."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 500, (rows, width), generator=gen)
    ids[:, :shared] = ids[0, :shared]
    mask = torch.ones_like(ids)
    for r in range(1, rows):
        mask[r, width - 2 * r :] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[:, : shared + 2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(params=["tiny-llama", "tiny-qwen3"])
def tiny(request, device):
    model, _ = load_model(request.param)
    return model.to(device)


def logits(model, batch):
    with torch.no_grad():
        ids, mask = batch["input_ids"].to(model.device), batch["attention_mask"].to(model.device)
        return model(input_ids=ids, attention_mask=mask).logits


def assert_matrices_close(got: dict, want: dict, rtol: float) -> None:
    """Per-matrix relative Frobenius error: AdamW normalises each element's step, so a gradient that is
    ~0 for one element can flip its few-ulp-level sign between two exact paths; the matrix still agrees."""
    for name in want:
        err = (got[name] - want[name]).norm() / want[name].norm().clamp_min(1e-12)
        assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol:.0e}"


def run_write(model, backend, batches, **kw):
    fw = FastWeights(model, backend=backend, **kw.pop("attach", {}))
    try:
        losses = fw.write(batches, **kw)
        return losses, fw.state_dict()
    finally:
        fw.detach()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("optimizer,lr,rtol", [("sgd", 0.5, 1e-5), ("adamw", 1e-2, 1e-4)])
def test_losses_and_final_b_match_peft(tiny, backend, optimizer, lr, rtol):
    if backend == "triton" and (optimizer != "sgd" or tiny.config.model_type != "llama"):
        pytest.skip("Triton runs under the interpreter on CPU: one model x optimizer keeps the suite fast")
    batches = [make_batch(0), make_batch(1)] * 6  # 12 steps, trunk cached per batch object
    fast, fast_state = run_write(tiny, backend, batches, lr=lr, optimizer=optimizer)
    ref, ref_state = run_write(tiny, "peft", batches, lr=lr, optimizer=optimizer)
    assert len(fast) == len(ref) == 12
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(ref), rtol=rtol, atol=0)
    assert fast[-1] < fast[0]
    assert_matrices_close(fast_state, ref_state, rtol * 10)


@pytest.mark.skipif(not available("triton"), reason="Triton is not installed")
def test_triton_sgd_write_steps_b_inside_the_backward(tiny):
    """Plain SGD on the Triton backend: the backward kernel applies B -= lr * dB, so the gradient
    buffer is never written (no dB materialised) while B moves (its parity with PEFT is tested above)."""
    if tiny.config.model_type != "llama":
        pytest.skip("Triton runs under the interpreter on CPU: one model keeps the suite fast")
    fw = FastWeights(tiny, backend="triton")
    fw.write([make_batch(0), make_batch(1)] * 2, lr=0.5, optimizer="sgd")
    assert torch.count_nonzero(fw.grad) == 0
    assert torch.count_nonzero(fw.buffer[: fw.layout.b_numel]) > 0
    fw.write([make_batch(0)], lr=0.5, optimizer="sgd", weight_decay=0.1)  # weight decay: the fused update
    assert torch.count_nonzero(fw.grad) > 0
    fw.detach()


def test_train_a_matches_peft(tiny):
    batches = [make_batch(2)] * 10
    fast, fast_state = run_write(tiny, "torch", batches, lr=1e-2, optimizer="adamw", train_a=True)
    ref, ref_state = run_write(tiny, "peft", batches, lr=1e-2, optimizer="adamw", train_a=True)
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(ref), rtol=1e-4, atol=0)
    assert_matrices_close(fast_state, ref_state, 1e-3)


@pytest.mark.parametrize("init", ["svd", "random", "pissa"])
def test_fresh_attach_reset_and_detach_are_exact(tiny, init):
    batch = make_batch(3)
    bare = logits(tiny, batch)
    weights = {k: v.clone() for k, v in tiny.state_dict().items()}
    fw = FastWeights(tiny, init=init, backend="torch")
    if init != "pissa":  # B = 0: bit-identical to the bare model
        assert torch.equal(logits(tiny, batch), bare)
    else:  # residual + B A reconstructs W up to rounding
        torch.testing.assert_close(logits(tiny, batch), bare, rtol=1e-4, atol=1e-4)
    fw.write([batch] * 3, lr=1e-2, optimizer="adamw")
    assert not torch.allclose(logits(tiny, batch), bare)
    fw.reset()
    if init != "pissa":
        assert torch.equal(logits(tiny, batch), bare)
    fw.detach()
    assert torch.equal(logits(tiny, batch), bare)
    for k, v in tiny.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_svd_init_is_top_singular_directions(tiny):
    fw = FastWeights(tiny, backend="torch")
    sd = fw.state_dict()
    layer = fw.mlps[-1][0]
    w = tiny.model.layers[layer].mlp.down_proj.weight.float()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    a = sd[f"layers.{layer}.mlp.down_proj.lora_A"]
    torch.testing.assert_close(a.abs(), (s[:6, None] * vh[:6]).abs(), rtol=1e-4, atol=1e-5)
    assert all(v.abs().max() == 0 for k, v in sd.items() if k.endswith("lora_B"))
    assert sorted({int(k.split(".")[1]) for k in sd}) == list(range(2, 6))
    fw.detach()


def test_writes_accumulate_and_hot_swap_keeps_buffers(tiny):
    fw = FastWeights(tiny, backend="torch")
    ptr = fw.buffer.data_ptr()
    first = fw.write([make_batch(4)] * 3, lr=1e-2, optimizer="adamw")
    session_a = fw.state_dict()
    second = fw.write([make_batch(4)] * 3, lr=1e-2, optimizer="adamw")
    assert second[0] < first[0]  # started from the first write's adapter
    session_b = fw.state_dict()
    fw.load_state_dict(session_a)
    assert fw.buffer.data_ptr() == ptr
    assert all(torch.equal(fw.state_dict()[k], session_a[k]) for k in session_a)
    fw.load_state_dict(session_b)
    assert all(torch.equal(fw.state_dict()[k], session_b[k]) for k in session_b)
    fw.detach()


def test_save_load_roundtrip_and_bad_files(tiny, tmp_path):
    fw = FastWeights(tiny, backend="torch")
    fw.write([make_batch(5)] * 2, lr=1e-2, optimizer="adamw")
    saved = fw.state_dict()
    path = tmp_path / "session.safetensors"
    fw.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["session.safetensors"]  # no temp file left
    fw.reset()
    fw.load(path)
    assert all(torch.equal(fw.state_dict()[k], saved[k]) for k in saved)

    before = fw.state_dict()
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(path.read_bytes()[:100])
    with pytest.raises(AdapterFileError, match="cannot read"):
        fw.load(corrupt)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterFileError):
        fw.load(garbage)
    fw.detach()
    other = FastWeights(tiny, rank=4, backend="torch")
    with pytest.raises(AdapterFileError, match="rank"):
        other.load(path)
    other.detach()
    fw = FastWeights(tiny, backend="torch")
    bad_state = dict(saved)
    bad_state[next(iter(bad_state))] = torch.full_like(bad_state[next(iter(bad_state))], float("nan"))
    with pytest.raises(AdapterFileError, match="finite"):
        fw.load_state_dict(bad_state)
    assert all(torch.equal(fw.state_dict()[k], FastWeights.state_dict(fw)[k]) for k in before)
    fw.detach()


def test_nan_loss_and_nan_update_roll_back(tiny):
    fw = FastWeights(tiny, backend="torch")
    fw.write([make_batch(6)] * 2, lr=1e-2, optimizer="adamw")
    good = fw.state_dict()
    with pytest.raises(NonFiniteLossError, match="non-finite update"):
        fw.write([make_batch(6)], lr=float("inf"), optimizer="sgd")
    assert all(torch.equal(fw.state_dict()[k], good[k]) for k in good)
    with torch.no_grad():
        tiny.model.embed_tokens.weight[:] = float("nan")
    with pytest.raises(NonFiniteLossError, match="loss nan"):
        fw.write([make_batch(6)], lr=1e-2, optimizer="adamw")
    assert all(torch.equal(fw.state_dict()[k], good[k]) for k in good)
    fw.detach()


def test_bad_batches_and_arguments(tiny):
    fw = FastWeights(tiny, backend="torch")
    batch = make_batch(7)
    with pytest.raises(ValueError, match="shapes differ"):
        fw.write([{**batch, "labels": batch["labels"][:, :-1]}])
    with pytest.raises(ValueError, match="no trainable token"):
        fw.write([{**batch, "labels": torch.full_like(batch["labels"], -100)}])
    with pytest.raises(ValueError, match="missing"):
        fw.write([{"input_ids": batch["input_ids"]}])
    with pytest.raises(ValueError, match="optimizer"):
        fw.write([batch], optimizer="lion")
    assert fw.write([]) == []
    assert fw.write_examples([], Recipe()) == []
    with pytest.raises(RuntimeError, match="already has fast weights"):
        FastWeights(tiny)
    fw.detach()
    with pytest.raises(ValueError, match="rank 100 exceeds"):
        FastWeights(tiny, rank=100)
    with pytest.raises(ValueError, match="init"):
        FastWeights(tiny, init="lora-fa")


def test_left_padded_batch_uses_generic_path_with_same_result(tiny):
    batch = make_batch(8)
    left = {k: torch.flip(v, dims=[1]) for k, v in batch.items()}  # not a language, just left padding
    fast, _ = run_write(tiny, "torch", [left] * 3, lr=1e-2, optimizer="adamw")
    ref, _ = run_write(tiny, "peft", [left] * 3, lr=1e-2, optimizer="adamw")
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(ref), rtol=1e-5, atol=0)


def test_model_without_targets_is_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ModelNotSupportedError, match="decoder-layer list"):
        FastWeights(gpt2)
    model, _ = load_model("tiny-llama")
    model.model.layers[-1].mlp = nn.Sequential(nn.Linear(72, 72))
    with pytest.raises(ModelNotSupportedError, match="gate_proj"):
        FastWeights(model)


def test_write_schedule_is_seeded_epochs_of_batches():
    steps = write_schedule(20, Recipe(epochs=3, batch_size=8), seed=1)
    assert [len(s) for s in steps] == [8, 8, 4] * 3
    for e in range(3):
        assert sorted(i for s in steps[3 * e : 3 * e + 3] for i in s) == list(range(20))
    assert steps == write_schedule(20, Recipe(epochs=3, batch_size=8), seed=1)
    assert steps != write_schedule(20, Recipe(epochs=3, batch_size=8), seed=2)
    assert write_schedule(0, Recipe()) == []
