"""Per-example scores of a generated answer against a reference answer, each in [0, 1]; pure Python.

  exact_match  1 if the two are equal after trimming surrounding whitespace, else 0
  contains     1 if the trimmed reference occurs in the prediction (an empty reference is contained in anything)
  f1           token-level F1 over words (SQuAD's): the overlap of the two bags of words, 2 * common / (|pred| +
               |ref|)
  rouge_l      ROUGE-L F-measure (beta 1) over the same words: 2 * LCS / (|pred| + |ref|), LCS the longest common
               subsequence of the two word sequences

Words (`words`): the text lowercased, every punctuation character deleted (Unicode categories P*, plus ASCII's
`string.punctuation`, whose symbols such as $ + < = > ^ ` | ~ SQuAD deletes too), then split on whitespace. Deleted,
not replaced by a space, as SQuAD does: "don't" is "dont", "e-mail" is "email". Unlike SQuAD's official script, the
English articles a/an/the are kept: the answers scored here need not be English. Two texts without words (both
empty) score 1 on f1 and rouge_l; one without words against one with words scores 0.

f1 and rouge_l are symmetric (swap prediction and reference, same score); exact_match is too; contains is not.
"""

from __future__ import annotations

import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence

_ASCII_PUNCTUATION = frozenset(string.punctuation)


def words(text: str) -> list[str]:
    """The normalised words of text (see the module docstring)."""
    kept = "".join(c for c in text.lower()
                   if c not in _ASCII_PUNCTUATION and not unicodedata.category(c).startswith("P"))
    return kept.split()


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def contains(prediction: str, reference: str) -> float:
    return float(reference.strip() in prediction)


def _f_measure(common: int, n_pred: int, n_ref: int) -> float:
    """2PR / (P + R) with P = common / n_pred, R = common / n_ref, written so that it is exact and symmetric."""
    if n_pred == 0 and n_ref == 0:
        return 1.0
    return 2 * common / (n_pred + n_ref)


def f1(prediction: str, reference: str) -> float:
    p, r = words(prediction), words(reference)
    common = sum((Counter(p) & Counter(r)).values())  # each word counted as often as it occurs in both
    return _f_measure(common, len(p), len(r))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """The length of the longest common subsequence of a and b (dynamic programming, O(len(a) * len(b)) time,
    O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)  # row[j]: LCS of the prefix of a read so far and b[:j]
    for x in a:
        diagonal = 0  # the previous row's row[j - 1]
        for j, y in enumerate(b, 1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    p, r = words(prediction), words(reference)
    return _f_measure(lcs_length(p, r), len(p), len(r))


Metric = Callable[[str, str], float]  # (prediction, reference) -> score in [0, 1]
METRICS: dict[str, Metric] = {"exact_match": exact_match, "contains": contains, "f1": f1, "rouge_l": rouge_l}


def score(prediction: str, reference: str, metrics: Sequence[str] = tuple(METRICS)) -> dict[str, float]:
    """The named metrics of one prediction, in the order given."""
    return {name: METRICS[name](prediction, reference) for name in metrics}
