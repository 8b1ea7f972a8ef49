"""The corpus's plates: discovering and checking them (manifests, sources inside their folders),
and the lock one refresh holds. Ingesting new ones: plateflow/ingest.py. Where things live:
plateflow/layout.py."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from plateflow.config import CharacterizeParams
from plateflow.errors import DuplicatePlateError, ManifestError, PlateError, UnsafePathError
from plateflow.layout import (CANDIDATES, HISTOGRAMS, INPUT_IMAGE, MANIFEST, OUTPUT_DIRS, PLATES, WORKING_COPY,
                              CorpusLayout, natural_key)

PLATE_NAME = re.compile(r"^plate-(\d+)$")
# Ingest applies the refresh's pixel limit.
DEFAULT_MAX_PIXELS: int = CharacterizeParams.model_fields["max_pixels"].default


@dataclass(frozen=True, slots=True)
class PlateRef:
    """A plate whose manifest is valid and whose source lies inside its folder."""

    folder: str
    plate_dir: Path
    plate_id: str
    source_path: Path
    source_image: str
    manifest: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def original_path(manifest: dict[str, Any]) -> str | None:
    """Where the plate's source came from, as its manifest says (text to show, never a path
    plateflow opens); None when the manifest has none."""
    value = manifest.get("original_path")
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class PlateProblem:
    """A plate folder that cannot be processed, and why."""

    folder: str
    plate_dir: Path
    plate_id: str
    error: PlateError


@contextlib.contextmanager
def corpus_lock(root: Path, holder: str, on_wait=None) -> Iterator[str]:
    """Hold the corpus for one refresh at a time (ROOT/.plateflow/refresh.lock, flock).

    A scheduled refresh and one started by an ingest event may overlap; each writes the whole
    corpus table, so the second waits for the first. ``on_wait(holder)`` is called once, with
    what the holder wrote (its run, host and process), when it has to wait. The lock goes with
    its process: a refresh that dies holds nothing. Yields what the lock file still named when
    it was taken: empty, or the holder that died without letting go (then its writers may have
    left temp files behind).
    """
    path = CorpusLayout(Path(root)).lock
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait(os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown")
            fcntl.flock(fd, fcntl.LOCK_EX)
        died = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        with contextlib.suppress(OSError):  # who holds it is news for whoever waits, not a need (a full disk)
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder.encode(), 0)
        try:
            yield died
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def read_manifest(plate_dir: Path, top: Path | None = None) -> PlateRef:
    """Parse and check one plate's manifest; raise a ``PlateError`` that says what is wrong.

    A plate folder, manifest or output folder (viz/, runs/) that resolves outside
    plates_structured/ (``top``, resolved; by default the folder's parent) is refused: nothing
    outside the corpus is read or written.

    This runs for every plate on every refresh, so it works on strings and on one listing of the
    folder (whose entries say which are symlinks) rather than a stat per question."""
    plate_dir = Path(plate_dir)
    name, folder = plate_dir.name, os.fspath(plate_dir)
    top_s = os.fspath(top or plate_dir.parent.resolve())
    real = os.path.realpath(folder) if os.path.islink(folder) else f"{top_s}/{name}"
    if not real.startswith(top_s + os.sep):
        raise UnsafePathError(f"plate folder {name}/ is a symlink to {real}, outside {PLATES}/; refused")
    try:
        with os.scandir(folder) as it:
            entries = {e.name: e for e in it}
    except OSError as exc:
        raise ManifestError(f"cannot list {name}/: {exc}") from None
    manifest_entry = entries.get(MANIFEST)
    if manifest_entry is not None and manifest_entry.is_symlink() and not _inside(
            os.path.realpath(manifest_entry.path), real):
        raise UnsafePathError(f"{MANIFEST} of {name}/ is a symlink to {os.path.realpath(manifest_entry.path)}, "
                              f"outside the plate folder; refused")
    for out in OUTPUT_DIRS:
        entry = entries.get(out)
        if entry is not None and entry.is_symlink() and not _inside(os.path.realpath(entry.path), real):
            raise UnsafePathError(f"{name}/{out} is a symlink to {os.path.realpath(entry.path)}, outside the "
                                  f"plate folder; refused (plateflow writes there)")
    if manifest_entry is None or not manifest_entry.is_file():
        raise ManifestError(f"missing {MANIFEST} in {name}/")
    try:
        with open(manifest_entry.path, "rb") as fh:
            manifest = json.loads(fh.read().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{MANIFEST} is not UTF-8 text: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{MANIFEST} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ManifestError(f"{MANIFEST} is nested too deep to read (past Python's recursion limit)") from None
    except OSError as exc:
        raise ManifestError(f"cannot read {MANIFEST} of {name}/: {exc}") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{MANIFEST} must hold a JSON object, found {type(manifest).__name__}")
    plate_id = manifest.get("plate_id")
    if not isinstance(plate_id, str) or not plate_id.strip():
        raise ManifestError(f"{MANIFEST} needs a non-empty string 'plate_id', found {plate_id!r}")
    source_image = manifest.get("source_image")
    if not isinstance(source_image, str) or not source_image.strip():
        raise ManifestError(f"{MANIFEST} needs a string 'source_image', found {source_image!r}")
    if "\0" in source_image:
        raise ManifestError(f"source_image {source_image!r} holds a NUL byte, which no file name can")
    if (output := _plateflow_output(source_image)) is not None:
        raise ManifestError(f"source_image {source_image!r} is {output}, which plateflow writes: a source must be "
                            f"a scan of its own (source/<file>), or a refresh would overwrite it")
    source_path = _source_inside(plate_dir, source_image, real, entries)
    if source_path is None:
        raise ManifestError(f"source_image {source_image!r} {_missing(real, source_image)} in {name}/")
    return PlateRef(name, plate_dir, plate_id, source_path, source_image, manifest)


_OUTPUT_FILES = (INPUT_IMAGE, HISTOGRAMS, WORKING_COPY, CANDIDATES, MANIFEST)


def _plateflow_output(relative: str) -> str | None:
    """What of plateflow's own a source path names (its viz/ or runs/ folder, a file it writes
    beside the manifest), or None."""
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if parts and parts[0] in OUTPUT_DIRS:
        return f"in {parts[0]}/"
    if len(parts) == 1 and parts[0] in _OUTPUT_FILES:
        return parts[0]
    return None


def _missing(real: str, relative: str) -> str:
    """Why a source path is not a readable file: it does not exist, or what it is instead."""
    try:
        st = os.stat(os.path.join(real, relative))
    except (OSError, ValueError):
        return "does not exist"
    return "is a folder, not a file" if stat.S_ISDIR(st.st_mode) else f"is {_kind(st.st_mode)}, not a file"


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder + os.sep)


def _source_inside(plate_dir: Path, relative: str, real: str, entries: dict) -> Path | None:
    """The source's resolved path if it is a file inside the plate folder (None if there is no
    such file); ``UnsafePathError`` if it leads outside. The usual ``source/<file>``, with no
    symlink on the way (the listing and one lstat say so), needs no walk of the path."""
    parts = relative.split("/")
    if (len(parts) == 2 and parts[0] not in ("", ".", "..") and parts[1] not in ("", ".", "..")
            and os.sep == "/" and (entry := entries.get(parts[0])) is not None
            and entry.is_dir(follow_symlinks=False)):
        path = f"{real}/{relative}"
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if stat.S_ISREG(st.st_mode):
            return Path(path)
        if not stat.S_ISLNK(st.st_mode):
            return None
    candidate = resolve_inside(plate_dir, relative, base=Path(real))
    return candidate if candidate.is_file() else None


def resolve_inside(plate_dir: Path, relative: str, base: Path | None = None) -> Path:
    """Resolve ``relative`` against the plate folder (``base``: its resolved path), refusing
    anything that leaves it."""
    base = base or plate_dir.resolve()
    candidate = (base / relative).resolve()
    if not candidate.is_relative_to(base):
        raise UnsafePathError(
            f"source_image {relative!r} points outside the plate folder {plate_dir.name}/; refused"
        )
    return candidate


def plate_folder_names(root: Path) -> list[str]:
    """The names of the plate folders under ROOT/plates_structured, in natural order (plate-101
    before plate-1000): one listing, no stat per folder."""
    with os.scandir(CorpusLayout(Path(root)).plates) as it:
        names = [e.name for e in it if not e.name.startswith(".") and e.is_dir()]
    return sorted(names, key=natural_key)


def plate_folders(root: Path) -> list[Path]:
    """The plate folders under ROOT/plates_structured, in natural order."""
    top = CorpusLayout(Path(root)).plates
    return [top / name for name in plate_folder_names(root)]


def discover_plates(root: Path, folders: list[str] | None = None) -> list[PlateRef | PlateProblem]:
    """Every plate folder under ROOT (those named in ``folders``, when given), in folder order,
    each either valid or with its problem."""
    found: list[PlateRef | PlateProblem] = []
    top = CorpusLayout(Path(root)).plates.resolve()
    names = plate_folder_names(root) if folders is None else folders
    plates = CorpusLayout(Path(root)).plates
    for plate_dir in (plates / name for name in names):
        try:
            found.append(read_manifest(plate_dir, top))
        except PlateError as exc:
            found.append(PlateProblem(plate_dir.name, plate_dir, plate_dir.name, exc))
        except (ValueError, OSError, RecursionError) as exc:  # whatever else one folder holds: its plate alone
            err = ManifestError(f"cannot read the plate folder: {type(exc).__name__}: {exc}")
            found.append(PlateProblem(plate_dir.name, plate_dir, plate_dir.name, err))
    by_id: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(found):
        if isinstance(item, PlateRef):
            by_id[item.plate_id].append(i)
    for plate_id, idxs in by_id.items():
        if len(idxs) > 1:
            folders = [found[i].folder for i in idxs]
            for i in idxs:
                item = found[i]
                others = ", ".join(f for f in folders if f != item.folder)
                err = DuplicatePlateError(f"plate_id {plate_id!r} is also used by {others}")
                found[i] = PlateProblem(item.folder, item.plate_dir, plate_id, err)
    return found


# ---------------------------------------------------------------------------------------------
# Ingest


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"
