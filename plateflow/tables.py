"""Every table plateflow writes, with its schema: plates.parquet (one row per plate), the
embeddings tables (one row per crop candidate) and the source index. Written atomically."""

from __future__ import annotations

from datetime import datetime, timezone
from itertools import pairwise
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from plateflow.atomic import write_parquet
from plateflow.errors import CorpusTableError
from plateflow.flags import SCORES
from plateflow.layout import CorpusLayout, natural_key



_SCORE_TYPES = {"brightness": pa.int16(), "foreground_brightness": pa.int16(), "paper_luminance": pa.int16(),
                "foreground_share": pa.float32(), "entropy": pa.float32(), "edge_width": pa.float32(),
                "tint_spread": pa.float32()}
QUALITY_SCORES = pa.struct([(name, _SCORE_TYPES[name]) for name in SCORES])  # the names: plateflow/flags.py


PLATES_SCHEMA = pa.schema([
    ("plate_dir", pa.string()),
    ("plate_id", pa.string()),
    ("source_image", pa.string()),
    ("original_path", pa.string()),  # where ingest copied the source from (manifest.json), as given
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
    # cleanvision's issue names (plateflow/characterize/quality.py): the plate's own, then the corpus's; the
    # plate an exact or near duplicate duplicates; the hashes that decide duplicates.
    ("quality_flags", pa.list_(pa.string())),
    # The share of the plate at its detected paper level (0 for a photograph: no paper found).
    ("paper_share", pa.float32()),
    # The scores the plate's own flags come from (input_image.json's quality; profiles/quality.toml).
    ("quality_scores", QUALITY_SCORES),
    ("duplicate_of", pa.string()),
    ("pixel_hash", pa.string()),
    ("phash", pa.string()),  # space-separated: the content's hash and its cut versions
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


# Columns of plates.parquet copied from a plate's input_image.json record.
CHARACTERIZATION_COLUMNS = (
    "sha256", "image_format", "mode", "file_size_bytes", "width", "height", "megapixels",
    "aspect_ratio", "mean_rgb", "luminance_mean", "luminance_std", "entropy", "background_ratio",
    "grayscale_like", "very_large", "extreme_aspect", "frames", "exif_orientation",
)

RUN_KEYS = (b"plateflow.flow_run_id", b"plateflow.root_flow_run_id")  # schema metadata: who wrote it
FINALIZE_KEY = b"plateflow.corpus_flags"  # schema metadata: what decided the corpus-wide columns


# Columns of plates.parquet made by a refresh with models (the embeddings, the smart crop).
MODEL_COLUMNS = ("embed_status", "crop_status", "run_id", "best_crop_idx", "crop_box", "similarity", "original_size")


def carry_model_columns(root: Path, rows: list[dict[str, Any]]) -> None:
    """For a refresh without models: each ok plate of ``rows`` whose bytes are those its old row
    was made from keeps the old row's ``MODEL_COLUMNS`` (its smart crop stands), so a nightly
    characterization does not erase what a refresh with models found. A changed plate's are
    dropped: they were of other bytes."""
    import pyarrow.compute as pc

    from plateflow.status import Status

    wanted = {r["plate_dir"]: r for r in rows if r.get("status") == Status.OK and r.get("sha256")}
    if not wanted:
        return
    try:
        old = read_corpus_table(root, ["plate_dir", "sha256", *MODEL_COLUMNS])
    except CorpusTableError:  # written anew by this refresh: nothing to carry
        return
    if old is None or not {"plate_dir", "sha256", "run_id"} <= set(old.column_names):
        return
    old = old.filter(pc.and_(pc.is_in(old.column("plate_dir"), value_set=pa.array(sorted(wanted), pa.string())),
                             pc.is_valid(old.column("run_id"))))
    for before in old.to_pylist():
        row = wanted[before.pop("plate_dir")]
        if before.pop("sha256") == row["sha256"]:
            row.update(before)


# Columns that say how a row was made, not what it holds: a refreshed plate whose other columns
# come out as they were keeps its row (and its updated_at), so an unchanged corpus writes nothing.
_HOW_MADE = ("characterize_status", "embed_status", "crop_status", "updated_at")
# Columns decided over the whole corpus (corpus_flags): compared after it has run.
_CORPUS_WIDE = ("quality_flags", "duplicate_of")
_COMPARE_ROWS = 4096  # new rows compared with their old ones this many at a time


def write_corpus_table(root: Path, rows: list[dict[str, Any]], partial: bool = False,
                       flow_runs: tuple[str, ...] = (), finalize: Callable[..., pa.Table] | None = None,
                       keep: set[str] | frozenset[str] = frozenset(), plate_flags: frozenset[str] = frozenset(),
                       finalize_version: str = "") -> bool:
    """Merge ``rows`` into ROOT/plates.parquet and write it atomically if anything changed
    (True then), with the typed schema, rows in natural folder order.

    A row replaces its plate's old row only where it holds something new: a row whose columns,
    other than how it was made (the stage statuses) and when, are those of the old row leaves
    the old row in place, so ``updated_at`` is when the plate's row last changed. ``keep``: the
    folders whose old rows stand without a new row (plates a refresh found unchanged);
    ``partial``: every folder without a new row keeps its old row (a retry). Any other old row
    is dropped (its folder is gone). Columns plateflow does not know (added by a notebook,
    say) are kept, each value with its plate folder. ``finalize(table)`` returns the merged
    table with its corpus-wide columns (``quality_flags`` of which only ``plate_flags``
    compare between rows, and ``duplicate_of``) set; it is not called when no row changed and
    the table records the same ``finalize_version`` (what decided them). When it does, and only
    some rows replaced theirs in place, it is told which (``changed``: their positions;
    ``before``: the old rows there), so it can decide only what they touch. ``flow_runs`` (the writing flow run's id
    and its root run's) are recorded in the table's metadata. An old table that cannot be read
    is kept beside it as ``plates.parquet.unreadable`` (a full refresh replaces it; a partial
    one refuses).

    The work is columnar: the unchanged plates' rows are never Python objects, so the cost of a
    refresh that changed k plates is k rows, one merge and one write of the file.
    """
    now = datetime.now(timezone.utc).replace(microsecond=0)
    fresh = pa.Table.from_arrays(  # a column at a time: 10^5 rows' values are not listed all at once
        [pa.array([now] * len(rows) if f.name == "updated_at" else [row.get(f.name) for row in rows], f.type)
         for f in PLATES_SCHEMA], schema=PLATES_SCHEMA)
    path = CorpusLayout(Path(root)).table
    try:
        old = read_corpus_table(root)
    except CorpusTableError:
        if partial:
            raise
        path.rename(path.with_name(path.name + ".unreadable"))
        old = None
    old_folders = old.column("plate_dir").to_pylist() if old is not None and "plate_dir" in old.column_names else []
    at = {f: i for i, f in enumerate(old_folders)}
    base = _conform(old) if old_folders else None
    new = fresh.column("plate_dir").to_pylist()
    if base is not None and new:  # a row that holds nothing new (as stored: float32s are float32s) keeps the old one
        mine = [i for i, f in enumerate(new) if f in at]
        same = set()
        for start in range(0, len(mine), _COMPARE_ROWS):  # rows as dicts a slice at a time, not 10^5 of each
            part = mine[start:start + _COMPARE_ROWS]
            for i, row, before in zip(part, fresh.take(_ix(part)).to_pylist(),
                                      base.take(_ix([at[new[i]] for i in part])).to_pylist()):
                if _same(row, before, plate_flags):
                    same.add(i)
        if same:
            fresh = fresh.filter(pa.array([i not in same for i in range(len(new))]))
            new = fresh.column("plate_dir").to_pylist()
    refreshed, replaced = {r["plate_dir"] for r in rows}, set(new)
    kept = [i for i, f in enumerate(old_folders) if f not in replaced and (partial or f in keep or f in refreshed)]
    removed = len(old_folders) - len(kept) - len(replaced & at.keys())
    in_place = None  # the positions of the only rows that changed, each in its old place
    if base is not None and not removed and all(f in at for f in new):
        # Every plate has its old place: the old table's slices around the new rows (no copy).
        pieces, prev = [], 0
        for pos, i in sorted((at[f], i) for i, f in enumerate(new)):
            pieces += [base.slice(prev, pos - prev), fresh.slice(i, 1)]
            prev = pos + 1
        table = pa.concat_tables(pieces + [base.slice(prev)])
        in_place = sorted(at[f] for f in new)
    else:
        table = pa.concat_tables(([base.take(_ix(kept))] if base is not None else []) + [fresh])
        folders = table.column("plate_dir").to_pylist()
        if all(f in at for f in new):  # the old order holds every plate: no sort
            where = {f: i for i, f in enumerate(folders)}
            table = table.take(_ix([where[f] for f in old_folders if f in where]))
        elif not _in_natural_order(folders):  # (a refresh hands its rows sorted: no copy then)
            table = table.take(_ix(sorted(range(len(folders)), key=lambda i: natural_key(folders[i]))))
    unchanged = old is not None and not new and not removed and base is not None and _typed(old)
    decided = (old.schema.metadata or {}).get(FINALIZE_KEY, b"").decode() if old is not None else ""
    if unchanged and decided == finalize_version:
        return False  # nothing changed: the file stays as it is, byte for byte
    if finalize is not None:
        if in_place and finalize_version and decided == finalize_version and _typed(old):
            table = finalize(table, changed=np.array(in_place, np.int64), before=base.take(_ix(in_place)))
        else:
            table = finalize(table)
    if unchanged and not finalize_version and all(table.column(c).equals(base.column(c)) for c in _CORPUS_WIDE):
        return False  # (with a version, a table decided otherwise is written once, to record it)
    table = _carry_foreign_columns(old, table)
    meta = {**(table.schema.metadata or {}), **{k: v.encode() for k, v in zip(RUN_KEYS, flow_runs) if v}}
    if finalize_version:
        meta[FINALIZE_KEY] = finalize_version.encode()
    write_parquet(path, table.replace_schema_metadata(meta))
    return True


def _in_natural_order(folders: list[str]) -> bool:
    """Whether ``folders`` are sorted by ``natural_key`` (two keys alive at a time)."""
    return all(a <= b for a, b in pairwise(map(natural_key, folders)))


def _ix(indices: list[int]) -> pa.Array:
    return pa.array(indices, pa.int64())


def _typed(old: pa.Table) -> bool:
    """The table has plateflow's columns with their types (else it is written again, upgraded)."""
    def same(a: pa.DataType, b: pa.DataType) -> bool:  # Parquet keeps seconds as milliseconds
        return a == b or (pa.types.is_timestamp(a) and pa.types.is_timestamp(b) and a.tz == b.tz)

    return all(f.name in old.column_names and same(old.schema.field(f.name).type, f.type) for f in PLATES_SCHEMA)


def _conform(old: pa.Table) -> pa.Table:
    """The old table with exactly plateflow's columns and types (a table an earlier version or
    a notebook wrote may lack some: they are null)."""
    columns = []
    for f in PLATES_SCHEMA:
        if f.name in old.column_names:
            columns.append(old.column(f.name).cast(f.type))
        else:
            columns.append(pa.nulls(old.num_rows, f.type))
    return pa.Table.from_arrays(columns, schema=PLATES_SCHEMA)


def _same(row: dict, before: dict, plate_flags: frozenset[str]) -> bool:
    for k in PLATES_SCHEMA.names:
        if k in _HOW_MADE or k == "duplicate_of":
            continue
        a, b = row[k], before[k]
        if k == "quality_flags":
            a, b = [f for f in a or () if f in plate_flags], [f for f in b or () if f in plate_flags]
        if a != b:
            return False
    return True


def _carry_foreign_columns(old: pa.Table | None, table: pa.Table) -> pa.Table:
    """Columns of the old table that plateflow does not write, carried over by plate folder
    (plate ids may repeat: duplicates are a plate error, and a note must stay with its folder)
    or, in a table with no plate_dir column, by plate_id."""
    key = next((k for k in ("plate_dir", "plate_id") if old is not None and k in old.column_names), None)
    extra = [c for c in old.column_names if c not in PLATES_SCHEMA.names] if key else []
    if not extra:
        return table
    # A table a notebook wrote may have no plate_dir: its plate_ids then name the rows.
    old_rows = {r[key]: r for r in old.select([key, *extra]).to_pylist()}
    folders = table.column(key).to_pylist()
    for name in extra:
        field = old.schema.field(name)
        table = table.append_column(field, pa.array([old_rows.get(d, {}).get(name) for d in folders], field.type))
    return table


def read_parquet(path: Path, what: str, columns: list[str] | None = None) -> pa.Table | None:
    """The table at ``path`` (of ``columns``, those of them it has), None if there is none; a
    file that is not a readable table raises ``CorpusTableError`` saying which file and how to
    recover."""
    try:
        if columns is not None:
            names = set(pq.read_schema(path).names)
            columns = [c for c in columns if c in names]
        return pq.read_table(path, columns=columns)
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowException) as exc:
        root = Path(path).parents[1] if what != "corpus table" else Path(path).parent
        raise CorpusTableError(
            f"{path} is not a readable {what} ({type(exc).__name__}: {exc}); a plain "
            f"`plateflow refresh --root {root}` rebuilds it") from None


def read_corpus_table(root: Path, columns: list[str] | None = None) -> pa.Table | None:
    """ROOT/plates.parquet (of ``columns``, those of them it has), None if there is none;
    raises ``CorpusTableError`` if unreadable."""
    return read_parquet(CorpusLayout(Path(root)).table, "corpus table", columns)


def failed_plate_folders(root: Path) -> list[str]:
    """Folder names of the plates whose last status in the corpus table is failed, in folder
    order; ``ConfigError`` when there is no table yet."""
    import pyarrow.compute as pc

    from plateflow.errors import ConfigError
    from plateflow.layout import natural_key
    from plateflow.status import Status

    table = read_corpus_table(root, ["plate_dir", "status"])
    if table is None:
        raise ConfigError(f"{root} has no plates.parquet yet: run `plateflow refresh --root {root}` first")
    failed = table.filter(pc.equal(table.column("status"), Status.FAILED)).column("plate_dir").to_pylist()
    return sorted(failed, key=natural_key)


def failure_signatures(root: Path) -> dict[str, tuple]:
    """plate folder -> (failed step, error, sha256) of each plate the corpus table lists as
    failed; empty when there is no table or it cannot be read (then no failure is known)."""
    import pyarrow.parquet as pq

    path = CorpusLayout(Path(root)).table
    try:
        table = pq.read_table(path, columns=["plate_dir", "status", "failed_step", "error", "sha256"],
                              filters=[("status", "=", "failed")])
    except (OSError, pa.ArrowException, KeyError):
        return {}
    return {r["plate_dir"]: (r["failed_step"], r["error"], r["sha256"]) for r in table.to_pylist()}


def failure_signature(row: dict) -> tuple:
    return row.get("failed_step"), row.get("error"), row.get("sha256")


def table_flow_runs(table: pa.Table) -> set[str]:
    """The flow run ids recorded in a corpus table by ``write_corpus_table``."""
    meta = table.schema.metadata or {}
    return {meta[k].decode() for k in RUN_KEYS if meta.get(k)}


def embeddings_schema(dim: int) -> pa.Schema:
    """ROOT/embeddings/<model>.parquet: one row per crop candidate, ``dim`` float32s a vector."""
    return pa.schema([
        ("plate_id", pa.string()),
        ("sha256", pa.string()),
        ("candidate_index", pa.int16()),
        ("box", pa.list_(pa.int32(), 4)),
        ("vector", pa.list_(pa.float32(), dim)),
    ])


SOURCE_INDEX_SCHEMA = pa.schema([
    ("path", pa.string()),
    ("size", pa.int64()),
    ("mtime_ns", pa.int64()),
    ("ino", pa.uint64()),
    ("ctime_ns", pa.int64()),
    ("hashed_ns", pa.int64()),
    ("sha256", pa.string()),
])


def write_embeddings_table(root: Path, model: str, rows: list[tuple[str, str, list[list[int]], "object"]],
                           dim: int, partial: bool = False, keep: set[str] | frozenset[str] = frozenset()) -> Path | None:
    """ROOT/embeddings/<model>.parquet: plate_id, sha256, candidate_index, box, vector (``dim``
    float32s; the column keeps its type with no rows, say when every plate failed). Returns its
    path, or None when it was left as it was.

    ``partial``: ``rows`` cover only some plates; the other plates' rows are kept. ``keep``: the
    plate ids (of plates a refresh found unchanged) whose rows are kept besides ``rows``; the
    other plates' rows go (plates gone from the corpus).
    """
    import numpy as np
    import pyarrow.compute as pc

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
    schema = embeddings_schema(dim)
    table = pa.table({
        "plate_id": pa.array(plate_ids, pa.string()),
        "sha256": pa.array(shas, pa.string()),
        "candidate_index": pa.array(idx, pa.int16()),
        "box": pa.array(boxes, pa.list_(pa.int32(), 4)),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), dim),
    }, schema=schema)
    path = CorpusLayout(Path(root)).embeddings_table(model)
    if partial or keep:
        ids = read_parquet(path, f"embeddings table of {model}", ["plate_id"])
        if ids is not None:
            kept = pc.invert(pc.is_in(ids.column("plate_id"), value_set=pa.array(sorted(set(plate_ids)), pa.string())))
            if not partial:
                kept = pc.and_(kept, pc.is_in(ids.column("plate_id"), value_set=pa.array(sorted(keep), pa.string())))
            if not rows and pc.all(kept).as_py():  # nothing new, nothing gone
                return None
            old = read_parquet(path, f"embeddings table of {model}")
            if old.schema.equals(table.schema):
                table = pa.concat_tables([old.filter(kept), table])
    write_parquet(path, table)
    return path


# DEST/tiles.parquet and DEST/tile-plates.parquet of `plateflow tiles` (flows/tiles.py).
# ROOT/features/<model>/index-<version>.parquet: a feature store's rows (plateflow/features.py).
FEATURES_INDEX_SCHEMA = pa.schema([
    ("row", pa.int32()),
    ("plate_dir", pa.string()),
    ("plate_id", pa.string()),
    ("sha256", pa.string()),
    ("views", pa.int16()),
])
# ROOT/features/<model>-tiles/: a row per tile, with its key and split.
TILE_FEATURES_INDEX_SCHEMA = FEATURES_INDEX_SCHEMA.append(pa.field("key", pa.string())).append(
    pa.field("split", pa.string()))
TILES_SCHEMA = pa.schema([
    ("key", pa.string()),  # the WebDataset __key__: plate id and tile index
    ("plate_id", pa.string()),
    ("sha256", pa.string()),
    ("split", pa.string()),  # train | test
    ("mode", pa.string()),
    ("index", pa.int32()),
    ("box", pa.list_(pa.int32(), 4)),  # the plate region the tile shows
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("shard", pa.string()),
])
# ROOT/features/<model>-patches/patches.parquet: a row per patch of every plate.
PATCHES_SCHEMA = pa.schema([
    ("patch_id", pa.string()),  # <plate folder>:<index>
    ("plate_dir", pa.string()),
    ("plate_id", pa.string()),
    ("sha256", pa.string()),
    ("index", pa.int32()),  # the patch's row in its tokens file
    ("box", pa.list_(pa.int32(), 4)),  # x0, y0, x1, y1 in source pixels (may reach past the plate's edge)
    ("tokens_file", pa.string()),  # relative to ROOT: (patches, grid*grid, dim) float16
    ("version", pa.string()),  # the patch key's version: model, patch parameters, code
    ("grid", pa.int16()),
    ("dim", pa.int32()),
])
TILE_PLATES_SCHEMA = pa.schema([
    ("plate_dir", pa.string()),
    ("plate_id", pa.string()),
    ("sha256", pa.string()),
    ("split", pa.string()),
    ("tiles", pa.int32()),
    ("status", pa.string()),  # ok | skipped | failed
    ("reason", pa.string()),
])


def parquet_bytes(table: pa.Table) -> bytes:
    """The table as the bytes of a Parquet file (the same rows give the same bytes)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()
