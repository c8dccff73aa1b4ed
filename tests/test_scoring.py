"""Answer metrics: hand-computed values on small cases, and the invariants that hold for any text."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gemmatune.scoring import METRICS, contains, exact_match, f1, lcs_length, rouge_l, score, words


def test_words_lowercase_and_drop_punctuation():
    assert words("  The Cat,  sat!\n") == ["the", "cat", "sat"]
    assert words("don't e-mail $5+3") == ["dont", "email", "53"]  # deleted, not split, as SQuAD does
    assert words("«Bonjour», dit-il… ¿Qué?") == ["bonjour", "ditil", "qué"]  # Unicode punctuation too
    assert words(" \t ") == [] and words("...") == []


@pytest.mark.parametrize("prediction, reference, want", [
    (" yes\n", "yes", 1.0),  # surrounding whitespace is trimmed
    ("Yes", "yes", 0.0),  # case is not
    ("yes.", "yes", 0.0),
    ("", "  ", 1.0),
])
def test_exact_match(prediction, reference, want):
    assert exact_match(prediction, reference) == want


@pytest.mark.parametrize("prediction, reference, want", [
    ("The answer is 42.", " 42 ", 1.0),
    ("42", "The answer is 42", 0.0),  # not symmetric
    ("forty-two", "Forty", 0.0),  # case matters
    ("anything", "", 1.0),
])
def test_contains(prediction, reference, want):
    assert contains(prediction, reference) == want


@pytest.mark.parametrize("prediction, reference, want", [
    # [the, cat, sat] vs [a, cat, sat, down]: 2 words in common; P = 2/3, R = 2/4, F1 = 2PR/(P+R) = 4/7
    ("the cat sat", "a cat sat down", 4 / 7),
    ("The Cat, sat!", "the cat sat", 1.0),
    # bags of words: {a: 3, b: 1} vs {a: 1, b: 2} share min(3,1) + min(1,2) = 2; P = 2/4, R = 2/3: F1 = 4/7
    ("a a a b", "a b b", 4 / 7),
    ("cat sat", "sat cat", 1.0),  # order does not matter
    ("dog", "cat", 0.0),
    ("", "", 1.0), ("!!", "", 1.0), ("", "cat", 0.0),
])
def test_f1(prediction, reference, want):
    assert f1(prediction, reference) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("prediction, reference, want", [
    # LCS of [the cat sat on the mat] and [the mat the cat sat] is [the cat sat], 3: P = 3/6, R = 3/5, F = 6/11
    ("the cat sat on the mat", "the mat the cat sat", 6 / 11),
    ("cat sat", "sat cat", 0.5),  # order matters: LCS 1, P = R = 1/2
    ("the cat sat", "a cat sat down", 4 / 7),  # LCS [cat sat] = the common words here
    ("A B C D", "a x c y", 0.5),
    ("", "", 1.0), ("", "cat", 0.0),
])
def test_rouge_l(prediction, reference, want):
    assert rouge_l(prediction, reference) == pytest.approx(want, abs=1e-12)


def test_lcs_length():
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # the textbook example (BCBA)
    assert lcs_length([], ["x"]) == 0 and lcs_length("abc", "abc") == 3


def test_score_picks_metrics_in_order():
    assert list(score("a", "a", ["rouge_l", "contains"])) == ["rouge_l", "contains"]
    assert score("the cat", "the cat") == dict.fromkeys(METRICS, 1.0)


text = st.text(st.sampled_from(list("ab c,.-É!\n\t")) | st.characters(), max_size=30)


@given(text, text)
def test_scores_are_in_unit_interval_and_symmetric_where_they_should_be(prediction, reference):
    for name, metric in METRICS.items():
        assert 0.0 <= metric(prediction, reference) <= 1.0, name
    for metric in (f1, rouge_l, exact_match):
        assert metric(prediction, reference) == metric(reference, prediction)
    assert rouge_l(prediction, reference) <= f1(prediction, reference)  # a common subsequence is a common bag
    if exact_match(prediction, reference):
        assert contains(prediction, reference) == 1.0 and f1(prediction, reference) == 1.0
        assert rouge_l(prediction, reference) == 1.0


@given(text)
def test_identical_texts_score_one(t):
    assert score(t, t) == dict.fromkeys(METRICS, 1.0)
