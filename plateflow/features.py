"""Cached float16 features: per model, every plate's whole-plate and candidate vectors in one
memory-mappable store, ROOT/features/<model>/ (and the tiles' at ROOT/features/<model>-tiles/).

    meta.json                 model, dim, views, dtype, kind, and the version the files below carry
    vectors-<version>.npy     float16, shape (rows, views, dim); a plate with fewer views is zero-padded
    index-<version>.parquet   row, plate_dir, plate_id, sha256, views (tiles: key, split too)

Why a plain .npy and a Parquet index: ``np.load(mmap_mode="r")`` maps it with no copy and no new
dependency, a head reads it in row chunks and ``torch.from_numpy`` takes those as they are;
Arrow would hold the same fixed-size rows with more indirection, and LanceDB adds a dataset
format and a package for what is one dense array. 16 views of 768 float16s are 24 KiB a plate.

A new version's files are written beside the old ones, then meta.json is replaced (atomically),
then the old files go: a reader that opened meta.json first always finds the files it names.
The store is built from the embedding cache (the refresh's vectors), never by recomputing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from plateflow.atomic import temp_file, write_json, write_parquet
from plateflow.errors import ConfigError
from plateflow.layout import CorpusLayout
from plateflow.tables import FEATURES_INDEX_SCHEMA

DTYPE = np.float16
WRITE_ROWS = 1024  # rows of vectors per write
STORE_META = "meta.json"  # replaced last: a store's files are those it names


@dataclass
class FeatureStore:
    """An opened store: ``vectors`` is a read-only memory map, shape (rows, views, dim)."""

    folder: Path
    meta: dict
    index: pa.Table
    vectors: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.index)

    def column(self, name: str) -> list:
        return self.index.column(name).to_pylist()


class DamagedStoreError(ConfigError):
    """A feature store's files cannot be read or do not agree; the message names the store and
    the command that rebuilds it."""


def open_store(folder: Path) -> FeatureStore | None:
    """The store in ``folder``, memory-mapped; None if there is none yet; ``DamagedStoreError``
    if its files cannot be read or do not agree with meta.json."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / STORE_META).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:
        raise _damaged(folder, f"meta.json cannot be read: {exc}") from None
    try:
        version = meta["version"]
        if not isinstance(version, str) or not version.isalnum():
            raise ValueError(f"meta.json names no version: {version!r}")
        index = pq.read_table(folder / f"index-{version}.parquet")
        vectors = np.load(folder / f"vectors-{version}.npy", mmap_mode="r")
        expected = (len(index), int(meta["views"]), int(meta["dim"]))
        if vectors.shape != expected or vectors.dtype != DTYPE:
            raise ValueError(f"vectors-{version}.npy holds {vectors.dtype} {vectors.shape}, meta.json says "
                             f"{np.dtype(DTYPE).name} {expected}")
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException) as exc:
        raise _damaged(folder, str(exc)) from None
    return FeatureStore(folder, meta, index, vectors)


def _damaged(folder: Path, why: str) -> DamagedStoreError:
    root, name = folder.parent.parent, folder.name
    model, tiles = (name[:-len("-tiles")], True) if name.endswith("-tiles") else (name, False)
    how = (f"plateflow features --root {root} --model {model} --tiles DEST" if tiles
           else f"plateflow features --root {root} --model {model}")
    return DamagedStoreError(f"the feature store {folder} is damaged ({why}); rebuild it with `{how}`")


def _existing(folder: Path) -> FeatureStore | None:
    """The store to replace: a damaged one counts as none (it is rebuilt, never a blocker)."""
    try:
        return open_store(folder)
    except DamagedStoreError:
        return None


def _version(index: pa.Table, meta: dict) -> str:
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in ("plate_dir", "sha256", "views"):
        h.update(json.dumps(index.column(name).to_pylist()).encode())
    return h.hexdigest()[:16]


def write_store(folder: Path, index_rows: list[dict], vectors: list[np.ndarray], meta: dict,
                schema: pa.Schema = FEATURES_INDEX_SCHEMA, old: FeatureStore | None = None) -> tuple[str, bool]:
    """Write a store of ``vectors`` (each (views_i, dim), any float dtype) with their index rows
    (``row`` is filled in); returns (version, whether anything was written: an unchanged store
    is left alone)."""
    folder = Path(folder)
    views = max((len(v) for v in vectors), default=1)
    dim = int(meta["dim"])
    index = pa.Table.from_pylist([{**r, "row": i, "views": len(v)} for i, (r, v) in enumerate(zip(index_rows, vectors))],
                                 schema=schema)
    meta = {**meta, "views": views, "dtype": np.dtype(DTYPE).name, "rows": len(vectors)}
    version = _version(index, meta)
    old = old if old is not None else _existing(folder)
    if old is not None and old.meta.get("version") == version:
        return version, False
    folder.mkdir(parents=True, exist_ok=True)
    with temp_file(folder / f"vectors-{version}.npy") as (fd, _):
        # Plain writes, not a memory map: a full disk is an OSError here, not a SIGBUS later.
        with os.fdopen(os.dup(fd), "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(DTYPE)),
                                                      "fortran_order": False, "shape": (len(vectors), views, dim)})
            for start in range(0, len(vectors), WRITE_ROWS):
                block = np.zeros((min(WRITE_ROWS, len(vectors) - start), views, dim), DTYPE)
                for i, v in enumerate(vectors[start:start + WRITE_ROWS]):
                    block[i, :len(v)] = v
                fh.write(block.tobytes())
    write_parquet(folder / f"index-{version}.parquet", index)
    write_json(folder / STORE_META, {**meta, "version": version})
    for stale in [*folder.glob("vectors-*.npy"), *folder.glob("index-*.parquet")]:
        if version not in stale.name:
            with contextlib.suppress(OSError):
                stale.unlink()
    return version, True


def update_plate_features(root: Path, model: str, items: list[tuple[str, str, str, np.ndarray]], dim: int,
                          embedding_key: str, partial: bool = False,
                          keep: set[str] | frozenset[str] = frozenset()) -> tuple[str, bool]:
    """Keep ROOT/features/<model>/ in step with the refresh: ``items`` are (plate_dir, plate_id,
    sha256, vectors) of the plates with vectors. The whole corpus replaces the store (new and
    changed plates in, removed ones out), but for the plates in ``keep`` (folders a refresh
    found unchanged), whose rows stay; ``partial`` (a retry) replaces only its plates' rows.
    Returns (version, whether anything was written)."""
    folder = CorpusLayout(Path(root)).features(model)
    try:
        old = open_store(folder)
    except DamagedStoreError:
        if partial or keep:  # its other plates' rows are lost with it: the whole store, from the embeddings table
            version, written, _ = build_from_embeddings_table(root, model)
            return version, written
        old = None  # the whole corpus is here: the store is written anew
    rows = [{"plate_dir": d, "plate_id": p, "sha256": s} for d, p, s, _ in items]
    vectors = [v for *_, v in items]
    if (partial or keep) and old is not None and old.meta.get("embedding_key") == embedding_key:
        mine = {d for d, *_ in items}
        kept = [r for r in old.index.to_pylist() if r["plate_dir"] not in mine and (partial or r["plate_dir"] in keep)]
        if not items and len(kept) == old.rows:  # nothing new, nothing gone
            return old.meta["version"], False
        for r in kept:
            rows.append({"plate_dir": r["plate_dir"], "plate_id": r["plate_id"], "sha256": r["sha256"]})
            vectors.append(old.vectors[r["row"], :r["views"]])
        order = sorted(range(len(rows)), key=lambda i: rows[i]["plate_dir"])
        rows, vectors = [rows[i] for i in order], [vectors[i] for i in order]
    meta = {"model": model, "dim": dim, "kind": "plates", "embedding_key": embedding_key}
    return write_store(folder, rows, vectors, meta, old=old)


def build_from_embeddings_table(root: Path, model: str) -> tuple[str, bool, int]:
    """The store built from ROOT/embeddings/<model>.parquet (what earlier refreshes wrote),
    without recomputing a vector: (version, written, plates)."""
    from plateflow.errors import ConfigError
    from plateflow.tables import read_corpus_table, read_parquet

    corpus = CorpusLayout(Path(root))
    table = read_parquet(corpus.embeddings_table(model), f"embeddings table of {model}")
    if table is None:
        raise ConfigError(f"{corpus.embeddings_table(model)} does not exist: run `plateflow refresh --root {root} "
                          f"--models {model}` first")
    plates = read_corpus_table(root)
    folder_of = {}
    if plates is not None and "plate_dir" in plates.column_names:
        for d, p, st in zip(*(plates.column(c).to_pylist() for c in ("plate_dir", "plate_id", "status"))):
            if st != "failed":
                folder_of.setdefault(p, d)
    dim = table.schema.field("vector").type.list_size
    ids = table.column("plate_id").to_pylist()
    shas = table.column("sha256").to_pylist()
    flat = table.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    items, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or ids[end] != ids[start]:
            items.append((folder_of.get(ids[start], ids[start]), ids[start], shas[start], flat[start:end]))
            start = end
    items.sort(key=lambda it: it[0])
    folder = corpus.features(model)
    old = _existing(folder)
    key = (old.meta.get("embedding_key") if old else None) or "from-embeddings-table"
    version, written = write_store(folder, [{"plate_dir": d, "plate_id": p, "sha256": s} for d, p, s, _ in items],
                                   [v for *_, v in items], {"model": model, "dim": dim, "kind": "plates",
                                                            "embedding_key": key}, old=old)
    return version, written, len(items)


def plate_inputs(vectors: np.ndarray, views: np.ndarray, rows: np.ndarray | None = None, chunk: int = 512) -> np.ndarray:
    """A head's input per row (all rows, or those in ``rows``), read from the memory map in
    chunks: the whole-plate vector (view 0) and the mean of the row's views, side by side,
    float32, (rows, 2 * dim). Pages of the map are let go after each chunk, so reading a store
    costs about one chunk of memory, not the store."""
    rows = np.arange(len(vectors)) if rows is None else np.asarray(rows)
    _, _, dim = vectors.shape
    out = np.empty((len(rows), 2 * dim), np.float32)
    views = np.asarray(views)
    for start in range(0, len(rows), chunk):
        pick = rows[start:start + chunk]
        block = np.asarray(vectors[pick], np.float32)
        n = views[pick].astype(np.float32)[:, None]
        out[start:start + len(pick), :dim] = block[:, 0]
        out[start:start + len(pick), dim:] = block.sum(axis=1) / np.maximum(n, 1)  # padded views are zero
        _release(vectors, int(pick.min()), int(pick.max()) + 1)
    return out


def _release(vectors: np.ndarray, first: int, end: int) -> None:
    """Tell the kernel the map's pages for rows [first, end) are not needed any more (they are
    file-backed: read again from the page cache if they are)."""
    import mmap

    base = getattr(vectors, "_mmap", None)
    if base is None or not hasattr(base, "madvise"):
        return
    row_bytes = int(np.prod(vectors.shape[1:])) * vectors.itemsize
    head = vectors.offset % mmap.ALLOCATIONGRANULARITY  # where the array starts in the map
    lo = head + first * row_bytes
    hi = head + end * row_bytes
    lo -= lo % mmap.PAGESIZE
    with contextlib.suppress(OSError, ValueError):
        base.madvise(mmap.MADV_DONTNEED, lo, min(hi, len(base)) - lo)
