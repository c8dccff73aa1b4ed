"""data/sources.py: every format and path kind read with exact values and locations, every kind of bad input
reported precisely (and reading going on after it), streaming, and round trips of random data."""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gemmatune.data import sources
from gemmatune.data.records import BadRow, DataError, Location, Row
from gemmatune.data.sources import (
    BAD_HEADER,
    EMPTY_FILE,
    INVALID_ARROW,
    INVALID_PARQUET,
    INVALID_UTF8,
    MALFORMED_CSV,
    MALFORMED_JSON,
    NOT_AN_OBJECT,
    UNREADABLE,
    WRONG_COLUMNS,
    iter_rows,
)
from gemmatune.errors import GemmatuneError

ROWS = [{"q": "héllo", "a": "wörld"}, {"q": "2", "a": "multi\nline, \"quoted\""}, {"q": "", "a": "日本"}]


def write_csv(path: Path, rows: list[dict], delimiter: str = ",") -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:  # csv's default "\r\n" line endings
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)


def write_arrow(path: Path, rows: list[dict], stream: bool) -> None:
    table = pa.Table.from_pylist(rows)
    with (pa.ipc.new_stream if stream else pa.ipc.new_file)(str(path), table.schema) as w:
        for batch in table.to_batches(max_chunksize=2):  # several batches: row numbers continue across them
            w.write_batch(batch)


def jsonl(rows: list) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def read(*paths: Path | str, **kw) -> list[Row | BadRow]:
    return list(iter_rows([str(p) for p in paths], **kw))


def only_rows(items: list[Row | BadRow]) -> list[Row]:
    assert all(isinstance(i, Row) for i in items), [i for i in items if isinstance(i, BadRow)]
    return items  # type: ignore[return-value]


def rows_at(path: Path, numbers: list[int], unit: str, data: list[dict] = ROWS) -> list[Row]:
    return [Row(Location(str(path), n, unit), d) for n, d in zip(numbers, data, strict=True)]


# ---------------------------------------------------------------------------------------------------------------
# Formats and path kinds


def test_every_format_reads_values_and_locations(tmp_path):
    multiline = 1 + ROWS[1]["a"].count("\n")  # the CSV record of row 2 spans two lines
    csv_lines = [2, 3, 3 + multiline]
    files = {
        "a.jsonl": (jsonl(ROWS), [1, 2, 3], "line"),
        "a.ndjson": (jsonl(ROWS), [1, 2, 3], "line"),
        "lines.json": (jsonl(ROWS), [1, 2, 3], "line"),
        "array.json": (json.dumps(ROWS, indent=2, ensure_ascii=False), [1, 2, 3], "row"),
    }
    for name, (text, numbers, unit) in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
        assert read(tmp_path / name) == rows_at(tmp_path / name, numbers, unit), name
    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl(ROWS).encode()))
    assert read(gz) == rows_at(gz, [1, 2, 3], "line")

    for name, delimiter in [("a.csv", ","), ("a.tsv", "\t")]:
        write_csv(tmp_path / name, ROWS, delimiter)
        assert read(tmp_path / name) == rows_at(tmp_path / name, csv_lines, "line"), name
    csv_gz = tmp_path / "b.csv.gz"
    csv_gz.write_bytes(gzip.compress((tmp_path / "a.csv").read_bytes()))
    assert read(csv_gz) == rows_at(csv_gz, csv_lines, "line")

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "a.parquet", row_group_size=2)
    assert read(tmp_path / "a.parquet") == rows_at(tmp_path / "a.parquet", [1, 2, 3], "row")
    for name, stream in [("stream.arrow", True), ("file.arrow", False)]:
        write_arrow(tmp_path / name, ROWS, stream)
        assert read(tmp_path / name) == rows_at(tmp_path / name, [1, 2, 3], "row"), name


def test_bom_and_crlf_are_accepted(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.jsonl").write_bytes(bom + b'{"q": "x"}\r\n{"q": "y"}\r\n')
    (tmp_path / "a.csv").write_bytes(bom + b"q,a\r\nx,1\r\ny,2\r\n")
    (tmp_path / "a.json").write_bytes(bom + b'[{"q": "x"},\r\n {"q": "y"}]\r\n')
    assert [r.data for r in read(tmp_path / "a.jsonl")] == [{"q": "x"}, {"q": "y"}]
    assert [r.data for r in read(tmp_path / "a.csv")] == [{"q": "x", "a": "1"}, {"q": "y", "a": "2"}]
    assert [r.data for r in read(tmp_path / "a.json")] == [{"q": "x"}, {"q": "y"}]


def test_blank_lines_are_skipped_but_counted(tmp_path):
    (tmp_path / "a.jsonl").write_text('\n{"i": 1}\n   \n\t\r\n{"i": 2}\n\n')
    (tmp_path / "a.csv").write_text("\ni\n1\n\n2\n")
    assert [(r.where.number, r.data) for r in read(tmp_path / "a.jsonl")] == [(2, {"i": 1}), (5, {"i": 2})]
    assert [(r.where.number, r.data) for r in read(tmp_path / "a.csv")] == [(3, {"i": "1"}), (5, {"i": "2"})]


def test_several_files_globs_and_directories_in_order(tmp_path):
    for name, i in [("b.jsonl", 1), ("a.jsonl", 2), ("sub/c.jsonl", 3), ("sub/deep/d.jsonl", 4)]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(jsonl([{"i": i}]))
    (tmp_path / "README.md").write_text("# not data")  # ignored in a directory
    (tmp_path / ".hidden.jsonl").write_text(jsonl([{"i": 0}]))

    def order(*paths: Path | str) -> list[int]:
        return [r.data["i"] for r in only_rows(read(*paths))]

    assert order(tmp_path / "b.jsonl", tmp_path / "a.jsonl") == [1, 2]  # the given order
    assert order(tmp_path / "*.jsonl") == [2, 1]  # sorted by name
    assert order(tmp_path / "**" / "*.jsonl") == [2, 1, 3, 4]
    assert order(tmp_path) == [2, 1]  # top-level data files only, sorted; README and hidden files ignored
    assert order(tmp_path / "sub", tmp_path / "a.jsonl") == [3, 2]
    assert read(tmp_path / "*.jsonl")[0].where == Location(str(tmp_path / "a.jsonl"), 1, "line")


def test_save_to_disk_is_read_exactly_without_importing_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"text": f"row {i} ü", "n": i, "tags": ["x"] * (i % 3)} for i in range(2500)]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "one"), num_shards=3)
    datasets.DatasetDict({"train": ds.select(range(5)), "test": ds.select(range(5, 7))}).save_to_disk(
        str(tmp_path / "dict"))

    got = only_rows(read(tmp_path / "one"))
    assert [r.data for r in got] == rows
    shards = sorted((tmp_path / "one").glob("data-*.arrow"))
    assert len(shards) == 3 and got[0].where == Location(str(shards[0]), 1, "row")
    assert got[-1].where.path == str(shards[-1]) and got[-1].where.unit == "row"
    assert [r.data for r in read(tmp_path / "dict", split="test")] == rows[5:7]
    with pytest.raises(GemmatuneError, match="no split 'validation'.*train, test"):
        read(tmp_path / "dict", split="validation")

    code = ("import sys; from gemmatune.data.sources import iter_rows; "
            f"n = sum(1 for _ in iter_rows([{str(tmp_path / 'one')!r}])); "
            "print(n, 'datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["2500", "False"]


# ---------------------------------------------------------------------------------------------------------------
# The Hugging Face Hub (no network here: `datasets` is replaced by a stand-in module)


def fake_datasets(monkeypatch, load_dataset) -> list:
    calls: list = []

    def record(*args, **kw):
        calls.append((args, kw))
        return load_dataset(*args, **kw)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=record))
    return calls


def test_hub_dataset_rows_and_locations(monkeypatch):
    calls = fake_datasets(monkeypatch, lambda *a, **kw: [{"text": "a"}, {"text": "b"}])
    assert read("someone/data", split="validation") == [Row(Location("hub:someone/data", 1, "row"), {"text": "a"}),
                                                        Row(Location("hub:someone/data", 2, "row"), {"text": "b"})]
    assert calls == [(("someone/data",), {"split": "validation", "streaming": True})]
    assert str(Location("hub:someone/data", 2, "row")) == "hub:someone/data row 2"


def test_hub_failures_are_one_clear_error(monkeypatch):
    def offline(*a, **kw):
        raise ConnectionError("Couldn't reach the Hub")

    fake_datasets(monkeypatch, offline)
    with pytest.raises(GemmatuneError, match=r"(?s)someone/data.*could not be loaded from the Hugging Face Hub.*"
                                             r"Couldn't reach the Hub.*Download it and pass its files"):
        iter_rows(["someone/data"])  # at once, before anything is read

    def midway():
        yield {"text": "a"}
        raise ConnectionError("connection reset")

    fake_datasets(monkeypatch, lambda *a, **kw: midway())
    rows = iter_rows(["name"])
    assert next(rows).where == Location("hub:name", 1, "row")
    with pytest.raises(GemmatuneError, match="connection reset"):
        next(rows)

    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails
    with pytest.raises(GemmatuneError, match="could not be loaded from the Hugging Face Hub.*pip install datasets"):
        iter_rows(["name"])


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_jsonl_lines_are_reported_and_reading_goes_on(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"i": 1}\n{"i": 2,}\r\n[1, 2]\n"text"\n{"i": "caf\xe9"}\n\n{"i": 7\r\n{"i": 8}\n')
    items = read(path)
    assert [(i.where.number, getattr(i, "reason", None)) for i in items] == [
        (1, None), (2, MALFORMED_JSON), (3, NOT_AN_OBJECT), (4, NOT_AN_OBJECT), (5, INVALID_UTF8),
        (7, MALFORMED_JSON), (8, None)]
    assert items[-1] == Row(Location(str(path), 8, "line"), {"i": 8})
    assert "Expecting property name" in items[1].detail and "column 9" in items[1].detail
    assert "array ([1, 2])" in items[2].detail and 'string ("text")' in items[3].detail
    assert "Expecting ',' delimiter at column 8" in items[5].detail  # the end of its line, not the next line
    assert "byte offset 10" in items[4].detail and r"b'\xe9'" in items[4].detail
    # What the user sees when the pipeline stops there: the file, the line, the reason, the remedy.
    error = DataError(items[1].where, items[1].reason, items[1].detail)
    assert str(error).startswith(f"{path}:2: malformed JSON: Expecting property name")


def test_a_json_file_that_is_neither_array_nor_lines_says_what_it_must_be(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{\n  "data": [{"i": 1}]\n}\n')
    first = read(path)[0]
    assert (first.where.number, first.reason) == (1, MALFORMED_JSON)
    assert "a JSON array of objects or one JSON object per line" in first.detail


def test_bad_csv_records_are_reported_and_reading_goes_on(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b'q,a\n1,one\n2,"two\nlines"\n3\n4,f\xfcr\n5,five\n6,six,extra\n7,seven\n')
    items = read(path)
    assert [(i.where.number, getattr(i, "reason", None)) for i in items] == [
        (2, None), (3, None), (5, WRONG_COLUMNS), (6, INVALID_UTF8), (7, None), (8, WRONG_COLUMNS), (9, None)]
    assert items[1].data == {"q": "2", "a": "two\nlines"}
    assert "expected 2" in items[2].detail and "found 1" in items[2].detail and "lines" not in items[2].detail
    assert "byte offset 3" in items[3].detail and "found 3" in items[5].detail
    assert items[-1] == Row(Location(str(path), 9, "line"), {"q": "7", "a": "seven"})


def test_a_csv_record_running_over_lines_names_its_first_line(tmp_path):
    path = tmp_path / "a.tsv"
    path.write_bytes(b'q\ta\n1\t"x\ny\tz"\tw\n2\t"broken\n3\tok\n')
    items = read(path)
    assert (items[0].where.number, items[0].reason) == (2, WRONG_COLUMNS)
    assert "lines 2-3" in items[0].detail and "tabs" in items[0].detail
    # The quote left open on line 4 would swallow the rest of the file into one value: reported, not joined.
    assert [(i.where.number, i.reason) for i in items[1:]] == [(4, MALFORMED_CSV)]
    assert "lines 4-5" in items[1].detail and "unclosed quote" in items[1].detail


def test_csv_invalid_utf8_on_a_later_line_of_a_record(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b'q,a\n1,"ok\nbad \xff"\n2,fine\n')
    bad, good = read(path)
    assert (bad.where.number, bad.reason) == (2, INVALID_UTF8) and "line 3, byte offset 4" in bad.detail
    assert good == Row(Location(str(path), 4, "line"), {"q": "2", "a": "fine"})


def test_csv_malformed_record_is_reported(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b'q,a\n1,"x"y\n2,z\n')  # text after a closing quote
    bad, good = read(path)
    assert (bad.where.number, bad.reason) == (2, MALFORMED_CSV)
    assert good.where.number == 3 and good.data == {"q": "2", "a": "z"}


@pytest.mark.parametrize("header, problem", [(b"q,,a", "column 2 has no name"), (b"q,a,q", "'q' appears twice"),
                                             (b"q,\xff", "not valid UTF-8")])
def test_a_csv_without_a_usable_header_stops(tmp_path, header, problem):
    path = tmp_path / "a.csv"
    path.write_bytes(b"\n" + header + b"\n1,2,3\n")
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:2: .*{problem}") as e:
        read(path)
    assert e.value.reason in (BAD_HEADER, INVALID_UTF8) and "--skip-bad-rows" not in str(e.value)


@pytest.mark.parametrize("chunk", [1, 4, 1 << 16])  # positions must survive the parser forgetting parsed text
def test_json_array_errors(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(sources, "_CHUNK", chunk)
    path = tmp_path / "a.json"
    path.write_text('[\n  {"i": 1},\n  2,\n  {"i": 3},\n  {"i": 4,}\n]')
    items = iter_rows([str(path)])
    first, second, third = next(items), next(items), next(items)
    assert first == Row(Location(str(path), 1, "row"), {"i": 1})
    assert (second.where, second.reason) == (Location(str(path), 2, "row"), NOT_AN_OBJECT)
    assert third.data == {"i": 3}
    expected = f"^{re.escape(str(path))}: malformed JSON: line 5 column 11: .*convert it to JSON Lines"
    with pytest.raises(DataError, match=expected):
        next(items)

    for text, where in [('[{"i": 1} {"i": 2}]', "line 1 column 11"), ('[{"i": 1},\n', "line 2 column 1"),
                        ('[{"i": 1}] x', "line 1 column 12"), ('[{"i": 1},]', "line 1 column 11")]:
        path.write_text(text)
        with pytest.raises(DataError, match=f"malformed JSON: {where}"):
            read(path)
    for text in [b'[{"i": "\xff"}]', b'[{"i": "\xc3("}]']:  # a bad byte alone, and a character cut short
        path.write_bytes(text)
        with pytest.raises(DataError, match="invalid UTF-8: .*file byte offset 8"):
            read(path)


@pytest.mark.parametrize("name, content", [("a.jsonl", b""), ("a.jsonl", b" \n\r\n\t"), ("a.json", b"\xef\xbb\xbf"),
                                           ("a.json", b" [ ] "), ("a.csv", b"q,a\r\n"), ("a.parquet", b""),
                                           ("a.arrow", b""), ("a.jsonl.gz", gzip.compress(b"\n"))])
def test_empty_files_stop_with_a_clear_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: empty file: it holds no rows; check the path$") as e:
        read(path)
    assert e.value.reason == EMPTY_FILE


def test_an_empty_parquet_table_is_an_empty_file(tmp_path):
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match="empty file"):
        read(tmp_path / "a.parquet")


@pytest.mark.parametrize("name, reason", [("a.parquet", INVALID_PARQUET), ("a.arrow", INVALID_ARROW)])
def test_corrupt_columnar_files_stop_with_a_clear_error(tmp_path, name, reason):
    (tmp_path / name).write_bytes(b"this is not what the extension says")
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / name))}: {reason}: .*re-export it"):
        read(tmp_path / name)


def test_a_truncated_gzip_stops_with_a_clear_error(tmp_path):
    path = tmp_path / "a.jsonl.gz"
    path.write_bytes(gzip.compress(jsonl([{"i": i} for i in range(1000)]).encode())[:200])
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: {UNREADABLE}: .*complete"):
        read(path)


def test_bad_paths_name_the_path_and_the_supported_kinds(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty_dir").mkdir()
    cases = [(tmp_path / "missing.jsonl", "no such file"), (tmp_path / "*.csv", "matches no files"),
             (tmp_path / "empty_dir", "holds no data files"), (tmp_path / "notes.txt", "unsupported file type"),
             ("./relative/dir", "no such file")]
    for path, problem in cases:
        with pytest.raises(GemmatuneError, match=f"^{re.escape(str(path))}: .*{problem}.*Supported: .jsonl.*.parquet"):
            iter_rows([str(path)])  # raised at the call, not on reading
    with pytest.raises(GemmatuneError, match="no data given"):
        iter_rows([])


# ---------------------------------------------------------------------------------------------------------------
# Streaming


@pytest.fixture(scope="module")
def big_files(tmp_path_factory) -> dict[str, Path]:
    """~48 MB of text per format (Parquet: many row groups of incompressible text)."""
    d = tmp_path_factory.mktemp("big")
    line = json.dumps({"text": "x" * 1000}) + "\n"
    (d / "big.jsonl").write_text(line * 48_000)
    (d / "big.csv").write_text("text\n" + ("y" * 1000 + "\n") * 48_000)
    table = pa.table({"text": [os.urandom(500).hex() for _ in range(20_000)]})
    pq.write_table(table, d / "big.parquet", row_group_size=500, compression="none")
    return {p.suffix: p for p in d.iterdir()}


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_reading_the_first_row_does_not_read_the_file(big_files, suffix):
    path = big_files[suffix]
    proc = psutil.Process()
    before = proc.io_counters().read_chars
    first = next(iter_rows([str(path)]))
    read_bytes = proc.io_counters().read_chars - before
    assert isinstance(first, Row) and first.where.number in (1, 2)
    assert read_bytes < path.stat().st_size / 10, (read_bytes, path.stat().st_size)


def test_json_array_elements_split_across_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_CHUNK", 3)  # every element, number and string straddles chunk boundaries
    rows = [{"n": 123456789, "s": "ü" * 5 + "\\\"\n", "f": 1.5e-7}, {"n": -42}, {"list": [1, [2, {"x": None}]]}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    assert [r.data for r in only_rows(read(path))] == rows
    for chunk in range(1, 9):  # bare numbers must not be cut where a chunk ends, wherever that is
        monkeypatch.setattr(sources, "_CHUNK", chunk)
        path.write_text('[12345, {"i": 1}, 2.5e-10, 67890]')
        numbers, row, *more = read(path)
        shown = [b.detail.split(";")[0] for b in (numbers, *more)]
        assert shown == ["found a JSON number (12345)", "found a JSON number (2.5e-10)", "found a JSON number (67890)"]
        assert row.data == {"i": 1}


# ---------------------------------------------------------------------------------------------------------------
# Round trips of random data

TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufeff"), max_size=12)
JSON_VALUE = st.recursive(st.none() | st.booleans() | st.integers(-2**60, 2**60) | TEXT |
                          st.floats(allow_nan=False, allow_infinity=False),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                          max_leaves=8)
OBJECTS = st.lists(st.dictionaries(TEXT, JSON_VALUE, max_size=4), min_size=1, max_size=6)


@st.composite
def tables(draw) -> list[dict[str, str]]:
    """Rows with one set of named columns and string values, as CSV/TSV/Parquet hold them."""
    names = draw(st.lists(TEXT.filter(str.strip), min_size=1, max_size=4, unique=True))
    return draw(st.lists(st.fixed_dictionaries({n: TEXT for n in names}), min_size=1, max_size=6))


@settings(max_examples=60, deadline=None)
@given(rows=OBJECTS, array=st.booleans(), chunk=st.sampled_from([1, 5, 1 << 16]))
def test_json_round_trip(tmp_path_factory, rows, array, chunk):
    path = tmp_path_factory.mktemp("rt") / ("a.json" if array else "a.jsonl")
    path.write_text(json.dumps(rows, ensure_ascii=False) if array else jsonl(rows), encoding="utf-8")
    sources._CHUNK, saved = chunk, sources._CHUNK  # hypothesis forbids function-scoped fixtures like monkeypatch
    try:
        got = only_rows(read(path))
    finally:
        sources._CHUNK = saved
    assert [r.data for r in got] == rows
    assert [r.where.number for r in got] == list(range(1, len(rows) + 1))


@settings(max_examples=60, deadline=None)
@given(rows=tables(), kind=st.sampled_from([".csv", ".tsv", ".parquet"]))
def test_table_round_trip(tmp_path_factory, rows, kind):
    path = tmp_path_factory.mktemp("rt") / f"a{kind}"
    if kind == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        write_csv(path, rows, "," if kind == ".csv" else "\t")
    assert [r.data for r in only_rows(read(path))] == rows


def test_csv_line_numbers_match_the_text(tmp_path):
    """A record's line number is where it starts, counting the line breaks inside earlier quoted values."""
    rows = [{"i": str(i), "a": "x\n" * i} for i in range(6)]
    write_csv(tmp_path / "a.csv", rows)
    lines = (tmp_path / "a.csv").read_text(encoding="utf-8").split("\n")
    got = only_rows(read(tmp_path / "a.csv"))
    assert [r.data for r in got] == rows
    for row in got:
        assert lines[row.where.number - 1].startswith(row.data["i"] + ",")
