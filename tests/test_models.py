"""load_model: a local directory by str or Path, and the cache of the embedded default (complete, current, atomic).

The GGUF dequantisation itself (25 s) is replaced by saving a tiny random-weight model, so these tests
check the cache's bookkeeping on the real file system: what is reused, what is converted again, what a
failed conversion leaves behind.
"""

from __future__ import annotations

import json
import stat
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tmem_runtime import ModelNotSupportedError, load_model, models
from tmem_runtime.models import smollm2_dir, smollm2_gguf_path, tiny_config


@pytest.fixture
def conversions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """TMEM_CACHE in a temporary directory and a fast conversion (a tiny model); returns the directories
    converted into, one per conversion."""
    monkeypatch.setenv("TMEM_CACHE", str(tmp_path / "cache"))
    done: list[Path] = []

    def tiny_dequantise(gguf: Path, directory: Path) -> None:
        AutoModelForCausalLM.from_config(tiny_config("tiny-llama")).save_pretrained(directory)  # safetensors: 0600
        done.append(directory)

    monkeypatch.setattr(models, "_dequantise_into", tiny_dequantise)
    return done


def cache_entries() -> list[str]:
    return sorted(p.name for p in models.cache_dir().iterdir())


def test_a_complete_copy_is_reused_and_readable_by_others(conversions: list[Path]) -> None:
    target = smollm2_dir()
    assert (target / "config.json").is_file() and len(conversions) == 1
    recorded = json.loads((target / "tmem_source.json").read_text())
    assert recorded["gguf_bytes"] == smollm2_gguf_path().stat().st_size
    assert stat.S_IMODE(target.stat().st_mode) == 0o755  # not mkdtemp's 0700
    assert {stat.S_IMODE(p.stat().st_mode) for p in target.iterdir()} == {0o644}
    assert smollm2_dir() == target and len(conversions) == 1  # no second conversion
    assert cache_entries() == [target.name]


def test_an_incomplete_copy_is_converted_again(conversions: list[Path]) -> None:
    target = models.cache_dir() / "smollm2-135m-instruct"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"half")  # e.g. a copy cut short: no config.json
    assert (smollm2_dir() / "config.json").is_file()
    assert not (target / "model.safetensors").read_bytes().startswith(b"half")
    assert len(conversions) == 1 and cache_entries() == [target.name]


def test_a_copy_of_another_gguf_or_format_is_converted_again(conversions: list[Path]) -> None:
    target = smollm2_dir()
    source = target / "tmem_source.json"
    for stale in ({"gguf_bytes": 1}, {"format": 0}):
        source.write_text(json.dumps({**json.loads(source.read_text()), **stale}))
        smollm2_dir()
        assert json.loads(source.read_text())["gguf_bytes"] == smollm2_gguf_path().stat().st_size
        assert json.loads(source.read_text())["format"] == models.CACHE_FORMAT
    assert len(conversions) == 3 and cache_entries() == [target.name]


def test_a_failed_conversion_leaves_nothing_behind(conversions: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(gguf: Path, directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(b"x" * 1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_dequantise_into", interrupted)
    with pytest.raises(KeyboardInterrupt):
        smollm2_dir()
    assert cache_entries() == []  # no half-written temporary directory


def test_an_unwritable_cache_says_to_set_tmem_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("TMEM_CACHE", str(tmp_path / "file" / "cache"))
    with pytest.raises(OSError, match="TMEM_CACHE"):
        smollm2_dir()


def test_a_local_directory_loads_from_a_path_as_from_its_string(tmp_path: Path) -> None:
    saved, _ = load_model("tiny-llama", packed_linears=False)
    saved.save_pretrained(tmp_path / "model")
    by_path, _ = load_model(tmp_path / "model", load_tokenizer=False, packed_linears=False)
    by_str, _ = load_model(str(tmp_path / "model"), load_tokenizer=False, packed_linears=False)
    ids = torch.arange(3, 11)[None]
    with torch.no_grad():
        expected = saved(ids).logits
        assert torch.equal(by_path(ids).logits, expected) and torch.equal(by_str(ids).logits, expected)
    with pytest.raises(FileNotFoundError, match="tokenizer"):  # a Path gets the same checks
        load_model(tmp_path / "model")


def test_two_conversions_at_once_leave_one_complete_copy(conversions: list[Path], monkeypatch) -> None:
    both_converting, tiny_dequantise = threading.Barrier(2, timeout=60), models._dequantise_into

    def side_by_side(gguf: Path, directory: Path) -> None:
        both_converting.wait()  # neither has put its copy in place yet
        tiny_dequantise(gguf, directory)

    monkeypatch.setattr(models, "_dequantise_into", side_by_side)
    got: list[Path] = []
    threads = [threading.Thread(target=lambda: got.append(smollm2_dir())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(conversions) == 2 and len(got) == 2 and got[0] == got[1]
    assert (got[0] / "config.json").is_file() and cache_entries() == [got[0].name]  # the loser's copy removed


def test_a_family_without_a_causal_lm_class_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ModelNotSupportedError, match="'t5' model"):
        load_model("tiny-t5")
    config = AutoConfig.for_model("t5", d_model=32, num_layers=1, num_heads=2, d_ff=64, vocab_size=64)
    config.save_pretrained(tmp_path / "t5")
    with pytest.raises(ModelNotSupportedError, match="T5Config"):  # a local directory: refused before any weights
        load_model(tmp_path / "t5", load_tokenizer=False)


def test_an_older_copy_in_a_cache_that_cannot_be_written_is_loaded_as_it_is(conversions: list[Path],
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    target = smollm2_dir()
    (target / "tmem_source.json").write_text(json.dumps({"gguf": "/old/venv/SmolLM2.gguf"}))  # an earlier version's

    def read_only(gguf: Path, directory: Path) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(models, "_dequantise_into", read_only)
    with pytest.warns(UserWarning, match="cannot be made again"):
        assert smollm2_dir() == target
    assert (target / "config.json").is_file() and cache_entries() == [target.name]


def test_dtype_names_and_unavailable_devices_are_refused_or_taken_before_loading():
    """load_model(dtype="bf16") failed inside transformers (AttributeError), and device="cuda" on a CPU build
    with torch's AssertionError after the model was built; names are taken now, bad values said first."""
    bf16, _ = load_model("tiny-llama", dtype="bf16")
    named, _ = load_model("tiny-llama", dtype="torch.bfloat16")
    assert bf16.dtype == named.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(bf16.state_dict().values(), named.state_dict().values()))
    assert load_model("tiny-llama", dtype="fp16")[0].dtype == torch.float16
    with pytest.raises(ValueError, match=r"dtype 'float8': not one of"):
        load_model("tiny-llama", dtype="float8")
    with pytest.raises(TypeError, match="floating torch.dtype"):
        load_model("tiny-llama", dtype=torch.int64)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            load_model("tiny-llama", device="cuda")
    with pytest.raises(ValueError, match="not a torch device: 'gpu'"):
        load_model("tiny-llama", device="gpu")


def test_a_model_loaded_inside_inference_mode_runs_and_takes_fast_weights_outside_it(tmp_path: Path) -> None:
    """Loaded inside torch.inference_mode(), the weights were inference tensors: the packed linears' first forward
    failed ("Inference tensors do not track version counter"), and so did attaching fast weights."""
    from tmem_runtime import FastWeights

    want, _ = load_model("tiny-llama")
    with torch.inference_mode():
        model, _ = load_model("tiny-llama")
        inside = model(torch.arange(3, 11)[None]).logits
    assert not any(p.is_inference() for p in model.parameters())
    ids = torch.arange(3, 11)[None]
    with torch.no_grad():
        expected = want(ids).logits
        assert torch.equal(model(ids).logits, expected) and torch.equal(inside, expected)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    losses = FastWeights(model, backend="torch").write([batch] * 2, lr=1e-2)
    assert losses == FastWeights(want, backend="torch").write([batch] * 2, lr=1e-2)
