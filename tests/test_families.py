"""Every model family the README names, built the ordinary way: same logits and losses as PEFT.

Each family's tiny random model gets fast weights with a nonzero B (the same A and B loaded into the
PEFT reference), so a wrong activation or a wrong layer layout shows as a logit difference.
"""

from __future__ import annotations

import pytest
import torch

from tmem_kernels.ops import available
from tmem_runtime import FastWeights, ModelNotSupportedError, load_model
from tmem_runtime.models import is_silu

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "gemma3", "olmo2"]  # gemma3: multimodal


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 500, (2, 17), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _random_b(fw: FastWeights, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = fw.state_dict()
    return {k: (torch.randn(v.shape, generator=gen) * 0.05 if k.endswith("lora_B") else v) for k, v in state.items()}


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_peft_with_the_same_a_and_b(family):
    model, _ = load_model(f"tiny-{family}")
    batch = _batch()
    backends = [b for b in ("torch", "native") if available(b)]
    results = {}
    for backend in backends + ["peft"]:
        fw = FastWeights(model, backend=backend)
        state = _random_b(fw, seed=1)
        fw.load_state_dict(state)
        logits = _logits(model, batch)
        losses = fw.write([batch, _batch(1)] * 2, lr=1e-2, optimizer="adamw")
        results[backend] = (logits, losses)
        fw.detach()
    ref_logits, ref_losses = results["peft"]
    for backend in backends:
        logits, losses = results[backend]
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5, msg=f"{family}/{backend}")
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_gemma_activation_is_not_taken_for_silu(family):
    model, _ = load_model(f"tiny-{family}")
    assert not is_silu(model.model.layers[-1].mlp.act_fn)  # gelu_pytorch_tanh, named `hidden_activation`
    fw = FastWeights(model, backend="torch")
    assert fw.store.engine.fused == [False] * 4  # the generic path, with the model's own activation
    fw.detach()


def test_a_multimodal_model_takes_fast_weights_on_its_text_decoder(tmp_path):
    """tiny-gemma3 (Gemma3ForConditionalGeneration) takes the tiny sizes for its language model and a
    one-layer vision tower (the family's defaults were 3.3B parameters, 13 GB). Fast weights sit on its
    text decoder's last four MLPs (`model.language_model.layers`, never the vision tower's), and its
    adapter files and PEFT export work as for a text-only model (logits as above: FAMILIES)."""
    from peft import PeftModel

    from tmem_runtime.peft_export import export_peft

    model, _ = load_model("tiny-gemma3")
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert model.config.text_config.hidden_size == 72 and model.config.text_config.num_hidden_layers == 6
    fw = FastWeights(model, backend="torch")
    text_mlps = {id(layer.mlp) for layer in model.model.language_model.layers[-4:]}
    assert {id(mlp) for _, mlp in fw.store.engine.mlps} == text_mlps
    fw.load_state_dict(_random_b(fw, seed=1))
    batch = _batch()
    want = _logits(model, batch)
    fw.save(tmp_path / "a.safetensors")
    export_peft(fw, tmp_path / "peft")
    fw.reset()
    fw.load(tmp_path / "a.safetensors")
    torch.testing.assert_close(_logits(model, batch), want, rtol=0, atol=0)
    fw.detach()
    peft_model = PeftModel.from_pretrained(model, tmp_path / "peft")
    torch.testing.assert_close(_logits(peft_model, batch), want, rtol=1e-5, atol=1e-5)


def test_phi3_fused_gate_up_is_refused_clearly():
    model, _ = load_model("tiny-phi3")
    with pytest.raises(ModelNotSupportedError, match="gate_up_proj"):
        FastWeights(model)


def test_load_model_takes_dtype_device_and_attention_and_loads_gemma2(tmp_path):
    """Gemma2 could not load through a forced SDPA: the family's own choice is taken (eager), and
    dtype / device / attn_implementation pass through."""
    model, _ = load_model("tiny-gemma2")
    _, tokenizer = load_model("smollm2-135m")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, tok = load_model(str(tmp_path), dtype=torch.bfloat16, device="cpu")
    family_choice = "sdpa" if type(loaded)._supports_sdpa else "eager"  # eager on transformers 5.2x
    assert loaded.config._attn_implementation == family_choice and loaded.dtype == torch.bfloat16
    assert tok is not None and not any(p.requires_grad for p in loaded.parameters())
    llama, _ = load_model("tiny-llama", attn_implementation="eager")
    assert llama.config._attn_implementation == "eager"
    assert load_model("tiny-llama")[0].config._attn_implementation == "sdpa"


def test_shapes_models_have_the_real_configs_and_seeded_random_weights():
    """"shapes-<model>": a real model's shapes with random weights (timing runs without its files)."""
    model, tokenizer = load_model("shapes-smollm2-135m", dtype=torch.bfloat16)
    real, _ = load_model("smollm2-135m")
    assert tokenizer is None and model.dtype == torch.bfloat16 and not any(p.requires_grad for p in model.parameters())
    shapes = {n: p.shape for n, p in model.named_parameters()}
    assert shapes == {n: p.shape for n, p in real.named_parameters()}
    again, _ = load_model("shapes-smollm2-135m", dtype=torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight.float(), real.model.layers[0].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="shapes-qwen3-4b"):
        load_model("shapes-qwen3-8b")
