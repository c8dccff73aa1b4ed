"""Preference data for DPO: {prompt, chosen, rejected} rows in TRL's and UltraFeedback's forms become (chosen,
rejected) pairs of examples with the same prompt tokens and only the replies trained; pairs are fitted, split,
shuffled and packed whole, chosen right before its rejected, and `data inspect` shows them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_data_formats import REPLY, conversations
from test_data_loader import numbered_example, row_examples

from gemmatune.cli import main
from gemmatune.config import DEFAULT_MODEL, PLAIN_TEMPLATE, DataConfig
from gemmatune.data import formats as F
from gemmatune.data.formats import PREFERENCE, Formatter, Layout, detect_layout, fit_pair
from gemmatune.data.inspect import summarize
from gemmatune.data.loader import BatchIterator, ExampleStore, StoreWriter
from gemmatune.data.pipeline import prepare
from gemmatune.data.records import Example, Pair, RowError
from gemmatune.errors import GemmatuneError
from gemmatune.tokenizer import load_tokenizer, render_chat

TOK = load_tokenizer(DEFAULT_MODEL)
PREF = Layout(PREFERENCE, "preference pairs")


def msgs(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in pairs]


def pair_of(row: dict, **cfg) -> Pair:
    return Formatter(DataConfig(**cfg), TOK, PREF).encode_pair(row)


def sft(messages: list[dict[str, str]]) -> Example:
    """The same conversation as a supervised chat example (train_on "model")."""
    return Formatter(DataConfig(), TOK, Layout(F.CHAT, "chat messages", flavour=F.MESSAGES)).encode(
        {"messages": messages})


def text(tokens: np.ndarray) -> str:
    return TOK.decode(tokens.tolist(), skip_special_tokens=False)


# --- detection -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("columns", "cfg"), [({"prompt", "chosen", "rejected"}, {}),
                                              ({"chosen", "rejected", "score_chosen", "id"}, {}),
                                              ({"text", "chosen", "rejected"}, {"format": "preference"}),
                                              # UltraFeedback binarized: the chosen conversation again as messages
                                              ({"prompt", "prompt_id", "chosen", "rejected", "messages",
                                                "score_chosen", "score_rejected"}, {})])
def test_preference_rows_are_detected(columns: set[str], cfg: dict) -> None:
    assert detect_layout(columns, DataConfig(**cfg)) == PREF


def test_preference_detection_errors() -> None:
    assert detect_layout({"messages", "chosen", "rejected"}, DataConfig(format="chat")).kind == F.CHAT
    with pytest.raises(GemmatuneError, match="data.format is 'preference' but the rows lack the column.s. "
                                             "'rejected' for preference pairs"):
        detect_layout({"prompt", "chosen"}, DataConfig(format="preference"))
    with pytest.raises(GemmatuneError, match="preference pairs .format preference.: prompt .optional., chosen, "
                                             "rejected"):
        detect_layout({"foo"}, DataConfig())


# --- each row form to tokens and masks -------------------------------------------------------------------------


SYSTEM_PROMPT = msgs(("system", "Be brief."), ("user", " What is 2+2? "), ("assistant", "Four."), ("user", "And 3+3?"))
CHOSEN, REJECTED = "Six.", "  Seven, I think. "


@pytest.mark.parametrize("row", [
    # TRL conversational, explicit prompt
    {"prompt": SYSTEM_PROMPT, "chosen": msgs(("assistant", CHOSEN)), "rejected": msgs(("assistant", REJECTED))},
    # replies as strings after a message-list prompt
    {"prompt": SYSTEM_PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
    # UltraFeedback / Anthropic-HH: two whole conversations, the prompt implicit
    {"chosen": SYSTEM_PROMPT + msgs(("assistant", CHOSEN)), "rejected": SYSTEM_PROMPT + msgs(("model", REJECTED)),
     "prompt": None},
    # a prompt, and whole conversations repeating it (HuggingFaceH4/ultrafeedback_binarized)
    {"prompt": SYSTEM_PROMPT, "chosen": SYSTEM_PROMPT + msgs(("assistant", CHOSEN)),
     "rejected": SYSTEM_PROMPT + msgs(("assistant", REJECTED))},
    # ShareGPT keys
    {"chosen": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                for m in SYSTEM_PROMPT + msgs(("assistant", CHOSEN))],
     "rejected": [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]],
                   "value": m["content"]} for m in SYSTEM_PROMPT + msgs(("assistant", REJECTED))]},
])
def test_conversational_pairs_are_the_sft_examples_with_only_the_reply_trained(row: dict) -> None:
    p = pair_of(row)
    for example, reply in ((p.chosen, CHOSEN), (p.rejected, REJECTED)):
        reference = sft(SYSTEM_PROMPT + msgs(("assistant", reply)))
        # The tokens of the whole conversation as SFT (and transformers' template) write them...
        assert example.tokens.tolist() == reference.tokens.tolist()
        assert example.tokens.tolist() == [TOK.bos_id, *TOK.encode(render_chat(SYSTEM_PROMPT + msgs(
            ("assistant", reply)))), TOK.eos_id]
        # ... trained as SFT trains the last model turn; the prompt's model turn ("Four.") is not trained.
        assert example.mask.tolist() == (reference.mask & (np.arange(len(reference.mask)) >= p.prompt)).tolist()
        assert text(example.tokens[example.mask]) == reply.strip() + "<end_of_turn><eos>"
        assert "Four." in text(reference.tokens[reference.mask])
    assert np.array_equal(p.chosen.tokens[:p.prompt], p.rejected.tokens[:p.prompt])
    assert text(p.chosen.tokens[:p.prompt]) == ("<bos><start_of_turn>user\nBe brief.\n\nWhat is 2+2?<end_of_turn>\n"
                                                "<start_of_turn>model\nFour.<end_of_turn>\n<start_of_turn>user\n"
                                                "And 3+3?<end_of_turn>\n<start_of_turn>model\n")
    assert p.chosen.tokens[p.prompt] != p.rejected.tokens[p.prompt]


@settings(max_examples=60, deadline=None)
@given(messages=conversations(), other=REPLY)
def test_pairs_of_any_conversation_match_sft(messages: list[dict[str, str]], other: str) -> None:
    """Whatever the contents (whitespace runs, braces, multi-byte text), each side is token for token the SFT
    example of its conversation, trained only on its last model turn, and the implicit-prompt form agrees."""
    prompt, reply = messages[:-1], messages[-1]
    if other.strip() == reply["content"].strip():
        return
    explicit = pair_of({"prompt": prompt, "chosen": [reply], "rejected": other})
    implicit = pair_of({"chosen": messages, "rejected": prompt + msgs(("assistant", other))})
    for p in (explicit, implicit):
        for example, conversation in ((p.chosen, messages), (p.rejected, prompt + msgs(("assistant", other)))):
            reference = sft(conversation)
            assert example.tokens.tolist() == reference.tokens.tolist()
            assert example.mask.tolist() == (reference.mask & (np.arange(len(reference.mask)) >= p.prompt)).tolist()
            assert text(example.tokens[example.mask]) == conversation[-1]["content"].strip() + "<end_of_turn><eos>"
        assert np.array_equal(p.chosen.tokens[:p.prompt], p.rejected.tokens[:p.prompt])
    assert explicit.prompt == implicit.prompt
    assert explicit.rejected.tokens.tolist() == implicit.rejected.tokens.tolist()


@pytest.mark.parametrize("train_on", ["model", "all"])
def test_string_pairs_use_the_chat_template_and_ignore_train_on(train_on: str) -> None:
    p = pair_of({"prompt": " Hi there ", "chosen": "Hello!", "rejected": "Go away."}, train_on=train_on)
    for example, reply in ((p.chosen, "Hello!"), (p.rejected, "Go away.")):
        reference = sft(msgs(("user", " Hi there "), ("assistant", reply)))
        assert example.tokens.tolist() == reference.tokens.tolist()
        assert example.mask.tolist() == reference.mask.tolist()  # train_on "all" does not apply
    assert p.prompt == 1 + len(TOK.encode("<start_of_turn>user\nHi there<end_of_turn>\n")) + \
        len(TOK.encode("<start_of_turn>model\n"))


def test_string_pairs_with_a_plain_template() -> None:
    p = pair_of({"prompt": "Add {input} 2 and 2 ", "chosen": " 4", "rejected": "5\n"}, template=PLAIN_TEMPLATE)
    head = TOK.encode("Instruction:\nAdd {input} 2 and 2 \n\nResponse:\n")  # the user text as written
    for example, reply in ((p.chosen, " 4"), (p.rejected, "5\n")):
        ids = TOK.encode(reply)
        assert example.tokens.tolist() == [TOK.bos_id, *head, *ids, TOK.eos_id]
        assert example.mask.tolist() == [False] * (1 + len(head)) + [True] * (len(ids) + 1)
    assert p.prompt == 1 + len(head)
    # Message lists use the chat template whatever data.template says.
    conv = pair_of({"prompt": msgs(("user", "Q")), "chosen": "A", "rejected": "B"}, template=PLAIN_TEMPLATE)
    assert text(conv.chosen.tokens).startswith("<bos><start_of_turn>user\nQ")


def test_the_implicit_prompt_is_the_shared_messages_up_to_the_last_user_turn() -> None:
    shared = msgs(("user", "a"), ("assistant", "b"), ("user", "c"))
    implicit = pair_of({"chosen": shared + msgs(("assistant", "yes")), "rejected": shared + msgs(("assistant", "no"))})
    explicit = pair_of({"prompt": shared, "chosen": "yes", "rejected": "no"})
    for a, b in ((implicit.chosen, explicit.chosen), (implicit.rejected, explicit.rejected)):
        assert a.tokens.tolist() == b.tokens.tolist() and a.mask.tolist() == b.mask.tolist()
    assert implicit.prompt == explicit.prompt
    assert text(implicit.chosen.tokens[:implicit.prompt]).endswith("c<end_of_turn>\n<start_of_turn>model\n")


U, A = "user", "assistant"


@pytest.mark.parametrize(("row", "reason", "fragment"), [
    ({"prompt": "x", "rejected": "b"}, F.MISSING_FIELD, "no 'chosen' field"),
    ({"chosen": "a", "rejected": "b"}, F.MISSING_FIELD, "no 'prompt' field"),
    ({"prompt": "x", "chosen": 3, "rejected": "b"}, F.WRONG_TYPE, "chosen must be a string or a list of messages"),
    ({"prompt": {"a": 1}, "chosen": "a", "rejected": "b"}, F.WRONG_TYPE, "prompt must be"),
    ({"prompt": "x", "chosen": " ", "rejected": "b"}, F.EMPTY_RESPONSE, "'chosen' is empty"),
    ({"prompt": "x", "chosen": "a", "rejected": []}, F.EMPTY_CONVERSATION, "'rejected' is an empty list"),
    ({"prompt": "x", "chosen": msgs((A, "")), "rejected": "b"}, F.EMPTY_MODEL_TURN, "chosen[0]"),
    ({"prompt": "x", "chosen": " same", "rejected": "same "}, F.SAME_RESPONSE, "the same reply"),
    ({"chosen": msgs((U, "q"), (A, "a")), "rejected": msgs((U, "q"), (A, "a"))}, F.SAME_RESPONSE,
     "same conversation"),
    ({"prompt": msgs((U, "q"), (A, "a")), "chosen": "b", "rejected": "c"}, F.PROMPT_NOT_USER, "ends on a model turn"),
    ({"prompt": "q", "chosen": msgs((U, "b"), (A, "c")), "rejected": "c"}, F.NO_SHARED_PROMPT,
     "does not begin with the prompt"),
    ({"prompt": "q", "chosen": msgs((U, "q"), (A, "c"), (U, "d"), (A, "e")), "rejected": "c"}, F.REPLY_NOT_MODEL,
     "got 3 turns after it"),
    ({"prompt": "q", "chosen": msgs((U, "q")), "rejected": "c"}, F.REPLY_NOT_MODEL, "got 0 turns after it"),
    ({"prompt": "q", "chosen": msgs((A, "b"), (U, "c"), (A, "d")), "rejected": "c"}, F.REPLY_NOT_MODEL,
     "got 3 messages"),
    ({"chosen": msgs((U, "q"), (A, "a")), "rejected": msgs((U, "Q"), (A, "b"))}, F.NO_SHARED_PROMPT,
     "first messages differ"),
    ({"chosen": msgs((U, "q"), (A, "a")), "rejected": msgs((U, "q"), (A, "a"), (U, "r"), (A, "b"))},
     F.NO_SHARED_PROMPT, "one is the beginning of the other"),
    ({"chosen": msgs((U, "q"), (A, "a"), (U, "r"), (A, "b")), "rejected": msgs((U, "q"), (A, "a"), (U, "s"),
                                                                               (A, "b"))},
     F.NO_SHARED_PROMPT, "differ at turn 3, a user turn"),
    ({"chosen": msgs((U, "q"), (A, "a"), (U, "r"), (A, "b")), "rejected": msgs((U, "q"), (A, "c"), (U, "r"),
                                                                               (A, "b"))},
     F.REPLY_NOT_MODEL, "3 turns after it"),
    ({"chosen": msgs((U, "q"), (A, "a")), "rejected": msgs((U, "q"), (A, "a"), (U, "r"))}, F.ENDS_ON_USER_TURN,
     "'rejected' ends on a user turn"),
    ({"prompt": msgs((A, "q")), "chosen": "a", "rejected": "b"}, F.ROLES_OUT_OF_ORDER, "expected a 'user' message"),
    ({"prompt": msgs(("robot", "q")), "chosen": "a", "rejected": "b"}, F.UNKNOWN_ROLE, "prompt[0]"),
    ({"prompt": "<bos>q", "chosen": "a", "rejected": "b"}, F.BOS_IN_TEXT, "<bos>"),
])
def test_bad_preference_rows(row: dict, reason: str, fragment: str) -> None:
    with pytest.raises(RowError) as e:
        pair_of(row)
    assert e.value.reason == reason and fragment in e.value.detail


# --- fitting pairs to a row ------------------------------------------------------------------------------------


def example(tokens: int, prompt: int, first: int = 0) -> Example:
    """`tokens` tokens: a <bos>, prompt - 1 untrained prompt tokens, then trained reply tokens numbered from `first`
    (so the two replies of a pair differ)."""
    ids = [2, *range(10, 10 + prompt - 1), *range(first + 1000, first + 1000 + tokens - prompt)]
    return Example(np.array(ids, np.int32), np.arange(tokens) >= prompt)


@pytest.mark.parametrize(("chosen", "rejected", "max_seq_len", "kept"), [
    (10, 12, 20, (10, 12)),  # 9 + 11 slots fit 20
    (10, 20, 20, (10, 12)),  # the chosen takes at most half (9 slots): whole; the rejected gets the other 11
    (30, 8, 21, (15, 8)),  # the rejected fits its half (11): whole
    (30, 40, 21, (11, 12)),  # both long: 10 and 11 slots
])
def test_truncation_keeps_the_prompt_and_fits_the_pair(chosen: int, rejected: int, max_seq_len: int,
                                                       kept: tuple[int, int]) -> None:
    pair = Pair(example(chosen, 5), example(rejected, 5, 500), 5)
    fitted, reason = fit_pair(pair, max_seq_len, "truncate")
    assert reason is None and (len(fitted.chosen.tokens), len(fitted.rejected.tokens)) == kept
    assert fitted.chosen.slots + fitted.rejected.slots <= max_seq_len and fitted.prompt == 5
    for before, after in ((pair.chosen, fitted.chosen), (pair.rejected, fitted.rejected)):
        assert after.truncated == (len(after.tokens) < len(before.tokens))
        assert np.array_equal(after.tokens, before.tokens[:len(after.tokens)])
        assert np.array_equal(after.mask, before.mask[:len(after.tokens)])
    assert fitted.truncated == (kept != (chosen, rejected))
    if kept == (chosen, rejected):
        assert fitted == pair
    assert fit_pair(pair, max_seq_len, "drop") == ((pair, None) if kept == (chosen, rejected) else (None, F.TOO_LONG))


def test_a_prompt_leaving_no_reply_token_drops_the_pair() -> None:
    pair = Pair(example(30, 12), example(30, 12, 500), 12)
    assert fit_pair(pair, 22, "truncate") == (None, F.PROMPT_TOO_LONG)  # 11 slots each: only the prompt's 12 tokens
    fitted, _ = fit_pair(pair, 24, "truncate")  # 12 slots each: one reply token each
    assert fitted.chosen.trained == fitted.rejected.trained == 1
    untrained = Pair(example(6, 5), Example(np.array([2, 10, 11, 12, 13, 99], np.int32), np.zeros(6, bool)), 5)
    assert fit_pair(untrained, 20, "truncate") == (None, F.NO_TRAINED_TOKENS)


# --- the pipeline ----------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def prefs(n: int, long: int = 0) -> list[dict]:
    return [{"prompt": f"Question {i}?", "chosen": f"Good answer {i}." + " more" * (long * (i % 2)),
             "rejected": f"Bad {i}."} for i in range(n)]


def test_pairs_are_stored_consecutively_and_split_whole(tmp_path: Path) -> None:
    rows = prefs(20, long=40)
    rows[3] = {"prompt": "q", "chosen": "same", "rejected": "same"}
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = DataConfig(paths=(str(path),), max_seq_len=64, val_fraction=0.25, skip_bad_rows=True, seed=3)
    p = prepare(cfg, TOK, tmp_path / "w")
    assert p.pairs and p.train.pairs and p.val.pairs
    r = p.train.report
    assert (r.read, r.used, r.truncated, dict(r.skipped)) == (20, 19, 9, {F.SAME_RESPONSE: 1})
    store = p.train.store
    assert len(store) == 38 and r.tokens == store.total
    kept = [i for i in range(20) if i != 3]
    for j, i in enumerate(kept):  # row i's chosen at 2j, its rejected at 2j + 1
        chosen, rejected = store[2 * j], store[2 * j + 1]
        assert text(chosen.tokens[chosen.mask]).startswith(f"Good answer {i}.")
        assert text(rejected.tokens[rejected.mask]) == f"Bad {i}.<end_of_turn><eos>"
        assert chosen.slots + rejected.slots <= 64 and chosen.truncated == (i % 2 == 1)
    assert r.prompt == sum(int(np.argmax(store[2 * j].mask)) for j in range(19))
    both = np.concatenate([p.train.indices, p.val.indices])
    assert sorted(both.tolist()) == list(range(38)) and len(p.val.indices) == 2 * 5
    for indices in (p.train.indices, p.val.indices):
        assert (indices[0::2] % 2 == 0).all() and (indices[1::2] == indices[0::2] + 1).all()

    dropped = prepare(DataConfig(paths=(str(path),), max_seq_len=64, overflow="drop", skip_bad_rows=True), TOK,
                      tmp_path / "d").train.report
    assert (dropped.used, dict(dropped.dropped)) == (10, {F.TOO_LONG: 9})
    with pytest.raises(GemmatuneError, match="no usable rows .*, 19 dropped .prompt too long.*whole prompt"):
        prepare(DataConfig(paths=(str(path),), max_seq_len=16, skip_bad_rows=True), TOK, tmp_path / "x")
    with pytest.raises(GemmatuneError, match=f"{path}:4: chosen equals rejected"):
        prepare(DataConfig(paths=(str(path),), max_seq_len=64), TOK, tmp_path / "y")


def test_preference_files_mixed_with_others_are_refused(tmp_path: Path) -> None:
    pref = write_jsonl(tmp_path / "prefs.jsonl", prefs(3))
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs(("user", "q"), ("assistant", "a"))}])
    for cfg in (DataConfig(paths=(str(chat), str(pref))), DataConfig(paths=(str(pref), str(chat))),
                DataConfig(paths=(str(pref),), val_paths=(str(chat),)),
                DataConfig(paths=(str(chat),), val_paths=(str(pref),))):
        with pytest.raises(GemmatuneError, match=f"{pref} holds preference pairs .* but {chat} holds chat messages "
                                                 "rows .format chat.; one run reads one kind"):
            prepare(cfg, TOK, tmp_path / "w")
    p = prepare(DataConfig(paths=(str(pref),), val_paths=(str(pref),)), TOK, tmp_path / "w")
    assert p.pairs and p.val.pairs and len(p.val.indices) == 6


def test_data_inspect_shows_pairs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", prefs(10) + ['{"prompt": "q", "chosen": "x", "rejected": "x"}'])
    args = ["data", "inspect", "--data", str(path), "--max-seq-len", "64", "--skip-bad-rows", "--val-fraction", "0.2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "kind=preference, name=preference pairs" in out and "11 read, 10 used, 1 skipped (chosen equals rejected)" \
        in out
    assert "validation: 2 pairs" in out and "in 10 pairs (20 examples)" in out and "packing the 8 training pairs" in out
    lengths = [len(TOK.encode(f"<start_of_turn>user\nQuestion {i}?<end_of_turn>\n<start_of_turn>model\n")) + 1
               for i in range(10)]
    assert f"  prompt (shared)  min {min(lengths)}, mean {np.mean(lengths):.1f}, median" in out
    assert ("first pair (trained tokens between « and »), chosen:\n<bos><start_of_turn>user\nQuestion 0?<end_of_turn>\n"
            "<start_of_turn>model\n«Good answer 0.<end_of_turn>»\n«<eos>»\nrejected:\n<bos><start_of_turn>user\n"
            "Question 0?<end_of_turn>\n<start_of_turn>model\n«Bad 0.<end_of_turn>»\n«<eos>»\n") in out
    assert main(args + ["--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["pairs"] and s["tokens"]["pairs"] == 10 and sum(s["histogram"]["counts"]) == 10
    assert s["tokens"]["prompt"]["min"] == min(lengths) and s["tokens"]["prompt"]["max"] == max(lengths)
    assert s["rows"]["prompt"] == sum(lengths)


def test_inspect_packs_pairs_as_training_does(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", prefs(40, long=5))
    cfg = DataConfig(paths=(str(path),), max_seq_len=128, shuffle_buffer=8, seed=2)
    p = prepare(cfg, TOK, tmp_path / "w")
    fill = summarize(p, cfg, TOK)["packing"]
    it = BatchIterator(p.train.store, p.train.indices, seq_len=128, batch_size=1, pad_id=0, shuffle_buffer=8,
                       seed=2, pairs=True)
    segments = np.concatenate([next(it)["segment_ids"] for _ in range(it.epoch_rows())])
    assert fill["packed_fill"] == (segments > 0).mean() > fill["padded_fill"]


# --- packing and batching pairs --------------------------------------------------------------------------------


PAIRS = 60


@pytest.fixture(scope="module")
def pair_store(tmp_path_factory: pytest.TempPathFactory) -> ExampleStore:
    """60 pairs, examples of 1..20 slots; example i's targets are numbered ID * (i + 1) + position."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("pairs") / "s"
    with StoreWriter(path) as w:
        for i in range(2 * PAIRS):
            w.append(numbered_example(i, int(rng.integers(1, 21)), rng))
    return ExampleStore(path)


def pair_rows(batches: list[dict]) -> list[list[int]]:
    """Each row's pairs (by chosen index), checking segments 2j - 1 and 2j are a pair's chosen and its rejected."""
    out = []
    for row in row_examples(batches):
        assert len(row) % 2 == 0 and row[0::2] == [i for i in row[0::2] if i % 2 == 0]
        assert row[1::2] == [i + 1 for i in row[0::2]], row
        out.append(row[0::2])
    return out


@given(seq_len=st.integers(40, 120), batch=st.integers(1, 5), buffer=st.integers(1, 70), seed=st.integers(0, 9),
       packing=st.sampled_from(["pack", "pad"]), subset=st.integers(0, 3), k=st.integers(0, 12))
@settings(max_examples=30, deadline=None)
def test_rows_hold_whole_pairs_chosen_first_each_once_per_epoch_and_resume(
        pair_store: ExampleStore, seq_len: int, batch: int, buffer: int, seed: int, packing: str, subset: int,
        k: int) -> None:
    units = np.arange(0, 2 * PAIRS, 2)[subset::4 if subset else 1]  # every pair, or every 4th from `subset`
    indices = np.stack([units, units + 1], 1).reshape(-1)
    kw = {"seq_len": seq_len, "batch_size": batch, "pad_id": 0, "shuffle_buffer": buffer, "seed": seed,
          "packing": packing, "pairs": True}
    it = BatchIterator(pair_store, indices, **kw)
    rows0, rows1 = it.epoch_rows(0), it.epoch_rows(1)
    states, batches = [], []
    while len(batches) * batch < rows0 + rows1:
        states.append(it.state())
        batches.append(next(it))
    rows = pair_rows(batches)
    for epoch in (rows[:rows0], rows[rows0:rows0 + rows1]):
        assert sorted(u for row in epoch for u in row) == units.tolist()  # nothing lost, nothing twice
        if packing == "pad":
            assert all(len(row) == 1 for row in epoch)
    assert [r.tolist() for r in it.row_plan(0)] == [[i for u in row for i in (u, u + 1)] for row in rows[:rows0]]
    for b in batches:  # positions restart at 0 in each segment: each side sees its own copy of the prompt
        assert b["inputs"].shape == (batch, seq_len)
        starts = np.diff(b["segment_ids"], prepend=0, axis=1) != 0
        assert (b["positions"][starts] == 0).all()
    k = min(k, len(batches) - 1)
    resumed = BatchIterator(pair_store, indices, state=json.loads(json.dumps(states[k])), **kw)
    for want in batches[k:]:
        got = next(resumed)
        assert all(np.array_equal(got[key], want[key]) for key in want)


def test_pairs_validation_take_and_fingerprint(pair_store: ExampleStore) -> None:
    indices = np.arange(10, 70)  # pairs 5..34
    kw = {"seq_len": 64, "batch_size": 4, "pad_id": 0, "shuffle_buffer": 7, "seed": 1, "pairs": True}
    val = BatchIterator(pair_store, indices, shuffle=False, **kw)
    seen = [u for row in pair_rows(list(val)) for u in row]
    assert sorted(seen) == list(range(10, 70, 2))  # one pass, every pair once
    groups = [(u - 10) // 2 // 7 for u in seen]  # groups of 7 pairs, in order
    assert groups == sorted(groups)
    whole = BatchIterator(pair_store, indices, **kw)
    parts = [BatchIterator(pair_store, indices, take=take, **kw) for take in ([0, 2], [1, 3])]
    for _ in range(6):
        want, got = next(whole), [next(p) for p in parts]
        for key in ("inputs", "segment_ids", "weights"):
            np.testing.assert_array_equal(np.stack([got[0][key][0], got[1][key][0], got[0][key][1], got[1][key][1]]),
                                          want[key])
    # The pairs flag is part of what a saved position means; a state saved before the flag existed means False.
    state = whole.state()
    with pytest.raises(GemmatuneError, match="pairs True -> False"):
        BatchIterator(pair_store, indices, state=state, **(kw | {"pairs": False}))
    single = BatchIterator(pair_store, indices, **(kw | {"pairs": False}))
    old = single.state()
    del old["fingerprint"]["pairs"]
    BatchIterator(pair_store, indices, state=old, **(kw | {"pairs": False}))
    with pytest.raises(GemmatuneError, match="pairs False -> True"):
        BatchIterator(pair_store, indices, state=old, **kw)
    for bad in (np.arange(11, 71), np.arange(10, 69), np.array([10, 13])):
        with pytest.raises(ValueError, match="whole pairs"):
            BatchIterator(pair_store, bad, **kw)
    with pytest.raises(GemmatuneError, match="pairs .chosen . rejected. are up to"):
        BatchIterator(pair_store, indices, **(kw | {"seq_len": 20}))
