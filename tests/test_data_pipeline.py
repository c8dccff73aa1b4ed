"""The whole data path, files to batches: bad rows stop the run with their location (or are skipped and counted),
nothing is dropped silently, `gemmatune data inspect` reports it all, and a 200 MB file streams in bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gemmatune.cli import main
from gemmatune.config import DEFAULT_MODEL, DataConfig
from gemmatune.data.inspect import summarize
from gemmatune.data.loader import BatchIterator
from gemmatune.data.pipeline import prepare
from gemmatune.errors import GemmatuneError
from gemmatune.tokenizer import load_tokenizer

TOK = load_tokenizer(DEFAULT_MODEL)


def chat(user: str, model: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": model}]}


GOOD = [chat(f"Question {i}?", f"Answer number {i}.") for i in range(6)]
# (JSONL line, the reason it is bad). Each sits at line 3 of its file, between good rows.
BAD = {
    "malformed JSON": '{"messages": [',
    "missing field": json.dumps({"prompt": "x"}),
    "wrong type": json.dumps({"messages": "hello"}),
    "empty model turn": json.dumps(chat("Hi", "   ")),
    "unknown role": json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
    "roles out of order": json.dumps({"messages": [{"role": "assistant", "content": "a"},
                                                   {"role": "user", "content": "b"}]}),
    "ends on a user turn": json.dumps({"messages": [{"role": "user", "content": "a"}]}),
}


def write_jsonl(path: Path, lines: list[str], *, newline: str = "\n", bom: bool = False) -> Path:
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + newline.join(lines).encode() + newline.encode())
    return path


def lines_with(bad: str) -> list[str]:
    good = [json.dumps(r) for r in GOOD]
    return good[:2] + [bad] + good[2:]


@pytest.mark.parametrize("reason", BAD)
def test_a_bad_row_stops_the_run_naming_file_line_and_reason(tmp_path, reason):
    path = write_jsonl(tmp_path / "data.jsonl", lines_with(BAD[reason]))
    with pytest.raises(GemmatuneError) as e:
        prepare(DataConfig(paths=(str(path),)), TOK, tmp_path / "work")
    msg = str(e.value)
    assert f"{path}:3" in msg and "--skip-bad-rows" in msg
    assert reason.split()[0] in msg.lower()


@pytest.mark.parametrize("reason", BAD)
def test_skip_bad_rows_counts_each_skip_by_reason(tmp_path, reason):
    path = write_jsonl(tmp_path / "data.jsonl", lines_with(BAD[reason]))
    p = prepare(DataConfig(paths=(str(path),), skip_bad_rows=True), TOK, tmp_path / "work")
    r = p.train.report
    assert (r.read, r.used, sum(r.skipped.values())) == (7, 6, 1)
    [(counted, n)] = r.skipped.items()
    assert r.first_bad[counted] == f"{path}:3"


def test_invalid_utf8_is_located_and_bom_crlf_are_accepted(tmp_path):
    path = tmp_path / "data.jsonl"
    good = [json.dumps(r).encode() for r in GOOD]
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(good[:3] + [b'{"text": "caf\xe9"}'] + good[3:]) + b"\r\n")
    with pytest.raises(GemmatuneError, match=rf"{path}:4: invalid UTF-8"):
        prepare(DataConfig(paths=(str(path),)), TOK, tmp_path / "w1")
    p = prepare(DataConfig(paths=(str(path),), skip_bad_rows=True), TOK, tmp_path / "w2")
    assert (p.train.report.used, dict(p.train.report.skipped)) == (6, {"invalid UTF-8": 1})
    # BOM and CRLF left no trace in the text: the first example decodes to the clean conversation.
    text = TOK.decode(p.train.store[0].tokens.tolist(), skip_special_tokens=False)
    assert text == "<bos><start_of_turn>user\nQuestion 0?<end_of_turn>\n<start_of_turn>model\nAnswer number 0." \
                   "<end_of_turn>\n<eos>"


def test_empty_file_and_file_without_usable_rows(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(GemmatuneError, match=f"{empty}: empty file"):
        prepare(DataConfig(paths=(str(empty),)), TOK, tmp_path / "w1")
    bad = write_jsonl(tmp_path / "bad.jsonl", [BAD["malformed JSON"], BAD["empty model turn"]])
    with pytest.raises(GemmatuneError, match="no usable rows") as e:
        prepare(DataConfig(paths=(str(bad),), skip_bad_rows=True), TOK, tmp_path / "w2")
    assert f"{bad}:1" in str(e.value) and f"{bad}:2" in str(e.value)


def test_truncation_and_drops_are_counted(tmp_path):
    rows = GOOD + [chat("Tell me a long story.", " ".join(["word"] * 200))]
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    kept = prepare(DataConfig(paths=(str(path),), max_seq_len=48), TOK, tmp_path / "w1").train
    assert (kept.report.used, kept.report.truncated) == (7, 1)
    assert kept.store.lengths().max() == 48
    dropped = prepare(DataConfig(paths=(str(path),), max_seq_len=48, overflow="drop"), TOK, tmp_path / "w2").train
    assert (dropped.report.used, dict(dropped.report.dropped)) == (6, {"too long": 1})
    # A prompt longer than the row leaves nothing to train: dropped, and said so.
    path2 = write_jsonl(tmp_path / "d2.jsonl", [json.dumps(r) for r in GOOD + [chat("q " * 100, "a")]])
    r = prepare(DataConfig(paths=(str(path2),), max_seq_len=48), TOK, tmp_path / "w3").train.report
    assert r.used == 6 and sum(r.dropped.values()) == 1 and "trained" in next(iter(r.dropped))


def test_validation_split_and_separate_validation_files(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(chat(f"q{i}", f"a{i}")) for i in range(40)])
    p = prepare(DataConfig(paths=(str(path),), val_fraction=0.25), TOK, tmp_path / "w1")
    assert len(p.val.indices) == 10 and len(p.train.indices) == 30
    assert not set(p.val.indices) & set(p.train.indices)
    val = write_jsonl(tmp_path / "v.jsonl", [json.dumps(chat("vq", "va"))] * 3)
    p = prepare(DataConfig(paths=(str(path),), val_paths=(str(val),)), TOK, tmp_path / "w2")
    assert len(p.val.store) == 3 and len(p.train.indices) == 40


def test_preparation_removes_what_a_killed_preparation_left(tmp_path):
    """A preparation killed while writing leaves its hidden staging directory (".train.partial-PID", as large as
    the data); the next one removes it and succeeds. (test_data_loader kills a real writer.)"""
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in GOOD])
    leftover = tmp_path / "w" / ".train.partial-999999"
    leftover.mkdir(parents=True)
    (leftover / "tokens.bin").write_bytes(bytes(1 << 20))
    p = prepare(DataConfig(paths=(str(path),)), TOK, tmp_path / "w")
    assert len(p.train.store) == len(GOOD) and sorted(q.name for q in (tmp_path / "w").iterdir()) == ["train"]


def test_batches_carry_exactly_the_trained_tokens(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in GOOD])
    cfg = DataConfig(paths=(str(path),), max_seq_len=64)
    p = prepare(cfg, TOK, tmp_path / "w")
    it = BatchIterator(p.train.store, p.train.indices, seq_len=64, batch_size=2, pad_id=TOK.pad_id,
                       shuffle_buffer=cfg.shuffle_buffer, seed=0, shuffle=False)
    trained = [TOK.decode(b["targets"][b["weights"] > 0].tolist(), skip_special_tokens=False) for b in it]
    assert "".join(trained) == "".join(f"Answer number {i}.<end_of_turn><eos>" for i in range(6))


def test_data_inspect_reports_everything(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows = [{"instruction": f"Question {i}: " + "why " * int(rng.integers(2, 60)), "context": "",
             "response": "because " * int(np.clip(rng.lognormal(4.5, 0.8), 1, 900))} for i in range(1500)]
    path = write_jsonl(tmp_path / "dolly.jsonl", [json.dumps(r) for r in rows] + [BAD["malformed JSON"]])
    args = ["data", "inspect", "--data", str(path), "--max-seq-len", "1024", "--skip-bad-rows"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "Dolly" in out and "1501 read, 1500 used, 1 skipped (malformed JSON)" in out
    assert f"first malformed JSON: {path}:1501" in out and "histogram" in out
    assert "«" in out and "<start_of_turn>model" in out
    assert main(args + ["--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["rows"]["read"] == 1501 and s["rows"]["skipped"] == {"malformed JSON": 1}
    assert sum(s["histogram"]["counts"]) == s["tokens"]["examples"] == 1500
    # Short instruction data packs into nearly full rows; one example per padded row wastes most of each.
    assert s["packing"]["packed_fill"] >= 0.95 > 0.5 > s["packing"]["padded_fill"]
    assert main(["data", "inspect", "--data", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_each_file_has_its_own_layout(tmp_path, capsys):
    """`--data chat.jsonl dolly.jsonl` (and validation files of a third layout) read each file in its own layout,
    and `data inspect` reports every file's."""
    chats = write_jsonl(tmp_path / "chat.jsonl", [json.dumps(r) for r in GOOD[:3]])
    dolly = write_jsonl(tmp_path / "dolly.jsonl", [json.dumps({"instruction": f"Question {i}?", "context": "",
                                                               "response": f"Answer number {i}."})
                                                   for i in range(3, 6)])
    sharegpt = write_jsonl(tmp_path / "val.jsonl", [json.dumps({"conversations": [
        {"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]})])
    cfg = DataConfig(paths=(str(chats), str(dolly)), val_paths=(str(sharegpt),), max_seq_len=64)
    p = prepare(cfg, TOK, tmp_path / "w")
    assert {k: v.name for k, v in p.train.layouts.items()} == {str(chats): "chat messages", str(dolly): "Dolly"}
    assert {k: v.name for k, v in p.val.layouts.items()} == {str(sharegpt): "ShareGPT"}
    # The same conversations, whichever layout spells them.
    trained = [TOK.decode(e.tokens[e.mask].tolist()) for e in p.train.store.get_many(range(6))]
    assert trained == [f"Answer number {i}." for i in range(6)]
    assert len(p.val.store) == 1 and p.val.report.used == 1

    args = ["data", "inspect", "--data", str(chats), str(dolly), "--val-data", str(sharegpt), "--max-seq-len", "64"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"  {chats}: kind=chat, name=chat messages" in out and f"  {dolly}: kind=instruction, name=Dolly" in out
    assert f"  {sharegpt} (validation): kind=chat, name=ShareGPT" in out
    assert main(args + ["--json"]) == 0
    formats = json.loads(capsys.readouterr().out)["formats"]
    assert [(f["split"], f["source"], f["name"]) for f in formats] == [
        ("train", str(chats), "chat messages"), ("train", str(dolly), "Dolly"),
        ("validation", str(sharegpt), "ShareGPT")]


def test_a_file_of_no_known_layout_is_named(tmp_path):
    good = write_jsonl(tmp_path / "chat.jsonl", [json.dumps(r) for r in GOOD])
    odd = write_jsonl(tmp_path / "odd.jsonl", [json.dumps({"question": "q", "answer": "a"})])
    with pytest.raises(GemmatuneError, match=f"^{odd}:1: cannot tell the data layout"):
        prepare(DataConfig(paths=(str(good), str(odd))), TOK, tmp_path / "w")


def test_inspect_packs_exactly_as_training_does(tmp_path):
    """The packed fill `data inspect` reports is the fill of training's first epoch of batches, several shuffle
    buffers with a non-zero seed and a validation split included."""
    rng = np.random.default_rng(1)
    rows = [chat("why " * int(rng.integers(1, 30)), "because " * int(rng.integers(1, 60))) for _ in range(300)]
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in rows])
    cfg = DataConfig(paths=(str(path),), max_seq_len=128, shuffle_buffer=40, seed=7, val_fraction=0.1)
    p = prepare(cfg, TOK, tmp_path / "w")
    s = summarize(p, cfg, TOK)
    for packing in ("pack", "pad"):
        it = BatchIterator(p.train.store, p.train.indices, seq_len=128, batch_size=4, pad_id=TOK.pad_id,
                           packing=packing, shuffle_buffer=40, seed=7)  # as trainer.py builds it
        rows_ = it.epoch_rows()
        batches = [next(it) for _ in range(-(-rows_ // 4))]
        segments = np.concatenate([b["segment_ids"] for b in batches])[:rows_]  # [rows, 128]: epoch 0 only
        assert s["packing"][{"pack": "packed_fill", "pad": "padded_fill"}[packing]] == (segments > 0).mean()
    assert s["packing"]["training_examples"] == len(p.train.indices) == 270


@pytest.mark.slow
def test_a_200mb_jsonl_streams_in_bounded_memory(tmp_path):
    """Peak RSS growth while tokenising, storing and packing a 200 MB JSONL stays under 0.75x the file size
    (measured: 113 MB for 210 MB, of which ~15 MB are Python objects; examples go to disk as they are made, and
    packing holds one shuffle buffer of examples at a time)."""
    path = tmp_path / "big.jsonl"
    rng = np.random.default_rng(0)
    words = np.array("the of and to in is was for on that with as by at from this be are or an it".split())
    with path.open("w") as f:
        while f.tell() < 200 * 2**20:
            for _ in range(1000):
                f.write(json.dumps({"text": " ".join(rng.choice(words, int(rng.integers(20, 400))))}) + "\n")
    size = path.stat().st_size
    script = textwrap.dedent(f"""
        import json, sys
        from gemmatune.config import DEFAULT_MODEL, DataConfig
        from gemmatune.data.loader import BatchIterator
        from gemmatune.data.pipeline import prepare
        from gemmatune.tokenizer import load_tokenizer

        def status(key):
            return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024

        tok = load_tokenizer(DEFAULT_MODEL)
        open("/proc/self/clear_refs", "w").write("5")  # reset the peak: measure only what follows
        before = status("VmRSS")
        cfg = DataConfig(paths=({str(path)!r},), max_seq_len=1024)
        p = prepare(cfg, tok, {str(tmp_path / "work")!r})
        it = BatchIterator(p.train.store, p.train.indices, seq_len=1024, batch_size=8, pad_id=0,
                           shuffle_buffer=cfg.shuffle_buffer, seed=0)
        for _ in range(200):
            next(it)
        print(json.dumps({{"growth": status("VmHWM") - before, "examples": len(p.train.store)}}))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["examples"] > 100_000
    assert out["growth"] < 0.75 * size, (out, size)
