"""Writing outputs: per-plate files in the notebooks' names, and the corpus table plates.parquet.

Every file is written atomically. A plate's files are rewritten only when what they would contain
differs from what is on disk (or one is missing); input_image.json goes last and carries the cache
key, so its presence with matching bytes means the rest were written for the same result.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from plateflow.atomic import dumps_json, temp_path_for, write_bytes
from plateflow.caching import exponential_backoff, retry_transient
from plateflow.corpus import PlateRef
from tasks.characterize import Characterization
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
    try:
        return path.resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(path)


def save_characterization(plate: PlateRef, root: Path, result: Characterization) -> bool:
    """Write input_image.json, input_color_histograms.json and viz/; False if all were current."""
    d = plate.plate_dir
    record = dumps_json(input_image_record(plate, root, result))
    viz_wanted = result.preview_png is not None
    expected = [d / HISTOGRAMS] + ([d / VIZ / f for f in VIZ_FILES] if viz_wanted else [])
    current = d / INPUT_IMAGE
    if current.is_file() and current.read_bytes() == record and all(p.is_file() for p in expected):
        return False
    write_bytes(d / HISTOGRAMS, dumps_json(result.histograms))
    if viz_wanted:
        write_bytes(d / VIZ / "input_preview.png", result.preview_png)
        for name, data in histogram_plots(result.histograms).items():
            write_bytes(d / VIZ / name, data)
    write_bytes(current, record)
    return True


def save_failure_record(plate: PlateRef, root: Path, error: str) -> None:
    """input_image.json for a plate whose image could not be loaded (loadable: false)."""
    try:
        size = plate.source_path.stat().st_size
    except OSError:
        size = None
    write_bytes(
        plate.plate_dir / INPUT_IMAGE,
        dumps_json({
            "plate_id": plate.plate_id,
            "filename": plate.source_path.name,
            "path": _relative(plate.source_path, root),
            "file_size_bytes": size,
            "loadable": False,
            "error": error,
        }),
    )


@task(
    name="save-characterization",
    task_run_name="save-{plate.plate_id}",
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=1),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_transient,
)
def save_plate(plate: PlateRef, root: Path, result: Characterization) -> bool:
    return save_characterization(plate, root, result)


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
    ("mean_rgb", pa.list_(pa.float64(), 3)),
    ("luminance_mean", pa.float64()),
    ("luminance_std", pa.float64()),
    ("entropy", pa.float64()),
    ("background_ratio", pa.float64()),
    ("grayscale_like", pa.bool_()),
    ("very_large", pa.bool_()),
    ("extreme_aspect", pa.bool_()),
    ("frames", pa.int32()),
    ("exif_orientation", pa.int32()),
    ("updated_at", pa.timestamp("s", tz="UTC")),
])


def write_corpus_table(root: Path, rows: list[dict[str, Any]]) -> Path:
    """Write ROOT/plates.parquet atomically with the typed schema.

    Columns plateflow does not know (added by a notebook, say) are kept for plate_ids that are
    still in the corpus.
    """
    now = datetime.now(timezone.utc).replace(microsecond=0)
    full = [{**{f.name: None for f in SCHEMA}, "updated_at": now, **row} for row in rows]
    table = pa.Table.from_pylist([{k: r[k] for k in SCHEMA.names} for r in full], schema=SCHEMA)
    path = Path(root) / TABLE
    table = _carry_foreign_columns(path, table)
    tmp = temp_path_for(path)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _carry_foreign_columns(path: Path, table: pa.Table) -> pa.Table:
    if not path.is_file():
        return table
    try:
        old = pq.read_table(path)
    except (OSError, pa.ArrowException):
        return table  # unreadable old table: it is replaced, not merged
    extra = [c for c in old.column_names if c not in SCHEMA.names]
    if not extra or "plate_id" not in old.column_names:
        return table
    old_rows = {r["plate_id"]: r for r in old.select(["plate_id", *extra]).to_pylist()}
    for name in extra:
        values = [old_rows.get(pid, {}).get(name) for pid in table.column("plate_id").to_pylist()]
        table = table.append_column(old.schema.field(name), pa.array(values, old.schema.field(name).type))
    return table


def read_corpus_table(root: Path) -> pa.Table | None:
    path = Path(root) / TABLE
    return pq.read_table(path) if path.is_file() else None
