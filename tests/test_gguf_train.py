"""A GGUF file as --model, end to end: `gemmatune train --model tiny.gguf` (a small Gemma 3 with the embedded
tokenizer's vocabulary, as llama.cpp would run it) trains, resumes, generates, and exports to HF (transformers loads
it with gemmatune's logits, the tokenizer rebuilt from the file's vocabulary) and to GGUF (the source's vocabulary
copied, the merged weights read back)."""

from __future__ import annotations

import dataclasses
import json

import gguf
import jax.numpy as jnp
import numpy as np
import torch
from test_gguf_gemma3 import G3
from test_train_loop import TINY, read_jsonl, write_rows

from conftest import strong_params
from gemmatune import lora
from gemmatune.checkpoint import load_adapter
from gemmatune.cli import main
from gemmatune.config import DEFAULT_MODEL
from gemmatune.convert import load_model
from gemmatune.convert.gguf import save_gguf
from gemmatune.model import forward
from gemmatune.settings import load_yaml
from gemmatune.tokenizer import load_tokenizer

CFG = dataclasses.replace(G3, query_pre_attn_scalar=G3.head_dim, rope_scaling=1.0)


def test_train_resume_generate_and_export_from_a_gguf_file(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, run = tmp_path / "base.gguf", tmp_path / "run"
    save_gguf(base, CFG, strong_params(CFG, 3), DEFAULT_MODEL, dtype="f32")
    data = write_rows(tmp_path / "rows.jsonl", 16)
    args = ["train", "--model", str(base), "--data", str(data), "--output", str(run), "--lr", "1e-2",
            "--warmup_steps", "0", "--save-every", "2", *TINY]
    assert main([*args, "--max-steps", "2"]) == 0
    assert load_yaml(run / "config.yaml")["model"] == str(base)  # the run records the file
    assert main([*args, "--max-steps", "4", "--resume"]) == 0  # continues from the step-2 checkpoint
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert steps[-2:] == [3, 4], steps
    capsys.readouterr()

    assert main(["generate", "--model", str(base), "--adapter", str(run / "adapter"), "--prompt", "Question 3:",
                 "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()

    cfg, params = load_model(base)
    adapters, lora_cfg = load_adapter(run / "adapter", cfg)
    tok = load_tokenizer(base)
    ids = tok.encode("Question 7: what is 7 plus 0? The answer is 7, worked out step by step.", add_bos=True)
    want = np.asarray(forward(lora.attach(params, adapters), jnp.asarray([ids]), cfg, adapter=lora_cfg))[0]
    assert np.abs(want - np.asarray(forward(params, jnp.asarray([ids]), cfg))[0]).max() > 1e-2  # it learned

    hf_dir = tmp_path / "hf"
    assert main(["export", "--model", str(base), "--adapter", str(run / "adapter"), "--format", "hf",
                 "--output", str(hf_dir)]) == 0
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    assert AutoTokenizer.from_pretrained(hf_dir)("Question 7: 7 plus 0?").input_ids == tok.encode(
        "Question 7: 7 plus 0?", add_bos=True)

    out = tmp_path / "tuned.gguf"
    assert main(["export", "--model", str(base), "--adapter", str(run / "adapter"), "--format", "gguf",
                 "--output", str(out), "--dtype", "f32"]) == 0
    fields = gguf.GGUFReader(out).fields
    source = gguf.GGUFReader(base).fields
    assert fields["tokenizer.ggml.tokens"].contents() == source["tokenizer.ggml.tokens"].contents()
    assert json.loads(fields["gemmatune.merged_adapters"].contents())[0]["source"] == str((run / "adapter").resolve())
    tuned_cfg, tuned = load_model(out)
    assert tuned_cfg == cfg
    got = np.asarray(forward(tuned, jnp.asarray([ids]), tuned_cfg))[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
