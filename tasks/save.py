"""Writing outputs: per-plate files in the notebooks' names, and the corpus table plates.parquet.

Every file is written atomically. A plate's files are rewritten only when what they would contain
differs from what is on disk (or one is missing); input_image.json goes last and carries the cache
key, so its presence with matching bytes means the rest were written for the same result.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from plateflow.atomic import dumps_json, write_bytes, write_bytes_if_changed, write_parquet
from plateflow.corpus import PlateRef, natural_key
from plateflow.errors import CorpusTableError
from tasks.characterize import Characterization
from tasks.crops import WORKING_COPY
from tasks.viz import histogram_plots

INPUT_IMAGE = "input_image.json"
HISTOGRAMS = "input_color_histograms.json"
VIZ = "viz"
VIZ_FILES = ("input_preview.png", "histogram_rgb.png", "histogram_rgb_foreground.png", "histogram_luminance.png")


def input_image_record(plate: PlateRef, root: Path, result: Characterization) -> dict:
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
    """The files besides input_image.json that a characterisation leaves in a plate folder."""
    return ([plate_dir / HISTOGRAMS] + ([plate_dir / VIZ / f for f in VIZ_FILES] if viz else [])
            + ([plate_dir / WORKING_COPY] if working_copy else []))


def current_record(plate: PlateRef, root: Path, key: str, viz: bool, working_copy: bool) -> dict | None:
    """The plate's input_image.json record if every output of the characterisation ``key`` is in
    place (the record carries the key and names this plate and source), else None. This is how
    a refresh knows, without a task or a decode, that a plate has nothing to do. A failure
    record (``loadable: false``) made with ``key`` is returned as it is. It runs for every plate
    of every refresh: strings and one listing of viz/, not a Path and a stat per file."""
    folder = os.fspath(plate.plate_dir)
    try:
        with open(f"{folder}/{INPUT_IMAGE}", "rb") as fh:
            record = json.loads(fh.read())
    except (OSError, ValueError):
        return None
    if not (isinstance(record, dict) and record.get("plateflow_cache_key") == key
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


def save_characterization(plate: PlateRef, root: Path, result: Characterization) -> bool:
    """Write input_image.json, input_color_histograms.json and viz/; False if all were current."""
    d = plate.plate_dir
    record = dumps_json(input_image_record(plate, root, result))
    viz_wanted = result.preview_png is not None
    expected = _expected_outputs(d, viz_wanted, result.working_jpeg is not None)
    current = d / INPUT_IMAGE
    if current.is_file() and current.read_bytes() == record and all(p.is_file() for p in expected):
        return False
    write_bytes(d / HISTOGRAMS, dumps_json(result.histograms))
    if result.working_jpeg is not None:
        write_bytes(d / WORKING_COPY, result.working_jpeg)
    if viz_wanted:
        write_bytes(d / VIZ / "input_preview.png", result.preview_png)
        for name, data in histogram_plots(result.histograms).items():
            write_bytes(d / VIZ / name, data)
    write_bytes(current, record)
    return True


def save_failure_record(plate: PlateRef, root: Path, error: str, key: str | None = None,
                        full_error: str | None = None) -> bool:
    """input_image.json for a plate whose image could not be loaded (loadable: false); written
    only when it differs from the file on disk (an unchanged failed plate rewrites nothing).
    With the characterisation's ``key``, the record is that key's result: bad input is
    deterministic, so the next refresh of the same bytes, parameters and code reads the failure
    (``full_error``, as the corpus table shows it) instead of decoding the file again."""
    try:
        size = plate.source_path.stat().st_size
    except OSError:
        size = None
    return write_bytes_if_changed(
        plate.plate_dir / INPUT_IMAGE,
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


# ---------------------------------------------------------------------------------------------
# Corpus table

TABLE = "plates.parquet"
SCHEMA = pa.schema([
    ("plate_dir", pa.string()),
    ("plate_id", pa.string()),
    ("source_image", pa.string()),
    ("status", pa.string()),  # ok | failed
    ("failed_step", pa.string()),
    ("error", pa.string()),
    ("characterize_status", pa.string()),  # computed | cached | failed | not_run
    ("sha256", pa.string()),
    ("image_format", pa.string()),
    ("mode", pa.string()),
    ("file_size_bytes", pa.int64()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("megapixels", pa.float64()),
    ("aspect_ratio", pa.float64()),
    # Lists that are null for a failed plate are variable-size lists: Arrow's Parquet reader could
    # not read a null fixed-size list before 2026 (apache/arrow#35692), nor can many tools.
    ("mean_rgb", pa.list_(pa.float64())),
    ("luminance_mean", pa.float64()),
    ("luminance_std", pa.float64()),
    ("entropy", pa.float64()),
    ("background_ratio", pa.float64()),
    ("grayscale_like", pa.bool_()),
    ("very_large", pa.bool_()),
    ("extreme_aspect", pa.bool_()),
    ("frames", pa.int32()),
    ("exif_orientation", pa.int32()),
    ("embed_status", pa.string()),  # computed | cached | failed | not_run | (null: no models)
    ("crop_status", pa.string()),
    ("run_id", pa.string()),
    ("best_crop_idx", pa.int16()),
    ("crop_box", pa.list_(pa.int32())),
    ("similarity", pa.float64()),
    ("original_size", pa.list_(pa.int32())),
    ("updated_at", pa.timestamp("s", tz="UTC")),
])


RUN_KEYS = (b"plateflow.flow_run_id", b"plateflow.root_flow_run_id")  # schema metadata: who wrote it


def write_corpus_table(root: Path, rows: list[dict[str, Any]], partial: bool = False,
                       flow_runs: tuple[str, ...] = ()) -> Path:
    """Write ROOT/plates.parquet atomically with the typed schema, rows in natural folder order.

    ``partial``: ``rows`` cover only some plates (a retry); the others keep their rows as they
    are. Columns plateflow does not know (added by a notebook, say) are kept, each value with
    its plate folder. ``flow_runs`` (the writing flow run's id and its root run's) are recorded
    in the table's metadata, so a reader can tell whether a run wrote it. An old table that cannot be read is kept beside it as
    ``plates.parquet.unreadable`` (a full refresh replaces it; a partial one refuses).
    """
    now = datetime.now(timezone.utc).replace(microsecond=0)
    full = [{**{f.name: None for f in SCHEMA}, "updated_at": now, **row} for row in rows]
    path = Path(root) / TABLE
    try:
        old = read_corpus_table(root)
    except CorpusTableError:
        if partial:
            raise
        path.rename(path.with_name(TABLE + ".unreadable"))
        old = None
    if partial and old is not None:
        mine = {r["plate_dir"] for r in full}
        kept = [{**{f.name: None for f in SCHEMA}, **{k: v for k, v in r.items() if k in SCHEMA.names}}
                for r in old.to_pylist() if r.get("plate_dir") not in mine]
        full = full + kept
    full.sort(key=lambda r: natural_key(r["plate_dir"]))
    table = pa.Table.from_pylist([{k: r[k] for k in SCHEMA.names} for r in full], schema=SCHEMA)
    table = _carry_foreign_columns(old, table)
    if flow_runs:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               **{k: v.encode() for k, v in zip(RUN_KEYS, flow_runs) if v}})
    write_parquet(path, table)
    return path


def _carry_foreign_columns(old: pa.Table | None, table: pa.Table) -> pa.Table:
    """Columns of the old table that plateflow does not write, carried over by plate folder
    (plate ids may repeat: duplicates are a plate error, and a note must stay with its folder)
    or, in a table with no plate_dir column, by plate_id."""
    key = next((k for k in ("plate_dir", "plate_id") if old is not None and k in old.column_names), None)
    extra = [c for c in old.column_names if c not in SCHEMA.names] if key else []
    if not extra:
        return table
    # A table a notebook wrote may have no plate_dir: its plate_ids then name the rows.
    old_rows = {r[key]: r for r in old.select([key, *extra]).to_pylist()}
    folders = table.column(key).to_pylist()
    for name in extra:
        field = old.schema.field(name)
        table = table.append_column(field, pa.array([old_rows.get(d, {}).get(name) for d in folders], field.type))
    return table


def read_parquet(path: Path, what: str) -> pa.Table | None:
    """The table at ``path``, None if there is none; a file that is not a readable table
    raises ``CorpusTableError`` saying which file and how to recover."""
    try:
        return pq.read_table(path)
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowException) as exc:
        root = Path(path).parents[1] if what != "corpus table" else Path(path).parent
        raise CorpusTableError(
            f"{path} is not a readable {what} ({type(exc).__name__}: {exc}); a plain "
            f"`plateflow refresh --root {root}` rebuilds it") from None


def read_corpus_table(root: Path) -> pa.Table | None:
    """ROOT/plates.parquet, None if there is none; raises ``CorpusTableError`` if unreadable."""
    return read_parquet(Path(root) / TABLE, "corpus table")


def table_flow_runs(table: pa.Table) -> set[str]:
    """The flow run ids recorded in a corpus table by ``write_corpus_table``."""
    meta = table.schema.metadata or {}
    return {meta[k].decode() for k in RUN_KEYS if meta.get(k)}


# ---------------------------------------------------------------------------------------------
# Per-plate run outputs (the notebooks' runs/<run_id>/ layout) and the embedding tables


def find_run(plate_dir: Path, key: str) -> str | None:
    """The run id of an earlier run whose outputs for this plate were made with ``key``."""
    for metrics in sorted((plate_dir / "runs").glob("*/metrics.json"), reverse=True):
        try:
            data = json.loads(metrics.read_text())
        except (OSError, ValueError):
            continue
        outputs = [metrics.parent / o for o in data.get("outputs", [])]
        if data.get("plateflow_key") == key and all(p.is_file() for p in outputs):
            return data.get("run_id")
    return None


def save_run_outputs(plate: PlateRef, run_id: str, key: str, vectors: dict[str, "object"],
                     boxes: list[list[int]], crop_model: str, best: int, similarity: float,
                     original_size: tuple[int, int], crop_format: str, sha256: str | None = None) -> str:
    """Write runs/<run_id>/: embeddings/<model>.npy, smart_crop.json, the best crop, metrics.json.
    With ``sha256``, a source that no longer has that hash fails the plate before anything is written."""
    import io

    import numpy as np

    from tasks.crops import cut_crop

    run_dir = plate.plate_dir / "runs" / run_id
    crop_name = f"best_crop.{'png' if crop_format == 'png' else 'jpg'}"
    crop = cut_crop(plate.source_path, boxes[best], crop_format, expected_sha256=sha256)
    outputs = []
    for model, vec in vectors.items():
        buf = io.BytesIO()
        np.save(buf, np.asarray(vec, np.float32))
        write_bytes(run_dir / "embeddings" / f"{model}.npy", buf.getvalue())
        outputs.append(f"embeddings/{model}.npy")
    write_bytes(run_dir / crop_name, crop)
    outputs.append(crop_name)
    write_bytes(run_dir / "smart_crop.json", dumps_json({
        "plate_id": plate.plate_id, "crop_box": boxes[best], "similarity": similarity,
        "best_crop_idx": best, "original_size": list(original_size), "crop_model": crop_model,
        "candidates": len(boxes) - 1,
    }))
    outputs.append("smart_crop.json")
    write_bytes(run_dir / "metrics.json", dumps_json({
        "run_id": run_id, "plate_id": plate.plate_id,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "models": list(vectors), "outputs": outputs,
        "notes": f"smart crop by {crop_model}: candidate {best} of {len(boxes) - 1}, cosine {similarity:.4f}",
        "plateflow_key": key,
    }))
    return run_id


def write_embeddings_table(root: Path, model: str, rows: list[tuple[str, str, list[list[int]], "object"]],
                           dim: int, partial: bool = False) -> Path:
    """ROOT/embeddings/<model>.parquet: plate_id, sha256, candidate_index, box, vector (``dim``
    float32s; the column keeps its type with no rows, say when every plate failed).

    ``partial``: ``rows`` cover only some plates; the other plates' rows are kept.
    """
    import numpy as np

    plate_ids, shas, idx, boxes, vecs = [], [], [], [], []
    for plate_id, sha, plate_boxes, vectors in rows:
        vectors = np.asarray(vectors, np.float32)
        if vectors.shape != (len(plate_boxes), dim):
            raise ValueError(f"{model} vectors of {plate_id}: shape {vectors.shape}, expected "
                             f"({len(plate_boxes)}, {dim}): one per box, of the model's dimension")
        for i, box in enumerate(plate_boxes):
            plate_ids.append(plate_id)
            shas.append(sha)
            idx.append(i)
            boxes.append(box)
        vecs.append(vectors)
    flat = np.concatenate(vecs).reshape(-1) if vecs else np.zeros(0, np.float32)
    table = pa.table({
        "plate_id": pa.array(plate_ids, pa.string()),
        "sha256": pa.array(shas, pa.string()),
        "candidate_index": pa.array(idx, pa.int16()),
        "box": pa.array(boxes, pa.list_(pa.int32(), 4)),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim),
    })
    path = embeddings_table_path(root, model)
    old = read_parquet(path, f"embeddings table of {model}") if partial else None
    if old is not None:
        import pyarrow.compute as pc

        if old.schema.equals(table.schema):
            keep = pc.invert(pc.is_in(old.column("plate_id"), value_set=pa.array(sorted(set(plate_ids)), pa.string())))
            table = pa.concat_tables([old.filter(keep), table])
    write_parquet(path, table)
    return path


def embeddings_table_path(root: Path, model: str) -> Path:
    return Path(root) / "embeddings" / f"{model}.parquet"


def smart_crop_plate(plate: PlateRef, run_id: str, key: str, vector_files: dict[str, str],
                     boxes: list[list[int]], crop_model: str, crop_params, original_size: tuple[int, int],
                     sha256: str | None = None) -> dict:
    """Choose the best crop and write this run's outputs, unless an earlier run has them for
    ``key``. The crop is cut only from a source whose bytes still have ``sha256``."""
    from tasks.crops import choose_best_crop
    from tasks.embeddings import load_vectors

    vectors = {m: load_vectors(f, len(boxes)) for m, f in vector_files.items()}
    best, similarity = choose_best_crop(vectors[crop_model], boxes, crop_params)
    existing = find_run(plate.plate_dir, key)
    if existing is None:
        save_run_outputs(plate, run_id, key, vectors, boxes, crop_model, best, similarity,
                         original_size, crop_params.crop_format, sha256)
    return {"run_id": existing or run_id, "crop_status": "cached" if existing else "computed",
            "best_crop_idx": best, "crop_box": boxes[best], "similarity": similarity,
            "original_size": list(original_size)}
