"""The `tmem` command line: usage, version, every command's --help (defaults shown), unknown commands.

Run in-process through `tmem_runtime.cli.main` (argparse's --help exits via SystemExit); no model loads.
"""

from __future__ import annotations

import json
import re

import pytest

from tmem_runtime.cli import USAGE, main

# command -> options whose default its --help must show (one or two each, with the value)
DEFAULTS = {
    "demo": {"--l-max": "150", "--replay": "32"},
    "demo-weights": {"--threads": "1"},
    "eval": {"--l-max": "1024", "--cards": "all", "--recipe": "agent"},
    "make-conversations": {"--tokens": "16000", "--n": "2"},
    "ablate": {"--threads": "1"},
    "bench": {"--threads": "1"},
    "serve": {"--threads": "1"},
    "rl": {"--policy": "lora", "--group-size": "4", "--lr": "1e-05"},
}

ALL_SHOWN = tuple(DEFAULTS)  # every option of every command documents its default


def _help_of(command: str, capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_usage_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^  ([a-z][a-z-]+)\s", out, flags=re.M)
    assert sorted(listed) == sorted(DEFAULTS)
    assert main([]) == 0 and capsys.readouterr().out == USAGE + "\n"


def test_version(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert re.match(r"tmem \S+ \(torch \S+, transformers \S+\)", out)


@pytest.mark.parametrize("command", sorted(DEFAULTS))
def test_every_command_help_shows_its_defaults(command, capsys):
    out = _help_of(command, capsys)
    assert out.startswith(f"usage: tmem {command}")
    # one entry per option, as argparse lays them out ("  --name METAVAR  help ... (default: X)")
    raw = re.split(r"\n  (?=-)", out.split("options:")[1])[1:]
    entries = {e.split()[0].rstrip(","): " ".join(e.split()) for e in raw}
    assert entries["--threads"].endswith("(default: 1)")
    for option, default in DEFAULTS[command].items():
        assert entries[option].endswith(f"(default: {default})"), entries[option]
    if command in ALL_SHOWN:  # every option documents its default
        assert all("(default:" in e for option, e in entries.items() if option != "-h"), command


def test_unknown_command_exits_2(capsys):
    assert main(["no-such-command"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'no-such-command'" in err and "commands:" in err


def test_bad_option_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["make-conversations", "--tokens", "many"])
    assert exit_info.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


def test_serve_refuses_a_capacity_too_small_before_loading_a_model(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--model", "no-such-model", "--capacity", "2", "--store", "unused"])
    assert exit_info.value.code == 2
    assert "capacity 2 must be at least max_write_sessions + 2 (3)" in capsys.readouterr().err


def test_serve_names_the_settings_out_of_range(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--model", "no-such-model", "--l-max", "0", "--lease-ttl", "-1", "--store", "unused"])
    assert exit_info.value.code == 2
    assert "invalid serve config: l_max=0 (must be >= 1), lease_ttl=-1.0 (must be > 0)\n" in capsys.readouterr().err


@pytest.mark.parametrize("keys, store_is_a_file, message", [
    ("{not json", False, "keys.json is not valid JSON"),
    ('["KEY"]', False, "keys.json: expected a JSON object"),
    ("\udcff", False, "keys.json is not valid JSON ('utf-8' codec"),
    ('{"KEY": "acme"}', True, "cannot be the store's directory (File exists)"),
])
def test_serve_refuses_a_bad_keys_file_or_store_path_before_loading_a_model(keys, store_is_a_file, message, tmp_path):
    """A keys file that is not {"key": "tenant"} JSON, or a --store path holding a file, is said in one line
    (no traceback) before the model loads (here: a model that does not exist, which would be said instead)."""
    (tmp_path / "keys.json").write_bytes(keys.encode("utf-8", "surrogateescape"))
    store = tmp_path / "store"
    if store_is_a_file:
        store.write_text("a file")
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--model", "no-such-model", "--api-keys", str(tmp_path / "keys.json"), "--store", str(store)])
    assert str(exit_info.value.code).startswith("tmem serve: --") and message in str(exit_info.value.code)
    assert store.is_file() if store_is_a_file else not store.exists()  # no store made for a bad keys file


@pytest.mark.parametrize("command, option", [
    ("eval", ["--l-max", "0"]), ("eval", ["--max-questions", "-1"]), ("eval", ["--answer-tokens", "0"]),
    ("eval", ["--top-k", "0"]), ("eval", ["--replay", "-1"]), ("eval", ["--recipe", "no-such-recipe"]),
    ("demo", ["--l-max", "-5"]), ("demo", ["--recipe", "no-such-recipe"]),
    ("make-conversations", ["--n", "0"]), ("make-conversations", ["--facts", "100"]),
    ("make-conversations", ["--turns", "0"]), ("rl", ["--steps", "-1"]), ("rl", ["--group-size", "1"]),
    # a learning rate, temperature or KL weight GRPOConfig refuses (was its ValueError traceback once the model
    # had loaded) or that trains NaN (inf)
    ("rl", ["--lr", "0"]), ("rl", ["--lr=-1e-5"]), ("rl", ["--lr", "inf"]), ("rl", ["--lr", "nan"]),
    ("rl", ["--temperature", "0"]), ("rl", ["--temperature", "inf"]), ("rl", ["--beta", "-0.1"]),
    ("rl", ["--beta", "nan"]),
    ("ablate", ["--capacity-writes", "13"]), ("ablate", ["--max-sessions", "0"]), ("ablate", ["--recipes", "bogus"]),
    ("ablate", ["--sets", "no-such-set"]), ("ablate", ["--precondition-sets", "no-such-set"]),
    # a device this machine lacks, a backend that cannot run the model: said before the model loads
    ("demo", ["--device", "cuda:99"]), ("eval", ["--device", "gpu"]), ("rl", ["--device", "cuda:99"]),
    ("serve", ["--device", "cuda:99"]), ("serve", ["--backend", "native", "--dtype", "bfloat16"]),
    ("serve", ["--backend", "peft"]), ("demo-weights", ["--recipe", "no-such-recipe"]),
    # every write failed (a negative replay sample) and its client waited for ever; every request got a 413
    ("serve", ["--replay", "-1"]), ("serve", ["--max-body", "0"]),
    ("demo-weights", ["--backend", "no-such-backend"]),
])
def test_out_of_range_options_are_usage_errors_before_anything_runs(command, option, tmp_path, capsys):
    need = {"eval": ["--data", "unused.json", "--out", str(tmp_path / "o")],
            "rl": ["--data", "unused.json", "--out", str(tmp_path / "o")],
            "make-conversations": ["--out", str(tmp_path / "o.json")], "demo": [],
            "ablate": ["--out", str(tmp_path / "o"), "--model", "no-such-model"],
            "serve": ["--model", "no-such-model", "--store", str(tmp_path / "store")],
            "demo-weights": ["--model", "no-such-model"]}[command]
    with pytest.raises(SystemExit) as exit_info:
        main([command, *need, *option])
    assert exit_info.value.code == 2
    assert option[0].split("=")[0] in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("command", ["eval", "demo", "rl"])
@pytest.mark.parametrize("text, message", [(None, "no such file"), ('[{"conversation": ', "not valid JSON"),
                                           ("[]", "holds no conversations")])
def test_a_bad_data_file_is_refused_before_a_model_loads_or_out_is_made(command, text, message, tmp_path):
    data = tmp_path / "data.json"
    if text is not None:
        data.write_text(text)
    out = ["--out", str(tmp_path / "o")] if command != "demo" else []
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--data", str(data), *out, "--model", "no-such-model"])
    assert message in str(exit_info.value.code) and str(data) in str(exit_info.value.code)
    assert not (tmp_path / "o").exists()


def test_eval_names_the_known_conversations_for_an_unknown_id(tmp_path):
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "two_sessions.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--data", str(fixture), "--conversations", "conv-404", "--out", str(tmp_path / "o"),
              "--model", "no-such-model"])
    assert "['conv-404'] are not in" in str(exit_info.value.code) and "fx-1" in str(exit_info.value.code)
    assert not (tmp_path / "o").exists()


def test_demo_refuses_a_conversation_with_nothing_to_ask(tmp_path):
    data = tmp_path / "data.json"
    data.write_text('[{"sample_id": "s", "conversation": {"session_1": [{"speaker": "A", "text": "hi"}]}, '
                    '"qa": [{"question": "q?", "adversarial_answer": "x", "category": 5}]}]')
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--data", str(data), "--model", "no-such-model"])
    assert "has no questions of categories 1-4" in str(exit_info.value.code)


@pytest.mark.slow  # the real tokenizer
@pytest.mark.parametrize("flag", ["--answer-tokens", "--flashcard-tokens"])
def test_demo_refuses_new_tokens_past_the_window_before_anything_runs(flag, capsys):
    """--answer-tokens / --flashcard-tokens of the window's size or more: one line once the model is loaded (it
    was the decoder's ValueError traceback, after the two baselines had read the conversation)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", flag, "100000"])
    assert str(exit_info.value.code).startswith(f"tmem demo: {flag} 100000 leaves no room for a prompt")
    assert "reading" not in capsys.readouterr().out


@pytest.mark.parametrize("command, data", [("eval", "two_sessions.json"), ("rl", "generated.json")])
@pytest.mark.parametrize("under", [False, True])
def test_eval_and_rl_refuse_an_out_they_cannot_make(command, data, under, tmp_path):
    """--out a file, or a path under one: one line before the model loads (rl's was a FileExistsError /
    NotADirectoryError traceback once the model had loaded and the policy and pool were built)."""
    from pathlib import Path

    blocker = tmp_path / "a-file"
    blocker.write_text("kept")
    out = blocker / "run" if under else blocker
    if data == "generated.json":
        from tmem_runtime.agent.long_conversations import make_conversation

        (tmp_path / data).write_text(json.dumps([make_conversation(1, n_facts=2, tokens=100, turns_per_session=6)]))
        fixture = tmp_path / data
    else:
        fixture = Path(__file__).parent / "fixtures" / data
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--data", str(fixture), "--out", str(out), "--model", "no-such-model"])
    assert str(exit_info.value.code) == f"tmem {command}: cannot make --out {out}: " + (
        f"Not a directory ({blocker})" if under else "it is a file")
    assert blocker.read_text() == "kept"


@pytest.mark.parametrize("command, options", [
    ("eval", ["--data", "FIXTURE"]),
    ("ablate", ["--only", "init", "capacity"]),
])
def test_a_failed_model_load_leaves_no_empty_out_behind(command, options, tmp_path, capsys):
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "two_sessions.json"
    out = tmp_path / "runs" / "new"
    options = [str(fixture) if o == "FIXTURE" else o for o in options]
    assert main([command, *options, "--out", str(out), "--model", "no-such-model"]) == 2
    assert "is neither a known model name" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_ablate_report_only_refuses_an_out_with_no_results(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["ablate", "--report-only", "--out", str(tmp_path / "none")])
    assert "holds no results to report" in str(exit_info.value.code)
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("data, message", [("missing.json", "no such file"), ("two_sessions.json", "conv-26")])
def test_ablate_checks_its_locomo_data_before_the_hour_of_studies_before_it(data, message, tmp_path):
    from pathlib import Path

    path = Path(__file__).parent / "fixtures" / data
    with pytest.raises(SystemExit) as exit_info:
        main(["ablate", "--out", str(tmp_path / "o"), "--data", str(path), "--model", "no-such-model"])
    assert message in str(exit_info.value.code) and str(path) in str(exit_info.value.code)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", sorted(DEFAULTS))
def test_threads_below_one_is_a_usage_error_in_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--threads", "0", "--help"])  # parsed before --help acts: no command runs
    assert exit_info.value.code == 2
    assert "argument --threads: must be >= 1, got 0" in capsys.readouterr().err


def test_make_conversations_refuses_an_out_it_cannot_write(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["make-conversations", "--out", str(tmp_path), "--n", "1", "--tokens", "100"])  # a directory
    assert f"cannot write {tmp_path}" in str(exit_info.value.code)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", ["demo", "demo-weights"])
def test_a_model_path_that_is_not_a_model_is_one_line_not_a_traceback(command, tmp_path, capsys):
    assert main([command, "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tmem {command}: '{tmp_path}' is neither a known model name") and "Traceback" not in err


@pytest.mark.parametrize("command", ["demo", "demo-weights"])
def test_a_model_directory_without_its_tokenizer_is_one_line_saying_so(command, tmp_path, capsys):
    """A model saved without its tokenizer: said (and how to add it) before the weights load, no traceback
    (transformers' own error spoke of sentencepiece and slow tokenizers)."""
    from tmem_runtime.models import tiny_config

    tiny_config("tiny-llama").save_pretrained(tmp_path)  # config.json only: the check comes first
    assert main([command, "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tmem {command}: no tokenizer in the model directory") and str(tmp_path) in err
    assert "tokenizer.save_pretrained" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["demo", "demo-weights"])
def test_a_model_directory_of_a_family_without_a_causal_lm_is_one_line(command, tmp_path, capsys):
    from transformers import AutoConfig

    AutoConfig.for_model("t5", d_model=32, num_layers=1, num_heads=2, d_ff=64).save_pretrained(tmp_path)
    assert main([command, "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tmem {command}: '{tmp_path}' is a 't5' model") and "Traceback" not in err


def test_eval_refuses_a_policy_that_is_not_one_before_a_model_loads(tmp_path):
    """--policy: a missing file, one that is not a policy (another safetensors file, junk), or a run's
    directory rather than its checkpoint (the newest checkpoint named): one line, no model loaded
    (no-such-model would be said instead), no --out made."""
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    fixture = Path(__file__).parent / "fixtures" / "two_sessions.json"
    run = tmp_path / "rl"
    for step in ("step-000002", "step-000010"):
        (run / "checkpoints" / step).mkdir(parents=True)
        (run / "checkpoints" / step / "policy.safetensors").write_bytes(b"")
    save_file({"w": torch.zeros(2)}, tmp_path / "weights.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    cases = {
        str(tmp_path / "missing.safetensors"): "not a readable policy file",
        str(tmp_path / "junk.safetensors"): "not a readable policy file",
        str(tmp_path / "weights.safetensors"): "not a tmem policy file",
        str(run): f"the newest checkpoint under it is {run / 'checkpoints' / 'step-000010'}",
    }
    for policy, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "--data", str(fixture), "--out", str(tmp_path / "o"), "--model", "no-such-model",
                  "--policy", policy])
        said = str(exit_info.value.code)
        assert said.startswith("tmem eval: --policy ") and message in said, said
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, message", [
    (["--num-layers", "7"], "num_layers=7 but the model has 6 decoder layers"),
    (["--rank", "100"], "rank 100 exceeds layers.2.mlp.gate_proj's smaller side (200 x 72)"),
])  # fmt: skip
def test_fast_weight_flags_the_model_cannot_take_are_one_line_before_anything_runs(flags, message, tmp_path):
    """eval and rl with --num-layers past the model's layers or --rank past a targeted matrix: one line
    naming the flags (it was a ValueError traceback), before any episode ran (eval's `none` method
    ran first, its --out made) or a step began."""
    from pathlib import Path

    from tmem_runtime.models import _tiny_tokenizer, load_model

    model_dir = tmp_path / "model"
    load_model("tiny-llama", packed_linears=False)[0].save_pretrained(model_dir)
    _tiny_tokenizer().save_pretrained(model_dir)  # (its ids past the tiny vocabulary never reach the model here)
    fixture = Path(__file__).parent / "fixtures" / "two_sessions.json"
    for command, extra in (("eval", ["--memory", "none", "tmem"]), ("rl", [])):
        out = tmp_path / f"out-{command}"
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--data", str(fixture), "--out", str(out), "--model", str(model_dir), *flags, *extra])
        said = str(exit_info.value.code)
        assert said.startswith(f"tmem {command}: --rank ") and message in said, said
        assert not (out / "answers.json").exists() and not (out / "log.jsonl").exists()


@pytest.mark.parametrize("command", ["demo", "demo-weights", "eval", "ablate"])
def test_a_random_weight_model_without_a_tokenizer_is_one_line(command, tmp_path):
    """--model tiny-llama (load_model gives it no tokenizer): one line saying so, in every command that
    tokenizes text (demo and demo-weights were a NoneType traceback; eval's line did not name itself)."""
    from pathlib import Path

    fixture = str(Path(__file__).parent / "fixtures" / "two_sessions.json")
    more = {"eval": ["--data", fixture, "--out", str(tmp_path / "o")],
            "ablate": ["--data", fixture, "--conversations", "fx-1", "--out", str(tmp_path / "o")]}  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--model", "tiny-llama", *more.get(command, [])])
    said = str(exit_info.value.code)
    assert said.startswith(f"tmem {command}: tiny-llama has no tokenizer") and "needs a real model" in said, said
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_exit_status_130():
    """Ctrl-C in a long command (here demo-weights, once it has printed its first line) printed a
    KeyboardInterrupt traceback; it is one line now, exit status 130 as a shell's."""
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731 (a background job's tests
    # inherit SIGINT ignored, and a process started so keeps ignoring it: the child gets a terminal's)
    proc = subprocess.Popen([sys.executable, "-m", "tmem_runtime.cli", "demo-weights"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=default_sigint)  # fmt: skip
    assert proc.stdout.readline().startswith("model ")  # the model is loaded and the demo running
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["tmem demo-weights: interrupted"]


@pytest.mark.parametrize("command, options", [
    ("eval", ["--data", "FIXTURE", "--memory", "none"]),
    ("ablate", ["--only", "capacity"]),
    ("rl", ["--data", "GENERATED"]),
])
def test_an_existing_out_that_cannot_be_written_is_refused_before_the_model_loads(command, options, tmp_path):
    """An --out that exists but cannot be written in (read-only: here an immutable directory, which root cannot
    write in either) was taken: the model loaded, the first episode or study ran, and its save was a
    PermissionError traceback. Refused at once now (the model named does not exist: nothing loads)."""
    import shutil
    import subprocess
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "two_sessions.json"
    out = tmp_path / "ro"
    out.mkdir()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode:
        pytest.skip("no chattr +i here to make a directory nobody can write in")
    generated = tmp_path / "generated.json"
    if "GENERATED" in options:
        from tmem_runtime.agent.long_conversations import make_conversation

        generated.write_text(json.dumps([make_conversation(1, n_facts=2, tokens=100, turns_per_session=6)]))
    try:
        options = [str(fixture) if o == "FIXTURE" else str(generated) if o == "GENERATED" else o for o in options]
        with pytest.raises(SystemExit) as exit_info:
            main([command, *options, "--out", str(out), "--model", "no-such-model"])
        assert str(exit_info.value.code) == f"tmem {command}: cannot write in --out {out}: Permission denied"
        assert list(out.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)


def test_rl_refuses_flashcard_prompts_past_the_window_before_the_model_loads(tmp_path, capsys):
    """tmem rl whose flashcard prompts (+ their new tokens) the model's window cannot hold (a tiny model: 512
    positions) is a usage error (exit status 2) in the decoder's words, naming the mode, the budget and, per
    turn, the conversation of the longest turn, before the model loads (its weights file is gone here, and that
    load error never comes) and with nothing made under --out. It was the decoder's ValueError traceback at the
    first generation, after loading and setup. A run whose prompts fit goes on to load the model."""
    import json
    from pathlib import Path

    from tmem_runtime.agent.long_conversations import make_conversation
    from tmem_runtime.models import _tiny_tokenizer, load_model

    model_dir = tmp_path / "model"
    load_model("tiny-llama", packed_linears=False)[0].save_pretrained(model_dir)
    _tiny_tokenizer().save_pretrained(model_dir)
    (model_dir / "model.safetensors").unlink()  # loading it would fail: the check must come first
    fixture = str(Path(__file__).parent / "fixtures" / "two_sessions.json")
    sample = make_conversation(3, n_facts=2, tokens=100, turns_per_session=6)
    sample["conversation"]["session_1"][0]["text"] = " ".join(["word"] * 600)  # one turn too long for a prompt
    long_turn = tmp_path / "long_turn.json"
    long_turn.write_text(json.dumps([sample]))
    cases = [
        ([long_turn], ["--flashcard-mode", "array", "--l-max", "200"],
         "array mode: a whole context, up to l_max=200 tokens"),
        ([fixture], ["--flashcard-mode", "array", "--l-max", "1000"],  # the conversation is shorter than l_max
         "array mode: a whole context, up to the 112 tokens of conversation fx-1"),
        ([long_turn], ["--l-max", "200"], "per-turn mode: the longest turn, in long-3"),
        ([fixture, "--held-out", long_turn], ["--l-max", "200"], "per-turn mode: the longest turn, in long-3"),
        ([fixture], ["--l-max", "200", "--eval-modes", "array", "--held-out", fixture], "array mode"),
    ]  # fmt: skip
    out = tmp_path / "out"
    for data, flags, what in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["rl", "--data", *map(str, data), "--out", str(out), "--model", str(model_dir), *flags])
        assert exit_info.value.code == 2
        said = capsys.readouterr().err
        assert "passes the model's window of 512 positions" in said and what in said, said
        assert f"with --l-max {flags[flags.index('--l-max') + 1]} on --model {model_dir}: a flashcard prompt of " \
            in said, said
        assert not out.exists()
    with pytest.raises(OSError, match="model.safetensors"):  # fits: on to the load (which finds no weights)
        main(["rl", "--data", fixture, "--out", str(out), "--model", str(model_dir), "--l-max", "200"])
