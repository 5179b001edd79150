"""export_peft / import_peft: a session as a PEFT LoRA directory that PEFT loads with tmem's logits."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from tmem_runtime import AdapterFileError, FastWeights, Recipe, SessionPool, load_model
from tmem_runtime.peft_export import export_peft, import_peft
from tmem_runtime.write import IGNORE_INDEX


def _examples(seed: int) -> list[tuple[list[int], list[int]]]:
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, 500, (14,), generator=gen).tolist() for _ in range(4)]
    return [(x, [IGNORE_INDEX] * 5 + x[5:]) for x in ids]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(3, 500, (2, 11), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("init", ["svd", "random"])
def test_peft_loads_the_export_with_tmems_logits(tmp_path, init):
    model, _ = load_model("tiny-llama")
    fw = FastWeights(model, init=init, backend="torch")
    fw.write_examples(_examples(0), Recipe(lr=1e-2, epochs=3))
    ours = _logits(model, IDS)
    export_peft(fw, tmp_path / "adapter")
    fw.detach()
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 6 and config["lora_alpha"] == 6 and config["layers_to_transform"] == [2, 3, 4, 5]
    fresh, _ = load_model("tiny-llama")
    peft_model = PeftModel.from_pretrained(fresh, tmp_path / "adapter")
    torch.testing.assert_close(_logits(peft_model, IDS), ours, rtol=1e-5, atol=1e-5)


def test_import_into_another_pool_session_and_bad_directories(tmp_path):
    model, _ = load_model("tiny-llama")
    pool = SessionPool(model, capacity=2, backend="torch")
    pool.open("alice")
    pool.write_examples_many({"alice": _examples(1)}, Recipe(lr=1e-2, epochs=3))
    export_peft((pool, "alice"), tmp_path / "alice")
    pool.open("bob")
    import_peft((pool, "bob"), tmp_path / "alice")
    assert all(torch.equal(pool.state_dict("bob")[k], v) for k, v in pool.state_dict("alice").items())

    before = pool.state_dict("bob")
    other, _ = load_model("tiny-llama", seed=9)  # another model's adapter (different A)
    stranger = FastWeights(other, backend="torch")
    export_peft(stranger, tmp_path / "stranger")
    with pytest.raises(AdapterFileError, match="A, which every session shares"):
        import_peft((pool, "bob"), tmp_path / "stranger")
    stranger.detach()
    rank4 = FastWeights(load_model("tiny-llama")[0], rank=4, backend="torch")
    export_peft(rank4, tmp_path / "rank4")
    with pytest.raises(AdapterFileError, match="r=4"):
        import_peft((pool, "bob"), tmp_path / "rank4")
    with pytest.raises(AdapterFileError, match="cannot read"):
        import_peft((pool, "bob"), tmp_path / "missing")
    assert all(torch.equal(pool.state_dict("bob")[k], v) for k, v in before.items())
    pool.detach()


def test_an_export_of_the_fp32_model_into_its_bf16_copy_names_the_dtype(tmp_path):
    """A0 is the SVD of the weights as loaded, so the same model in bf16 has another A0: the refusal says
    so (it said only "another model, init or seed")."""
    fw = FastWeights(load_model("tiny-llama")[0], backend="torch")
    fw.write_examples(_examples(2), Recipe(lr=1e-2, epochs=2))
    export_peft(fw, tmp_path / "fp32")
    fw.detach()
    pool = SessionPool(load_model("tiny-llama", dtype=torch.bfloat16)[0], capacity=1, backend="torch")
    pool.open("a")
    before = pool.state_dict("a")
    with pytest.raises(AdapterFileError, match=r"or for this model in another dtype"):
        import_peft((pool, "a"), tmp_path / "fp32")
    assert all(torch.equal(pool.state_dict("a")[k], v) for k, v in before.items())
    pool.detach()


def test_pissa_is_refused_clearly(tmp_path):
    model, _ = load_model("tiny-llama")
    fw = FastWeights(model, init="pissa", backend="torch")
    with pytest.raises(ValueError, match="PiSSA"):
        export_peft(fw, tmp_path / "x")
    fw.detach()


def _peft_trained(export_dir, out_dir, seed: int) -> PeftModel:
    """PEFT training the B of an exported adapter (its lora_A frozen: the A tmem shares) from a random B."""
    base, _ = load_model("tiny-llama")
    peft_model = PeftModel.from_pretrained(base, export_dir, is_trainable=True)
    gen = torch.Generator().manual_seed(seed)
    b = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    for n, p in peft_model.named_parameters():
        p.requires_grad_("lora_B" in n)
    with torch.no_grad():
        for p in b:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    opt = torch.optim.SGD(b, lr=1e-2)
    for _ in range(3):
        peft_model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.save_pretrained(out_dir)
    return peft_model


def test_an_adapter_peft_trained_imports_with_pefts_logits_and_rslora_by_its_scaling(tmp_path):
    """A LoRA whose B PEFT trained (lora_A the exported A0) gives PEFT's logits in a pool session; with
    use_rslora PEFT's scaling is lora_alpha / sqrt(r): alpha = sqrt(6) is tmem's scaling 1 and imports,
    alpha = 6 is scaling sqrt(6) and is refused."""
    model, _ = load_model("tiny-llama")
    pool = SessionPool(model, capacity=2, backend="torch")
    pool.open("alice")
    export_peft((pool, "alice"), tmp_path / "export")
    want = _logits(_peft_trained(tmp_path / "export", tmp_path / "trained", seed=0), IDS)
    import_peft((pool, "alice"), tmp_path / "trained")
    with pool.rows(["alice", "alice"]):
        torch.testing.assert_close(_logits(model, IDS), want, rtol=1e-5, atol=1e-5)

    config_file = tmp_path / "trained" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "use_rslora": True, "lora_alpha": 6 ** 0.5}))
    want = _logits(PeftModel.from_pretrained(load_model("tiny-llama")[0], tmp_path / "trained"), IDS)
    pool.open("bob")
    import_peft((pool, "bob"), tmp_path / "trained")
    with pool.rows(["bob", "bob"]):
        torch.testing.assert_close(_logits(model, IDS), want, rtol=1e-5, atol=1e-5)
    config_file.write_text(json.dumps({**config, "use_rslora": True}))
    before = pool.state_dict("bob")
    with pytest.raises(AdapterFileError, match="scaling 2.449"):
        import_peft((pool, "bob"), tmp_path / "trained")
    assert all(torch.equal(pool.state_dict("bob")[k], v) for k, v in before.items())
    pool.detach()


@pytest.mark.parametrize(
    "option,match",
    [
        ({"use_dora": True}, "DoRA"),
        ({"rank_pattern": {"gate_proj": 4}}, "a rank per module"),
        ({"alpha_pattern": {"gate_proj": 12}}, "a scaling per module"),
        ({"bias": "lora_only"}, "trained biases"),
        ({"lora_bias": True}, "a bias on lora_B"),
        ({"modules_to_save": ["lm_head"]}, "whole trained modules"),
        ({"trainable_token_indices": [1, 2]}, "trained token embeddings"),
        ({"layers_to_transform": 3}, "layers_to_transform=3"),
        ({"lora_alpha": None}, "not a number"),
        ({}, "holds tensors"),  # (an extra tensor in the weights file)
    ],
)
def test_peft_options_a_session_cannot_carry_are_refused_and_change_nothing(tmp_path, option, match):
    from safetensors.torch import load_file, save_file

    model, _ = load_model("tiny-llama")
    fw = FastWeights(model, backend="torch")
    fw.write_examples(_examples(2), Recipe(lr=1e-2, epochs=2))
    export_peft(fw, tmp_path / "a")
    config_file = tmp_path / "a" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **option}))
    if not option:
        weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
        weights["base_model.model.lm_head.weight"] = model.lm_head.weight.detach().clone()
        save_file(weights, tmp_path / "a" / "adapter_model.safetensors")
    fw.reset()
    with pytest.raises(AdapterFileError, match=match):
        import_peft(fw, tmp_path / "a")
    assert fw.store.engine.initial == [True]
    fw.detach()


def test_a_peft_adapter_with_pefts_own_init_is_refused_and_one_layer_as_an_int_imports(tmp_path):
    """PEFT's own init draws its own lora_A, which no session shares: refused naming A. PEFT takes
    layers_to_transform as one int; an adapter of one layer written that way imports."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=6, lora_alpha=6, target_modules=["gate_proj", "up_proj", "down_proj"],
                        layers_to_transform=[2, 3, 4, 5])  # fmt: skip
    peft_model = get_peft_model(load_model("tiny-llama")[0], config)
    peft_model.save_pretrained(tmp_path / "own_init")
    model, _ = load_model("tiny-llama")
    fw = FastWeights(model, backend="torch")
    with pytest.raises(AdapterFileError, match="lora_A differs from this pool's A"):
        import_peft(fw, tmp_path / "own_init")
    fw.detach()
    one = FastWeights(model, num_layers=1, backend="torch")
    one.write_examples(_examples(3), Recipe(lr=1e-2, epochs=2))
    want = one.state_dict()
    export_peft(one, tmp_path / "one")
    config_file = tmp_path / "one" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "layers_to_transform": 5}))
    one.reset()
    import_peft(one, tmp_path / "one")
    assert all(torch.equal(one.state_dict()[k], v) for k, v in want.items())
    one.detach()


def test_concurrent_exports_to_one_directory_all_succeed(tmp_path):
    """Four threads exporting sessions to the same directory: none fails (each file is replaced atomically),
    and the directory imports."""
    import threading

    model, _ = load_model("tiny-llama")
    pool = SessionPool(model, capacity=4, backend="torch")
    for s in "abcd":
        pool.open(s)
    errors = []

    def export(session: str) -> None:
        try:
            for _ in range(20):
                export_peft((pool, session), tmp_path / "same")
        except Exception as exc:  # any failure is the finding
            errors.append(exc)

    threads = [threading.Thread(target=export, args=(s,)) for s in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(p.name for p in (tmp_path / "same").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    import_peft((pool, "a"), tmp_path / "same")
    pool.detach()
