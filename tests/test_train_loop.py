"""`gemmatune train` end to end, through the command line: the embedded default job, exact resume after SIGKILL,
the output-directory refusals, non-finite steps, train -> merge -> transformers on a Hugging Face checkpoint, and
validation with evaluation prompts. Runs are tiny (the embedded 4-layer model, 64 positions, a few steps, float32)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import SMALL, SMALL3, strong_params
from gemmatune.cli import SAMPLE, main
from gemmatune.config import DEFAULT_MODEL
from gemmatune.settings import config_from_dict, load_yaml

# Settings shared by the small runs: float32 so that losses of two runs can be compared exactly.
TINY = ["--seq-len", "64", "--batch-size", "2", "--dtype", "float32", "--log-every", "1"]


def write_rows(path: Path, n: int = 40) -> Path:
    """n instruction/response rows as JSON lines (or CSV, by the suffix), distinct and of varied lengths."""
    rows = [{"instruction": f"Question {i}: what is {i} plus {i * 3 % 7}?",
             "response": f"The answer is {i + i * 3 % 7}, worked out " + "step by step " * (i % 4) + f"for item {i}."}
            for i in range(n)]
    if path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, ["instruction", "response"])
            w.writeheader()
            w.writerows(rows)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cli(args: list[str], cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 300
        ) -> subprocess.CompletedProcess:
    """`gemmatune ARGS` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "gemmatune.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def train_rows(run: Path) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]


def checkpoint_steps(run: Path) -> list[int]:
    """Steps of the complete checkpoints (a checkpoint being written is a hidden .step-N.partial-PID)."""
    d = run / "checkpoints"
    return sorted(int(m[1]) for p in (d.iterdir() if d.is_dir() else []) if (m := re.fullmatch(r"step-(\d+)", p.name)))


# --- 1. the embedded default job --------------------------------------------------------------------------------

@pytest.mark.slow
def test_default_job_learns_the_sample_answer(tmp_path):
    t0 = time.perf_counter()
    r = cli(["train"], cwd=tmp_path)
    wall = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    assert wall < 120, f"the default job took {wall:.0f}s"
    sample = load_yaml(SAMPLE / "train.yaml")
    [question] = sample["eval_prompts"]
    answers = {}
    for line in (SAMPLE / "chat.jsonl").read_text().splitlines():
        user, model = json.loads(line)["messages"][:2]
        answers[user["content"]] = model["content"]
    assert r.stdout.endswith(f"> {question}\n{answers[question]}\n"), r.stdout
    run = tmp_path / "runs" / "sample"

    rows = read_jsonl(run / "metrics.jsonl")
    assert rows and all(isinstance(row, dict) for row in rows)
    logged = [row for row in rows if "loss" in row]
    for row in logged:
        assert {"step", "loss", "lr", "tokens_per_s"} <= row.keys(), row
        assert math.isfinite(row["loss"]) and row["lr"] > 0 and row["tokens_per_s"] > 0, row
    steps = [row["step"] for row in logged]
    total = int(re.search(r"^steps\s+(\d+)$", (run / "summary.txt").read_text(), re.MULTILINE)[1])
    # every log_every steps, and the last step, each exactly once
    assert steps == sorted(set(range(sample["log_every"], total + 1, sample["log_every"])) | {total})
    assert logged[-1]["loss"] < logged[0]["loss"] / 3

    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and b"loss" in events[0].read_bytes()
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = config_from_dict(load_yaml(run / "config.yaml"))
    want = config_from_dict(sample)
    want = dataclasses.replace(want, data=dataclasses.replace(
        want.data, paths=tuple(str(SAMPLE / p) for p in want.data.paths)))
    assert saved == want
    summary = (run / "summary.txt").read_text()
    assert "final train loss" in summary and "skipped non-finite steps  0" in summary
    assert sorted(p.name for p in (run / "adapter").iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["rank"] == sample["lora"]["rank"]


# --- 2. exact resume after SIGKILL -------------------------------------------------------------------------------

# Dropout makes the result depend on the restored RNG key; save_every 2 gives several checkpoints to resume from;
# the evaluation prompt is answered (and logged) once, at the end.
RESUME_ARGS = ["--max-steps", "12", "--save-every", "2", "--lora.dropout", "0.1", "--seed", "7", "--lr", "3e-3",
               "--warmup_steps", "3", "--eval_prompts", "hi", "--eval_max_new_tokens", "4", *TINY]


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("resume") / "rows.jsonl")


@pytest.fixture(scope="module")
def cached_env(resume_data):
    """The processes of these tests share a persistent compilation cache: only the first compiles the train step
    (about 15 of its 25 seconds on 2 cores). A cached executable is the one a recompilation would produce."""
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(resume_data.parent / "jax-cache")}


@pytest.fixture(scope="module")
def uninterrupted(resume_data, cached_env):
    out = resume_data.parent / "uninterrupted"
    r = cli(["train", "--data", str(resume_data), "--output", str(out), *RESUME_ARGS], env=cached_env)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r.stdout


def adapter_tensors(run: Path) -> dict[str, np.ndarray]:
    return load_file(run / "adapter" / "adapter.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("after,seed", [
    ("step-00000002", 0),  # while training: soon after the first checkpoint
    ("step-00000012", 1),  # after the final checkpoint, while the adapter, plot and summary are written
])
def test_sigkill_then_resume_continues_exactly(resume_data, cached_env, uninterrupted, after, seed):
    uninterrupted, answer = uninterrupted
    out = resume_data.parent / f"killed-{seed}"
    args = ["train", "--data", str(resume_data), "--output", str(out), *RESUME_ARGS]
    log = resume_data.parent / f"killed-{seed}.stderr"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "gemmatune.cli", *args], stdout=subprocess.DEVNULL,
                                stderr=f, env=cached_env)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / after).is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        delay = random.Random(seed).uniform(0.0, 0.1)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, \
        f"the run ended before the kill ({delay=:.3f}s after {after}): {log.read_text()[-3000:]}"
    kept = checkpoint_steps(out)
    assert kept and (kept[-1] == 12) == (after == "step-00000012"), kept

    r = cli([*args, "--resume"], env=cached_env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from step {kept[-1]} " in r.stderr, r.stderr
    assert r.stdout == answer and answer.startswith("> hi\n")
    assert read_jsonl(out / "samples.jsonl") == read_jsonl(uninterrupted / "samples.jsonl")  # once, at step 12
    want, got = train_rows(uninterrupted), train_rows(out)
    assert [row["step"] for row in got] == list(range(1, 13))
    np.testing.assert_allclose([row["loss"] for row in got], [row["loss"] for row in want], rtol=0, atol=1e-6)
    a, b = adapter_tensors(uninterrupted), adapter_tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text()) == \
        json.loads((uninterrupted / "adapter" / "adapter_config.json").read_text())


# --- 3. refusals ---------------------------------------------------------------------------------------------------

def test_output_directory_refusals(tmp_path, capsys):
    data = write_rows(tmp_path / "rows.jsonl", 12)
    out = tmp_path / "run"
    base = ["train", "--data", str(data), "--output", str(out), "--max-steps", "2", *TINY]
    assert main(base) == 0
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    assert main(base) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--resume" in err and "--overwrite" in err and "Traceback" not in err, err

    assert main([*base, "--resume", "--lora-rank", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot resume") and "configuration" in err and "Traceback" not in err, err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # a refused run touches nothing


def test_a_failed_start_writes_nothing(tmp_path, capsys):
    """A start that fails on the user's input leaves --output as it was: absent (so the corrected command runs
    without --overwrite), or with --overwrite, the previous run whole. A bad row is found while the data is
    prepared, after the checks of the directory, model and mesh."""
    data = write_rows(tmp_path / "rows.jsonl", 12)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text() + '{"instruction": "unterminated\n')
    out = tmp_path / "runs" / "run"
    base = ["train", "--output", str(out), "--max-steps", "1", *TINY]
    for wrong, says in ((["--data", str(data), "--model", str(tmp_path / "no-such-model")], "no-such-model"),
                        (["--data", str(data), "--attention", "flash"], "attention: flash runs on GPUs"),
                        (["--data", str(bad)], "bad.jsonl")):
        assert main([*base, *wrong]) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1].startswith("error: ") and says in err and "Traceback" not in err, err
        assert not (tmp_path / "runs").exists(), list((tmp_path / "runs").rglob("*"))
    assert main([*base, "--data", str(data)]) == 0
    capsys.readouterr()

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert main([*base, "--data", str(bad), "--lr", "1e-3", "--overwrite"]) == 2
    assert "bad.jsonl" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert checkpoint_steps(out) == [1]


def test_overwrite_replaces_the_previous_run(tmp_path, capsys):
    data = write_rows(tmp_path / "rows.jsonl", 12)
    out = tmp_path / "run"
    base = ["train", "--data", str(data), "--output", str(out), *TINY]
    assert main([*base, "--max-steps", "3"]) == 0
    assert main([*base, "--max-steps", "2", "--lr", "1e-3", "--overwrite"]) == 0, capsys.readouterr().err
    assert [row["step"] for row in train_rows(out)] == [1, 2]  # the first run's lines are gone
    assert config_from_dict(load_yaml(out / "config.yaml")).lr == 1e-3
    assert checkpoint_steps(out) == [2]


# --- 4. non-finite steps --------------------------------------------------------------------------------------------

# An honest divergence through the command line: with lr 1e30 and no warmup, step 1 is finite (LoRA's B starts at
# zero, so the loss does not depend on the update) but its update puts ~1e30 into B; the activations of step 2
# overflow float32 and its loss is NaN.
DIVERGE = ["--max-steps", "4", "--save-every", "1", "--lr", "1e30", "--warmup_steps", "0", *TINY]


def test_nonfinite_stops_with_the_step_and_causes(tmp_path, capsys):
    from gemmatune.checkpoint import load_checkpoint
    from gemmatune.convert.hf import load_hf
    from gemmatune.hub import resolve_model
    from gemmatune.step import init_state, optimizer, split_trainable

    data = write_rows(tmp_path / "rows.jsonl", 12)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--output", str(out), *DIVERGE]) == 2
    err = capsys.readouterr().err
    assert "error: step 2: the loss or gradients are not finite" in err, err
    assert "learning rate" in err and "float16" in err and "--nonfinite skip" in err and "Traceback" not in err
    assert checkpoint_steps(out) == [1]  # nothing is saved after the bad step
    last = out / "checkpoints" / "step-00000001"
    assert str(last) in err

    tcfg = config_from_dict(load_yaml(out / "config.yaml"))
    cfg, base = load_hf(resolve_model(tcfg.model), dtype=tcfg.dtype)
    trainable, _ = split_trainable(base, cfg, tcfg, jax.random.key(1))
    state, meta = load_checkpoint(last, init_state(trainable, optimizer(tcfg, 4), jax.random.key(2)))
    assert meta["step"] == 1 and int(state["step"]) == 1
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state["params"]))


def test_nonfinite_skip_completes_and_counts(tmp_path, capsys):
    data = write_rows(tmp_path / "rows.jsonl", 12)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--output", str(out), *DIVERGE, "--nonfinite", "skip"]) == 0
    capsys.readouterr()
    rows = train_rows(out)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    bad = [row["step"] for row in rows if row["loss"] is None]  # JSON has no NaN: a non-finite loss is null
    assert bad == [2, 3, 4]  # a skipped step keeps the diverged state of step 1, so every later step fails too
    assert [row["skipped"] for row in rows] == [0, 1, 2, 3]
    assert "skipped non-finite steps  3" in (out / "summary.txt").read_text()
    assert checkpoint_steps(out)[-1] == 4 and (out / "adapter" / "adapter.safetensors").is_file()


# --- 5. a Hugging Face checkpoint: train, merge, load in transformers, generate ------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_train_merge_generate_on_a_hugging_face_checkpoint(tmp_path, capsys, family):
    import torch
    from transformers import AutoModelForCausalLM

    from gemmatune import lora
    from gemmatune.checkpoint import load_adapter
    from gemmatune.convert.hf import load_hf, save_hf
    from gemmatune.model import forward

    # the embedded tokenizer has 4096 tokens
    cfg = dataclasses.replace({"gemma2": SMALL, "gemma3": SMALL3}[family], vocab_size=4096)
    base_dir, out, merged = tmp_path / "base", tmp_path / "run", tmp_path / "merged"
    save_hf(base_dir, cfg, strong_params(cfg), tokenizer_dir=DEFAULT_MODEL)
    data = write_rows(tmp_path / "rows.csv", 16)
    assert main(["train", "--model", str(base_dir), "--data", str(data), "--output", str(out), "--max-steps", "4",
                 "--lr", "1e-2", "--warmup_steps", "0", *TINY]) == 0
    assert main(["merge", "--model", str(base_dir), "--adapter", str(out / "adapter"), "--output", str(merged)]) == 0
    capsys.readouterr()

    # still tied: no lm_head tensor is written, and transformers shares the embedding
    assert not any("lm_head" in k for f in merged.glob("*.safetensors") for k in load_file(f))
    hf = AutoModelForCausalLM.from_pretrained(merged, attn_implementation="eager", dtype=torch.float32).eval()
    assert type(hf).__name__ == {"gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}[family]
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()

    tokens = np.random.RandomState(0).randint(3, cfg.vocab_size, (2, 40))  # several sliding windows of 8
    with torch.no_grad():
        want = hf(torch.from_numpy(tokens)).logits.numpy()
    loaded_cfg, base = load_hf(base_dir, dtype="float32")
    adapters, lora_cfg = load_adapter(out / "adapter", loaded_cfg)
    got = np.asarray(forward(lora.attach(base, adapters), jnp.asarray(tokens), loaded_cfg, adapter=lora_cfg))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    unadapted = np.asarray(forward(base, jnp.asarray(tokens), loaded_cfg))
    assert np.abs(got - unadapted).max() > 1e-2  # the adapter learned something the comparison can see

    gen = ["generate", "--max-new-tokens", "5"]
    assert main([*gen, "--model", str(base_dir), "--adapter", str(out / "adapter")]) == 0
    with_adapter = capsys.readouterr().out
    assert main([*gen, "--model", str(merged)]) == 0
    assert with_adapter == capsys.readouterr().out and with_adapter.strip()


def test_qlora_resumes_exactly_and_merges_into_the_dequantized_base(tmp_path, capsys):
    """Gemma 3 on an NF4 base (double-quantized scales): a run cut after its first checkpoint resumes to the same
    adapter; resuming with another quantization is refused; the merged checkpoint is the quantized base plus the
    adapter (what was trained), not the original base plus the adapter."""
    import shutil

    from gemmatune import lora
    from gemmatune.checkpoint import load_adapter
    from gemmatune.config import Quantization
    from gemmatune.convert.hf import load_hf, save_hf
    from gemmatune.model import forward

    cfg = dataclasses.replace(SMALL3, vocab_size=4096)  # the embedded tokenizer's
    base_dir, out, cut, merged = tmp_path / "base", tmp_path / "run", tmp_path / "cut", tmp_path / "merged"
    save_hf(base_dir, cfg, strong_params(cfg), tokenizer_dir=DEFAULT_MODEL)
    data = write_rows(tmp_path / "rows.csv", 16)
    args = ["train", "--model", str(base_dir), "--data", str(data), "--max-steps", "2", "--save-every", "1",
            "--lr", "1e-2", "--warmup_steps", "0", "--quantize", "nf4", "--quantize-block", "32", "--double-quant",
            *TINY]
    assert main([*args, "--output", str(out)]) == 0
    shutil.copytree(out, cut)
    shutil.rmtree(cut / "checkpoints" / "step-00000002")
    shutil.rmtree(cut / "adapter")
    capsys.readouterr()
    assert main([*args, "--output", str(cut), "--resume", "--quantize", "int8"]) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert main([*args, "--output", str(cut), "--resume"]) == 0
    assert "resumed from step 1 " in capsys.readouterr().err
    a, b = adapter_tensors(out), adapter_tensors(cut)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)

    assert main(["merge", "--model", str(base_dir), "--adapter", str(out / "adapter"), "--output", str(merged)]) == 0
    assert "merging into its dequantized weights" in capsys.readouterr().err
    tokens = jnp.asarray(np.random.RandomState(0).randint(3, cfg.vocab_size, (2, 24)))
    _, quantized = load_hf(base_dir, "float32", quant=Quantization("nf4", 32, double=True))
    _, original = load_hf(base_dir, "float32")
    adapters, lora_cfg = load_adapter(out / "adapter", cfg)
    trained = np.asarray(forward(lora.attach(quantized, adapters), tokens, cfg, adapter=lora_cfg))
    _, m = load_hf(merged, "float32")
    np.testing.assert_allclose(np.asarray(forward(m, tokens, cfg)), trained, rtol=0, atol=1e-4)
    assert np.abs(np.asarray(forward(lora.attach(original, adapters), tokens, cfg, adapter=lora_cfg))
                  - trained).max() > 1e-2


# --- 6. validation and evaluation prompts ----------------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["--eval_prompts", "--eval-prompts"])
def test_eval_prompts_flag_spellings(spelling):
    from gemmatune.cli import build_parser
    from gemmatune.settings import train_config_from_args

    args, extra = build_parser().parse_known_args(["train", "--data", "x.jsonl", spelling, "hi", "there"])
    assert not extra and train_config_from_args(args).eval_prompts == ("hi", "there")


def test_validation_loss_and_samples(tmp_path, capsys):
    data = write_rows(tmp_path / "rows.jsonl", 30)
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--output", str(out), "--max-steps", "5", "--val-fraction", "0.2",
                 "--eval-every", "2", "--eval_prompts", "hi", "--eval_max_new_tokens", "8", "--eval-generate",
                 "--eval-generate-examples", "3", *TINY]) == 0
    stdout, _ = capsys.readouterr()
    rows = read_jsonl(out / "metrics.jsonl")
    val = [row for row in rows if "val_loss" in row]
    assert [row["step"] for row in val] == [2, 4, 5]  # every eval_every steps and at the end
    for row in val:
        assert 0 < row["val_loss"] < 20 and row["val_ppl"] == pytest.approx(math.exp(row["val_loss"]), rel=1e-9)
        # --eval-generate: the validation answers' metrics (means over 3 examples) in the same row
        assert all(0 <= row[f"val_{m}"] <= 1 for m in ("exact_match", "contains", "f1", "rouge_l")), row
    tensorboard = next((out / "tensorboard").glob("events.out.tfevents.*")).read_bytes()
    assert b"val_rouge_l" in tensorboard
    samples = read_jsonl(out / "samples.jsonl")
    assert [(s["step"], s["tag"]) for s in samples] == [(2, "hi"), (4, "hi"), (5, "hi")]
    assert all(isinstance(s["text"], str) for s in samples)
    assert stdout == f"> hi\n{samples[-1]['text']}\n"  # the final answer is what the command prints
    summary = (out / "summary.txt").read_text()
    assert re.search(rf"^final validation loss\s+{val[-1]['val_loss']:.4f}$", summary, re.MULTILINE), summary
