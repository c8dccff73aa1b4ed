"""`gemmatune train --method dpo | distill`: runs on the embedded tiny model that start, log, resume and export like
supervised runs, and the refusals of what they cannot learn from. The losses' exactness is tested in
test_preference.py and test_distill.py."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from test_train_loop import TINY, adapter_tensors, train_rows, write_rows

from gemmatune.checkpoint import save_adapter
from gemmatune.cli import SAMPLE, main
from gemmatune.config import DEFAULT_MODEL, LoraConfig
from gemmatune.convert.hf import load_hf, save_hf
from gemmatune.lora import init_adapters


def write_pairs(path: Path, n: int = 12) -> Path:
    rows = [{"prompt": f"What is {i} plus {i % 5}?", "chosen": f"{i} plus {i % 5} is {i + i % 5}.",
             "rejected": f"{i} plus {i % 5} is {i + i % 5 + 1 + i % 3}, I think."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cut_after_first_checkpoint(run: Path, cut: Path, last: str) -> None:
    """A copy of a finished run as it was when killed after its first checkpoint."""
    shutil.copytree(run, cut)
    shutil.rmtree(cut / "checkpoints" / last)
    shutil.rmtree(cut / "adapter")


def assert_same_adapter(a: Path, b: Path) -> None:
    x, y = adapter_tensors(a), adapter_tensors(b)
    assert x.keys() == y.keys()
    for k in x:
        np.testing.assert_allclose(y[k], x[k], rtol=0, atol=1e-6, err_msg=k)


def test_dpo_from_an_adapter_logs_rewards_resumes_exactly_and_merges(tmp_path, capsys):
    """The reference is the adapter the run starts from: at the first step policy and reference are equal, so the
    rewards are 0 and the sigmoid loss is log 2. A run cut after its first checkpoint resumes to the same adapter,
    and the adapter merges like a supervised one."""
    cfg, _ = load_hf(DEFAULT_MODEL, "float32")
    lora_cfg = LoraConfig(rank=4, alpha=8.0)
    start = init_adapters(cfg, lora_cfg, jax.random.key(1))
    start = jax.tree.map(lambda a: a + 0.05 * np.asarray(jax.random.normal(jax.random.key(2), a.shape)), start)
    save_adapter(tmp_path / "sft", jax.device_get(start), lora_cfg, cfg, str(DEFAULT_MODEL))
    data, out, cut = write_pairs(tmp_path / "prefs.jsonl"), tmp_path / "run", tmp_path / "cut"
    args = ["train", "--method", "dpo", "--data", str(data), "--adapter", str(tmp_path / "sft"), "--lora.rank", "4",
            "--lora.alpha", "8", "--max-steps", "2", "--save-every", "1", "--lr", "1e-2", "--warmup-steps", "0",
            "--val-fraction", "0.25", "--report-to", "none", *TINY]
    assert main([*args, "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "reward accuracy" in err and "validation perplexity" not in err
    first, second = train_rows(out)
    assert first["rewards_chosen"] == first["rewards_rejected"] == first["reward_margin"] == 0.0
    np.testing.assert_allclose(first["loss"], np.log(2.0), rtol=1e-6)
    assert first["pairs"] == 2  # a pair takes 40 to 50 positions: one in each of the 2 rows of 64
    assert second["reward_margin"] != 0.0 and {"logps_chosen", "logps_rejected", "reward_accuracy"} <= second.keys()
    val = [r for r in json.loads("[" + ",".join((out / "metrics.jsonl").read_text().splitlines()) + "]")
           if "val_loss" in r]
    assert val and "val_reward_accuracy" in val[-1] and "val_ppl" not in val[-1]

    cut_after_first_checkpoint(out, cut, "step-00000002")
    assert main([*args, "--output", str(cut), "--resume"]) == 0
    assert "resumed from step 1 " in capsys.readouterr().err
    assert_same_adapter(out, cut)
    assert main(["merge", "--adapter", str(out / "adapter"), "--output", str(tmp_path / "merged")]) == 0


def test_distill_in_the_step_and_from_a_cache(tmp_path, capsys):
    """A teacher with more embedding rows than the student, the extra ones past the tokenizer's ids, and the
    student's weights on the ids they share: distilled over the shared ids, its distribution is the student's own,
    so the first step's divergence is 0, in the step and from a top-k cache alike. The cache is computed once and
    reused; a run cut after its first checkpoint resumes to the same adapter."""
    cfg, params = load_hf(DEFAULT_MODEL, "float32")
    extra = np.asarray(jax.random.normal(jax.random.key(0), (64, cfg.hidden_size)), np.float32)
    teacher = {**params, "embed": np.concatenate([np.asarray(params["embed"]), extra])}
    save_hf(tmp_path / "teacher", dataclasses.replace(cfg, vocab_size=cfg.vocab_size + 64), teacher,
            tokenizer_dir=DEFAULT_MODEL)
    data = SAMPLE / "chat.jsonl"
    common = ["train", "--method", "distill", "--teacher", str(tmp_path / "teacher"), "--data", str(data),
              "--kd-temperature", "2", "--max-steps", "2", "--lr", "1e-2", "--report-to", "none", *TINY]
    assert main([*common, "--output", str(tmp_path / "in-step")]) == 0
    err = capsys.readouterr().err
    assert f"compared on the {cfg.vocab_size} ids they share" in err and "kd " in err
    first = train_rows(tmp_path / "in-step")[0]
    assert abs(first["kd"]) < 1e-5 and first["ce"] > 1.0
    np.testing.assert_allclose(first["loss"], 0.5 * first["kd"] + 0.5 * first["ce"], rtol=1e-6)

    cached = [*common, "--teacher-cache", str(tmp_path / "cache"), "--kd-topk", "8", "--save-every", "1"]
    assert main([*cached, "--output", str(tmp_path / "cached")]) == 0
    assert "computing" in capsys.readouterr().err
    assert abs(train_rows(tmp_path / "cached")[0]["kd"]) < 1e-5
    cut_after_first_checkpoint(tmp_path / "cached", tmp_path / "cut", "step-00000002")
    assert main([*cached, "--output", str(tmp_path / "cut"), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "resumed from step 1 " in err and "computing" not in err
    assert_same_adapter(tmp_path / "cached", tmp_path / "cut")


@pytest.mark.parametrize("args, words", [
    (["--method", "lora"], "method: 'lora' is now set by tune (--tune lora)"),
    (["--method", "dpo", "--tune", "full"], "method dpo trains LoRA adapters"),
    (["--method", "distill"], "method distill needs a teacher: pass --teacher"),
    (["--teacher", "tiny"], "teacher and teacher_cache are for method distill"),
    (["--method", "dpo"], "method dpo learns from preference pairs, but the rows have no chosen and rejected"),
    (["--method", "dpo", "--dpo-label-smoothing", "0.5"], "dpo_label_smoothing in [0, 0.5)"),
    (["--method", "distill", "--teacher", "tiny", "--kd-alpha", "2"], "kd_alpha and kd_beta in [0, 1]"),
])
def test_refusals(tmp_path, capsys, args, words):
    data = write_rows(tmp_path / "rows.jsonl", 4)
    assert main(["train", "--data", str(data), "--output", str(tmp_path / "out"), *args]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_preference_pairs_need_method_dpo_and_a_teacher_its_tokenizer(tmp_path, capsys):
    pairs = write_pairs(tmp_path / "prefs.jsonl", 4)
    assert main(["train", "--data", str(pairs), "--output", str(tmp_path / "out")]) == 2
    assert "the rows are preference pairs (chosen and rejected), which method sft cannot learn from; pass " \
           "--method dpo" in capsys.readouterr().err
    # A teacher whose tokenizer differs from the student's: here the student's with two pieces' ids swapped.
    teacher = tmp_path / "teacher"
    shutil.copytree(DEFAULT_MODEL, teacher)
    tok = json.loads((teacher / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tok["model"]["vocab"]
    vocab["▁the"], vocab["▁a"] = vocab["▁a"], vocab["▁the"]
    (teacher / "tokenizer.json").write_text(json.dumps(tok), encoding="utf-8")
    (teacher / "tokenizer.model").unlink()
    data = write_rows(tmp_path / "rows.jsonl", 4)
    assert main(["train", "--method", "distill", "--teacher", str(teacher), "--data", str(data),
                 "--output", str(tmp_path / "out")]) == 2
    assert "the teacher's tokenizer differs from the student's" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_eval_of_preference_pairs_scores_their_chosen_responses(tmp_path, capsys):
    pairs = write_pairs(tmp_path / "prefs.jsonl", 4)
    chosen = tmp_path / "chosen.jsonl"
    chosen.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n"
                              for r in map(json.loads, pairs.read_text().splitlines())), encoding="utf-8")
    outs = []
    for data in (pairs, chosen):
        assert main(["eval", "--data", str(data), "--json"]) == 0
        outs.append(capsys.readouterr())
    assert "evaluating 4 pairs (their chosen responses)" in outs[0].err
    got, want = (json.loads(out.out)["runs"][0] for out in outs)
    assert got["trained_tokens"] == want["trained_tokens"] > 0 and got["loss"] == want["loss"]
