"""`gemmatune generate`: only the generated text on stdout, errors as one message with status 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from gemmatune.cli import main
from gemmatune.config import DEFAULT_MODEL, PRESETS
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
