"""Atomic writes: a reader sees the old file (or folder) or the new one, never half of one;
and the matching read of a small JSON file with one-line errors.

    write_json(path, obj)              # temp file beside it, then os.replace
    write_text(path, text)
    with publish_dir(final) as tmp:    # fill tmp; on success it is renamed to `final`
        ...
    read_json(path, "the template")    # ValueError "path:line: the template is not valid JSON (...)"

The temp file or folder lives beside the target (same filesystem, so the rename is atomic)
and starts with a dot, so a crash leaves at most a hidden leftover, never a torn target.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["writing", "write_bytes", "write_text", "write_json", "publish_dir", "previous", "read_json", "check_out_dir", "check_out_file",
           "nearest_existing"]


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[Path]:
    """A hidden temp file beside `path` (`.NAME.XXXX`: no reader's pattern matches it) for the
    block to write; renamed to `path` when the block succeeds, removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with writing(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with writing(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj, *, allow_nan: bool = True) -> None:
    """Indented, key-sorted JSON and a final newline (the format of every JSON file we write)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=allow_nan) + "\n")


@contextmanager
def publish_dir(final: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """A fresh temp folder beside `final`; when the block succeeds it is renamed to `final` (an
    empty folder already there, e.g. one the user made for it, is replaced; a full one only
    with `replace`: it is renamed to `.NAME-old` first, and removed once the new one is in
    place, so a reader sees the old folder or the new one and a kill leaves one of them whole,
    the old under `previous(final)`). When the block fails, `final` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    old = previous(final)
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it 0700
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()
        elif final.exists() and replace:
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def previous(folder: str | os.PathLike) -> Path:
    """Where publish_dir(folder, replace=True) keeps the folder it replaces until the new one is in."""
    folder = Path(folder)
    return folder.parent / f".{folder.name}-old"


def read_json(path: str | os.PathLike, what: str, error: type[ValueError] = ValueError):
    """The JSON in `path`; an unreadable file or invalid JSON raises `error` with one line
    naming the file (and line) and `what` it should hold."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: {what} is not valid JSON ({e.msg})") from None


def nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else its nearest existing ancestor: what a write there needs
    to be a writable folder."""
    return next((p for p in (path, *path.parents) if p.exists()), Path("."))


def check_out_dir(path: str | os.PathLike, what: str = "--out") -> None:
    """Refuse, before any long work, an output folder that cannot be made or written: a file in
    its place or above it, or a read-only parent. ValueError with one line."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a folder")
    parent = nearest_existing(path)
    if not parent.is_dir():
        raise ValueError(f"{what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: {parent} is not writable")


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same path after links are resolved, or one inode
    (a hard link)."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_out_file(out: str | os.PathLike, *, inputs=(), folders=(), what: str = "--out") -> None:
    """Refuse, before anything is written, an output file that would overwrite what the command
    reads: one of `inputs` (the same path, a symbolic or hard link to it, or the file a link at
    `out` points to), or a file inside one of `folders` (an index, a model). ValueError, one line."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{what} {out} is a folder; give a file name")
    for src in inputs:
        if src is not None and _same_file(out, Path(src)):
            raise ValueError(f"{what} {out} is the input file {src}: the output would overwrite it; "
                             "choose another name")
    target = out.resolve()
    for folder in folders:
        if folder is not None and Path(folder).exists() and target.is_relative_to(Path(folder).resolve()):
            raise ValueError(f"{what} {out} lies inside {folder}, which the command reads; choose another place")
