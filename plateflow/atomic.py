"""Atomic file writes: a temp file in the same folder, then ``os.replace``.

Temp files are named ``.<name>.<8 random characters>.tmp`` (the names ``tempfile.mkstemp``
gives them, so files left by earlier versions are recognised too) and created with the mode the
umask gives, as ``open()`` creates files: on a shared filesystem the workers' service account
and a web server read what plateflow writes. While a writer fills a temp file it holds an
``flock`` on it, so ``remove_stale_temps`` can tell a file whose writer died (kill -9, a lost
machine) from one being written right now.

An ``OSError`` while writing names the file it was writing (a full disk says which path).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import random
import re
import shutil
import string
from pathlib import Path
from typing import Any, Iterator

_ALPHABET = string.ascii_lowercase + string.digits + "_"
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{''.join(random.choices(_ALPHABET, k=8))}.tmp")


def _named(exc: OSError, path: Path) -> OSError:
    """``exc`` again, naming ``path`` when it names no file (a failed write() names none)."""
    if exc.filename is not None or exc.errno is None:
        return exc
    return type(exc)(exc.errno, exc.strerror, str(path))


@contextlib.contextmanager
def temp_file(path: Path) -> Iterator[tuple[int, Path]]:
    """A new, locked temp file beside ``path`` (mode from the umask); yields (fd, temp path).

    The caller writes it (through the fd, or by name); on a clean exit it replaces ``path``,
    on an error it is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = _temp_name(path)
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise _named(exc, path) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield fd, tmp
            os.replace(tmp, path)
        except OSError as exc:
            raise _named(exc, path) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a mix."""
    with temp_file(path) as (fd, _):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]


def write_bytes_if_changed(path: Path, data: bytes) -> bool:
    """``write_bytes`` unless ``path`` already holds exactly ``data``; True if it wrote."""
    try:
        if os.path.getsize(path) == len(data) and Path(path).read_bytes() == data:
            return False
    except OSError:
        pass
    write_bytes(path, data)
    return True


def dumps_json(obj: Any) -> bytes:
    """The canonical JSON bytes plateflow writes (stable across runs)."""
    return (json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode()


def dumps_compact_json(obj: Any) -> bytes:
    """JSON bytes on one line, for files of numbers no one reads by eye (Python's C encoder:
    several times faster than the indented form)."""
    return (json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n").encode()


def write_json(path: Path, obj: Any) -> None:
    write_bytes(path, dumps_json(obj))


def write_parquet(path: Path, table) -> None:
    """Write a pyarrow table to ``path`` atomically."""
    import pyarrow.parquet as pq

    with temp_file(path) as (_, tmp):
        pq.write_table(table, tmp)


def make_temp_dir(parent: Path, prefix: str) -> tuple[int, Path]:
    """A new folder ``parent/.<prefix>.<random>.tmp`` (mode from the umask), held by an flock
    on the returned fd until the caller closes it; ``remove_stale_temps`` leaves it alone till then."""
    while True:
        tmp = _temp_name(Path(parent) / prefix)
        try:
            tmp.mkdir()
            break
        except FileExistsError:
            continue
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd, tmp


def _is_abandoned(path: Path) -> bool:
    """True if no process holds ``path``'s flock (its writer is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    finally:
        os.close(fd)


def remove_stale_temps(top: Path, skip: tuple[str, ...] = ()) -> list[Path]:
    """Remove plateflow's temp files and folders under ``top`` whose writer is gone.

    ``skip``: folder names not to descend into (a plate's ``source/``). Returns what it removed.
    """
    removed = []
    for folder, dirs, files in os.walk(top):
        base = Path(folder)
        stale_dirs = [d for d in dirs if TEMP_NAME.match(d)]
        dirs[:] = [d for d in dirs if d not in skip and d not in stale_dirs]
        for name in [f for f in files if TEMP_NAME.match(f)] + stale_dirs:
            path = base / name
            if not path.is_symlink() and _is_abandoned(path):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed
