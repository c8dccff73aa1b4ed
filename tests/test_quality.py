"""Fine-tuning works on a real model: gemmatune teaches Google's Gemma 3 270M (the base model, from its GGUF file) a
skill it does not have, and the skill carries over to dates it never saw.

The task (benchmarks/tasks.py): "Date: 2024-03-15\\nDMY: " -> "15.03.2024", exact match on a held-out split of dates
disjoint from the training ones. The base model copies the ISO date or guesses (0 of 32, with gemmatune and with
transformers); after 16 LoRA steps of 8 examples it answers 31 of the 32 held-out dates (training loss ~2e-4;
transformers + PEFT with the same recipe and another example order: 28 of 32, benchmarks/quality.py), hence the
margin in the thresholds. Everything goes through what a user runs: the data as a JSONL file, gemmatune.train with the
GGUF file as the model, the adapter it writes loaded back and merged, and greedy generation.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import tasks  # noqa: E402 (benchmarks/ is not a package)

import gemmatune  # noqa: E402
from gemmatune.convert import load_model  # noqa: E402
from gemmatune.convert.peft import load_adapter_for  # noqa: E402
from gemmatune.lora import merge  # noqa: E402
from gemmatune.tokenizer import load_tokenizer  # noqa: E402

N_TRAIN, N_HELD_OUT = 1000, 32


def test_fine_tune_teaches_the_real_270m_a_held_out_skill(gemma3_gguf, tmp_path):
    recipe = tasks.Recipe()
    train, held_out = tasks.splits(N_TRAIN, N_HELD_OUT)
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in held_out}
    tokenizer = load_tokenizer(gemma3_gguf)
    cfg, base = load_model(gemma3_gguf, dtype=recipe.dtype)
    before = tasks.exact_match(tasks.gemmatune_answers(base, cfg, tokenizer, held_out), held_out)

    data = tasks.write_jsonl(train, tmp_path / "dates.jsonl")
    result = gemmatune.train(recipe.train_config(str(gemma3_gguf), data, tmp_path / "run"))
    assert result.summary["steps"] == recipe.steps and result.summary["train_loss"] < 0.1, result.summary

    adapters, lora_cfg = load_adapter_for(gemma3_gguf, result.summary["adapter"], cfg)
    answers = tasks.gemmatune_answers(merge(base, adapters, lora_cfg), cfg, tokenizer, held_out)
    after = tasks.exact_match(answers, held_out)
    wrong = [(r["response"], a) for r, a in zip(held_out, answers) if tasks.answer_of(a) != r["response"]]
    assert before <= 0.1, before
    assert after >= 0.75 and after >= before + 0.5, (before, after, wrong)
