"""The corpus on disk, in the notebooks' layout.

ROOT/plates_structured/plate-XXX/manifest.json   {"plate_id", "source_image", ...any other keys}
ROOT/plates_structured/plate-XXX/source/<image>
ROOT/plates_structured/plate-XXX/input_image.json, input_color_histograms.json, viz/
ROOT/plates.parquet                               one row per plate
ROOT/.plateflow/                                  plateflow's own state (cached results, config)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from plateflow.errors import DuplicatePlateError, ManifestError, PlateError, UnsafePathError

PLATES_DIR = "plates_structured"
MANIFEST = "manifest.json"
STATE_DIR = ".plateflow"
PLATE_NAME = re.compile(r"^plate-(\d+)$")


@dataclass(frozen=True)
class PlateRef:
    """A plate whose manifest is valid and whose source lies inside its folder."""

    folder: str
    plate_dir: Path
    plate_id: str
    source_path: Path
    source_image: str
    manifest: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass(frozen=True)
class PlateProblem:
    """A plate folder that cannot be processed, and why."""

    folder: str
    plate_dir: Path
    plate_id: str
    error: PlateError


def plates_dir(root: Path) -> Path:
    return Path(root) / PLATES_DIR


def state_dir(root: Path) -> Path:
    return Path(root) / STATE_DIR


@contextlib.contextmanager
def corpus_lock(root: Path, holder: str, on_wait=None) -> Iterator[None]:
    """Hold the corpus for one refresh at a time (ROOT/.plateflow/refresh.lock, flock).

    A scheduled refresh and one started by an ingest event may overlap; each writes the whole
    corpus table, so the second waits for the first. ``on_wait(holder)`` is called once, with
    what the holder wrote (its run, host and process), when it has to wait. The lock goes with
    its process: a refresh that dies holds nothing.
    """
    path = state_dir(root) / "refresh.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait(os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown")
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def read_manifest(plate_dir: Path) -> PlateRef:
    """Parse and check one plate's manifest; raise a ``PlateError`` that says what is wrong."""
    path = plate_dir / MANIFEST
    if not path.is_file():
        raise ManifestError(f"missing {MANIFEST} in {plate_dir.name}/")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{MANIFEST} is not UTF-8 text: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{MANIFEST} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{MANIFEST} must hold a JSON object, found {type(manifest).__name__}")
    plate_id = manifest.get("plate_id")
    if not isinstance(plate_id, str) or not plate_id.strip():
        raise ManifestError(f"{MANIFEST} needs a non-empty string 'plate_id', found {plate_id!r}")
    source_image = manifest.get("source_image")
    if not isinstance(source_image, str) or not source_image.strip():
        raise ManifestError(f"{MANIFEST} needs a string 'source_image', found {source_image!r}")
    source_path = resolve_inside(plate_dir, source_image)
    if not source_path.is_file():
        raise ManifestError(f"source_image {source_image!r} does not exist in {plate_dir.name}/")
    return PlateRef(plate_dir.name, plate_dir, plate_id, source_path, source_image, manifest)


def resolve_inside(plate_dir: Path, relative: str) -> Path:
    """Resolve ``relative`` against the plate folder, refusing anything that leaves it."""
    base = plate_dir.resolve()
    candidate = (base / relative).resolve()
    if not candidate.is_relative_to(base):
        raise UnsafePathError(
            f"source_image {relative!r} points outside the plate folder {plate_dir.name}/; refused"
        )
    return candidate


def plate_folders(root: Path) -> list[Path]:
    top = plates_dir(root)
    return sorted(p for p in top.iterdir() if p.is_dir() and not p.name.startswith("."))


def discover_plates(root: Path) -> list[PlateRef | PlateProblem]:
    """Every plate folder under ROOT, in folder order, each either valid or with its problem."""
    found: list[PlateRef | PlateProblem] = []
    for plate_dir in plate_folders(root):
        try:
            found.append(read_manifest(plate_dir))
        except PlateError as exc:
            found.append(PlateProblem(plate_dir.name, plate_dir, plate_dir.name, exc))
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


@dataclass
class IngestReport:
    added: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def iter_source_files(sources: Iterable[Path]) -> Iterator[Path]:
    for src in sources:
        src = Path(src)
        if src.is_dir():
            yield from sorted(
                p for p in src.rglob("*") if p.is_file() and not any(
                    part.startswith(".") for part in p.relative_to(src).parts)
            )
        else:
            yield src


def _sniff_image(path: Path) -> str | None:
    """None if Pillow recognises the file as an image, else the reason it is not one."""
    from PIL import Image, UnidentifiedImageError

    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as im:
            im.size  # header parsed
    except UnidentifiedImageError:
        return "not an image (no decoder recognises its contents)"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"unreadable image header: {exc}"
    return None


def _known_hashes(root: Path) -> dict[str, str]:
    known: dict[str, str] = {}
    for item in discover_plates(root):
        if isinstance(item, PlateRef):
            sha = item.manifest.get("sha256")
            if not isinstance(sha, str):
                sha = sha256_file(item.source_path)
            known.setdefault(sha, item.plate_id)
    return known


def _next_number(root: Path) -> int:
    nums = [int(m.group(1)) for p in plate_folders(root) if (m := PLATE_NAME.match(p.name))]
    return max(nums, default=0) + 1


def ingest(sources: Iterable[Path], root: Path, progress=None) -> IngestReport:
    """Copy image files into ROOT in the notebooks' layout. Sources are never moved or modified.

    Each new plate is assembled in a hidden temp folder and renamed into place, so a plate folder
    is either complete or absent. Files whose bytes are already in the corpus are skipped.
    """
    root = Path(root)
    plates_dir(root).mkdir(parents=True, exist_ok=True)
    known = _known_hashes(root)
    number = _next_number(root)
    report = IngestReport()
    files = list(iter_source_files(sources))
    for path in files:
        if progress:
            progress(path)
        if not path.exists():
            report.skipped.append((path, "does not exist"))
            continue
        if reason := _sniff_image(path):
            report.skipped.append((path, reason))
            continue
        sha = sha256_file(path)
        if sha in known:
            report.skipped.append((path, f"same bytes already ingested as {known[sha]}"))
            continue
        plate_id = f"plate-{number:03d}"
        number += 1
        _write_plate(plates_dir(root), plate_id, path, sha)
        known[sha] = plate_id
        report.added.append((path, plate_id))
    return report


def _write_plate(top: Path, plate_id: str, src: Path, sha: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{plate_id}.", dir=top))
    try:
        (tmp / "source").mkdir()
        shutil.copy2(src, tmp / "source" / src.name)
        manifest = {
            "plate_id": plate_id,
            "source_image": f"source/{src.name}",
            "original_path": str(src.resolve()),
            "sha256": sha,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        os.rename(tmp, top / plate_id)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
