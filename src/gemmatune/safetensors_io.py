"""A small streaming reader and writer of the safetensors format.

Layout: an 8-byte little-endian header length N, N bytes of a JSON object
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the raw little-endian
tensor bytes, offsets counted from the end of the header.

Why our own and not the `safetensors` library: the library memory-maps the file, and mapped pages that were read
count in the process's RSS until the mapping goes away, so loading a model through it holds the checkpoint twice.
Here one tensor at a time is read with seek + readinto into a fresh array, and a file is written tensor by tensor
from an iterator (the header is computed first from the declared shapes and dtypes). Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import ml_dtypes
import numpy as np

from gemmatune.errors import GemmatuneError

# Explicit little-endian dtypes: the format is little-endian whatever the host.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {v: k for k, v in DTYPES.items()}
# The library refuses larger headers too; the cap keeps a corrupt length from making us read gigabytes of JSON.
MAX_HEADER_BYTES = 100 * 2**20
_CORRUPT = "the file is truncated or corrupt; re-download or re-export it"


def dtype_name(dtype: np.dtype | type) -> str:
    """numpy dtype -> safetensors dtype name ("F32", "BF16", ...)."""
    dt = np.dtype(dtype)
    if dt not in _NAMES:
        raise GemmatuneError(f"dtype {dt} cannot be stored in safetensors (known: {', '.join(DTYPES)}).")
    return _NAMES[dt]


@dataclass(frozen=True)
class TensorInfo:
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    nbytes: int


class SafetensorsReader:
    """Open and validate a safetensors file; `read(name)` loads one tensor. Use as a context manager."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            # Unbuffered: readinto then goes straight from the OS into the array, with no copy in between.
            self._file = open(self.path, "rb", buffering=0)
        except OSError as e:
            raise GemmatuneError(f"{self.path}: cannot open ({e.strerror}).") from None
        try:
            self.metadata, self.tensors = self._parse_header()
        except BaseException:
            self._file.close()
            raise

    def _corrupt(self, why: str) -> GemmatuneError:
        return GemmatuneError(f"{self.path}: {why}; {_CORRUPT}.")

    def _parse_header(self) -> tuple[dict[str, str], dict[str, TensorInfo]]:
        size = os.fstat(self._file.fileno()).st_size
        if size < 8:
            raise self._corrupt(f"{size} bytes long, shorter than the 8-byte header length")
        n = int.from_bytes(self._read_exact(0, 8), "little")
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise self._corrupt(f"header length {n} exceeds the file size {size}"
                                if n > size - 8 else f"header length {n} exceeds {MAX_HEADER_BYTES} bytes")
        try:
            header = json.loads(self._read_exact(8, n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._corrupt(f"header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise self._corrupt("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._corrupt("__metadata__ is not a map of strings")
        data_start, data_size = 8 + n, size - 8 - n
        tensors, spans = {}, []
        for name, entry in header.items():
            dtype, shape, (begin, end) = self._parse_entry(name, entry)
            if end > data_size:
                raise self._corrupt(f"tensor {name!r} ends at data byte {end} but the file holds only "
                                    f"{data_size} data bytes")
            tensors[name] = TensorInfo(dtype, shape, data_start + begin, end - begin)
            if end > begin:  # empty tensors occupy no bytes, so they cannot overlap anything
                spans.append((begin, end, name))
        spans.sort()
        for (_, end0, name0), (begin1, _, name1) in zip(spans, spans[1:]):
            if begin1 < end0:
                raise self._corrupt(f"tensors {name0!r} and {name1!r} overlap")
        return metadata, tensors

    def _parse_entry(self, name: str, entry: object) -> tuple[np.dtype, tuple[int, ...], tuple[int, int]]:
        if not isinstance(entry, dict):
            raise self._corrupt(f"entry {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPES:
            raise self._corrupt(f"tensor {name!r} has unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise self._corrupt(f"tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise self._corrupt(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != expected:
            raise self._corrupt(f"tensor {name!r} of dtype {dtype} and shape {shape} needs {expected} bytes "
                                f"but data_offsets {offsets} span {offsets[1] - offsets[0]}")
        return DTYPES[dtype], tuple(shape), (offsets[0], offsets[1])

    def _read_exact(self, offset: int, n: int) -> bytes:
        buf = bytearray(n)
        self._readinto(offset, memoryview(buf))
        return bytes(buf)

    def _readinto(self, offset: int, buf: memoryview) -> None:
        self._file.seek(offset)
        done = 0
        while done < len(buf):  # a raw read may return fewer bytes than asked
            got = self._file.readinto(buf[done:])
            if not got:
                raise self._corrupt(f"unexpected end of file at byte {offset + done}")
            done += got

    def read(self, name: str) -> np.ndarray:
        """One tensor, in a newly allocated array that owns its memory."""
        info = self._info(name)
        out = np.empty(info.shape, info.dtype)
        self._readinto(info.start, memoryview(out.reshape(-1).view(np.uint8)))
        return out

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) along axis 0 of a tensor of rank >= 1 (stop is clipped): a contiguous byte range."""
        info = self._info(name)
        stop = min(stop, info.shape[0])
        row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
        out = np.empty((max(0, stop - start), *info.shape[1:]), info.dtype)
        self._readinto(info.start + start * row_bytes, memoryview(out.reshape(-1).view(np.uint8)))
        return out

    def _info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise GemmatuneError(f"{self.path}: no tensor {name!r}.")
        return self.tensors[name]

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def tensor_nbytes(shape: Sequence[int], dtype: np.dtype | type) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def write_safetensors(path: str | Path, layout: Sequence[tuple[str, Sequence[int], np.dtype | type]],
                      tensors: Iterable[tuple[str, np.ndarray]], metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (name, array) in the order of `layout` (name, shape, dtype), holding one at a time.

    The header comes first in the file, so it is computed from `layout`; each array must then match its entry.
    Arrays of another dtype are cast (one tensor at a time)."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, shape, dtype in layout:
        nbytes = tensor_nbytes(shape, dtype)
        header[name] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad as the library does, so the data starts 8-byte aligned
    it = iter(tensors)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape, dtype in layout:
            got_name, a = next(it, (None, None))
            if got_name != name or tuple(np.shape(a)) != tuple(shape):
                raise ValueError(f"{path}: expected tensor {name!r} of shape {tuple(shape)} next, got "
                                 f"{got_name!r} of shape {None if a is None else np.shape(a)}")
            a = np.ascontiguousarray(np.asarray(a).astype(DTYPES[dtype_name(dtype)], copy=False))
            f.write(memoryview(a.reshape(-1).view(np.uint8)))
        if next(it, None) is not None:
            raise ValueError(f"{path}: more tensors given than the layout lists")
