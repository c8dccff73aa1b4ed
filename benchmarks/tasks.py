"""A small exact-match skill for proving fine-tuning on a real model: rewrite an ISO date as day.month.year.

    {"instruction": "2024-03-15", "response": "15.03.2024"}

rendered with TEMPLATE (a plain prompt, no chat turns: the Gemma 3 270M base model has no chat template) as

    <bos>Date: 2024-03-15\\nDMY: 15.03.2024<eos>

The prompt does not say what "DMY" means, so a base model has to guess the format; it is a copy-and-rearrange skill
(Gemma's tokenizer splits digits, so every digit is its own token) of ~25 tokens per example, cheap to learn on a
CPU. Train and held-out splits are disjoint sets of dates drawn from one seeded permutation, so no held-out date is
ever seen in training.

Exact match (`answer_of` and `exact_match`): the generated token ids up to (not including) the first stop token
(<eos> or <end_of_turn>) are decoded, the text is cut at the first newline, and surrounding whitespace is stripped;
the example counts as right iff what is left equals the response string exactly.

Used by benchmarks/quality.py and tests/test_quality.py.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# gemmatune's data.template: the prompt is everything before {response}; the response (and the <eos> after it) is
# what is trained.
TEMPLATE = "Date: {instruction}\nDMY: {response}"
PROMPT = TEMPLATE.partition("{response}")[0]
ANSWER_TOKENS = 10  # "15.03.2024": one token per character (digits are split, "." is its own piece)
FIRST = datetime.date(1900, 1, 1)
DAYS = (datetime.date(2099, 12, 31) - FIRST).days + 1  # dates 1900-01-01 .. 2099-12-31


def dmy(iso: str) -> str:
    """"2024-03-15" -> "15.03.2024"."""
    year, month, day = iso.split("-")
    return f"{day}.{month}.{year}"


def splits(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and held-out examples ({"instruction", "response"} rows), disjoint: distinct dates from one seeded
    permutation of all of them, the first n_train for training and the next n_eval held out (so a longer held-out
    split extends a shorter one, and the training split does not depend on n_eval)."""
    offsets = list(range(DAYS))
    random.Random(seed).shuffle(offsets)
    offsets = offsets[:n_train + n_eval]
    rows = []
    for off in offsets:
        iso = (FIRST + datetime.timedelta(days=off)).isoformat()
        rows.append({"instruction": iso, "response": dmy(iso)})
    return rows[:n_train], rows[n_train:]


def prompt(row: dict[str, str]) -> str:
    """The text before the answer, as gemmatune's template renders it (without <bos>)."""
    return PROMPT.replace("{instruction}", row["instruction"])


def write_jsonl(rows: Sequence[dict[str, str]], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def answer_of(text: str) -> str:
    """The answer in a generated text (decoded, stop tokens cut off): up to the first newline, stripped."""
    return text.split("\n", 1)[0].strip()


def exact_match(answers: Sequence[str], rows: Sequence[dict[str, str]]) -> float:
    """The fraction of generated texts whose answer equals the row's response exactly."""
    assert len(answers) == len(rows)
    return sum(answer_of(a) == r["response"] for a, r in zip(answers, rows)) / len(rows)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The fine-tune both tools run (test_quality.py and quality.py): LoRA on all seven projections, AdamW after
    clipping at 1.0, linear warmup then cosine decay to 0, one example per row (every example is 30 tokens: <bos>,
    18 of prompt, 10 of answer, <eos>; the answer and <eos> trained), float32."""

    steps: int = 16
    batch: int = 8  # examples (rows) per step
    seq: int = 32  # input positions per row
    lr: float = 2e-3
    warmup: int = 2
    rank: int = 8
    alpha: float = 16.0
    clip: float = 1.0
    dtype: str = "float32"
    targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")

    def lr_at(self, step: int) -> float:
        """The learning rate of update `step` (0-based), as gemmatune's schedule (step.schedule) computes it: linear
        from 0 over the warmup, then cosine to 0 at `steps`."""
        import math

        if step < self.warmup:
            return self.lr * step / self.warmup
        t = min(step - self.warmup, self.steps - self.warmup) / max(self.steps - self.warmup, 1)
        return self.lr * 0.5 * (1 + math.cos(math.pi * t))

    def train_config(self, model: str, data: Path, output: Path, **kw: Any):
        """gemmatune's TrainConfig for this recipe: a user's `gemmatune train` with these settings."""
        from gemmatune import DataConfig, LoraConfig, TrainConfig

        return TrainConfig(model=model, output=str(output), dtype=self.dtype, max_steps=self.steps,
                           batch_size=self.batch, lr=self.lr, schedule="cosine", warmup_steps=self.warmup,
                           clip_norm=self.clip, weight_decay=0.0,
                           lora=LoraConfig(rank=self.rank, alpha=self.alpha, targets=self.targets),
                           data=DataConfig(paths=(str(data),), template=TEMPLATE, max_seq_len=self.seq, packing="pad"),
                           report_to=("none",), **kw)


def gemmatune_answers(params: Any, cfg: Any, tokenizer: Any, rows: Sequence[dict[str, str]],
                      adapter: tuple[Any, Any] | None = None) -> list[str]:
    """Greedy answers of gemmatune's generate to the rows' prompts (one batch), decoded up to the first stop token.
    `adapter` (adapters, LoraConfig) is applied unmerged, as `gemmatune generate --adapter` applies it (the only
    way onto a quantized base, which has no weights to merge into)."""
    from gemmatune.generate import generate
    from gemmatune.lora import make_bank
    from gemmatune.model import unstack

    prompts = [[tokenizer.bos_id] + tokenizer.encode(prompt(r)) for r in rows]
    out = generate(unstack(params), cfg, prompts, max_new_tokens=ANSWER_TOKENS + 1,
                   stop_ids=(tokenizer.eos_id, tokenizer.end_of_turn_id),
                   bank=make_bank([adapter]) if adapter else None, adapter_ids=[0] * len(rows) if adapter else None)
    return [tokenizer.decode(o) for o in out]
