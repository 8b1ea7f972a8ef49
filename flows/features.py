"""tile_features: the tiles of a make-tiles output embedded by a model, into a float16 feature
store of their own, ROOT/features/<model>-tiles/, so a head can be trained per tile.

1. DEST/tiles.parquet lists the tiles (DEST: a folder or a bucket URL, as make-tiles wrote it);
2. each tile's vector is stored once per key (its plate's content hash, the tile parameters,
   its key, and the model's embedding key) under ROOT/.plateflow/embeddings/<model>/tiles/;
3. tiles without one are taken out of their shards (each shard read once) into
   ROOT/.plateflow/tile-views/ and sent, a tile a "plate" with one view, through the GPU step
   (the embed-plates flow: chunks, the chunk ledger, the GPU class's batch and dtype), then
   removed;
4. the store: one row per tile, its plate, content hash, key and split.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
from prefect import flow, get_run_logger

from plateflow.buckets import Location, is_url
from plateflow.config import CropParams, corpus_root
from plateflow.corpus import corpus_lock
from plateflow.errors import ConfigError
from plateflow.hardware import gpu_class as detect_class
from plateflow.layout import SHARD_NAME, CorpusLayout
from plateflow.profiles import load_profiles
from plateflow.embed.reader import PlateJob
from plateflow.embed.writer import embedding_key, load_vectors
from plateflow.tables import TILE_FEATURES_INDEX_SCHEMA
from plateflow.features import write_store


@flow(name="tile-features", validate_parameters=True)
def tile_features(root: str, model: str, tiles: str, credentials_block: str | None = None,
                  gpu_class: str | None = None, chunk_size: int | None = None,
                  weights_root: str | None = None) -> int:
    """Embed every tile listed in ``tiles``/tiles.parquet with ``model`` and keep the vectors in
    ROOT/features/<model>-tiles/; returns the number of tiles in the store.

    Args:
        root: The corpus root: the folder that holds plates_structured/.
        model: The embedding model, a name from profiles/models.toml or one of the corpus's fine-tuned encoders.
        tiles: Where make-tiles wrote its shards and tables: a folder or an fsspec URL.
        credentials_block: A Prefect block with the bucket's credentials (BLOCK-TYPE/NAME, e.g. s3-bucket/scans).
        gpu_class: The GPU class whose batch size and dtype to use (default: detected).
        chunk_size: Tiles per embed-chunk task (default: profiles/dispatch.toml).
        weights_root: A folder with one folder of weights per model, named as the model (empty: the Hugging Face cache).
    """
    from flows.embed import embed_plates

    logger = get_run_logger()
    root_path = corpus_root(root)
    corpus = CorpusLayout(root_path)
    profiles = load_profiles(root=root_path)
    spec = profiles.model(model)
    gpu_class = gpu_class or detect_class(profiles)
    source = Location(tiles if is_url(tiles) else Path(tiles).expanduser().resolve(), credentials_block)
    listing, params = source.read_bytes("tiles.parquet"), source.read_bytes("tile-params.json")
    if listing is None or params is None:
        raise ConfigError(f"{source.url} holds no tiles.parquet and tile-params.json: run `plateflow tiles` first")
    rows = pq.read_table(io.BytesIO(listing)).to_pylist()
    plates = source.read_bytes("tile-plates.parquet")
    folder_of = ({r["plate_id"]: r["plate_dir"] for r in pq.read_table(io.BytesIO(plates)).to_pylist()
                  if r["plate_id"]} if plates else {})
    key = embedding_key(spec, CropParams())
    store = corpus.tile_vector_store(model)

    def cache(row: dict) -> Path:
        h = hashlib.sha256(f"{row['sha256']}|{row['key']}|{key}|".encode() + params).hexdigest()[:32]
        return store / f"{h}.npy"

    todo = [r for r in rows if not cache(r).is_file()]
    logger.info("%s: %d tiles, %d with stored vectors, %d to embed", model, len(rows), len(rows) - len(todo), len(todo))
    with corpus_lock(root_path, f"tile-features {model}"):
        if todo:
            views = corpus.tile_views
            views.mkdir(parents=True, exist_ok=True)
            try:
                jobs = _extract(source, todo, views, cache)
                outcome = embed_plates(model, gpu_class, jobs=jobs, chunk_size=chunk_size, weights_root=weights_root,
                                       root=str(root_path))
            finally:
                shutil.rmtree(views, ignore_errors=True)
            failed = {k: v for k, v in outcome.items() if v}
            if failed:
                logger.warning("%d tiles could not be embedded: %s", len(failed),
                               "; ".join(f"{k}: {v}" for k, v in list(failed.items())[:10]))
        done = [r for r in rows if cache(r).is_file()]
        index = [{"plate_dir": folder_of.get(r["plate_id"], r["plate_id"]), "plate_id": r["plate_id"],
                  "sha256": r["sha256"], "key": r["key"], "split": r["split"]} for r in done]
        vectors = [load_vectors(cache(r), 1, spec.embed_dim) for r in done]
        version, written = write_store(corpus.features(f"{model}-tiles"), index, vectors,
                                       {"model": model, "dim": spec.embed_dim, "kind": "tiles", "embedding_key": key,
                                        "tiles": source.url}, schema=TILE_FEATURES_INDEX_SCHEMA)
    logger.info("%s-tiles features: %d tiles, version %s%s", model, len(done), version, "" if written else " (unchanged)")
    return len(done)


def _extract(source: Location, todo: list[dict], folder: Path, cache) -> list[PlateJob]:
    """The tiles' PNGs out of their shards (each shard read once, streamed) into ``folder``."""
    by_shard: dict[str, dict[str, dict]] = {}
    for r in todo:
        by_shard.setdefault(r["shard"], {})[f"{r['key']}.png"] = r
    jobs = []
    for shard, wanted in sorted(by_shard.items()):
        if not SHARD_NAME.fullmatch(shard or ""):
            raise ConfigError(f"{source.url}/tiles.parquet names a shard {shard!r} that make-tiles never writes: "
                              f"run `plateflow tiles` to that destination again")
        with source.fs.open(source.join(shard), "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tar:
            for member in tar:
                row = wanted.get(member.name)
                if row is None or not member.isfile():
                    continue
                path = folder / f"{len(jobs):09d}.png"  # never a name from the shard
                path.write_bytes(tar.extractfile(member).read())
                jobs.append(PlateJob(row["key"], str(path), (row["width"], row["height"]),
                                     ((0, 0, row["width"], row["height"]),), str(cache(row))))
    return jobs
