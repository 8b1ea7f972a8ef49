"""Ingest: copy images from folders or buckets into the corpus in the notebooks' layout, one
plate folder each; sources are never moved, modified or deleted. Bad files are listed as
skipped with their reason; a bucket that stops answering stops the ingest with a message."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

from plateflow.atomic import make_temp_dir, write_bytes
from plateflow.buckets import Location, RemoteFile, is_url
from plateflow.errors import ConfigError, PlateError
from plateflow.corpus import DEFAULT_MAX_PIXELS, PLATE_NAME, PlateRef, _kind, discover_plates
from plateflow.hashindex import SourceIndex
from plateflow.layout import MANIFEST, SOURCE, CorpusLayout, natural_key, safe_file_name


@dataclass
class IngestReport:
    added: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    stopped: str | None = None  # why the ingest stopped before the end (a bucket that stopped answering)


GIVE_UP_AFTER = 3  # objects in a row a bucket did not answer for: it is down, the rest would wait as long


def _unanswered(reason: str) -> bool:
    """Whether a read failed for want of an answer (a dead endpoint), not for the object."""
    return any(word in reason for word in ("EndpointConnectionError", "ConnectTimeout", "ReadTimeout",
                                           "Connection refused", "ConnectionError", "Could not connect", "timed out"))


def iter_source_files(sources: Iterable[Path | str], credentials_block: str | None = None,
                      corpus: Path | None = None) -> Iterator[tuple[Path | RemoteFile | str, str | None]]:
    """(file, None) for each regular file in ``sources`` (folders searched recursively, in
    natural order, hidden names left out), and (entry, reason) for each entry that is not one:
    missing, a broken symlink or a symlink loop, a FIFO, socket or device (never opened).

    A source may be an fsspec URL (``s3://bucket/prefix``, ``gs://…``, ``az://…``, ``file://…``):
    its objects are listed (``RemoteFile``), with ``credentials_block``'s credentials or the
    environment's; a bucket that cannot be listed is one entry with its reason. ``corpus``, a
    corpus inside a source folder, is one entry too: its own files are never sources."""
    seen: set[tuple[int, int]] = set()
    skip: set[tuple[int, int]] = set()
    if corpus is not None:
        with contextlib.suppress(OSError):
            st = os.stat(corpus)
            skip.add((st.st_dev, st.st_ino))
    for src in sources:
        if not is_url(src):
            yield from _walk(Path(src), seen, skip)
            continue
        try:
            location = Location(src, credentials_block)
            if location.local is not None:
                yield from _walk(location.local, seen, skip)
                continue
            listed = list(location.walk_files())
        except ConfigError:
            raise  # a wrong credentials block or protocol: the user's to fix, not one file's problem
        except Exception as exc:  # noqa: BLE001 - a missing bucket, refused credentials, no network
            yield str(src), f"cannot be listed: {type(exc).__name__}: {exc}"
            continue
        if not listed:
            yield str(src), "no objects under this URL"
        yield from ((f, None) for f in listed)


def _walk(path: Path, seen: set[tuple[int, int]], skip: set[tuple[int, int]] = frozenset()
          ) -> Iterator[tuple[Path, str | None]]:
    try:
        st = path.stat()
    except FileNotFoundError:
        yield path, ("broken symlink (its target does not exist)" if path.is_symlink() else "does not exist")
        return
    except OSError as exc:
        yield path, ("symlink loop" if exc.errno == errno.ELOOP else f"cannot be read: {exc.strerror}")
        return
    if stat.S_ISREG(st.st_mode):
        yield path, None
    elif stat.S_ISDIR(st.st_mode):
        if (st.st_dev, st.st_ino) in skip:
            yield path, "the corpus being ingested into: its plates and outputs are never sources"
            return
        if (st.st_dev, st.st_ino) in seen:
            yield path, "symlink loop (this folder is already being ingested)"
            return
        seen.add((st.st_dev, st.st_ino))
        try:
            children = sorted((p for p in path.iterdir() if not p.name.startswith(".")),
                              key=lambda p: natural_key(p.name))
        except OSError as exc:
            yield path, f"cannot list this folder: {exc.strerror}"
            return
        for child in children:
            yield from _walk(child, seen, skip)
    else:
        yield path, f"{_kind(st.st_mode)}, not a regular file: not read"


def _read_regular(path: Path) -> bytes:
    """The file's bytes; refuses anything that became a non-regular file (never blocks on a FIFO)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PlateError(f"{_kind(st.st_mode)}, not a regular file: not read")
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read()
    finally:
        os.close(fd)


def _known(root: Path, index: SourceIndex) -> tuple[dict[str, str], set[str]]:
    """(sha256 of each plate's current source -> its plate_id, every plate_id and folder name in use)."""
    known: dict[str, str] = {}
    used: set[str] = set()
    for item in discover_plates(root):
        used.update((item.folder, item.plate_id))
        if isinstance(item, PlateRef):
            try:
                known.setdefault(index.sha256(item.source_path), item.plate_id)
            except OSError:
                continue
    return known, used


def ingest(sources: Iterable[Path | str], root: Path, progress=None,
           max_pixels: int = DEFAULT_MAX_PIXELS, credentials_block: str | None = None) -> IngestReport:
    """Copy image files into ROOT in the notebooks' layout. Sources are never moved or modified.

    ``sources``: files, folders and fsspec URLs (see ``iter_source_files``). Each new plate is
    assembled in a hidden temp folder and renamed into place, so a plate folder is either
    complete or absent. Files whose bytes are one of the corpus's current sources are skipped,
    and so is anything that is not an image of at most ``max_pixels`` (the refresh's limit), or
    that cannot be read (an object deleted after it was listed), each with its reason. New plate
    ids are unique among folder names and manifests. Reports name local files by path and
    objects by URL.
    """
    from plateflow.imagefile import read_header

    root = Path(root)
    corpus = CorpusLayout(root)
    corpus.plates.mkdir(parents=True, exist_ok=True)
    marker = corpus.sweep_needed  # if this ingest dies, the next refresh sweeps
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    index = SourceIndex(root)
    known, used = _known(root, index)
    number = max([int(m.group(1)) for name in used if (m := PLATE_NAME.match(name))], default=0) + 1
    report = IngestReport()
    unreachable = 0  # objects in a row that could not be read for want of an answer
    entries = _read_ahead(iter_source_files(sources, credentials_block, corpus=root))
    for item, reason, data in entries:
        shown = item.url if isinstance(item, RemoteFile) else item
        if progress:
            progress(shown)
        if isinstance(item, RemoteFile) and reason is not None and _unanswered(reason):
            unreachable += 1
            if unreachable >= GIVE_UP_AFTER:
                report.skipped.append((shown, reason))
                report.stopped = (f"{item.location.url} stopped answering ({reason}); ingest stopped after "
                                  f"{len(report.added)} added and {len(report.skipped)} skipped: run it again to "
                                  f"continue (what is in the corpus is kept and skipped)")
                entries.close()
                break
        elif reason is None:
            unreachable = 0
        if reason is None:
            try:
                read_header(data, item.name, max_pixels)
            except PlateError as exc:
                reason = str(exc)
        if reason is not None:
            report.skipped.append((shown, reason))
            continue
        sha = hashlib.sha256(data).hexdigest()
        if sha in known:
            report.skipped.append((shown, f"same bytes already ingested as {known[sha]}"))
            continue
        while (plate_id := f"plate-{number:03d}") in used:
            number += 1
        if isinstance(item, RemoteFile):
            original, mtime_ns = item.url, item.mtime_ns
        else:
            original, mtime_ns = str(item.resolve()), item.stat().st_mtime_ns
        try:  # the copy's name is made safe (the original is in the manifest)
            copy = _write_plate(corpus.plates, plate_id, safe_file_name(item.name), original, mtime_ns, data, sha)
        except OSError as exc:  # a full disk, a quota: this file is not in the corpus, and says why
            report.skipped.append((shown, f"could not be written into the corpus: {exc.strerror or exc}"))
            continue
        index.record(copy, sha)
        known[sha] = plate_id
        used.add(plate_id)
        report.added.append((shown, plate_id))
    index.save()
    return report


def _read_ahead(entries: Iterator[tuple[Path | RemoteFile | str, str | None]], window: int = 4
                ) -> Iterator[tuple[Path | RemoteFile | str, str | None, bytes | None]]:
    """(entry, reason, bytes) in order, reading up to ``window`` files at once (objects of a
    bucket come over the network); a file that cannot be read gets its reason."""
    def read(entry, reason):
        if reason is not None:
            return entry, reason, None
        try:
            return entry, None, entry.read() if isinstance(entry, RemoteFile) else _read_regular(entry)
        except PlateError as exc:
            return entry, str(exc), None
        except FileNotFoundError:
            return entry, "disappeared between listing and reading", None
        except OSError as exc:
            return entry, f"cannot be read: {exc.strerror or exc}", None
        except Exception as exc:  # noqa: BLE001 - a storage client's own error (refused, throttled)
            return entry, f"cannot be read: {type(exc).__name__}: {exc}", None

    with ThreadPoolExecutor(window) as pool:
        pending = []
        try:
            for entry, reason in entries:
                pending.append(pool.submit(read, entry, reason))
                if len(pending) >= window:
                    yield pending.pop(0).result()
            while pending:
                yield pending.pop(0).result()
        finally:  # stopped early: reads not begun are not begun
            for future in pending:
                future.cancel()


def _write_plate(top: Path, plate_id: str, name: str, original: str, mtime_ns: int | None,
                 data: bytes, sha: str) -> Path:
    """Assemble the plate in a temp folder and rename it into place; returns its source's path.
    The copy holds exactly the bytes that were checked and hashed, with the source's mtime."""
    fd, tmp = make_temp_dir(top, plate_id)
    try:
        copy = tmp / SOURCE / name
        write_bytes(copy, data)
        if mtime_ns is not None:
            os.utime(copy, ns=(mtime_ns, mtime_ns))
        manifest = {
            "plate_id": plate_id,
            "source_image": f"{SOURCE}/{name}",
            "original_path": original,
            "sha256": sha,
        }
        write_bytes(tmp / MANIFEST, (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode())
        os.rename(tmp, top / plate_id)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(fd)
    return CorpusLayout(top.parent).plate(plate_id).source(name)
