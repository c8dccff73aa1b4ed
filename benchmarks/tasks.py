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

import datetime
import json
import random
from collections.abc import Sequence
from pathlib import Path

# gemmatune's data.template: the prompt is everything before {response}; the response (and the <eos> after it) is
# what is trained.
TEMPLATE = "Date: {instruction}\nDMY: {response}"
PROMPT = TEMPLATE.partition("{response}")[0]
FIRST = datetime.date(1900, 1, 1)
DAYS = (datetime.date(2099, 12, 31) - FIRST).days + 1  # dates 1900-01-01 .. 2099-12-31


def dmy(iso: str) -> str:
    """"2024-03-15" -> "15.03.2024"."""
    year, month, day = iso.split("-")
    return f"{day}.{month}.{year}"


def splits(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Train and held-out examples ({"instruction", "response"} rows), disjoint: distinct dates from one seeded
    permutation, the first n_train for training and the next n_eval held out."""
    offsets = random.Random(seed).sample(range(DAYS), n_train + n_eval)
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
    """The answer in a generated text (decoded after the stop tokens were cut off): up to the first newline, stripped."""
    return text.split("\n", 1)[0].strip()


def exact_match(answers: Sequence[str], rows: Sequence[dict[str, str]]) -> float:
    """The fraction of generated texts whose answer equals the row's response exactly."""
    assert len(answers) == len(rows)
    return sum(answer_of(a) == r["response"] for a, r in zip(answers, rows)) / len(rows)
