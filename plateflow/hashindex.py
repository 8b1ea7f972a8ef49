"""The source index (ROOT/.plateflow/source-index.parquet): each source's stat signature with its sha256.

As git's index and rsync do, a file whose size, mtime_ns, inode and ctime_ns are what they were
when it was hashed is taken to hold the same bytes, and is not read again. A file modified
within ``RACY_NS`` of its hashing is hashed again next time (git's "racily clean" entries: a
write in the same clock tick as the hash would leave the stat unchanged).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from plateflow.layout import CorpusLayout

RACY_NS = 2_000_000_000
HASH_ATTEMPTS = 3  # a source that cannot be read is tried again after 1 s and 2 s


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def index_key(root: Path, path: Path) -> str:
    """How ``path`` is named in the source index (and the corpus snapshot): relative to the
    resolved ``root`` where it lies inside it, else its resolved path."""
    path_s, prefix = os.fspath(path), os.fspath(root) + os.sep
    if path_s.startswith(prefix) and os.path.isabs(path_s):  # a resolved path (the usual case)
        return path_s[len(prefix):].replace(os.sep, "/")
    path = Path(path).resolve()
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _signature(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def _stamp(signature: tuple[int, int, int, int]) -> bytes:
    """A stat signature in 32 bytes: what a refresh hands its tasks with each hash (10^5 of
    them, so a third of the memory of the tuple)."""
    return struct.pack("<QqQq", *signature)


@contextlib.contextmanager
def open_source(path: Path, sha256: str | None = None,
                stamp: bytes | None = None) -> Iterator[tuple[bytes | BinaryIO, str]]:
    """The source to decode and its sha256. ``sha256`` and ``stamp``: the hash the refresh found
    for the file and the stat it found it at (``SourceIndex.stamp``). While the file's stat is
    still that, its bytes are those it hashed, by the index's own rule: the open file itself is
    given, read as it is decoded and not hashed again (one hash per source per refresh), and a
    stat that changes before it is closed is an ``OSError`` (retried). Else its bytes, read whole
    and hashed: the hash is of the very bytes decoded."""
    with open(path, "rb") as fh:
        if sha256 is not None and stamp is not None and _stamp(_signature(os.fstat(fh.fileno()))) == stamp:
            yield fh, sha256
            if _stamp(_signature(os.fstat(fh.fileno()))) != stamp:
                raise OSError(f"{Path(path).name} changed while it was being read; retrying")
        else:
            data = fh.read()
            yield data, hashlib.sha256(data).hexdigest()


def _trusted(entry: tuple) -> bool:
    """An entry hashed well after its file's last modification (not racily clean)."""
    return entry[4] - entry[1] > RACY_NS


class SourceIndex:
    """sha256 of files under ``root``, read only where their stat changed. Thread-safe."""

    def __init__(self, root: Path):
        from plateflow.keyedtable import KeyedTable
        from plateflow.tables import SOURCE_INDEX_SCHEMA

        self.root = Path(root).resolve()
        self.path = CorpusLayout(self.root).source_index
        self._entries: dict[str, tuple[int, int, int, int, int, str]] = {}
        self._dirty: set[str] = set()  # keys recorded or dropped since the load
        self._damaged = False  # the index on disk could not be read: it is written whole
        self._lock = threading.Lock()
        self._table = KeyedTable(self.path, SOURCE_INDEX_SCHEMA)
        self._load()

    def _load(self) -> None:
        import pyarrow as pa

        try:
            self._entries, _ = self._table.load()
        except FileNotFoundError:
            return
        except (OSError, KeyError, pa.ArrowException):
            self._entries, self._damaged = {}, True  # an unreadable index is a cold one: it is rebuilt

    def key(self, path: Path) -> str:
        """How ``path`` is named in the index: ``index_key``."""
        return index_key(self.root, path)

    def sha256(self, path: Path) -> str:
        """The file's sha256: from the index if its stat is unchanged, else by reading it."""
        st = os.stat(path)
        return self.known(path, st) or self.rehash(path, st)

    def known(self, path: Path, st: os.stat_result | None = None) -> str | None:
        """The file's sha256 if the index has it for the file's current stat, else None (a stat, no read)."""
        sig = _signature(st or os.stat(path))
        entry = self._entries.get(self.key(path))
        return entry[5] if entry is not None and entry[:4] == sig and _trusted(entry) else None

    def stamp(self, path: Path) -> bytes | None:
        """The stat at which the index's sha256 of ``path`` holds (``_stamp``), when it is
        trusted (not racily clean); else None. The entry as recorded: no stat."""
        entry = self._entries.get(self.key(path))
        return _stamp(entry[:4]) if entry is not None and _trusted(entry) else None

    def rehash(self, path: Path, st: os.stat_result | None = None) -> str:
        """The file's sha256 by reading it (and recorded, unless it changed while it was read)."""
        st = st or os.stat(path)
        sig = _signature(st)
        hashed_ns = time.time_ns()
        sha = sha256_file(path)
        if _signature(os.stat(path)) == sig:  # it did not change while it was read
            self.record(path, sha, st, hashed_ns)
        return sha

    def rehash_patiently(self, path: Path, attempts: int = HASH_ATTEMPTS) -> str:
        """``rehash``, tried again after 1 s, 2 s … when the file cannot be read (a network
        filesystem's hiccup); the last ``OSError`` if it never can."""
        for attempt in range(attempts):
            try:
                return self.rehash(path)
            except OSError:
                if attempt == attempts - 1:
                    raise
                time.sleep(2 ** attempt)
        raise ValueError("attempts must be at least 1")

    def record(self, path: Path, sha256: str, st: os.stat_result | None = None,
               hashed_ns: int | None = None) -> None:
        """Record a hash computed elsewhere (from bytes just written, say)."""
        st = st or os.stat(path)
        entry = (*_signature(st), hashed_ns or time.time_ns(), sha256)
        key = self.key(path)
        with self._lock:
            old = self._entries.get(key)
            self._entries[key] = entry
            # Worth writing: a new file, new bytes or stat, or an entry that has stopped being racy.
            if (old is None or old[:4] != entry[:4] or old[5] != sha256
                    or (not _trusted(old) and _trusted(entry))):
                self._dirty.add(key)

    def forget_missing(self, keep: set[str]) -> None:
        """Drop entries whose paths are not in ``keep`` (relative paths, as stored)."""
        with self._lock:
            gone = [k for k in self._entries if k not in keep]
            for k in gone:
                del self._entries[k]
            self._dirty.update(gone)

    def save(self) -> None:
        """Write what changed since the load, atomically (a delta: ``KeyedTable``)."""
        with self._lock:
            if not (self._dirty or self._damaged):
                return
            self._table.save(self._entries, self._dirty, {})
            self._dirty, self._damaged = set(), False

    def hash_all(self, paths: list[Path], workers: int, verify: bool = False,
                 progress: Callable[[int, int], None] = lambda done, failed: None) -> list[str | OSError]:
        """Each path's sha256, or the OSError that kept it from being read: from the index
        where the stat is unchanged (a stat, no read), else read, in ``workers`` threads;
        ``verify`` reads them all. ``progress(done, failed)`` as they come. Not saved."""
        out: list[str | OSError | None] = [None] * len(paths)
        to_read = []
        for i, path in enumerate(paths):  # a stat each: most sources are unchanged, and threads would cost more
            try:
                out[i] = None if verify else self.known(path)
            except OSError:
                out[i] = None
            if out[i] is None:
                to_read.append(i)
        progress(len(paths) - len(to_read), 0)

        def read(i: int) -> str | OSError:
            try:
                return self.rehash_patiently(paths[i])
            except OSError as exc:
                return exc

        # A window of reads at a time: ``Executor.map`` makes every future up front (~1.4 KB each,
        # 140 MB for a first refresh of 10^5 plates, memory the process keeps).
        window = max(1, workers) * 256
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="plateflow-hash") as pool:
            for start in range(0, len(to_read), window):
                part = to_read[start:start + window]
                for i, value in zip(part, pool.map(read, part)):
                    out[i] = value
                    progress(1, int(isinstance(value, OSError)))
        return out
