"""The tokenizer gemmatune builds from a GGUF file's vocabulary against llama.cpp's own tokenizer of that file (the
real Gemma 3 270M): ids on the varied strings of tests/test_gemma3_tokenizer.py, and detokenized text."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_gemma3_tokenizer import STRINGS

from gemmatune.tokenizer import Tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def tok(gemma3_gguf: Path) -> Tokenizer:
    return load_tokenizer(gemma3_gguf)


@pytest.fixture(scope="module")
def llama(gemma3_gguf: Path):
    import llama_cpp

    model = llama_cpp.Llama(str(gemma3_gguf), vocab_only=True, verbose=False)
    yield model
    model.close()


def _llama_ids(llama, text: str) -> list[int]:
    return llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def test_encode_matches_llama_cpp(tok: Tokenizer, llama) -> None:
    """Equal ids on all 3,000 strings, long whitespace runs included (llama.cpp, like SentencePiece, cuts Gemma 3's
    user-defined whitespace pieces longest first)."""
    assert len(STRINGS) == 3000
    for text in STRINGS:
        assert tok.encode(text) == _llama_ids(llama, text), text


def test_detokenize_matches_llama_cpp(tok: Tokenizer, llama) -> None:
    """The text back, special tokens spelled out, as llama.cpp detokenizes (valid text only: llama.cpp drops invalid
    byte runs where gemmatune writes U+FFFD; PITFALLS)."""
    for text in STRINGS:
        ids = tok.encode(text)
        assert llama.detokenize(ids, special=True) == tok.decode(ids, skip_special_tokens=False).encode("utf-8")


def test_turn_markers_as_llama_cpp_reads_them(tok: Tokenizer, llama) -> None:
    assert llama.token_bos() == tok.bos_id and llama.token_eos() == tok.eos_id
    assert _llama_ids(llama, "<start_of_turn>") == [tok.start_of_turn_id] == [105]
    assert _llama_ids(llama, "<end_of_turn>") == [tok.end_of_turn_id] == [106]


def test_literal_space_marker_is_where_llama_cpp_differs(tok: Tokenizer, llama) -> None:
    """The one difference found: "▁" (U+2581) written in the text. SentencePiece writes spaces as "▁" before it
    matches pieces, so a written "▁" reads as a space, and transformers agrees (tests/test_gemma3_tokenizer.py);
    llama.cpp matches the whitespace pieces in the raw text, before that step, so it never joins a written "▁" into
    them. gemmatune follows SentencePiece, the checkpoint's own tokenizer."""
    text = " \u2581 x"
    assert [tok.id_to_piece(i) for i in tok.encode(text)] == ["\u2581" * 3, "x"]
    assert [tok.id_to_piece(i) for i in _llama_ids(llama, text)] == ["\u2581", "\u2581", "\u2581x"]
