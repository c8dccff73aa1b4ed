"""The real Gemma 3 tokenizer (the 270M GGUF's own vocabulary, built by tokenizer.gguf_sentencepiece) against
transformers' tokenizer loaded from the same file, the Gemma 3 chat template against transformers' rendering of it,
and the data pipeline and `data inspect` with that tokenizer. tests/test_gguf_tokenizer.py compares with llama.cpp."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from gemmatune.tokenizer import (
    GEMMA2_CHAT_TEMPLATE,
    GEMMA3_CHAT_TEMPLATE,
    Tokenizer,
    chat_template,
    load_tokenizer,
    render_chat,
)

# Text fragments by kind; varied_strings() mixes them, mostly within one kind per string, with random characters.
FRAGMENTS = {
    "code": ["def f(x):\n    return x ** 2", "for (int i = 0; i < n; ++i) {", "}\n", "    ", "\t", "#include <stdio.h>",
             "x = [1, 2, 3]", "if a != b && c <= d:", "const y = `${x}`;", "SELECT * FROM t WHERE id=42;", "//",
             "/* */", "</div>", "<td>", "<b>", "</s>", "{{ }}", "lambda: None", "0x1F", "1e-10", "self.__init__()"],
    "unicode": ["日本語", "中文字符", "한국어", "Ünïcödé", "naïve", "straße", "Ελληνικά", "русский", "עברית", "مرحبا",
                "हिन्दी", "ไทย", "😀", "👍🏽", "👩‍👩‍👧", "🇫🇷", "e\u0301", "a\u0308\u0323", "\u200b", "\u200d",
                "\ufeff", "\u202e", "\u00a0", "\u3000", "\u2028", "𝔘𝔫𝔦", "\U0010ffff", "\ue000", "ﬁ", "Å", "Å"],
    "whitespace": [" ", "  ", "   ", " " * 7, " " * 31, " " * 40, "\n", "\n\n", "\n" * 5, "\t", "\t\t", "\r\n", "\r",
                   " \n ", "\x0b", "\x0c"],
    "digits": ["0", "42", "2024", "3.14159", "1,000,000", "-7", "٣٤", "１２", "½"],
    "special": ["<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "<pad>", "<unk>", "<mask>", "<unused0>",
                "<unused99>", "<start_of_image>", "<end_of_image>", "[multimodal]", "<start_of_turn", "end_of_turn>",
                "<start_of_turn>user\n", "<start_of_turn>model\n", "<end_of_turn>\n"],
    "byte fallback": ["\x00", "\x01", "\x07", "\x1b", "\x7f", "\x80", "\u0378", "\U000e0001", "\U0001fae8",
                      "\U0002a6dd"],
    "words": ["the", " the", "Hello", " world", "I'm", "don't", "e.g.", "U.S.A.", "supercalifragilistic", "—", "…",
              "“quoted”", "(paren)", "a", "b", " x", "!", "?", "."],
}
ALL_FRAGMENTS = [f for kind in FRAGMENTS.values() for f in kind]
# Gemma 3's longest whitespace piece is 31 spaces; see test_encode_matches_transformers for longer runs.
LONG_SPACE_RUN = re.compile(" {32}")


def varied_strings(n: int, seed: int = 0) -> list[str]:
    """n deterministic strings: 1-12 fragments each, half from one kind, a third from any kind, the rest random
    characters from every Unicode plane (no surrogates, which are not text)."""
    rng = random.Random(seed)
    kinds = list(FRAGMENTS)
    out = []
    for i in range(n):
        focus = FRAGMENTS[kinds[i % len(kinds)]]
        parts = []
        for _ in range(rng.randint(1, 12)):
            r = rng.random()
            if r < 0.5:
                parts.append(rng.choice(focus))
            elif r < 0.85:
                parts.append(rng.choice(ALL_FRAGMENTS))
            else:
                points = [rng.choice([rng.randint(32, 126), rng.randint(0x80, 0x2FFF), rng.randint(0x3000, 0x10FFFF)])
                          for _ in range(rng.randint(1, 4))]
                parts.append("".join(chr(c) for c in points if not 0xD800 <= c < 0xE000))
        out.append("".join(parts))
    return out


STRINGS = varied_strings(3000)


@pytest.fixture(scope="session")
def gemma3_tok(gemma3_gguf: Path) -> Tokenizer:
    return load_tokenizer(gemma3_gguf)


def _cached_hf_tokenizer(gguf: Path, name: str, build):
    """transformers' tokenizer `build()` makes, saved once beside the cached download (building one takes 20-45 s)
    and read back from its tokenizer.json (a few seconds) afterwards; `name` says what it was built from."""
    import shutil
    import tempfile

    import transformers
    from transformers import AutoTokenizer

    cache = gguf.parent / f"{name}-{transformers.__version__}-{gguf.stat().st_size}"
    if not (cache / "tokenizer.json").is_file():
        tok = build()
        with tempfile.TemporaryDirectory(dir=gguf.parent) as tmp:
            tok.save_pretrained(tmp)
            shutil.rmtree(cache, ignore_errors=True)
            Path(tmp).rename(cache)
            Path(tmp).mkdir()  # for TemporaryDirectory's cleanup
    return AutoTokenizer.from_pretrained(cache)


@pytest.fixture(scope="session")
def gemma3_hf_tok(gemma3_gguf: Path):
    """transformers' tokenizer built from the GGUF file (the reference)."""
    from transformers import AutoTokenizer

    return _cached_hf_tokenizer(gemma3_gguf, "hf-tokenizer",
                                lambda: AutoTokenizer.from_pretrained(gemma3_gguf.parent, gguf_file=gemma3_gguf.name))


# --- the vocabulary ------------------------------------------------------------------------------------------


def test_special_ids_come_from_the_vocabulary(gemma3_tok: Tokenizer, gemma3_hf_tok) -> None:
    tok, hf = gemma3_tok, gemma3_hf_tok
    assert tok.vocab_size == len(hf) == 262_144
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (105, 106)  # 106, not Gemma 2's 107 (axolotl #3754)
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    for name in ("pad", "eos", "bos", "start_of_turn", "end_of_turn"):
        token_id = getattr(tok, f"{name}_id")
        assert hf.convert_tokens_to_ids(f"<{name}>") == token_id
        assert tok.id_to_piece(token_id) == f"<{name}>" and tok.encode(f"<{name}>") == [token_id]
    assert tok.id_to_piece(tok.encode("😀")[0]) == "😀"  # in Gemma 3's vocabulary; a newer emoji falls back to bytes
    assert [tok.id_to_piece(i) for i in tok.encode("\U0001fae8")] == ["<0xF0>", "<0x9F>", "<0xAB>", "<0xA8>"]


def test_no_bos_unless_asked(gemma3_tok: Tokenizer) -> None:
    assert gemma3_tok.encode("hello")[0] != gemma3_tok.bos_id
    assert gemma3_tok.encode("hello", add_bos=True) == [gemma3_tok.bos_id, *gemma3_tok.encode("hello")]


# --- encoding and decoding -----------------------------------------------------------------------------------


def test_generated_strings_cover_every_kind() -> None:
    for kind, fragments in FRAGMENTS.items():
        assert sum(any(f in s for f in fragments) for s in STRINGS) > 300, kind


def test_encode_matches_transformers(gemma3_tok: Tokenizer, gemma3_hf_tok) -> None:
    """Equal ids on 3,000 varied strings, except where a string holds a run of more than 31 spaces.

    Gemma 3's whitespace runs of 2..31 spaces are user-defined pieces: SentencePiece (and llama.cpp, see
    tests/test_gguf_tokenizer.py) cuts the longest one from the left (40 spaces: 31 + 9). transformers' tokenizer
    built from a GGUF file adds a user-defined piece as an added token only when its string is in the vocabulary it
    built (add_gguf_special_tokens, `token in vocab`), where these 30 pieces are spelled with "▁" and the GGUF with
    plain spaces; left as ordinary BPE pieces, they come out of its merges the same up to 31 spaces, but 40 spaces
    become 16 + 24: the same text, other ids. SentencePiece's rule is the checkpoint's own: llama.cpp keeps it, and
    transformers does too when it reads the vocabulary as a SentencePiece model (the test after this one)."""
    tok, hf = gemma3_tok, gemma3_hf_tok
    compared = 0
    for text in STRINGS:
        ours, theirs = tok.encode(text), hf.encode(text, add_special_tokens=False)
        if LONG_SPACE_RUN.search(text):
            assert tok.decode(theirs, skip_special_tokens=False) == text
            assert " " * 31 in [tok.decode([i]) for i in ours]
        else:
            assert ours == theirs, text
            compared += 1
    assert compared > 2500


def test_rebuilt_sentencepiece_model_reads_the_same_in_transformers(gemma3_gguf: Path, gemma3_tok: Tokenizer,
                                                                   tmp_path: Path) -> None:
    """gguf_sentencepiece's model, written as a tokenizer.model file, is one transformers reads (as an export of a
    GGUF base carries it) and encodes exactly as gemmatune on every string, long space runs included: read from a
    SentencePiece model, transformers registers the user-defined pieces and agrees with SentencePiece's rule."""
    from transformers import AutoTokenizer

    from gemmatune.tokenizer import gguf_sentencepiece

    proto = gguf_sentencepiece(gemma3_gguf)
    (tmp_path / "tokenizer.model").write_bytes(proto)
    hf = _cached_hf_tokenizer(gemma3_gguf, f"hf-tokenizer-from-spm-{hashlib.sha256(proto).hexdigest()[:16]}",
                              lambda: AutoTokenizer.from_pretrained(tmp_path, mask_token=None))
    assert len(hf) == gemma3_tok.vocab_size  # no <mask> added past the vocabulary (PITFALLS)
    for text in STRINGS:
        assert gemma3_tok.encode(text) == hf.encode(text, add_special_tokens=False), text


def test_decode_matches_transformers(gemma3_tok: Tokenizer, gemma3_hf_tok) -> None:
    """Text in, same text out, as transformers decodes the same ids, with and without special tokens (the strings
    are valid text, so there are no invalid byte runs to decode differently; see PITFALLS)."""
    tok, hf = gemma3_tok, gemma3_hf_tok
    for text in STRINGS:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=False) == text == hf.decode(ids, skip_special_tokens=False)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), text


def test_decode_any_non_byte_ids_matches_transformers(gemma3_tok: Tokenizer, gemma3_hf_tok) -> None:
    rng = np.random.default_rng(0)
    byte_ids = {tok_id for tok_id in range(gemma3_tok.vocab_size)
                if re.fullmatch(r"<0x[0-9A-F]{2}>", gemma3_tok.id_to_piece(tok_id))}
    assert len(byte_ids) == 256
    for _ in range(300):
        ids = [int(i) for i in rng.integers(0, gemma3_tok.vocab_size, rng.integers(1, 20)) if int(i) not in byte_ids]
        for skip in (False, True):
            assert gemma3_tok.decode(ids, skip) == gemma3_hf_tok.decode(ids, skip_special_tokens=skip), ids


def test_literal_space_marker_reads_as_a_space(gemma3_tok: Tokenizer, gemma3_hf_tok) -> None:
    """"▁" (U+2581) in the text is SentencePiece's own space marker: it encodes as a space does, as in transformers
    (llama.cpp differs here; tests/test_gguf_tokenizer.py)."""
    for text in ["\u2581", " \u2581 x", "\u2581\u2581", "a\u2581b", "\u2581" * 3 + "x", "x\u2581" + " " * 40]:
        ids = gemma3_tok.encode(text)
        assert ids == gemma3_tok.encode(text.replace("\u2581", " "))
        if not LONG_SPACE_RUN.search(text):
            assert ids == gemma3_hf_tok.encode(text, add_special_tokens=False)


# --- chat ----------------------------------------------------------------------------------------------------


def conversations(n: int, seed: int = 0) -> list[tuple[list[dict], bool]]:
    """n (messages, add_generation_prompt): with and without a system message, either model role name, contents
    with whitespace around and inside, sometimes as lists of text items, ending on a user or a model turn."""
    rng = random.Random(seed)
    pads = ["", " ", "\n", "  \n\t", "\n\n", "\u3000", "\xa0"]
    texts = ["Hi", "What is 2+2?", "4.", "Write code:\n```py\nprint(1)\n```", "日本語で答えて", "emoji 😀", "",
             "a\n\nb", "  indented", "<start_of_turn>", "x" * 50]

    def content() -> str:
        return rng.choice(pads) + rng.choice(texts) + rng.choice(pads)

    out = []
    for _ in range(n):
        messages: list[dict] = []
        if rng.random() < 0.4:
            messages.append({"role": "system", "content": content()})
        turns = rng.randint(1, 4)
        for turn in range(turns):
            messages.append({"role": "user", "content": content()})
            if turn < turns - 1 or rng.random() < 0.8:  # the last may end on the user
                messages.append({"role": rng.choice(["assistant", "model"]), "content": content()})
        for m in messages:
            if rng.random() < 0.15:  # the template's list of text items
                if m["role"] == "system":
                    m["content"] = [{"type": "text", "text": m["content"]}]
                else:
                    m["content"] = [{"type": "text", "text": content()} for _ in range(rng.randint(1, 3))]
        out.append((messages, rng.random() < 0.5))
    return out


def _hf_chat(hf, messages: list[dict], add_generation_prompt: bool, tokenize: bool, template: str):
    got = hf.apply_chat_template(messages, chat_template=template, tokenize=tokenize,
                                 add_generation_prompt=add_generation_prompt)
    return list(got["input_ids"] if hasattr(got, "keys") else got) if tokenize else got


def test_chat_matches_transformers(gemma3_tok: Tokenizer, gemma3_hf_tok) -> None:
    """render_chat is transformers' rendering of the released Gemma 3 template, and encode_chat its tokenisation
    with exactly one <bos>, on 300 conversations."""
    tok, hf = gemma3_tok, gemma3_hf_tok
    for messages, prompt in conversations(300):
        text = _hf_chat(hf, messages, prompt, tokenize=False, template=GEMMA3_CHAT_TEMPLATE)
        assert "<bos>" + render_chat(messages, prompt) == text, messages
        ids = tok.encode_chat(messages, prompt)
        assert ids == _hf_chat(hf, messages, prompt, tokenize=True, template=GEMMA3_CHAT_TEMPLATE)
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1


def test_gemma2_template_renders_the_same_without_a_system_message(gemma3_hf_tok) -> None:
    """One renderer serves both families: where Gemma 2's template accepts a conversation, it renders as Gemma 3's."""
    for messages, prompt in conversations(100, seed=1):
        if messages[0]["role"] == "system" or any(not isinstance(m["content"], str) for m in messages):
            continue
        text = _hf_chat(gemma3_hf_tok, messages, prompt, tokenize=False, template=GEMMA2_CHAT_TEMPLATE)
        assert text == "<bos>" + render_chat(messages, prompt)


def test_exact_gemma3_rendering() -> None:
    messages = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": " Hi\n"},
                {"role": "assistant", "content": [{"type": "text", "text": " Hel"}, {"type": "text", "text": "lo "}]}]
    assert render_chat(messages, add_generation_prompt=True) == (
        "<start_of_turn>user\n Be brief. \n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>model\n")


def test_chat_template_by_family() -> None:
    assert chat_template("gemma2") == GEMMA2_CHAT_TEMPLATE and chat_template("gemma3") == GEMMA3_CHAT_TEMPLATE
    from gemmatune.config import FAMILIES
    from gemmatune.errors import GemmatuneError

    assert all(chat_template(f) for f in FAMILIES)
    with pytest.raises(GemmatuneError, match="'gemma4'.*'gemma2', 'gemma3'"):
        chat_template("gemma4")


# --- the data pipeline and `data inspect` --------------------------------------------------------------------


def test_chat_rows_train_the_model_turns(gemma3_tok: Tokenizer) -> None:
    """A chat row through the data pipeline with the real tokenizer: the tokens are encode_chat's plus <eos>, and
    the trained ones are exactly each model turn's content with its <end_of_turn> (106), and the final <eos>."""
    from gemmatune.config import DataConfig
    from gemmatune.data.formats import Formatter, detect_layout

    tok = gemma3_tok
    config = DataConfig()
    fmt = Formatter(config, tok, detect_layout({"messages"}, config))
    for messages, _ in conversations(200, seed=2):
        if messages[-1]["role"] == "user" or any(not isinstance(m["content"], str) for m in messages) or any(
                m["role"] in ("assistant", "model") and not m["content"].strip() for m in messages):
            continue  # rows the pipeline refuses (tested in test_data_formats.py) or lists it does not read
        ex = fmt.encode({"messages": messages})
        assert ex.tokens.tolist() == [*tok.encode_chat(messages), tok.eos_id]
        trained = tok.decode(ex.tokens[ex.mask].tolist(), skip_special_tokens=False)
        replies = [m["content"].strip() for m in messages if m["role"] in ("assistant", "model")]
        assert trained == "".join(r + "<end_of_turn>" for r in replies) + "<eos>"
        assert (ex.tokens[ex.mask] == tok.end_of_turn_id).sum() == len(replies) and tok.end_of_turn_id == 106
        assert ex.tokens[-1] == tok.eos_id and ex.mask[-1]


def test_data_inspect_with_the_gguf(gemma3_gguf: Path, tmp_path: Path, capsys) -> None:
    """`gemmatune data inspect --model <file>.gguf` reads its tokenizer from the GGUF vocabulary."""
    from gemmatune.cli import main

    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                          {"role": "assistant", "content": "Paris."}]}] * 3
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert main(["data", "inspect", "--model", str(gemma3_gguf), "--data", str(data), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    expected = ("<bos><start_of_turn>user\nBe brief.\n\nCapital of France?<end_of_turn>\n<start_of_turn>model\n"
                "«Paris.<end_of_turn>»\n«<eos>»")
    assert summary["example"] == expected
    tok = load_tokenizer(gemma3_gguf)
    ids = tok.encode_chat(rows[0]["messages"]) + [tok.eos_id]
    assert summary["tokens"]["total"] == 3 * len(ids)
