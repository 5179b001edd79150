"""FastWeights on tiny random-weight models: parity with PEFT, exactness of attach/reset/detach, bad input.

The models live on the `device` fixture's device (conftest.py): CUDA on a GPU machine (the Triton backend
then runs the compiled kernels), else the CPU (Triton under its interpreter, and the native extension).
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from tmem_kernels.ops import available
from tmem_kernels.reference import sgd_step_ as ref_sgd
from tmem_runtime import (
    AdapterFileError,
    DivergedWriteError,
    FastWeights,
    FastWeightsError,
    ModelNotSupportedError,
    NonFiniteLossError,
    SessionPool,
    load_model,
)
from tmem_runtime.examples import qa_example, write_schedule
from tmem_runtime.fast_weights import fast_weights_of
from tmem_runtime.models import tiny_config
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
    fw = FastWeights(tiny, backend="triton", cuda_graphs=False)  # counts Python calls: a graph replays without them
    engine = fw.store.engine
    calls = []
    engine.ops = replace(engine.ops, sgd_step_=lambda *a, **k: (calls.append(1), engine.ops.sgd_step_)[0])
    fw.write([make_batch(0), make_batch(1)] * 2, lr=0.5, optimizer="sgd")
    assert calls == []  # no optimizer step ran ...
    assert torch.count_nonzero(engine.b[0]) > 0  # ... yet B moved: the backward kernel stepped it
    engine.ops = replace(engine.ops, sgd_step_=lambda *a, **k: calls.append(1) or ref_sgd(*a, **k))
    fw.write([make_batch(0)], lr=0.5, optimizer="sgd", weight_decay=0.1)  # weight decay: the fused update
    assert calls == [1]
    fw.detach()


def test_train_a_matches_peft(tiny):
    batches = [make_batch(2)] * 10
    fast, fast_state = run_write(tiny, "torch", batches, lr=1e-2, optimizer="adamw", train_a=True)
    ref, ref_state = run_write(tiny, "peft", batches, lr=1e-2, optimizer="adamw", train_a=True)
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(ref), rtol=1e-4, atol=0)
    assert_matrices_close(fast_state, ref_state, 1e-3)


def test_reset_after_a_train_a_write_keeps_a_on_both_paths(tiny):
    """reset() puts B back to B0 and leaves a trained A as it is; the PEFT reference put A back to A0 too, so after
    a train_a write and a reset the two paths held different adapters."""
    batches = [make_batch(2)] * 4
    states = {}
    for backend in ("torch", "peft"):
        fw = FastWeights(tiny, backend=backend)
        a0 = fw.state_dict()
        fw.write(batches, lr=1e-2, optimizer="adamw", train_a=True)
        trained = fw.state_dict()
        fw.reset()
        states[backend] = state = fw.state_dict()
        fw.detach()
        for k in state:
            assert torch.equal(state[k], trained[k] if k.endswith("lora_A") else a0[k]), f"{backend}: {k}"
        assert any(not torch.equal(state[k], a0[k]) for k in state if k.endswith("lora_A"))
    assert_matrices_close(states["torch"], states["peft"], 1e-3)


@pytest.mark.parametrize("backend", ["torch", "peft"])
def test_an_adapter_whose_a_was_trained_loads_into_fresh_fast_weights(tiny, tmp_path, backend):
    """A file saved after a train_a write loads into a fresh FastWeights of either backend (same logits), and a
    state saved before it swaps back in (A0 again); the fast path refused both (its A differs from the A0 a
    pool's sessions share), so such an adapter could never be loaded again, where the PEFT path loaded it. A
    pool of several sessions still refuses another A for one of them (they share A), changing nothing."""
    batch = make_batch(2)
    fw = FastWeights(tiny, backend=backend)
    start = fw.state_dict()
    fw.write([batch] * 4, lr=1e-2, optimizer="adamw", train_a=True)
    trained, want = fw.state_dict(), logits(tiny, batch)
    fw.save(tmp_path / "trained.safetensors")
    fw.load_state_dict(start)
    assert all(torch.equal(fw.state_dict()[k], start[k]) for k in start)
    fw.detach()
    for load_backend in ("torch", "peft"):
        fw = FastWeights(tiny, backend=load_backend)
        fw.load(tmp_path / "trained.safetensors")
        assert all(torch.equal(fw.state_dict()[k], trained[k]) for k in trained)
        torch.testing.assert_close(logits(tiny, batch), want, rtol=1e-5, atol=1e-5)
        fw.detach()
    pool = SessionPool(tiny, capacity=2, backend="torch")
    pool.open("a"), pool.open("b")
    fresh = pool.state_dict("a")
    with pytest.raises(ValueError, match="A, which every session shares"):
        pool.load_state_dict("a", trained)
    with pytest.raises(ValueError, match="open sessions share"):
        pool.load_state_dict("a", trained, own_a=True)
    assert all(torch.equal(pool.state_dict("a")[k], fresh[k]) for k in fresh)
    pool.detach()


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
    atol = 1e-5 if w.device.type == "cpu" else 1e-4  # two different SVD solvers on a GPU (measured 2.8e-5 on H200)
    torch.testing.assert_close(a.abs(), (s[:6, None] * vh[:6]).abs(), rtol=1e-4, atol=atol)
    assert all(v.abs().max() == 0 for k, v in sd.items() if k.endswith("lora_B"))
    assert sorted({int(k.split(".")[1]) for k in sd}) == list(range(2, 6))
    fw.detach()


def test_writes_accumulate_and_hot_swap_keeps_buffers(tiny):
    fw = FastWeights(tiny, backend="torch")
    ptr = fw.store.engine.b.data_ptr()
    first = fw.write([make_batch(4)] * 3, lr=1e-2, optimizer="adamw")
    session_a = fw.state_dict()
    second = fw.write([make_batch(4)] * 3, lr=1e-2, optimizer="adamw")
    assert second[0] < first[0]  # started from the first write's adapter
    session_b = fw.state_dict()
    fw.load_state_dict(session_a)
    assert fw.store.engine.b.data_ptr() == ptr
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
    other = FastWeights(tiny, num_layers=2, backend="torch")  # other layers (so other weights): named as layers
    with pytest.raises(AdapterFileError, match="layers="):
        other.load(path)
    other.detach()
    fw = FastWeights(tiny, backend="torch")
    fresh = fw.state_dict()
    b_name = next(k for k in saved if k.endswith("lora_B"))
    a_name = next(k for k in saved if k.endswith("lora_A"))
    with pytest.raises(AdapterFileError, match="finite"):
        fw.load_state_dict({**saved, b_name: torch.full_like(saved[b_name], float("nan"))})
    with pytest.raises(AdapterFileError, match="finite"):  # (its own A loads: a train_a write's, finite)
        fw.load_state_dict({**saved, a_name: torch.full_like(saved[a_name], float("inf"))})
    with pytest.raises(AdapterFileError, match="shape"):
        fw.load_state_dict({**saved, a_name: saved[a_name][:, 1:]})
    assert before.keys() == fresh.keys() and all(torch.equal(fw.state_dict()[k], fresh[k]) for k in fresh)
    fw.detach()


def test_a_file_name_of_255_bytes_saves(tiny, tmp_path):
    fw = FastWeights(tiny, backend="torch")
    fw.write([make_batch(5)], lr=1e-2, optimizer="adamw")
    path = tmp_path / ("n" * 243 + ".safetensors")  # the longest name a file may have
    fw.save(path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    fw.load(path)
    fw.detach()


def test_a_save_flushes_the_file_then_its_directory_entry(tiny, tmp_path, monkeypatch):
    """Durable against power loss, not only a killed process: the file's bytes are fsynced before the
    rename, and its directory after it (the rename is a directory entry)."""
    import os
    import stat

    from tmem_runtime import adapter_file

    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(adapter_file.os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_mode), real_fsync(fd)))
    fw = FastWeights(tiny, backend="torch")
    fw.save(tmp_path / "a.safetensors")
    assert [stat.S_ISREG(m) for m in synced] == [True, False] and stat.S_ISDIR(synced[1])
    fw.detach()


def test_a_damaged_file_is_refused_and_a_file_without_a_checksum_still_loads(tiny, tmp_path):
    """A bit flipped in a tensor's bytes (still a finite number) fails the file's data checksum; a file
    written before files had one loads as before."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    fw = FastWeights(tiny, backend="torch")
    fw.write([make_batch(5)] * 2, lr=1e-2, optimizer="adamw")
    saved = fw.state_dict()
    path = tmp_path / "session.safetensors"
    fw.save(path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01  # the last tensor's bytes: a mantissa bit of a float32, still finite
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(raw))
    fw.reset()
    with safe_open(str(damaged), framework="pt") as f:  # the damage is finite: only the checksum sees it
        assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())
        meta = f.metadata()
    with pytest.raises(AdapterFileError, match="corrupt"):
        fw.load(damaged)
    assert all(not v.any() for k, v in fw.state_dict().items() if k.endswith("lora_B"))  # still reset
    old = tmp_path / "old.safetensors"
    save_file(saved, str(old), metadata={k: v for k, v in meta.items() if k != "data_sha256"})
    fw.load(old)
    assert all(torch.equal(fw.state_dict()[k], saved[k]) for k in saved)
    fw.detach()


def test_a_file_of_another_dtype_is_refused_naming_both(tmp_path):
    model, _ = load_model("tiny-llama", seed=3)
    fw = FastWeights(model, backend="torch")
    fw.write([make_batch(0)] * 2, lr=1e-2, optimizer="adamw")
    fw.save(tmp_path / "session.safetensors")
    fw.detach()
    half = FastWeights(model.to(torch.bfloat16), backend="torch")
    with pytest.raises(AdapterFileError, match="in float32, and this model's are bfloat16"):
        half.load(tmp_path / "session.safetensors")
    half.detach()


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


def test_an_update_past_the_models_float16_range_rolls_back():
    """A float16 model's B is finite in its float32 master but not in the float16 copy its forwards read
    (|B| > 65504): a non-finite update, rolled back, not a session whose every read gives inf / NaN."""
    model, _ = load_model("tiny-llama", seed=3)
    fw = FastWeights(model.half(), backend="torch")
    good = fw.state_dict()
    with pytest.raises(NonFiniteLossError, match="non-finite update"):
        fw.write([make_batch(6)], lr=1e8, optimizer="sgd")
    assert all(torch.equal(fw.state_dict()[k], good[k]) for k in good)
    engine = fw.store.engine
    assert torch.isfinite(engine.b_compute).all() and torch.isfinite(engine.a_compute).all()
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
    with pytest.raises(ValueError, match=r"invalid recipe: lr=nan \(must be > 0\)$"):  # names what is wrong
        fw.write([batch], lr=float("nan"))
    # what the embedding, the loss or the trunk would fail on deep inside the write, each said plainly
    vocab = tiny.config.vocab_size
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    for bad, error, match in (
        ({**batch, "input_ids": ids.float()}, TypeError, "input_ids must hold integers"),
        ({**batch, "labels": ids.tolist()}, TypeError, "labels must be a torch.Tensor"),
        ({**batch, "input_ids": ids.masked_fill(ids == ids[0, 9], vocab)}, ValueError, f"input id {vocab} is outside"),
        ({**batch, "input_ids": ids.masked_fill(ids == ids[0, 9], -1)}, ValueError, "input id -1 is outside"),
        ({**batch, "labels": labels.masked_fill(labels == labels[0, -1], vocab + 3)}, ValueError, f"label {vocab + 3}"),
        ({**batch, "labels": labels.masked_fill(labels == labels[0, -1], -5)}, ValueError, "label -5 is neither"),
        ({**batch, "attention_mask": mask.index_fill(0, torch.tensor([1]), 0)}, ValueError, r"rows \[1\] have no"),
    ):
        with pytest.raises(error, match=match):
            fw.write([batch, bad], lr=1e-2)
    with pytest.raises(TypeError, match="one batch: wrap it"):
        fw.write(batch)
    assert fw.stats.writes == 0
    assert all(v.abs().sum() == 0 for k, v in fw.state_dict().items() if k.endswith("lora_B"))
    assert fw.write([]) == []
    assert fw.write_examples([], Recipe()) == []
    # load_model("tiny-llama") gives no tokenizer (None): a flashcard or text write says so
    for write in (lambda: fw.write_qa(None, [("Q?", "A")]), lambda: fw.write_text(None, ["Some text."])):
        with pytest.raises(TypeError, match="need the model's tokenizer, got None"):
            write()
    assert fw.stats.writes == 0
    with pytest.raises(RuntimeError, match="already has fast weights"):
        FastWeights(tiny)
    fw.detach()
    with pytest.raises(ValueError, match="rank 100 exceeds"):
        FastWeights(tiny, rank=100)
    with pytest.raises(ValueError, match="init"):
        FastWeights(tiny, init="lora-fa")


def test_a_rank_or_scaling_of_the_wrong_kind_is_refused_at_attach(tiny):
    """rank=6.0 failed deep inside the init (a torch TypeError about zeros()); scaling=inf attached, and every
    write then reported a NaN loss. Both are refused before anything is attached."""
    batch = make_batch(0)
    want = logits(tiny, batch)
    for rank in (6.0, "6", True):
        with pytest.raises(TypeError, match="rank must be an int"):
            FastWeights(tiny, rank=rank)
    for scaling in (float("inf"), float("nan"), "1"):
        with pytest.raises(ValueError, match="scaling must be a finite number"):
            FastWeights(tiny, backend="torch", scaling=scaling)
    torch.testing.assert_close(logits(tiny, batch), want, rtol=0, atol=0)
    fw = FastWeights(tiny, backend="torch", scaling=2)  # (an int scaling is a number too)
    losses = fw.write([batch] * 2, lr=0.5)
    assert losses[1] < losses[0]
    fw.detach()


def test_left_padded_batch_uses_generic_path_with_same_result(tiny):
    batch = make_batch(8)
    left = {k: torch.flip(v, dims=[1]) for k, v in batch.items()}  # not a language, just left padding
    fast, _ = run_write(tiny, "torch", [left] * 3, lr=1e-2, optimizer="adamw")
    ref, _ = run_write(tiny, "peft", [left] * 3, lr=1e-2, optimizer="adamw")
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(ref), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", [*(b for b in KERNEL_BACKENDS if b != "triton"), "peft"])  # (one check for all)
def test_int32_and_int16_token_ids_and_labels_write_as_int64_ones(tiny, backend):
    """Token ids and labels of any integer dtype (int32 from numpy or another tokenizer library) write as
    int64 ones do, right or left padded (they failed deep in the loss: "targets must be int64")."""
    right = make_batch(11)
    left = {k: torch.flip(v, dims=[1]) for k, v in right.items()}
    for batch in (right, left):
        want, b_want = run_write(tiny, backend, [batch] * 2, lr=1e-2, optimizer="adamw")
        for dtype in (torch.int32, torch.int16):
            narrow = {k: v.to(dtype) for k, v in batch.items()}
            got, b_got = run_write(tiny, backend, [narrow] * 2, lr=1e-2, optimizer="adamw")
            assert got == want
            assert all(torch.equal(b_got[k], b_want[k]) for k in b_want)


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


# ------------------------------------------------------------------------------------------------
# Ordinary use from outside (issue 8): each of these broke when a new user tried it.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_base_weights_that_require_grad_are_constants_to_a_write(backend, device):
    """A model built the ordinary way (every parameter requires grad): the write works, touches no
    flag and leaks nothing into any base weight's .grad (an RL policy trains those same weights)."""
    torch.manual_seed(0)
    config = tiny_config("tiny-llama")
    model = LlamaForCausalLM(config).to(device)
    assert all(p.requires_grad for p in model.parameters())
    reference, _ = load_model("tiny-llama", device=device)
    reference.load_state_dict(model.state_dict())
    batches = [make_batch(0), make_batch(1)] * 2
    fw = FastWeights(model, backend=backend)
    losses = fw.write(batches, lr=0.5, optimizer="sgd")
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    fw.detach()
    want, _ = run_write(reference, backend, batches, lr=0.5, optimizer="sgd")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want), rtol=1e-6, atol=0)


def test_outside_a_write_base_weights_still_get_their_gradient():
    """With fast weights attached, a policy's forward/backward (not a write) still trains the base."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config("tiny-llama"))
    fw = FastWeights(model, backend="native" if available("native") else "torch")
    fw.write([make_batch(0)] * 2, lr=1e-2, optimizer="adamw")
    batch = make_batch(1)
    model(**batch).loss.backward()
    down = model.model.layers[-1].mlp.down_proj.weight
    assert down.grad is not None and down.grad.abs().sum() > 0
    fw.detach()


def test_peft_reference_restores_requires_grad_flags():
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config("tiny-llama"))
    fw = FastWeights(model, backend="peft")
    fw.detach()
    assert all(p.requires_grad for p in model.parameters())


def test_deepcopy_gives_an_independent_model_with_its_own_fast_weights(tiny):
    fw = FastWeights(tiny, backend="torch")
    fw.write([make_batch(0)] * 3, lr=1e-2, optimizer="adamw")
    batch = make_batch(1)
    before = logits(tiny, batch)
    twin = copy.deepcopy(tiny)
    twin_fw = fast_weights_of(twin)
    assert twin_fw is not fw and twin_fw.store.engine.b.data_ptr() != fw.store.engine.b.data_ptr()
    assert torch.equal(logits(twin, batch), before)  # same state
    twin_fw.write([make_batch(2)] * 3, lr=1e-2, optimizer="adamw")
    assert torch.equal(logits(tiny, batch), before)  # the original did not move
    assert not torch.equal(logits(twin, batch), before)
    fw.reset()
    assert not torch.equal(logits(twin, batch), logits(tiny, batch))
    twin_fw.detach()
    fw.detach()


def test_bf16_model_on_cpu_picks_a_backend_that_runs_it():
    model, _ = load_model("tiny-llama", dtype=torch.bfloat16)
    fw = FastWeights(model)
    assert fw.backend == "torch"
    losses = fw.write([make_batch(0)] * 3, lr=1e-2, optimizer="adamw")
    assert losses[-1] < losses[0]
    assert fw.store.engine.b.dtype == torch.float32  # the master copy, whatever the model's dtype
    fw.detach()
    if available("native"):
        with pytest.raises(ValueError, match="native.*float32"):
            FastWeights(model, backend="native")


def test_auto_on_cuda_picks_the_torch_composition_for_one_session_and_triton_for_a_pool():
    """The dispatch rule (backends.py; measured on an H200: benchmarks/RESULTS-gpu.md). A rule on names: no
    CUDA tensor is made, so it holds here as on a GPU."""
    from tmem_runtime.backends import resolve_backend

    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda, torch.bfloat16, 6, sessions=1) == "torch"
    assert resolve_backend("auto", cuda, torch.bfloat16, 6, sessions=64) == ("triton" if available("triton")
                                                                            else "torch")  # fmt: skip
    assert resolve_backend("auto", cuda, torch.bfloat16, 32, sessions=64) == "torch"  # above Triton's rank 16


def test_a_rank_above_a_kernels_limit_picks_a_backend_that_runs_it(device):
    """Triton's kernels take rank <= 16 and the native ones <= 64: "auto" picks a backend that runs the
    rank asked for (rank 32 on CUDA used to attach Triton and fail at the first write), and an explicit
    backend that cannot is refused at construction, the model left bare."""
    from tmem_kernels.ops import get_ops

    model, _ = load_model("tiny-llama")
    model.to(device)
    fw = FastWeights(model, rank=32, num_layers=1)
    assert fw.backend != "triton"
    losses = fw.write([make_batch(0)] * 2, lr=0.5)
    assert losses[1] < losses[0]
    fw.detach()
    for backend in KERNEL_BACKENDS:
        limit = get_ops(backend).max_rank
        if limit is not None:
            with pytest.raises(ValueError, match=f"rank <= {limit}"):
                FastWeights(model, rank=limit + 1, num_layers=1, backend=backend)
            assert fast_weights_of(model) is None

def test_adapter_files_move_between_directories_and_hosts(tmp_path):
    model, _ = load_model("tiny-llama", seed=3)
    for name in ("here", "there"):
        model.save_pretrained(tmp_path / name)
    a, _ = load_model("tiny-llama", seed=3)  # unused: a third copy of the same weights
    del a
    first = AutoModelForCausalLM.from_pretrained(tmp_path / "here")
    second = AutoModelForCausalLM.from_pretrained(tmp_path / "there")
    fw = FastWeights(first, backend="torch")
    fw.write([make_batch(0)] * 2, lr=1e-2, optimizer="adamw")
    fw.save(tmp_path / "session.safetensors")
    other = FastWeights(second, backend="torch")
    other.load(tmp_path / "session.safetensors")
    assert all(torch.equal(other.state_dict()[k], v) for k, v in fw.state_dict().items())
    different, _ = load_model("tiny-llama", seed=4)
    stranger = FastWeights(different, backend="torch")
    with pytest.raises(AdapterFileError, match="different base weights"):
        stranger.load(tmp_path / "session.safetensors")
    for f in (fw, other, stranger):
        f.detach()


def test_a_file_of_another_scaling_is_refused_and_changes_nothing(tiny, tmp_path):
    """B trained at one scaling means another adapter at another (the delta is scaling * B A): a file
    saved at scaling 1 is refused by fast weights attached with scaling 2, which keep their own B."""
    fw = FastWeights(tiny, backend="torch")
    fw.write([make_batch(0)] * 2, lr=1e-2, optimizer="adamw")
    fw.save(tmp_path / "session.safetensors")
    fw.detach()
    other = FastWeights(tiny, backend="torch", scaling=2.0)
    other.write([make_batch(1)], lr=1e-2, optimizer="adamw")
    before = other.state_dict()
    with pytest.raises(AdapterFileError, match=r"scaling=1\.0; this adapter applies B with scaling=2\.0"):
        other.load(tmp_path / "session.safetensors")
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())
    other.save(tmp_path / "scaled.safetensors")
    other.reset()
    other.load(tmp_path / "scaled.safetensors")  # its own scaling loads
    assert all(torch.equal(other.state_dict()[k], v) for k, v in before.items())
    other.detach()


def test_a_detached_handle_refuses_writes_and_a_second_detach(tiny):
    fw = FastWeights(tiny, backend="torch")
    fw.detach()
    with pytest.raises(FastWeightsError, match="detached"):
        fw.write([make_batch(0)])
    with pytest.raises(FastWeightsError, match="detached"):
        fw.reset()
    with pytest.raises(FastWeightsError, match="already detached"):
        fw.detach()


def test_write_under_inference_mode_works_and_matches(tiny):
    batches = [make_batch(0), make_batch(1)]
    want, want_state = run_write(tiny, "torch", batches, lr=1e-2, optimizer="adamw")
    with torch.inference_mode():
        fw = FastWeights(tiny, backend="torch")
        got = fw.write(batches, lr=1e-2, optimizer="adamw")
        state = fw.state_dict()
        fw.detach()
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-6, atol=0)
    assert all(torch.equal(state[k], want_state[k]) for k in want_state)


@pytest.mark.parametrize("backend", [*KERNEL_BACKENDS, "peft"])
@pytest.mark.parametrize("init", ["svd", "pissa"])
def test_attach_and_write_under_autocast_are_those_without_it(tiny, backend, init):
    """A user's torch.autocast around attach or write changes nothing: the init, the write and its
    numerics are the model's own dtype with B in fp32 on every backend (under autocast the SVD's
    products ran in bf16, and the torch path's write too, while the native ops kept fp32)."""
    if backend == "triton" and tiny.config.model_type != "llama":
        pytest.skip("the Triton write is proven on one family here (interpreter time)")
    batches = [make_batch(0), make_batch(1)]
    want, want_state = run_write(tiny, backend, batches, lr=1e-2, optimizer="adamw", attach={"init": init})
    with torch.autocast(tiny.device.type, dtype=torch.bfloat16):
        got, state = run_write(tiny, backend, batches, lr=1e-2, optimizer="adamw", attach={"init": init})
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-6, atol=0)  # (bit-equal on CPU)
    assert state.keys() == want_state.keys()
    for k in want_state:  # (without the fix B differed by up to 0.24)
        torch.testing.assert_close(state[k], want_state[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "peft"])
def test_fast_weights_attached_under_inference_mode_write_and_load_outside_it(tiny, tmp_path, backend):
    batches = [make_batch(0), make_batch(1)]
    want_losses, _ = run_write(tiny, backend, batches * 2, lr=1e-2, optimizer="adamw")
    with torch.inference_mode():
        fw = FastWeights(tiny, backend=backend)
        losses = fw.write(batches, lr=1e-2, optimizer="adamw")
    losses += fw.write(batches, lr=1e-2, optimizer="adamw")  # (AdamW restarts per write: steps 1-2 again)
    torch.testing.assert_close(torch.tensor(losses[:2]), torch.tensor(want_losses[:2]), rtol=1e-6, atol=0)
    fw.reset()
    with torch.inference_mode():
        fw.write(batches, lr=1e-2, optimizer="adamw")
        want = logits(tiny, batches[0])
        fw.save(tmp_path / "a.safetensors")
        state = fw.state_dict()
    fw.reset()
    fw.load(tmp_path / "a.safetensors")  # outside the mode it was attached in
    torch.testing.assert_close(logits(tiny, batches[0]), want, rtol=0, atol=0)
    fw.reset()
    fw.load_state_dict(state)
    torch.testing.assert_close(logits(tiny, batches[0]), want, rtol=0, atol=0)
    fw.reset()
    with torch.inference_mode():
        fw.load(tmp_path / "a.safetensors")
        torch.testing.assert_close(logits(tiny, batches[0]), want, rtol=0, atol=0)
    fw.detach()


def test_a_model_built_inside_inference_mode_reads_and_swaps_fast_weights_and_refuses_writes(tmp_path):
    """Its weights are inference tensors, which track no version: attaching (the kept trunk rows' stamp), saving
    (the weights' hash) and a packed linear's forward failed on reading it. Now they read as a model of ordinary
    tensors does, and a write is refused clearly (it needs autograd through the weights)."""
    from tmem_runtime.packed_linears import pack_linears

    torch.manual_seed(0)
    with torch.inference_mode():
        model = AutoModelForCausalLM.from_config(tiny_config("tiny-llama")).eval()
    plain = AutoModelForCausalLM.from_config(tiny_config("tiny-llama")).eval()
    plain.load_state_dict(model.state_dict())
    assert model.model.layers[0].mlp.gate_proj.weight.is_inference()
    pack_linears(model)
    fw, ref = FastWeights(model, backend="torch"), FastWeights(plain, backend="torch")
    gen = torch.Generator().manual_seed(1)
    state = {k: torch.randn(v.shape, generator=gen) * 0.05 if k.endswith("lora_B") else v
             for k, v in fw.state_dict().items()}  # fmt: skip
    fw.load_state_dict(state)
    fw.save(tmp_path / "a.safetensors")
    ref.load(tmp_path / "a.safetensors")  # the same weights' hash
    batch = make_batch(0)
    torch.testing.assert_close(logits(model, batch), logits(plain, batch), rtol=1e-5, atol=1e-5)
    with pytest.raises(FastWeightsError, match="inference_mode"):
        fw.write([batch], lr=1e-2)
    torch.testing.assert_close(logits(model, batch), logits(plain, batch), rtol=1e-5, atol=1e-5)


def test_a_diverging_write_is_rolled_back(tiny):
    """The guard's mechanism on a tiny model, whose final norm bounds how far a loss can rise: a tight
    threshold. (The default threshold on the real model: tests/test_smollm2.py.)"""
    fw = FastWeights(tiny, backend="torch")
    fw.write([make_batch(0)] * 30, lr=3e-2, optimizer="adamw")  # loss down from ~6.3 to ~4.9
    good = fw.state_dict()
    tight = Recipe(optimizer="sgd", lr=1e4, divergence_factor=1.1, divergence_margin=0.5)
    with pytest.raises(DivergedWriteError, match="divergence_factor"):
        fw.write([make_batch(0)] * 4, recipe=tight)
    assert all(torch.equal(fw.state_dict()[k], good[k]) for k in good)
    assert fw.stats.rollbacks == 1
    losses = fw.write([make_batch(0)] * 4, recipe=tight.with_(divergence_factor=None))  # the guard off
    assert max(losses) > 1.1 * losses[0] + 0.5
    fw.detach()


@pytest.mark.slow  # the real tokenizer
def test_a_card_too_long_keeps_its_answer_and_is_counted():
    _, tokenizer = load_model("smollm2-135m")
    model, _ = load_model("tiny-llama")
    with torch.no_grad():  # the tiny model's vocabulary is small: map the real tokenizer's ids into it
        model.resize_token_embeddings(len(tokenizer))
    fw = FastWeights(model, backend="torch")
    long_question = "Tell me, after all that was said about the harbour and the boats, " * 20 + "what is it called?"
    pairs = [("What is the boat called?", "Sea Lark"), (long_question, "The Grey Heron")]
    recipe = Recipe(epochs=1, max_length=64)
    with pytest.warns(UserWarning, match="1 flashcard"):
        losses = fw.write_qa(tokenizer, pairs, recipe=recipe)
    assert len(losses) == 1 and fw.stats.truncated_cards == 1 and fw.stats.cards == 2
    ids, labels = qa_example(tokenizer, long_question, "The Grey Heron", max_length=64)
    answer = tokenizer("The Grey Heron" + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert len(ids) <= 64 and ids[-len(answer) :] == answer and labels[-len(answer) :] == answer
    with pytest.raises(ValueError, match="flashcard too long"):
        qa_example(tokenizer, "Q?", "word " * 80, max_length=64)
    fw.detach()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_a_model_cast_after_attach_is_refused_clearly(backend, device):
    """Fast weights are built for the dtype and device the model had at attach (buffers, kernels, file
    identity): after `model.to(torch.bfloat16)` the next write or adapted forward raises FastWeightsError
    and changes nothing. (Before, the native backend failed inside its kernel, and Triton's in-backward
    SGD stepped a temporary copy of B: a write that silently trained nothing.) Cast back, it works."""
    model, _ = load_model("tiny-llama")
    model.to(device)
    fw = FastWeights(model, backend=backend)
    fw.write([make_batch(0)] * 2, lr=0.5)
    state = fw.state_dict()
    model.to(torch.bfloat16)
    with pytest.raises(FastWeightsError, match="cast or moved"):
        fw.write([make_batch(1)] * 2, lr=0.5)
    with pytest.raises(FastWeightsError, match="cast or moved"):
        logits(model, make_batch(1))
    assert all(torch.equal(fw.state_dict()[k], v) for k, v in state.items()) and fw.stats.writes == 1
    model.float()
    losses = fw.write([make_batch(1)] * 2, lr=0.5)
    b_name = next(k for k in state if k.endswith("lora_B"))
    assert losses[1] < losses[0] and not torch.equal(fw.state_dict()[b_name], state[b_name])
    fw.detach()

def test_a_model_cast_after_attach_saves_no_file(tmp_path):
    """A save after `model.to(torch.bfloat16)` wrote a file whose header named the bf16 weights' hash for an adapter
    made on the float32 ones: refused by the model it came from (and by every float32 copy). Now it raises
    FastWeightsError and writes nothing; cast back, the adapter saves and loads as before."""
    model, _ = load_model("tiny-llama")
    fw = FastWeights(model, backend="torch")
    fw.write([make_batch(0)] * 2, lr=0.5)
    model.to(torch.bfloat16)
    with pytest.raises(FastWeightsError, match="cast or moved"):
        fw.save(tmp_path / "a.safetensors")
    assert not any(tmp_path.iterdir())
    model.float()  # (its weights rounded to bf16: the adapter files of the original weights no longer fit)
    want = logits(model, make_batch(1))
    fw.save(tmp_path / "a.safetensors")
    fw.reset()
    fw.load(tmp_path / "a.safetensors")
    torch.testing.assert_close(logits(model, make_batch(1)), want, rtol=0, atol=0)
    fw.detach()


@pytest.mark.slow  # the embedded model's tokenizer
def test_malformed_cards_are_refused_and_any_iterable_of_pairs_is_taken():
    """A card that is not a (question, answer) pair of strings (a dict, None, a number, a 3-tuple, a bare
    string) or holds a lone surrogate is refused with a ValueError naming it, and nothing is trained; pairs
    as lists, or a generator of pairs, train as the same list of tuples. write_text refuses one bare string
    (it trained each character as a text), a text that is not a string, and one that is not valid unicode."""
    _, tokenizer = load_model("smollm2-135m")
    model, _ = load_model("tiny-llama")
    with torch.no_grad():
        model.resize_token_embeddings(len(tokenizer))
    fw = FastWeights(model, backend="torch")
    good = ("What is the boat called?", "Sea Lark")
    recipe = Recipe(epochs=2)
    for bad in ({"q": "Q?", "a": "A"}, ("Q?", None), (None, "A"), (1, 2), ("Q?", "A", "B"), "Q? A", ("Q?",)):
        with pytest.raises(ValueError, match="flashcard 1 is not a"):
            fw.write_qa(tokenizer, [good, bad], recipe=recipe)
        assert fw.stats.writes == 0 and fw.stats.cards == 0
    with pytest.raises(ValueError, match="flashcard 1 is not valid unicode: surrogates not allowed at character 7"):
        fw.write_qa(tokenizer, [good, ("Who is \ud800?", "Ana")], recipe=recipe)  # as json.loads('"\\ud800"') gives
    for texts, match in (
        ("The boat is called Sea Lark.", "a list of strings"),
        (["ok", None], "text 1 is"),
        (["ok", "Sea \udfff Lark"], "text is not valid unicode"),
    ):
        with pytest.raises(ValueError, match=match):
            fw.write_text(tokenizer, texts, recipe=recipe)
    assert fw.stats.writes == 0
    assert all(v.abs().sum() == 0 for k, v in fw.state_dict().items() if k.endswith("lora_B"))
    cards = [good, ("Where is it moored?", "Port Ellen")]
    want = fw.write_qa(tokenizer, cards, recipe=recipe)
    fw.reset()
    assert fw.write_qa(tokenizer, (list(c) for c in cards), recipe=recipe) == want
    fw.detach()

@pytest.mark.parametrize("optimizer,lr,b_tol", [("sgd", 0.5, 5e-3), ("adamw", 1e-2, 2e-2)])
def test_bf16_model_keeps_an_fp32_master_and_tracks_peft_over_50_steps(optimizer, lr, b_tol):
    """B and the optimizer state stay float32 whatever the model's dtype (PEFT's default keeps its
    adapters in float32 too): after 50 steps on a bf16 model, B is within a few bf16 ulps (2^-8 =
    0.4%) of PEFT's and the losses within 1e-3."""
    model, _ = load_model("tiny-llama", dtype=torch.bfloat16)
    batches = [make_batch(i) for i in range(5)] * 10
    fast, fast_state = run_write(model, "torch", batches, lr=lr, optimizer=optimizer)
    ref, ref_state = run_write(model, "peft", batches, lr=lr, optimizer=optimizer)
    assert all(v.dtype == torch.float32 for v in fast_state.values())
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(ref), rtol=1e-3, atol=0)
    assert_matrices_close(fast_state, {k: v.float() for k, v in ref_state.items()}, b_tol)


def test_bf16_updates_below_a_bf16_ulp_still_accumulate():
    model, _ = load_model("tiny-llama", dtype=torch.bfloat16)
    fw = FastWeights(model, backend="torch")
    fw.write([make_batch(0)] * 3, lr=1e-2, optimizer="adamw")
    before = fw.store.engine.b[0].clone()
    fw.write([make_batch(1)] * 3, lr=1e-7, optimizer="sgd")  # steps far below bf16's resolution of B
    moved = fw.store.engine.b[0] - before
    assert moved.abs().max() > 0
    assert torch.equal(before.bfloat16(), fw.store.engine.b[0].bfloat16())  # a bf16 B would not have moved
    fw.detach()


def test_middle_layers_match_peft(tiny):
    """Fast weights on chosen layers (here two middle ones), the layers above them frozen but run
    every step: the same losses as PEFT with layers_to_transform."""
    batches = [make_batch(0), make_batch(1)] * 2
    fast, fast_state = run_write(tiny, "torch", batches, lr=1e-2, optimizer="adamw", attach={"num_layers": (2, 3)})
    ref, ref_state = run_write(tiny, "peft", batches, lr=1e-2, optimizer="adamw", attach={"num_layers": (2, 3)})
    assert sorted({int(k.split(".")[1]) for k in fast_state}) == [2, 3]
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(ref), rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="not indices"):
        FastWeights(tiny, num_layers=(5, 9))


@pytest.mark.parametrize("backend", ["torch", "peft"])
def test_writes_run_with_dropout_off_and_leave_the_models_mode_alone(backend):
    """A model in train mode with dropout (as a constructor leaves it) writes exactly what it writes in
    eval mode, every time; its modules' modes are what they were after the write."""
    results = []
    for mode in ("train", "train", "eval"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_config("tiny-llama", attention_dropout=0.5)).train(mode == "train")
        model.model.layers[0].eval()  # a mixed model: one module the user put in eval mode
        modes = {name: m.training for name, m in model.named_modules()}
        assert any(modes.values()) == (mode == "train")
        fw = FastWeights(model, backend=backend)
        torch.manual_seed(1 + len(results))  # dropout would draw other masks each time
        losses = fw.write([make_batch(2)] * 3, lr=1e-2, optimizer="adamw")
        results.append((losses, fw.state_dict()))
        fw.detach()
        assert {name: m.training for name, m in model.named_modules()} == modes
    for losses, state in results[1:]:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(results[0][0]), rtol=0, atol=0)
        assert all(torch.equal(state[k], v) for k, v in results[0][1].items())
