"""The command line: only the generated text on stdout, errors as one message with status 2, every setting in
--help, a closed pipe ends a command quietly."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest

from gemmatune.cli import SAMPLE, main
from gemmatune.config import DEFAULT_MODEL, PRESETS, TrainConfig
from gemmatune.convert.hf import load_hf
from gemmatune.generate import generate
from gemmatune.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tiny():
    cfg, params = load_hf(DEFAULT_MODEL)
    return load_tokenizer(DEFAULT_MODEL), cfg, params


def expected(tiny, prompt_ids: list[int], **kw) -> str:
    tok, cfg, params = tiny
    [out] = generate(params, cfg, [prompt_ids], stop_ids=(tok.eos_id, tok.end_of_turn_id), **kw)
    return tok.decode(out) + "\n"


def test_embedded_model_is_small_and_a_real_checkpoint():
    assert load_hf(DEFAULT_MODEL)[0] == PRESETS["tiny"]
    assert json.loads((DEFAULT_MODEL / "config.json").read_text())["model_type"] == "gemma2"
    for f in DEFAULT_MODEL.iterdir():
        assert f.stat().st_size < 5 * 2**20, f


def test_generate_writes_only_the_text_to_stdout(tiny, capsys):
    tok = tiny[0]
    assert main(["generate", "--prompt", "Hello there", "--max-new-tokens", "12"]) == 0
    out, err = capsys.readouterr()
    assert out == expected(tiny, [tok.bos_id] + tok.encode("Hello there"), max_new_tokens=12)
    assert "loaded" in err and "tokens" in err


def test_chat_and_sampling_flags(tiny, capsys):
    tok = tiny[0]
    args = ["generate", "--chat", "--prompt", "  What is JAX? ", "--max-new-tokens", "9", "--temperature", "0.8",
            "--top-k", "50", "--top-p", "0.9", "--seed", "3", "--dtype", "float32"]
    assert main(args) == 0
    prompt = tok.encode_chat([{"role": "user", "content": "What is JAX?"}], add_generation_prompt=True)
    want = expected(tiny, prompt, max_new_tokens=9, temperature=0.8, top_k=50, top_p=0.9, seed=3, dtype="float32")
    assert capsys.readouterr().out == want


@pytest.mark.parametrize("setup,named", [
    (lambda d: None, "no such directory"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text(json.dumps({"model_type": "llama"}))), "Llama"),
    (lambda d: (shutil.copytree(DEFAULT_MODEL, d), (d / "model.safetensors").unlink()), "model.safetensors"),
])
def test_errors_are_one_message_with_status_2(tmp_path, capsys, setup, named):
    model = tmp_path / "ckpt"
    setup(model)
    if named == "Llama":  # a tokenizer is present, so the config is what fails
        for f in ("tokenizer.json", "tokenizer.model"):
            shutil.copy(DEFAULT_MODEL / f, model / f)
    assert main(["generate", "--model", str(model)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and named in err and "Traceback" not in err


def test_console_script_runs_in_a_fresh_process():
    r = subprocess.run([sys.executable, "-m", "gemmatune.cli", "generate", "--max-new-tokens", "3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith("\n") and "loaded" in r.stderr


def test_os_errors_are_one_message(tmp_path, capsys, monkeypatch):
    import errno

    import gemmatune.tokenizer

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(gemmatune.tokenizer, "load_tokenizer", full)
    assert main(["generate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: No space left on device") and str(tmp_path) in err and "Traceback" not in err


def help_text(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return "".join(capsys.readouterr().out.split())  # without whitespace: argparse wraps lines where it likes


def test_train_help_lists_every_setting_with_its_meaning_and_default(capsys):
    shown = help_text(capsys, "train")

    def check(obj, prefix=""):
        for f in dataclasses.fields(obj):
            value, path = getattr(obj, f.name), prefix + f.name
            if dataclasses.is_dataclass(value):
                check(value, path + ".")
                continue
            dotted = "--" + path.replace("_", "-")
            names = f"{dotted},{dotted.replace('.', '-')}" if "." in path else dotted
            if isinstance(value, bool) or value is None:
                default = str(value).lower()
            elif isinstance(value, tuple):
                default = ",".join(value) or "none"
            else:
                default = "".join(str(value).split()) or '""'
            want = [names, "".join(f.metadata["help"].split()) + f"(default:{default})"]
            assert all(w in shown for w in want), (path, [w for w in want if w not in shown])

    check(TrainConfig())
    assert "--weight_decay" not in shown and "--weight-decay" in shown  # one spelling shown, hyphens


def test_data_inspect_shares_the_data_options(capsys):
    inspect, train = help_text(capsys, "data", "inspect"), help_text(capsys, "train")
    for option in ("--data,--data.paths,--data-paths", "--seq-len,--max-seq-len,--data.max-seq-len", "--data.seed"):
        assert option in inspect and option in train
    assert "--lora.rank" not in inspect


def test_merge_help_offers_only_what_merge_does(capsys):
    from gemmatune.hub import MODEL_HELP

    merge = help_text(capsys, "merge")
    merge = merge.replace("".join(MODEL_HELP.split()), "")  # --model may be a GGUF file; merge writes none
    assert "gguf" not in merge.lower() and "--format" not in merge and "q8_0" not in merge
    export = help_text(capsys, "export")
    assert all(w in export for w in ("--format{hf,peft,gguf}", "q8_0", ".gguf"))


@pytest.mark.parametrize("argv, want", [
    (["train", "--weight_decy", "0.1"], "error: --weight_decy: unknown option; did you mean --weight-decay?"),
    (["train", "--lora-rnak", "4"], "error: --lora-rnak: unknown option; did you mean --lora-rank?"),
    (["data", "inspect", "--data", "x", "--seq_lenn", "4"],
     "error: --seq_lenn: unknown option; did you mean --seq-len?"),
    (["generate", "--max_new_tokens", "3"], "error: --max_new_tokens: unknown option; did you mean --max-new-tokens?"),
    (["merge", "--adapter", "a"], "error: gemmatune merge: the following arguments are required: --output"),
    (["export", "--adapter", "a", "--output", "o", "--format", "onnx"],
     "error: gemmatune export: argument --format: invalid choice: 'onnx'"),
    (["data", "inspect"], "error: --data is required"),
    (["train", "--config", "nowhere.yaml"], "error: nowhere.yaml: no such file"),
])
def test_command_line_mistakes_are_one_message(capsys, argv, want):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(want) and err.count("\n") == 1, err  # no usage block, no traceback


def test_train_with_no_arguments_is_the_sample_job(monkeypatch):
    import gemmatune.loop

    seen = []
    monkeypatch.setattr(gemmatune.loop, "train", lambda cfg: seen.append(cfg) or type("R", (), {"answers": []}))
    assert main(["train", "--max-steps", "1"]) == 0
    assert seen[0].data.paths == (str(SAMPLE / "chat.jsonl"),) and seen[0].max_steps == 1 and seen[0].lora.rank == 16
    assert main(["train", "--data", "mine.jsonl"]) == 0  # data given: no sample settings
    assert seen[1].data.paths == ("mine.jsonl",) and seen[1].lora.rank == 8


@pytest.mark.parametrize("argv, status", [
    (["generate", "--max-new-tokens", "8"], 141),  # the status a shell shows for a command ended by SIGPIPE
    (["data", "inspect", "--data", str(SAMPLE / "chat.jsonl")], 141),
    (["train", "--help"], 0),  # argparse ignores a failed write of its help
])
def test_a_closed_pipe_ends_quietly(argv, status):
    """`gemmatune ... | head`: the reader has gone before the output is written (a pipe whose read end is closed,
    so this does not depend on timing): no message, no traceback."""
    read, write = os.pipe()
    os.close(read)
    try:
        r = subprocess.run([sys.executable, "-m", "gemmatune.cli", *argv], stdout=write, stderr=subprocess.PIPE,
                           text=True, timeout=120)
    finally:
        os.close(write)
    assert r.returncode == status, r.stderr
    assert "error" not in r.stderr and "Traceback" not in r.stderr and "Exception" not in r.stderr, r.stderr
