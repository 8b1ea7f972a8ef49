"""The characterization's files in each plate folder, in the notebooks' names: input_image.json,
input_color_histograms.json, viz/ and working_copy.jpg (the corpus table: plateflow/tables.py).

Every file is written atomically. A plate's files are rewritten only when what they would contain
differs from what is on disk (or one is missing); input_image.json goes last and carries the cache
key, so its presence with matching bytes means the rest were written for the same result.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from plateflow.atomic import dumps_compact_json, dumps_json, write_bytes, write_bytes_if_changed
from plateflow.corpus import PlateRef
from plateflow.layout import HISTOGRAMS, INPUT_IMAGE, PREVIEW, VIZ, VIZ_FILES, WORKING_COPY, PlateLayout

if TYPE_CHECKING:
    from plateflow.characterize.step import Characterization


def input_image_record(plate: PlateRef, root: Path, result: "Characterization") -> dict:
    return {
        "plate_id": plate.plate_id,
        "filename": plate.source_path.name,
        "path": _relative(plate.source_path, root),
        **result.metadata,
        "plateflow_cache_key": result.cache_key,
    }


def _relative(path: Path, root: Path) -> str:
    path_s, root_s = os.fspath(path), os.fspath(root)
    if path_s.startswith(root_s + os.sep) and os.path.isabs(path_s):  # both resolved already (a refresh)
        return path_s[len(root_s) + 1:].replace(os.sep, "/")
    try:
        return Path(path).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)


def _expected_outputs(plate_dir: Path, viz: bool, working_copy: bool) -> list[Path]:
    """The files besides input_image.json that a characterization leaves in a plate folder."""
    files = PlateLayout(plate_dir)
    return ([files.histograms] + ([files.viz(f) for f in VIZ_FILES] if viz else [])
            + ([files.working_copy] if working_copy else []))


def current_record(plate: PlateRef, root: Path, keys: tuple[str, ...], viz: bool, working_copy: bool) -> dict | None:
    """The plate's input_image.json record if every output of the characterization is in place
    (the record carries one of its ``keys`` and names this plate and source), else None. This is how
    a refresh knows, without a task or a decode, that a plate has nothing to do. A failure
    record (``loadable: false``) made with one of them is returned as it is. It runs for every plate
    of every refresh: strings and one listing of viz/, not a Path and a stat per file."""
    folder = os.fspath(plate.plate_dir)
    try:
        with open(f"{folder}/{INPUT_IMAGE}", "rb") as fh:
            record = json.loads(fh.read())
    except (OSError, ValueError):
        return None
    if not (isinstance(record, dict) and record.get("plateflow_cache_key") in keys
            and record.get("plate_id") == plate.plate_id and record.get("filename") == plate.source_path.name
            and record.get("path") == _relative(plate.source_path, root)):
        return None
    if record.get("loadable") is False:  # the key's result is a failure: nothing else to find
        return record
    files = [HISTOGRAMS] + ([WORKING_COPY] if working_copy else [])
    if not all(os.path.isfile(f"{folder}/{f}") for f in files):
        return None
    if viz:
        try:
            with os.scandir(f"{folder}/{VIZ}") as it:
                present = {e.name for e in it if e.is_file()}
        except OSError:
            return None
        if not present.issuperset(VIZ_FILES):
            return None
    return record


def save_characterization(plate: PlateRef, root: Path, result: "Characterization") -> bool:
    """Write input_image.json, input_color_histograms.json and viz/; False if all were current."""
    from plateflow.characterize.viz import histogram_plots

    files = PlateLayout(plate.plate_dir)
    record = dumps_json(input_image_record(plate, root, result))
    viz_wanted = result.preview_png is not None
    expected = _expected_outputs(files.dir, viz_wanted, result.working_jpeg is not None)
    current = files.input_image
    if current.is_file() and current.read_bytes() == record and all(p.is_file() for p in expected):
        return False
    write_bytes(files.histograms, dumps_compact_json(result.histograms))  # thousands of numbers: one line
    if result.working_jpeg is not None:
        write_bytes(files.working_copy, result.working_jpeg)
    if viz_wanted:
        write_bytes(files.viz(PREVIEW), result.preview_png)
        for name, data in histogram_plots(result.histograms).items():
            write_bytes(files.viz(name), data)
    write_bytes(current, record)
    return True


def save_failure_record(plate: PlateRef, root: Path, error: str, key: str | None = None,
                        full_error: str | None = None) -> bool:
    """input_image.json for a plate whose image could not be loaded (loadable: false); written
    only when it differs from the file on disk (an unchanged failed plate rewrites nothing).
    With the characterization's ``key``, the record is that key's result: bad input is
    deterministic, so the next refresh of the same bytes, parameters and code reads the failure
    (``full_error``, as the corpus table shows it) instead of decoding the file again."""
    try:
        size = plate.source_path.stat().st_size
    except OSError:
        size = None
    return write_bytes_if_changed(
        PlateLayout(plate.plate_dir).input_image,
        dumps_json({
            "plate_id": plate.plate_id,
            "filename": plate.source_path.name,
            "path": _relative(plate.source_path, root),
            "file_size_bytes": size,
            "loadable": False,
            "error": error,
            **({"plateflow_cache_key": key, "plateflow_error": full_error or error} if key else {}),
        }),
    )
