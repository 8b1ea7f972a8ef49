"""make_tiles: every plate of a corpus cut into model-input tiles, written as WebDataset shards.

1. hash each source (the source index: read only where its stat changed);
2. plates whose tile archive is stored for their key (content hash, tile parameters, code) are
   done; the others go through tiles-batch tasks, each plate isolated;
3. shards: plates are grouped by content hash into ``shard_groups`` groups, per split, and each
   group's plates (in hash order) fill ``<split>-<group><part>.tar`` up to ``shard_megabytes``.
   A shard is rewritten only when the plates it holds changed (DEST/.shards.json), so one
   changed plate rewrites the shards of its old and new group only;
4. DEST/tiles.parquet (every tile) and DEST/tile-plates.parquet (every plate: its split, its
   tiles, or why it has none).
"""

from __future__ import annotations

import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner

from plateflow.atomic import write_bytes_if_changed
from plateflow.config import corpus_root, default_workers
from plateflow.corpus import PlateRef, corpus_lock, discover_plates
from plateflow.hashindex import SourceIndex
from plateflow.layout import CorpusLayout
from plateflow.tables import TILE_PLATES_SCHEMA, TILES_SCHEMA, write_table_if_changed
from tasks.tiles import TileJob, TileParams, group_of, split_of, stored_tiles, tiles_batch, write_shard

BATCH = 32  # plates per tiles-batch task


@flow(name="make-tiles", validate_parameters=True)
def make_tiles(root: str, params: TileParams, out: str):
    """Cut every plate of ROOT into tiles; write WebDataset shards, tiles.parquet and
    tile-plates.parquet to ``out``. Ends Failed, naming them, if any plate failed.

    Args:
        root: The corpus root: the folder that holds plates_structured/.
        params: The tiles' size and mode, the train/test split rule, the noise frame and the shards.
        out: The folder the shards and tables are written to.
    """
    logger = get_run_logger()
    root_path = corpus_root(root)
    dest = Path(out).expanduser().resolve()
    corpus = CorpusLayout(root_path)
    store = corpus.state / "tiles"
    holder = f"make-tiles on {socket.gethostname()}, pid {os.getpid()}"
    with corpus_lock(root_path, holder):
        plates, failed = _hash(root_path, logger)
        todo = [TileJob(p, sha) for p, sha in plates if stored_tiles(store, params, sha) is None]
        logger.info("%d plates: %d with stored tiles, %d to cut", len(plates), len(plates) - len(todo), len(todo))
        failed |= _cut(todo, params, store, logger)
    records = {p.folder: (p, sha, stored_tiles(store, params, sha)) for p, sha in plates if p.folder not in failed}
    shards = _write_shards(dest, store, params, records, logger)
    _write_tables(dest, params, records, failed, shards)
    tiles = sum(len(r["rows"]) for _, _, r in records.values() if r)
    message = f"{tiles} tiles of {len(records)} plates in {len(shards)} shards at {dest}; {len(failed)} plates failed"
    logger.info(message)
    if failed:
        return Failed(message=message + ": " + "; ".join(f"{k}: {v}" for k, v in sorted(failed.items())))
    return Completed(message=message)


def _hash(root: Path, logger) -> tuple[list[tuple[PlateRef, str]], dict[str, str]]:
    """Valid plates with their source's sha256, and the plates that failed (folder -> why)."""
    index = SourceIndex(root)
    found = discover_plates(root)
    failed = {p.folder: f"{type(p.error).__name__}: {p.error}" for p in found if not isinstance(p, PlateRef)}
    plates = [p for p in found if isinstance(p, PlateRef)]

    def sha(p: PlateRef) -> str | None:
        try:
            return index.sha256(p.source_path)
        except OSError as exc:
            failed[p.folder] = f"{type(exc).__name__}: {exc}"
            return None

    with ThreadPoolExecutor(default_workers()) as pool:
        hashed = [(p, h) for p, h in zip(plates, pool.map(sha, plates)) if h is not None]
    try:
        index.save()
    except OSError as exc:
        logger.warning("could not write the source index: %s", exc)
    return hashed, failed


def _cut(todo: list[TileJob], params: TileParams, store: Path, logger) -> dict[str, str]:
    if not todo:
        return {}
    failed = {}
    groups = [todo[i:i + BATCH] for i in range(0, len(todo), BATCH)]
    with ThreadPoolTaskRunner(max_workers=default_workers()) as runner:
        futures = [runner.submit(tiles_batch, {"jobs": g, "params": params, "store": str(store),
                                               "name": f"{i + 1}of{len(groups)}"}) for i, g in enumerate(groups)]
        for future in as_completed(futures):
            for outcome in future.result():
                if outcome.failed:
                    failed[outcome.folder] = outcome.error
                    logger.warning("%s failed at tiles: %s", outcome.folder, outcome.error)
    return failed


def _write_shards(dest: Path, store: Path, params: TileParams, records: dict, logger) -> dict[str, list[str]]:
    """Shard name -> the plate folders it holds; shards whose plates are unchanged are not rewritten."""
    limit = params.shard_megabytes * 2**20
    planned: dict[str, list[tuple[str, str]]] = {}  # shard -> [(folder, key)]
    by_group: dict[tuple[str, int], list] = {}
    for folder, (plate, sha, record) in records.items():
        if record and record["rows"]:
            by_group.setdefault((record["split"], group_of(sha, params)), []).append((sha, folder))
    for (split, group), members in sorted(by_group.items()):
        part, size = 0, 0
        for sha, folder in sorted(members):
            archive = store / f"{params.key(sha)}.tar"
            n = archive.stat().st_size
            if size and size + n > limit:
                part, size = part + 1, 0
            planned.setdefault(f"{split}-{group:03d}{part:03d}.tar", []).append((folder, params.key(sha)))
            size += n
    state_path = dest / ".shards.json"
    try:
        written = json.loads(state_path.read_text())
    except (OSError, ValueError):
        written = {}
    rewritten = 0
    for name, members in planned.items():
        keys = [k for _, k in members]
        if written.get(name) == keys and (dest / name).is_file():
            continue
        write_shard(dest / name, [store / f"{k}.tar" for k in keys])
        rewritten += 1
    for stale in set(written) - set(planned):
        (dest / stale).unlink(missing_ok=True)
    write_bytes_if_changed(state_path, json.dumps({n: [k for _, k in m] for n, m in planned.items()},
                                                  sort_keys=True).encode())
    logger.info("%d shards, %d written, %d unchanged", len(planned), rewritten, len(planned) - rewritten)
    return {name: [f for f, _ in members] for name, members in planned.items()}


def _write_tables(dest: Path, params: TileParams, records: dict, failed: dict[str, str],
                  shards: dict[str, list[str]]) -> None:
    shard_of = {folder: name for name, folders in shards.items() for folder in folders}
    tiles, plates = [], []
    for folder, (plate, sha, record) in sorted(records.items()):
        rows = record["rows"] if record else []
        tiles += [{**r, "box": list(r["box"]), "shard": shard_of.get(folder)} for r in rows]
        plates.append({"plate_dir": folder, "plate_id": plate.plate_id, "sha256": sha,
                       "split": split_of(sha, params), "tiles": len(rows), "status": "skipped" if not rows else "ok",
                       "reason": record.get("reason") if record else None})
    plates += [{"plate_dir": f, "plate_id": None, "sha256": None, "split": None, "tiles": 0, "status": "failed",
                "reason": why} for f, why in sorted(failed.items())]
    write_table_if_changed(dest / "tiles.parquet", pa.Table.from_pylist(tiles, schema=TILES_SCHEMA))
    write_table_if_changed(dest / "tile-plates.parquet", pa.Table.from_pylist(plates, schema=TILE_PLATES_SCHEMA))
    write_bytes_if_changed(dest / "tile-params.json", params.model_dump_json(indent=2).encode())
