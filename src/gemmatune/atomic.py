"""Files and directories that appear whole or not at all: a killed writer leaves the previous version, never a
half-written one. A directory is written into a hidden sibling (".NAME.partial-PID"), fsynced, and renamed into
place; what a killed writer left behind is recognised by that name and removed by the next write."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

from gemmatune.errors import GemmatuneError

LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(partial|old)-\d+$")


def aside(final: Path, kind: str) -> Path:
    """The hidden sibling where `final` is staged ("partial") or parked before deletion ("old")."""
    return final.parent / f".{final.name}.{kind}-{os.getpid()}"


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a read-only descriptor suffices for fsync, and also opens directories
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> None:
    """Replace `path` atomically: a killed writer leaves the old file, never a truncated one."""
    staged = aside(path, "partial")
    with open(staged, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(staged, path)


def remove_dir(path: Path) -> None:
    """Delete a directory so that a kill midway never leaves a partial one under its own name."""
    parked = aside(path, "old")
    os.replace(path, parked)
    shutil.rmtree(parked)


def remove_leftovers(parent: Path, name: str | None = None) -> None:
    """Delete what killed writers left in `parent` (of `name` only, when given)."""
    for entry in parent.iterdir():
        m = LEFTOVER.match(entry.name)
        if m and name in (None, m["name"]):
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def refuse_to_replace(out: Path, force: bool, what: str) -> None:
    """A non-empty directory is replaced only when the user says so."""
    if out.exists() and not out.is_dir():
        raise GemmatuneError(f"{out}: exists and is not a directory; choose another {what} directory.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise GemmatuneError(f"{out}: directory exists and is not empty; pass --force to replace it, or choose "
                             f"another {what} directory.")


@contextlib.contextmanager
def provisional_dir(path: Path) -> Iterator[Path]:
    """Create `path` (and its missing parents) for the block; when the block raises, the directories created here
    are removed again if empty, so a failed start leaves the file system as it found it."""
    created = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for p in created:
            try:
                p.rmdir()
            except OSError:  # not empty (someone else writes there too) or already gone
                break
        raise


def begin_dir(final: Path) -> Path:
    """Remove what killed writers of `final` left behind and create an empty staging directory for it; a writer
    that cannot use a `with` block (one that streams over many calls) pairs this with `commit_dir`, and removes
    the staging directory itself when it gives up."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(final.parent, final.name)
    staged = aside(final, "partial")
    staged.mkdir()
    return staged


def commit_dir(staged: Path, final: Path) -> None:
    """Make the staging directory from `begin_dir` become `final` (replacing what is there), durably."""
    for f in staged.iterdir():
        fsync(f)
    fsync(staged)
    parked = aside(final, "old")
    if final.exists():
        os.replace(final, parked)  # a directory cannot be renamed over a non-empty one
    os.replace(staged, final)
    fsync(final.parent)  # makes the rename itself durable
    if parked.exists():
        shutil.rmtree(parked)


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """Yield an empty staging directory; when the block ends normally it becomes `final` (replacing what is
    there), durably; when it raises, the staging directory is removed and `final` is untouched."""
    staged = begin_dir(final)
    try:
        yield staged
        commit_dir(staged, final)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_files(paths: Sequence[Path], force: bool) -> Iterator[list[Path]]:
    """Yield one hidden sibling to write for each of `paths`; they replace `paths`, in the order given, only when the
    block ends normally, so an interrupted or failed write leaves every path as it was. An existing file is replaced
    only with force. Several files are renamed one after the other: order them so that the last one completes the
    set (a GGUF file after its Modelfile, whose text depends only on the GGUF's name)."""
    for path in paths:
        if path.is_dir():
            raise GemmatuneError(f"{path}: is a directory; give a file path (e.g. {path / 'model.gguf'}).")
        if path.exists() and not force:
            raise GemmatuneError(f"{path}: file exists; pass --force to replace it, or choose another path.")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(path.parent, path.name)
    staged = [aside(path, "partial") for path in paths]
    try:
        yield staged
        for s in staged:
            fsync(s)
        for s, path in zip(staged, paths):
            os.replace(s, path)
        for parent in dict.fromkeys(path.parent for path in paths):
            fsync(parent)
    except BaseException:
        for s in staged:
            s.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def staged_file(path: Path, force: bool) -> Iterator[Path]:
    """`staged_files` for one file: yield a hidden sibling to write; it replaces `path` only when the block ends
    normally."""
    with staged_files([path], force) as [staged]:
        yield staged
