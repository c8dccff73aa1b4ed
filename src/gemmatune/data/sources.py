"""Sources: the user's files (or a Hub dataset) -> a stream of `Row | BadRow`, each with its exact location.

Every format is streamed: JSON Lines and CSV/TSV line by line, JSON arrays element by element, Parquet by batches of
rows, Arrow by record batches (memory-mapped). A row that cannot be read becomes a `BadRow` and reading goes on; the
pipeline decides whether to stop (the default) or skip it. Problems that make a whole file unreadable raise
`DataError` naming the file.

Paths may be files, globs (`data/*.jsonl`, `**` allowed; matched files sorted by name), a `datasets` save_to_disk
directory (read with pyarrow alone), a plain directory (its files with supported extensions, sorted by name; other
files such as README.md are ignored), or a Hugging Face Hub dataset name (streamed with `datasets`).
"""

from __future__ import annotations

import codecs
import csv
import functools
import glob
import gzip
import json
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import ModuleType
from typing import IO, Any

from gemmatune.data.records import BadRow, DataError, Location, Row
from gemmatune.errors import GemmatuneError

# BadRow / DataError reasons: short fixed categories the pipeline counts by and tests compare against.
MALFORMED_JSON = "malformed JSON"
NOT_AN_OBJECT = "not a JSON object"
INVALID_UTF8 = "invalid UTF-8"
WRONG_COLUMNS = "wrong number of columns"
MALFORMED_CSV = "malformed CSV"
BAD_HEADER = "bad header"
EMPTY_FILE = "empty file"
UNREADABLE = "unreadable file"
INVALID_PARQUET = "not a valid Parquet file"
INVALID_ARROW = "not a valid Arrow file"

_CHUNK = 1 << 16  # bytes read at a time by the JSON array reader
_BATCH_ROWS = 1024  # rows converted to Python at once: bounds memory for columnar files with long texts
_JSON_WS = re.compile(r"[ \t\n\r]*")
# `name` or `owner/name` as on the Hub, without a file extension (a missing `data.jsonl` is a typo, not a dataset).
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_FILE_EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]*$")

Reader = Callable[[str], Iterator[Row | BadRow]]  # one file's rows
Source = Callable[[], Iterator[Row | BadRow]]  # one resolved file or Hub dataset, read when called


def iter_rows(paths: Sequence[str], *, split: str = "train") -> Iterator[Row | BadRow]:
    """The rows of every source, in order. All paths are resolved (and a Hub dataset opened) before returning, so a
    mistyped path fails at once rather than after reading the ones before it."""
    if not paths:
        raise GemmatuneError("no data given: pass data files, a glob, a directory or a Hugging Face dataset name")
    sources = [source for spec in paths for source in _resolve(spec, split)]
    return (item for source in sources for item in source())


# ---------------------------------------------------------------------------------------------------------------
# Resolving paths into sources


def _resolve(spec: str, split: str) -> list[Source]:
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        return [_file_source(path)]
    if os.path.isdir(path):
        return _dir_sources(path, split)
    if any(c in spec for c in "*?["):
        # Directories a glob matches are not read: `data/**` matches both `data/sub` and the files in it.
        matches = sorted(m for m in glob.glob(path, recursive=True) if os.path.isfile(m))
        if not matches:
            raise GemmatuneError(f"{spec}: the pattern matches no files. {_SUPPORTED_HINT}")
        return [_file_source(m) for m in matches]
    if _HUB_NAME.fullmatch(spec) and not _FILE_EXTENSION.search(spec):
        return [_hub_source(spec, split)]
    raise GemmatuneError(f"{spec}: no such file or directory. {_SUPPORTED_HINT}")


def _file_source(path: str) -> Source:
    reader = _reader_for(path)
    if reader is None:
        raise GemmatuneError(f"{path}: unsupported file type. {_SUPPORTED_HINT}")
    return functools.partial(_read_file, path, reader)


def _dir_sources(path: str, split: str) -> list[Source]:
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):  # DatasetDict.save_to_disk: one folder per split
        with open(os.path.join(path, "dataset_dict.json"), encoding="utf-8") as f:
            splits = json.load(f).get("splits", [])
        if split not in splits or not os.path.isdir(os.path.join(path, split)):
            raise GemmatuneError(f"{path}: this saved dataset has no split {split!r} (it has {', '.join(splits)}); "
                                 f"set data.split to one of them")
        return _dir_sources(os.path.join(path, split), split)
    names = sorted(os.listdir(path))
    if "state.json" in names or "dataset_info.json" in names:  # Dataset.save_to_disk
        # Only data-*.arrow: `datasets` also leaves cache-*.arrow files of later .map() calls here.
        shards = [os.path.join(path, n) for n in names if n.startswith("data-") and n.endswith(".arrow")]
        if not shards:
            raise GemmatuneError(f"{path}: looks like a `datasets` save_to_disk folder but holds no data-*.arrow "
                                 f"files; save the dataset again")
        return [_file_source(s) for s in shards]
    files = [os.path.join(path, n) for n in names if not n.startswith(".")]
    sources = [_file_source(f) for f in files if os.path.isfile(f) and _reader_for(f) is not None]
    if not sources:
        raise GemmatuneError(f"{path}: the directory holds no data files. {_SUPPORTED_HINT}")
    return sources


def _hub_source(name: str, split: str) -> Source:
    try:
        import datasets  # only here: it is slow to import and not needed for local files
    except ImportError as e:
        raise _hub_error(name, "the `datasets` package is not installed: pip install datasets") from e
    try:
        dataset = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as e:  # no network, unknown name or split...: the user's remedy is the same
        raise _hub_error(name, f"{type(e).__name__}: {e}") from e
    return functools.partial(_read_hub, name, dataset)


def _hub_error(name: str, reason: str) -> GemmatuneError:
    return GemmatuneError(f"{name}: not a local file or directory, and the dataset could not be loaded from the "
                          f"Hugging Face Hub ({reason}). Download it and pass its files instead (or check the path)")


def _read_hub(name: str, dataset: Iterable[dict[str, Any]]) -> Iterator[Row | BadRow]:
    rows = iter(dataset)
    number = 0
    while True:
        try:
            data = next(rows)
        except StopIteration:
            return
        except Exception as e:  # a streaming dataset downloads as it goes, so loading can fail midway too
            raise _hub_error(name, f"{type(e).__name__}: {e}") from e
        number += 1
        yield Row(Location(f"hub:{name}", number, "row"), dict(data))


# ---------------------------------------------------------------------------------------------------------------
# Reading one file


def _read_file(path: str, reader: Reader) -> Iterator[Row | BadRow]:
    """`reader`'s rows, with the checks every file gets: not empty, and OS/compression errors named."""
    if os.path.getsize(path) == 0:  # before the reader: pyarrow would call a 0-byte file corrupt
        raise _empty(path)
    count = 0
    try:
        for item in reader(path):
            count += 1
            yield item
    except (OSError, EOFError, zlib.error) as e:  # e.g. a truncated .gz, a permission error
        raise DataError(path, UNREADABLE, f"{e}; check that the file is complete and readable") from e
    if not count:
        raise _empty(path)


def _empty(path: str) -> DataError:
    return DataError(path, EMPTY_FILE, "it holds no rows; check the path")


def _open(path: str) -> IO[bytes]:
    """Bytes, decompressed for .gz; both file kinds support peek()."""
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _skip_bom(f: IO[bytes]) -> int:
    """Skips a UTF-8 byte order mark (Windows tools write one); returns the bytes skipped."""
    if f.peek(3)[:3] == codecs.BOM_UTF8:  # type: ignore[attr-defined]
        return len(f.read(3))
    return 0


def _utf8_detail(e: UnicodeDecodeError, where: str) -> str:
    return (f"{e.object[e.start:e.end]!r} at {where} is not valid UTF-8 ({e.reason}); re-save the file as UTF-8 "
            f"(it may be Latin-1, Windows-1252 or UTF-16)")


def _position(raw: bytes, e: UnicodeDecodeError, first_line: int) -> str:
    """Where in `raw` (a line, or a CSV record starting at line `first_line`) decoding failed."""
    lines_before = raw.count(b"\n", 0, e.start)
    offset = e.start - (raw.rfind(b"\n", 0, e.start) + 1)
    return f"line {first_line + lines_before}, byte offset {offset}" if lines_before else f"byte offset {offset}"


def _object_row(where: Location, value: Any) -> Row | BadRow:
    if isinstance(value, dict):
        return Row(where, value)
    shown = json.dumps(value, ensure_ascii=False)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return BadRow(where, NOT_AN_OBJECT, f"found a JSON {_json_type(value)} ({shown}); each row must be an object "
                                        f'such as {{"text": "..."}}')


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _read_jsonl(path: str, hint: str = "") -> Iterator[Row | BadRow]:
    with _open(path) as f:
        for number, raw in enumerate(f, 1):
            where = Location(path, number, "line")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield BadRow(where, INVALID_UTF8, _utf8_detail(e, _position(raw, e, number)))
                continue
            # Without its terminator, so an error at the end of the line gets this line's column.
            line = line.rstrip("\r\n")
            if number == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():  # blank lines are layout, not rows
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                yield BadRow(where, MALFORMED_JSON, f"{e.msg} at column {e.colno}{hint}")
                continue
            yield _object_row(where, value)


def _read_json(path: str) -> Iterator[Row | BadRow]:
    """A JSON array of objects; many `.json` datasets are really JSON Lines, so anything else is read as those."""
    with _open(path) as f:
        _skip_bom(f)
        first = b""
        while not first and (chunk := f.read(_CHUNK)):
            first = chunk.lstrip(b" \t\r\n")[:1]
    if first == b"[":
        return _read_json_array(path)
    return _read_jsonl(path, hint="; a .json file must hold a JSON array of objects or one JSON object per line")


def _text_chunks(path: str) -> Iterator[str]:
    """The file's text in chunks; invalid UTF-8 is fatal here since a JSON array cannot be skipped element-wise."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    with _open(path) as f:
        offset = _skip_bom(f)
        while True:
            data = f.read(_CHUNK)
            pending = len(decoder.getstate()[0])  # bytes of a character split across the previous chunk
            try:
                text = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                where = f"file byte offset {offset - pending + e.start}"
                raise DataError(path, INVALID_UTF8, _utf8_detail(e, where)) from e
            offset += len(data)
            if not data:
                return
            yield text


def _read_json_array(path: str) -> Iterator[Row | BadRow]:
    """Parses `[elem, elem, ...]` one element at a time, forgetting text already parsed, so memory holds one
    element (plus a chunk) rather than the whole file."""
    decoder = json.JSONDecoder()
    chunks = _text_chunks(path)
    buf, pos, eof = "", 0, False
    base_line, base_col = 1, 0  # line (1-based) and column (0-based) of buf[0] in the file, for error messages

    def more(at_least: int = 1) -> bool:
        nonlocal buf, eof
        added = 0
        while added < at_least and not eof:
            chunk = next(chunks, None)
            if chunk is None:
                eof = True
            else:
                buf, added = buf + chunk, added + len(chunk)
        return added > 0

    def peek() -> str:
        """The next non-whitespace character, or "" at the end of the file."""
        nonlocal pos
        while True:
            pos = _JSON_WS.match(buf, pos).end()  # type: ignore[union-attr]
            if pos < len(buf) or not more():
                return buf[pos:pos + 1]

    def malformed(message: str, at: int) -> DataError:
        newline = buf.rfind("\n", 0, at)
        line = base_line + buf.count("\n", 0, at)
        column = at - newline if newline >= 0 else base_col + at + 1
        return DataError(path, MALFORMED_JSON, f"line {line} column {column}: {message}; "
                                               f"fix the file or convert it to JSON Lines")

    def element() -> Any:
        nonlocal pos
        peek()
        while True:
            try:
                value, end = decoder.raw_decode(buf, pos)
                # A value ending exactly at the end of the buffer may be a number cut by the chunking.
                if end < len(buf) or eof:
                    pos = end
                    return value
            except json.JSONDecodeError as e:
                if eof:
                    raise malformed(e.msg, e.pos) from None
            more(at_least=max(1, len(buf) - pos))  # doubling what is buffered keeps re-parsing a long element linear

    def forget_parsed() -> None:
        nonlocal buf, pos, base_line, base_col
        if pos < len(buf) // 2:  # dropping text copies the rest: only worth it once most of the buffer is parsed
            return
        done = buf[:pos]
        newlines = done.count("\n")
        base_line += newlines
        base_col = len(done) - done.rfind("\n") - 1 if newlines else base_col + len(done)
        buf, pos = buf[pos:], 0

    assert peek() == "[", "_read_json checked the first character"
    pos += 1
    number = 0
    if peek() == "]":
        pos += 1
    else:
        while True:
            value = element()
            number += 1
            yield _object_row(Location(path, number, "row"), value)
            forget_parsed()
            c = peek()
            pos += 1
            if c == "]":
                break
            if c != ",":
                raise malformed("expecting ',' or ']' after an element" if c else "the array is not closed", pos - 1)
    if peek():
        raise malformed("extra data after the array", pos)


def _read_csv(path: str, delimiter: str) -> Iterator[Row | BadRow]:
    # Long documents in one cell exceed csv's default 128 KiB field limit; a field is bounded by the file anyway.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    with _open(path) as f:
        consumed: list[bytes] = []  # raw lines of the record being parsed: its line numbers and strict decoding

        def lines() -> Iterator[str]:
            for i, raw in enumerate(f):
                consumed.append(raw)
                # Decoded leniently so one bad record does not stop the reader; each record is checked below.
                text = raw.decode("utf-8", "surrogateescape")
                yield text.removeprefix("\ufeff") if i == 0 else text

        # strict: a quote left open must be an error, not silently swallow the rest of the file into one value.
        records = csv.reader(lines(), delimiter=delimiter, strict=True)
        header: list[str] | None = None
        line = 0  # lines before the current record
        while True:
            try:
                record: list[str] | csv.Error = next(records)
            except StopIteration:
                return
            except csv.Error as e:  # the reader recovers and goes on with the next line
                record = e
            start, raw = line + 1, b"".join(consumed)
            line += len(consumed)
            consumed.clear()
            where = Location(path, start, "line")
            bad = _check_record(where, raw, record, header, delimiter, line)
            if header is None:
                if bad:  # without its header, a file cannot be read at all
                    raise DataError(str(where), bad.reason, bad.detail)
                if record:  # blank lines before the header are layout
                    header = _check_header(where, record)  # type: ignore[arg-type]
            elif bad:
                yield bad
            elif record:  # a blank line is not a row
                yield Row(where, dict(zip(header, record)))  # type: ignore[arg-type]


def _check_record(where: Location, raw: bytes, record: list[str] | csv.Error, header: list[str] | None,
                  delimiter: str, last_line: int) -> BadRow | None:
    span = (f"; the record runs over lines {where.number}-{last_line}: look for an unclosed quote"
            if last_line > where.number else "")
    if isinstance(record, csv.Error):
        return BadRow(where, MALFORMED_CSV, f"{record}{span}; check the quoting")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadRow(where, INVALID_UTF8, _utf8_detail(e, _position(raw, e, where.number)))
    if header is not None and record and len(record) != len(header):
        sep = "commas" if delimiter == "," else "tabs"
        return BadRow(where, WRONG_COLUMNS, f"expected {len(header)} (as in the header), found {len(record)}{span}; "
                                            f"quote values that contain {sep} or line breaks")
    return None


def _check_header(where: Location, names: list[str]) -> list[str]:
    unnamed = [i + 1 for i, n in enumerate(names) if not n.strip()]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if unnamed or repeated:
        problem = (f"column {unnamed[0]} has no name" if unnamed else f"column {repeated[0]!r} appears twice")
        raise DataError(str(where), BAD_HEADER, f"{problem}; the first line must be a header naming each column "
                                                f"once, e.g. instruction,response")
    return names


def _pyarrow() -> ModuleType:
    try:
        import pyarrow
    except ImportError as e:
        raise GemmatuneError("reading Parquet and Arrow files needs pyarrow: pip install pyarrow") from e
    return pyarrow


def _columnar_rows(path: str, batches: Callable[[ModuleType], Iterable[Any]], reason: str) -> Iterator[Row]:
    """Rows of pyarrow record batches, converted to Python a slice at a time."""
    pa = _pyarrow()
    number = 0
    try:
        for batch in batches(pa):
            for start in range(0, batch.num_rows, _BATCH_ROWS):
                for data in batch.slice(start, _BATCH_ROWS).to_pylist():
                    number += 1
                    yield Row(Location(path, number, "row"), data)
    except (pa.ArrowException, OSError) as e:
        raise DataError(path, reason, f"pyarrow cannot read it ({e}); re-export it") from e


def _read_parquet(path: str) -> Iterator[Row]:
    def batches(pa: ModuleType) -> Iterator[Any]:
        import pyarrow.parquet as pq

        # pyarrow's default pre-buffering reads every row group at once; a buffered stream reads page by page.
        with pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20) as f:
            yield from f.iter_batches(batch_size=_BATCH_ROWS)

    return _columnar_rows(path, batches, INVALID_PARQUET)


def _read_arrow(path: str) -> Iterator[Row]:
    def batches(pa: ModuleType) -> Iterator[Any]:
        with pa.memory_map(path) as source:  # mapped, not read: batches are paged in as they are used
            try:
                stream = pa.ipc.open_stream(source)  # what `datasets` writes
            except pa.ArrowInvalid:
                source.seek(0)
                reader = pa.ipc.open_file(source)  # the random-access Arrow file format (Feather v2)
                yield from (reader.get_batch(i) for i in range(reader.num_record_batches))
                return
            yield from stream

    return _columnar_rows(path, batches, INVALID_ARROW)


_READERS: dict[str, Reader] = {
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".json": _read_json,
    ".csv": functools.partial(_read_csv, delimiter=","),
    ".tsv": functools.partial(_read_csv, delimiter="\t"),
    ".parquet": _read_parquet,
    ".arrow": _read_arrow,
}
_TEXT = (".jsonl", ".ndjson", ".json", ".csv", ".tsv")  # also read gzip-compressed (.jsonl.gz, ...)
_SUPPORTED_HINT = ("Supported: " + ", ".join([*_READERS, *(e + ".gz" for e in _TEXT)]) +
                   " files, globs of them, directories of them, a `datasets` save_to_disk folder, "
                   "or a Hugging Face dataset name.")


def _reader_for(path: str) -> Reader | None:
    name = path.lower()
    if name.endswith(".gz"):
        name = name[:-3]
        return next((_READERS[e] for e in _TEXT if name.endswith(e)), None)
    return next((r for e, r in _READERS.items() if name.endswith(e)), None)
