"""Layout detection, rows -> tokens + loss mask (checked by decoding the trained and untrained tokens and against
transformers' chat template), row errors, and fitting examples to the sequence length."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from gemmatune.config import DEFAULT_MODEL, PLAIN_TEMPLATE, DataConfig
from gemmatune.data import formats as F
from gemmatune.data.formats import (
    CHAT,
    INSTRUCTION,
    TEXT,
    Formatter,
    Layout,
    detect_layout,
    fit,
)
from gemmatune.data.records import Example, RowError
from gemmatune.errors import GemmatuneError
from gemmatune.tokenizer import GEMMA3_CHAT_TEMPLATE, Tokenizer, load_tokenizer, render_chat

DOLLY = ("instruction", "context", "response")
ALPACA = ("instruction", "input", "output")
PROMPT_COMPLETION = ("prompt", "completion")


@pytest.fixture(scope="module", params=["tokenizer.json", "tokenizer.model"])
def tok(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The embedded tokenizer through each backend."""
    if request.param == "tokenizer.json":
        return load_tokenizer(DEFAULT_MODEL)
    only = tmp_path_factory.mktemp("sp")
    shutil.copy(DEFAULT_MODEL / request.param, only)
    return load_tokenizer(only)


@pytest.fixture(scope="module")
def hf():
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL)


def formatter(tok: Tokenizer, found, **cfg) -> Formatter:
    """A Formatter for rows with the columns `found`, configured by `cfg` (DataConfig fields)."""
    config = DataConfig(**cfg)
    return Formatter(config, tok, detect_layout(found, config))


def msgs(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in pairs]


def decode(tok: Tokenizer, ex: Example, trained: bool) -> str:
    """The text of the trained (or untrained) tokens, special tokens spelled out."""
    return tok.decode(ex.tokens[ex.mask == trained].tolist(), skip_special_tokens=False)


def check_invariants(tok: Tokenizer, ex: Example) -> None:
    assert ex.tokens.dtype == np.int32 and ex.mask.dtype == bool and not ex.truncated
    assert ex.tokens[0] == tok.bos_id and not ex.mask[0]
    assert (ex.tokens == tok.bos_id).sum() == 1  # exactly one <bos> (unsloth #10312)
    assert ex.tokens[-1] == tok.eos_id and ex.mask[-1]  # the final <eos> is trained


# --- layout detection ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "cfg", "expected"),
    [
        ({"text"}, {}, Layout(TEXT, "plain text")),
        ({"text", "id", "source"}, {}, Layout(TEXT, "plain text")),
        ({*DOLLY, "category"}, {}, Layout(INSTRUCTION, "Dolly", "instruction", "context", "response")),
        ({"instruction", "response"}, {}, Layout(INSTRUCTION, "Dolly", "instruction", "context", "response")),
        (set(ALPACA), {}, Layout(INSTRUCTION, "Alpaca", "instruction", "input", "output")),
        (set(PROMPT_COMPLETION), {}, Layout(INSTRUCTION, "prompt/completion", "prompt", None, "completion")),
        ({"messages", "id"}, {}, Layout(CHAT, "chat messages", flavour=F.MESSAGES)),
        ({"conversations"}, {}, Layout(CHAT, "ShareGPT", flavour=F.SHAREGPT)),
        # A forced format picks among layouts that would otherwise be ambiguous.
        ({"text", "messages"}, {"format": "text"}, Layout(TEXT, "plain text")),
        ({"text", "messages"}, {"format": "chat"}, Layout(CHAT, "chat messages", flavour=F.MESSAGES)),
        ({"text", *ALPACA}, {"format": "instruction"}, Layout(INSTRUCTION, "Alpaca", *ALPACA)),
        # A column mapping selects instruction rows; unmapped fields default to their own names.
        ({"question", "answer", "id"}, {"columns": (("instruction", "question"), ("response", "answer"))},
         Layout(INSTRUCTION, "mapped columns", "question", None, "answer")),
        ({"question", "input", "answer"}, {"columns": (("instruction", "question"), ("response", "answer"))},
         Layout(INSTRUCTION, "mapped columns", "question", "input", "answer")),
        ({"q", "ctx", "response", "text"}, {"format": "instruction", "columns": (("instruction", "q"),
                                                                                  ("input", "ctx"))},
         Layout(INSTRUCTION, "mapped columns", "q", "ctx", "response")),
    ],
)
def test_detect_layout(columns: set[str], cfg: dict, expected: Layout) -> None:
    assert detect_layout(columns, DataConfig(**cfg)) == expected


@pytest.mark.parametrize(
    ("columns", "cfg", "expected"),
    [
        # Unknown columns: the message lists what was found, every known layout, and how to configure.
        ({"foo", "bar"}, {}, ["'bar', 'foo'", "match no known layout", "plain text (format text): text",
                              "Dolly (format instruction): instruction, context (optional), response",
                              "Alpaca (format instruction): instruction, input (optional), output",
                              "prompt/completion (format instruction): prompt, completion",
                              "chat messages (format chat): messages: [{role, content}]",
                              "ShareGPT (format chat): conversations: [{from, value}]",
                              "data.format", "data.columns"]),
        (set(), {}, ["columns found (none)", "match no known layout"]),
        ({"text", "messages"}, {}, ["more than one known layout (plain text, chat messages)", "data.format"]),
        ({"instruction", "response", "output"}, {}, ["more than one known layout (Dolly, Alpaca)", "data.columns"]),
        ({"messages", "conversations"}, {"format": "chat"}, ["more than one known layout (chat messages, ShareGPT)"]),
        # A forced format names the missing column.
        ({"messages"}, {"format": "text"}, ["data.format is 'text'", "lack the column(s) 'text'", "'messages'"]),
        ({"text"}, {"format": "chat"}, ["'messages' for chat messages", "'conversations' for ShareGPT"]),
        ({"instruction"}, {"format": "instruction"}, ["'response' for Dolly", "'output' for Alpaca",
                                                       "'prompt', 'completion' for prompt/completion"]),
        ({"question", "answer"}, {"columns": (("instruction", "question"), ("response", "reply"))},
         ["data.columns", "'reply' (for response)", "'answer', 'question'"]),
        ({"question", "answer"}, {"columns": (("instruction", "question"), ("response", "answer"),
                                              ("input", "context"))}, ["'context' (for input)"]),
        ({"q", "a"}, {"columns": (("instruction", "q"), ("instruction", "a"))}, ["more than once"]),
        ({"q", "a"}, {"format": "chat", "columns": (("instruction", "q"),)}, ["data.format is 'chat'"]),
    ],
)
def test_detect_layout_errors(columns: set[str], cfg: dict, expected: list[str]) -> None:
    with pytest.raises(GemmatuneError) as err:
        detect_layout(columns, DataConfig(**cfg))
    for part in expected:
        assert part in str(err.value)


# --- chat ------------------------------------------------------------------------------------------------------

# Contents that stress tokenisation and trimming: whitespace runs, newlines, braces, digits, multi-byte characters.
FRAGMENTS = st.sampled_from([" ", "  ", "\n", "\n\n", "\t", "\r\n", "{", "}", "{input}", "0", "42", "é", "😀", "日本",
                             "the", "Hello", "."])
SPECIAL_STRINGS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>")
# "▁" is left out: the tokenizer spells spaces as "▁", so a literal one decodes as a space. Special-token strings
# are left out (hypothesis draws them from this file's constants): test_special_token_strings_in_contents has them.
CONTENT = st.lists(st.one_of(FRAGMENTS, st.text(st.characters(codec="utf-8", exclude_characters="▁"), max_size=6)),
                   max_size=8).map("".join).filter(lambda s: not any(t in s for t in SPECIAL_STRINGS))
REPLY = CONTENT.filter(str.strip)


@st.composite
def conversations(draw: st.DrawFn) -> list[dict[str, str]]:
    """user/model pairs (the model role spelled either way), sometimes after a system message."""
    system = draw(st.none() | CONTENT)
    messages = [] if system is None else msgs(("system", system))
    for _ in range(draw(st.integers(1, 3))):
        messages += msgs(("user", draw(CONTENT)), (draw(st.sampled_from(["assistant", "model"])), draw(REPLY)))
    return messages


def folded(messages: list[dict[str, str]]) -> list[tuple[str, str]]:
    """(role, trimmed content) per turn, the system text (as written) folded into the first user turn, as the Gemma 3
    template does."""
    turns = [("model" if m["role"] in ("assistant", "model") else "user", m["content"].strip()) for m in messages
             if m["role"] != "system"]
    if messages[0]["role"] == "system":
        turns[0] = ("user", messages[0]["content"] + "\n\n" + turns[0][1])
    return turns


@settings(max_examples=150, deadline=None)
@given(messages=conversations())
def test_chat_mask_covers_exactly_the_model_turns(tok: Tokenizer, messages: list[dict[str, str]]) -> None:
    ex = formatter(tok, {"messages"}).encode({"messages": messages})
    check_invariants(tok, ex)
    # Tokenising segment by segment equals tokenising the rendered conversation whole.
    assert ex.tokens.tolist() == [tok.bos_id, *tok.encode(render_chat(messages)), tok.eos_id]
    turns = folded(messages)
    assert decode(tok, ex, trained=True) == "".join(c + "<end_of_turn>" for r, c in turns if r == "model") + "<eos>"
    # The rest: <bos>, user turns (with the system text), model headers and the "\n" after each <end_of_turn>.
    untrained = "".join(f"<start_of_turn>user\n{c}<end_of_turn>\n" if r == "user" else "<start_of_turn>model\n\n"
                        for r, c in turns)
    assert decode(tok, ex, trained=False) == "<bos>" + untrained
    # Every model turn's <end_of_turn> is trained, no user turn's is (axolotl #3754).
    ends = ex.mask[ex.tokens == tok.end_of_turn_id].tolist()
    assert ends == [r == "model" for r, _ in turns]
    assert not ex.mask[ex.tokens == tok.start_of_turn_id].any()

    everything = formatter(tok, {"messages"}, train_on="all").encode({"messages": messages})
    assert np.array_equal(everything.tokens, ex.tokens)
    assert not everything.mask[0] and everything.mask[1:].all()


@settings(max_examples=40, deadline=None)
@given(messages=conversations())
def test_chat_tokens_match_transformers(hf, messages: list[dict[str, str]]) -> None:
    tok = load_tokenizer(DEFAULT_MODEL)
    ex = formatter(tok, {"messages"}).encode({"messages": messages})
    # The released Gemma 2 template refuses a system role; Gemma 3's folds it, as gemmatune does for both.
    ids = hf.apply_chat_template(messages, chat_template=GEMMA3_CHAT_TEMPLATE, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # transformers 5 returns a BatchEncoding
    assert ex.tokens.tolist() == [*ids, tok.eos_id]


def test_special_token_strings_in_contents(tok: Tokenizer, hf) -> None:
    """Written special tokens map to their ids, as in transformers; only a written <bos> is refused."""
    messages = msgs(("user", "fake <start_of_turn>model\nturn<end_of_turn>\n"), ("assistant", "a<end_of_turn>b<eos>"))
    ex = formatter(tok, {"messages"}).encode({"messages": messages})
    ids = hf.apply_chat_template(messages, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ex.tokens.tolist() == [*ids, tok.eos_id]
    assert decode(tok, ex, trained=True) == "a<end_of_turn>b<eos><end_of_turn><eos>"
    with pytest.raises(RowError) as err:
        formatter(tok, {"messages"}).encode({"messages": msgs(("user", "a <bos>"), ("model", "b"))})
    assert err.value.reason == F.BOS_IN_TEXT


def test_chat_exact_tokens(tok: Tokenizer) -> None:
    messages = msgs(("system", " Be brief. "), ("user", "Hi\n"), ("assistant", "\tHello there \n"))
    ex = formatter(tok, {"messages"}).encode({"messages": messages})
    e = tok.encode
    header = e("<start_of_turn>user\n Be brief. \n\nHi<end_of_turn>\n<start_of_turn>model\n")
    reply = e("Hello there")
    assert ex.tokens.tolist() == [tok.bos_id, *header, *reply, tok.end_of_turn_id, *e("\n"), tok.eos_id]
    assert ex.mask.tolist() == [False] * (1 + len(header)) + [True] * (len(reply) + 1) + [False, True]


def test_sharegpt_maps_to_messages(tok: Tokenizer) -> None:
    row = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "a"},
                             {"from": "gpt", "value": "b"}, {"from": "user", "value": "c"},
                             {"from": "assistant", "value": "d"}, {"from": "human", "value": "e"},
                             {"from": "model", "value": "f"}]}
    same = msgs(("system", "S"), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"),
                ("user", "e"), ("model", "f"))
    got = formatter(tok, {"conversations"}).encode(row)
    want = formatter(tok, {"messages"}).encode({"messages": same})
    assert np.array_equal(got.tokens, want.tokens) and np.array_equal(got.mask, want.mask)


# --- instruction rows ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "row", "user", "response"),
    [
        (DOLLY, {"instruction": "Sum {a}+{b}", "context": "a=1, b=2", "response": "3"}, "Sum {a}+{b}\n\na=1, b=2",
         "3"),
        (DOLLY, {"instruction": "Say hi", "context": "  ", "response": "hi", "category": "x"}, "Say hi", "hi"),
        (DOLLY, {"instruction": "Say hi", "response": " hi\n"}, "Say hi", "hi"),  # no context column in the row
        (DOLLY, {"instruction": "Say hi", "context": None, "response": "hi"}, "Say hi", "hi"),
        (ALPACA, {"instruction": "Translate", "input": "chat", "output": "cat"}, "Translate\n\nchat", "cat"),
        (ALPACA, {"instruction": "Translate", "input": "", "output": "cat"}, "Translate", "cat"),
        (PROMPT_COMPLETION, {"prompt": "2+2=", "completion": "4"}, "2+2=", "4"),
    ],
)
def test_instruction_rows_via_chat(tok: Tokenizer, columns, row: dict, user: str, response: str) -> None:
    got = formatter(tok, columns).encode(row)
    want = formatter(tok, {"messages"}).encode({"messages": msgs(("user", user), ("assistant", response))})
    check_invariants(tok, got)
    assert np.array_equal(got.tokens, want.tokens) and np.array_equal(got.mask, want.mask)
    assert decode(tok, got, trained=True) == response.strip() + "<end_of_turn><eos>"


@pytest.mark.parametrize(
    ("columns", "row", "template", "prompt", "response"),
    [
        (ALPACA, {"instruction": "Name {a} {input} {response} {{x}} {0}", "input": "in {instruction}",
                  "output": "Out {response}"}, PLAIN_TEMPLATE,
         "Instruction:\nName {a} {input} {response} {{x}} {0}\n\nin {instruction}\n\nResponse:\n", "Out {response}"),
        (DOLLY, {"instruction": "I {input}", "context": "C {instruction}", "response": " R\n"},
         "### {instruction}\n### Input: {input}\n### Answer: {response}",
         "### I {input}\n### Input: C {instruction}\n### Answer: ", " R\n"),
        (PROMPT_COMPLETION, {"prompt": "2+2=", "completion": "4"}, "Q: {instruction}\nA: {response}", "Q: 2+2=\nA: ",
         "4"),
        (PROMPT_COMPLETION, {"prompt": "2+2=", "completion": "4"}, "{instruction}{response}", "2+2=", "4"),
    ],
)
def test_instruction_rows_via_plain_template(tok: Tokenizer, columns, row: dict, template: str, prompt: str,
                                             response: str) -> None:
    ex = formatter(tok, columns, template=template).encode(row)
    check_invariants(tok, ex)
    assert ex.tokens.tolist() == [tok.bos_id, *tok.encode(prompt), *tok.encode(response), tok.eos_id]
    assert decode(tok, ex, trained=True) == response + "<eos>"
    assert decode(tok, ex, trained=False) == "<bos>" + prompt
    everything = formatter(tok, columns, template=template, train_on="all").encode(row)
    assert np.array_equal(everything.tokens, ex.tokens) and everything.mask[1:].all() and not everything.mask[0]


def test_mapped_columns(tok: Tokenizer) -> None:
    columns = (("instruction", "question"), ("input", "passage"), ("response", "answer"))
    row = {"question": "Who?", "passage": "Ann met Bob.", "answer": "Ann"}
    got = formatter(tok, row, columns=columns).encode(row)
    want = formatter(tok, {"messages"}).encode({"messages": msgs(("user", "Who?\n\nAnn met Bob."), ("model", "Ann"))})
    assert np.array_equal(got.tokens, want.tokens) and np.array_equal(got.mask, want.mask)


@pytest.mark.parametrize("template", ["{instruction}\n{response}\n", "{instruction} {response} {response}",
                                      "Q: {question}\nA: {response}"])
def test_plain_template_must_end_with_response(tok: Tokenizer, template: str) -> None:
    with pytest.raises(GemmatuneError, match="data.template"):
        formatter(tok, ALPACA, template=template)


# --- text ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train_on", ["model", "all"])
def test_text_rows_train_every_token(tok: Tokenizer, train_on: str) -> None:
    text = "Once upon a time,\n  there was {a} 😀 story. "
    ex = formatter(tok, {"text"}, train_on=train_on).encode({"text": text})
    check_invariants(tok, ex)
    assert ex.tokens.tolist() == [tok.bos_id, *tok.encode(text), tok.eos_id]
    assert ex.mask[1:].all()
    # Pre-rendered text that starts with <bos> still gets exactly one.
    again = formatter(tok, {"text"}).encode({"text": "<bos>" + text})
    assert np.array_equal(again.tokens, ex.tokens)


# --- row errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "row", "reason", "detail"),
    [
        ({"text"}, {"id": 1, "body": "x"}, F.MISSING_FIELD, "the row has no 'text' field (its fields: 'id', 'body')"),
        ({"text"}, {"text": 5}, F.WRONG_TYPE, "text must be a string, got number"),
        ({"text"}, {"text": " \n\t"}, F.EMPTY_TEXT, "'text' is empty"),
        ({"text"}, {"text": "<bos>"}, F.EMPTY_TEXT, "'text' is empty"),
        ({"text"}, {"text": "<bos><bos>x"}, F.BOS_IN_TEXT, "contains '<bos>'"),
        ({"text"}, {"text": "a<bos>b"}, F.BOS_IN_TEXT, "contains '<bos>'"),
        (ALPACA, {"instruction": "a", "input": "", "output": "b <bos>"}, F.BOS_IN_TEXT, "contains '<bos>'"),
        ({"text"}, {"text": "a\ud800b"}, F.INVALID_TEXT, "'\\ud800', a lone UTF-16 surrogate"),
        ({"messages"}, {"messages": msgs(("user", "\udfff"), ("model", "b"))}, F.INVALID_TEXT, "lone UTF-16 surrogate"),
        (DOLLY, {"instruction": "a", "context": ""}, F.MISSING_FIELD,
         "no 'response' field (its fields: 'instruction', 'context')"),
        (DOLLY, {"context": "", "response": "r"}, F.MISSING_FIELD, "no 'instruction' field"),
        (DOLLY, {"instruction": "a", "response": 3}, F.WRONG_TYPE, "response must be a string, got number"),
        (DOLLY, {"instruction": "a", "response": None}, F.WRONG_TYPE, "response must be a string, got null"),
        (DOLLY, {"instruction": ["a"], "response": "r"}, F.WRONG_TYPE, "instruction must be a string, got list"),
        (DOLLY, {"instruction": "a", "context": {"k": 1}, "response": "r"}, F.WRONG_TYPE,
         "context must be a string, got object"),
        (ALPACA, {"instruction": "a", "input": "b", "output": " \n"}, F.EMPTY_RESPONSE, "'output' is empty"),
        ({"messages"}, {"messages": "hi"}, F.WRONG_TYPE, "messages must be a list, got string"),
        ({"messages"}, {"msgs": []}, F.MISSING_FIELD, "no 'messages' field (its fields: 'msgs')"),
        ({"messages"}, {"messages": []}, F.EMPTY_CONVERSATION, "'messages' is an empty list"),
        ({"conversations"}, {"conversations": []}, F.EMPTY_CONVERSATION, "'conversations' is an empty list"),
        ({"messages"}, {"messages": ["hi"]}, F.WRONG_TYPE, "messages[0] must be an object, got string"),
        ({"messages"}, {"messages": [{"role": "user"}]}, F.MISSING_FIELD,
         "messages[0] has no 'content' field (its fields: 'role')"),
        ({"messages"}, {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}, F.WRONG_TYPE,
         "messages[0].content must be a string, got list"),
        ({"messages"}, {"messages": [{"role": 1, "content": "a"}]}, F.WRONG_TYPE,
         "messages[0].role must be a string, got number"),
        ({"messages"}, {"messages": msgs(("user", "a"), ("bot", "b"))}, F.UNKNOWN_ROLE,
         "messages[1]: unknown role 'bot'; accepted: 'system', 'user', 'assistant', 'model'"),
        ({"conversations"}, {"conversations": [{"from": "human", "value": "a"}, {"from": "bard", "value": "b"}]},
         F.UNKNOWN_ROLE, "conversations[1]: unknown from 'bard'; accepted: 'system', 'human', 'user', 'gpt'"),
        ({"conversations"}, {"conversations": [{"from": "human", "text": "a"}]}, F.MISSING_FIELD,
         "conversations[0] has no 'value' field"),
        ({"messages"}, {"messages": msgs(("assistant", "a"))}, F.ROLES_OUT_OF_ORDER, "expected a 'user' message"),
        # the role as the file writes it, not the template's 'model'
        ({"messages"}, {"messages": msgs(("user", "a"), ("assistant", "b"), ("assistant", "c"))},
         F.ROLES_OUT_OF_ORDER, "messages[2]: expected a 'user' message, got role 'assistant'"),
        ({"conversations"}, {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                                               {"from": "gpt", "value": "c"}]},
         F.ROLES_OUT_OF_ORDER, "conversations[2]: expected a 'user' message, got role 'gpt'"),
        ({"conversations"}, {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
         F.ROLES_OUT_OF_ORDER, "conversations[1]: expected a 'model' message, got role 'human'"),
        ({"messages"}, {"messages": msgs(("user", "a"), ("user", "b"), ("model", "c"))}, F.ROLES_OUT_OF_ORDER,
         "roles must alternate"),
        ({"messages"}, {"messages": msgs(("user", "a"), ("model", "b"), ("system", "c"))}, F.ROLES_OUT_OF_ORDER,
         "only allowed as the first message"),
        ({"messages"}, {"messages": msgs(("system", "s"))}, F.ROLES_OUT_OF_ORDER, "followed by a 'user' message"),
        ({"messages"}, {"messages": msgs(("user", "a"))}, F.ENDS_ON_USER_TURN, "no model reply to learn from"),
        ({"messages"}, {"messages": msgs(("user", "a"), ("model", "b"), ("user", "c"))}, F.ENDS_ON_USER_TURN,
         "ends on a user turn"),
        ({"messages"}, {"messages": msgs(("user", "a"), ("assistant", " \n "))}, F.EMPTY_MODEL_TURN,
         "messages[1]: the model turn is empty"),
        ({"conversations"}, {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]},
         F.EMPTY_MODEL_TURN, "conversations[1]"),
    ],
)
def test_row_errors(tok: Tokenizer, columns, row: dict, reason: str, detail: str) -> None:
    with pytest.raises(RowError) as err:
        formatter(tok, columns).encode(row)
    assert err.value.reason == reason
    assert detail in err.value.detail


def test_reasons_are_distinct() -> None:
    reasons = [F.MISSING_FIELD, F.WRONG_TYPE, F.EMPTY_TEXT, F.EMPTY_RESPONSE, F.EMPTY_MODEL_TURN,
               F.EMPTY_CONVERSATION, F.UNKNOWN_ROLE, F.ROLES_OUT_OF_ORDER, F.ENDS_ON_USER_TURN, F.BOS_IN_TEXT,
               F.INVALID_TEXT, F.TOO_LONG, F.NO_TRAINED_TOKENS]
    assert len(set(reasons)) == len(reasons)


# --- fit -------------------------------------------------------------------------------------------------------


def example(mask: list[bool]) -> Example:
    return Example(np.arange(len(mask), dtype=np.int32), np.array(mask))


def test_fit_keeps_what_fits(tok: Tokenizer) -> None:
    ex = formatter(tok, {"messages"}).encode({"messages": msgs(("user", "Hi"), ("model", "Hello there"))})
    assert fit(ex, ex.slots, "drop") == (ex, None)
    assert fit(ex, ex.slots, "truncate")[0] is ex
    assert fit(ex, ex.slots - 1, "drop") == (None, F.TOO_LONG)


def test_fit_truncates_keeping_the_start(tok: Tokenizer) -> None:
    ex = formatter(tok, {"messages"}).encode({"messages": msgs(("user", "Hi"), ("model", "Hello there"))})
    cut, reason = fit(ex, ex.slots - 2, "truncate")
    assert reason is None and cut.truncated and cut.slots == ex.slots - 2
    assert np.array_equal(cut.tokens, ex.tokens[:-2]) and np.array_equal(cut.mask, ex.mask[:-2])
    assert tok.eos_id not in cut.tokens.tolist()  # a cut example must not learn to stop there
    # Cut inside the prompt: nothing trained is left.
    first_trained = int(np.argmax(ex.mask))
    assert fit(ex, first_trained - 1, "truncate") == (None, F.NO_TRAINED_TOKENS)
    assert fit(ex, first_trained, "truncate")[0].trained == 1


def test_fit_drops_untrained_examples() -> None:
    assert fit(example([False] * 5), 10, "truncate") == (None, F.NO_TRAINED_TOKENS)
    assert fit(example([False] * 5), 10, "drop") == (None, F.NO_TRAINED_TOKENS)


@settings(max_examples=300, deadline=None)
@given(mask=st.lists(st.booleans(), min_size=2, max_size=40).map(lambda m: [False, *m[1:]]),
       max_seq_len=st.integers(2, 45), overflow=st.sampled_from(["truncate", "drop"]))
def test_fit_invariants(mask: list[bool], max_seq_len: int, overflow: str) -> None:
    ex = example(mask)
    got, reason = fit(ex, max_seq_len, overflow)
    if got is None:
        assert reason == (F.TOO_LONG if overflow == "drop" and ex.slots > max_seq_len else F.NO_TRAINED_TOKENS)
        return
    assert reason is None and got.slots <= max_seq_len and got.trained > 0
    assert got.truncated == (ex.slots > max_seq_len)
    n = len(got.tokens)  # a prefix of the original
    assert np.array_equal(got.tokens, ex.tokens[:n]) and np.array_equal(got.mask, ex.mask[:n])
    assert n == min(len(ex.tokens), max_seq_len + 1)
