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


def test_pissa_is_refused_clearly(tmp_path):
    model, _ = load_model("tiny-llama")
    fw = FastWeights(model, init="pissa", backend="torch")
    with pytest.raises(ValueError, match="PiSSA"):
        export_peft(fw, tmp_path / "x")
    fw.detach()
