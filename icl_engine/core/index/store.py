"""Versioned folders behind an atomic pointer: how an artefact made of several files (an index)
is replaced so that readers never see it half-done and writers never collide.

    indexes/rt/
      CURRENT                         {"created_by": "icl_engine", "layout": 2, "version": "v-..."}
      v-20261126T143000Z-1a2b3c4d/    one complete version; never modified once published
      .lock                           writers hold an flock on it while they publish or delete
      .tmp-1a2b3c4d/                  a version being written (a killed writer's is removed by the next)
    indexes/.rt.build-1a2b3c4d/       a streaming build's scratch (scratch_folder), its builder holding
                                      an flock on its .lock; one a killed builder left is removed by
                                      the next build in that folder (remove_dead_scratch)

Publishing (the caller holds `writer_lock`): write the new version into `.tmp-*`, fsync it,
rename it to `v-*`, write `CURRENT.tmp`, fsync, rename it over `CURRENT` (the one atomic
switch), fsync the folder. A kill at any point leaves the old pointer, hence the old complete
version, or the new one. Readers take no lock: `read` reads the pointer once, then only that
version's files, and retries when the pointer moved while it read (the version it was reading
may have been collected). The previous version is kept until the next publish, so a reader
only retries when it is slower than a whole rebuild.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, TypeVar

__all__ = ["StoreError", "LockTimeoutError", "POINTER", "LOCK", "read_pointer", "current_version", "is_store",
           "only_leftovers", "writer_lock", "publish", "remove", "read", "collect_garbage", "scratch_folder",
           "remove_dead_scratch"]

POINTER = "CURRENT"
LOCK = ".lock"
LAYOUT = 2  # layout 1: the index files directly in the folder (still read, see index.py)
_VERSION = re.compile(r"v-\d{8}T\d{6}Z-[0-9a-f]{8}\Z")
_TMP = re.compile(r"\.tmp-[0-9a-f]{8}\Z")
_SCRATCH = re.compile(r"\..+\.build-[0-9a-f]{8}\Z")
DEFAULT_LOCK_TIMEOUT = 60.0  # seconds a writer waits for another writer of the same folder

T = TypeVar("T")


class StoreError(ValueError):
    """A folder that is not what it should be; the message is one line naming it."""


class LockTimeoutError(StoreError):
    """Another process kept the folder's writer lock for longer than the timeout."""


# ----------------------------------------------------------------------------- reading


def read_pointer(folder: Path) -> str | None:
    """The current version's name, or None when `folder` has no pointer (not a store, or a
    first publish that never finished). A pointer this engine did not write is an error."""
    try:
        raw = (folder / POINTER).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        d = json.loads(raw)
        ok = d.get("created_by") == "icl_engine" and d.get("layout") == LAYOUT and _VERSION.match(d.get("version", ""))
    except (ValueError, AttributeError, TypeError):
        ok = False
    if not ok:
        raise StoreError(f"{folder}: {POINTER} was not written by icl_engine (or is damaged)")
    return d["version"]


def current_version(folder: Path) -> Path | None:
    version = read_pointer(folder)
    return folder / version if version else None


def is_store(folder: Path) -> bool:
    try:
        return read_pointer(folder) is not None
    except StoreError:
        return False


def only_leftovers(folder: Path) -> bool:
    """True for an existing folder that holds nothing but what a writer leaves behind (a lock,
    temporary or unpublished versions): an interrupted first publish, safe to write into."""
    return folder.is_dir() and all(
        p.name == LOCK or _TMP.match(p.name) or (_VERSION.match(p.name) and p.is_dir()) for p in folder.iterdir())


def read(folder: Path, load: Callable[[Path], T], *, retries: int = 2) -> T:
    """load(current version folder), retried when a writer switched versions during the read.
    Raises StoreError when `folder` has no published version."""
    for attempt in range(retries + 1):
        version = current_version(folder)
        if version is None:
            raise StoreError(f"{folder}: no published version (a first build did not finish)")
        try:
            return load(version)
        except (ValueError, OSError):
            if attempt < retries and current_version(folder) != version:
                continue  # swapped under us: read the new version
            raise
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- writing


@contextmanager
def writer_lock(folder: Path, timeout: float | None = None, *, what: str | None = None) -> Iterator[None]:
    """Hold `folder`'s writer lock (an flock, released by the kernel if the process dies).
    Waits up to `timeout` seconds (default $ICL_LOCK_TIMEOUT, else 60), then LockTimeoutError."""
    if timeout is None:
        timeout = float(os.environ.get("ICL_LOCK_TIMEOUT") or DEFAULT_LOCK_TIMEOUT)
    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockTimeoutError(f"{what or folder} is being written by another process "
                                               f"(waited {timeout:g} s for its lock); try again later") from None
                    time.sleep(0.05)
            # the folder may have been deleted (and re-made) while we waited: lock the live one
            try:
                same = os.stat(folder / LOCK).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    finally:
        os.close(fd)  # releases the flock


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _new_version_name() -> str:
    return f"v-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def switch_pointer(folder: Path, version: str) -> None:
    """The one atomic step of a publish: CURRENT now names `version`."""
    tmp = folder / f"{POINTER}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps({"created_by": "icl_engine", "layout": LAYOUT, "version": version}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / POINTER)
    _fsync_dir(folder)


def publish(folder: Path, write: Callable[[Path], None]) -> Path:
    """Write a new version with write(tmp_folder) and make it current; returns its folder.
    The caller holds `writer_lock(folder)`. On any failure nothing visible changes."""
    tmp = folder / f".tmp-{uuid.uuid4().hex[:8]}"
    final = folder / _new_version_name()
    previous = read_pointer(folder)
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        os.rename(tmp, final)
        switch_pointer(folder, final.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        (folder / f"{POINTER}.tmp").unlink(missing_ok=True)
        if read_pointer(folder) != final.name:  # never switched to: an orphan nobody reads
            shutil.rmtree(final, ignore_errors=True)
        raise
    collect_garbage(folder, keep={final.name, previous})
    return final


def collect_garbage(folder: Path, keep: set) -> None:
    """Remove temporary folders and versions not in `keep` (the caller holds the lock). Failures
    are ignored: garbage left now is collected by the next writer."""
    for p in folder.iterdir():
        if (_TMP.match(p.name) or (_VERSION.match(p.name) and p.name not in keep)) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    (folder / f"{POINTER}.tmp").unlink(missing_ok=True)


def remove(folder: Path) -> None:
    """Delete a whole store (the caller holds its lock): one rename makes it vanish for readers,
    then the files go."""
    trash = folder.parent / f".{folder.name}.deleted-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(folder, trash)
    except OSError as e:
        if e.errno in (errno.ENOENT,):
            return
        raise
    shutil.rmtree(trash, ignore_errors=True)


# ----------------------------------------------------------------------------- a build's scratch


@contextmanager
def scratch_folder(parent: Path, name: str) -> Iterator[Path]:
    """A folder `.NAME.build-XXXXXXXX` in `parent` for a build's big intermediate files, removed
    after, whatever happens. Its builder holds an flock on the folder's .lock for as long as it
    runs (the kernel releases it when the process dies), so a later build tells a folder a killed
    builder left (lock free: remove_dead_scratch removes it) from one being built now (held:
    kept). The folder gets its `.build-` name only once the lock is held: it is made as
    `.NAME.start-XXXXXXXX`, locked, then renamed (a kill in those microseconds leaves that empty
    `.start-` folder, which nothing removes: a cleaner could not tell it from one starting now)."""
    token = uuid.uuid4().hex[:8]
    staging, scratch = parent / f".{name}.start-{token}", parent / f".{name}.build-{token}"
    staging.mkdir(parents=True)
    try:
        fd = os.open(staging / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
        os.rename(staging, scratch)
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)  # still locked: no cleaner touches it meanwhile
    finally:
        os.close(fd)
        shutil.rmtree(staging, ignore_errors=True)  # only there when the rename failed


def remove_dead_scratch(parent: Path) -> list[Path]:
    """Remove the scratch folders (scratch_folder's `.*.build-XXXXXXXX`, directly in `parent`)
    whose builder is dead: their lock is free. One whose lock is held (a build running now), one
    without a lock file (not made by scratch_folder) and anything else are left alone, as is
    everything outside `parent` (a symlink is not followed). Returns the folders removed."""
    removed = []
    try:
        entries = sorted(parent.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for p in entries:
        if not _SCRATCH.match(p.name) or p.is_symlink() or not p.is_dir():
            continue
        try:
            fd = os.open(p / LOCK, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its builder is alive
            os.close(fd)
            continue
        try:
            shutil.rmtree(p, ignore_errors=True)  # under its lock: another cleaner meanwhile sees it held
            removed.append(p)
        finally:
            os.close(fd)
    return removed
