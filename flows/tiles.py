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
import time
from pathlib import Path

import pyarrow as pa
from prefect import flow, get_run_logger
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from flows.batches import Batching, BatchStage, hash_plates, plates_state, run_batches
from plateflow.artifacts import plural
from plateflow.atomic import remove_stale_temps
from plateflow.buckets import Location, is_url
from plateflow.config import corpus_root, default_workers
from plateflow.corpus import corpus_lock
from plateflow.errors import ConfigError
from plateflow.layout import PLATES, SHARD_NAME, SHARD_STATE, STATE, CorpusLayout, shard_name
from plateflow.outcomes import file_size
from plateflow.profiles import dispatch_policy
from plateflow.runlog import quiet_returned_failures
from plateflow.status import Status
from plateflow.tables import TILE_PLATES_SCHEMA, TILES_SCHEMA, parquet_bytes
from plateflow.tiles import TileJob, TileParams, group_of, split_of, stored_tiles, tiles_of_plates, write_shard
from tasks.tiles import tiles_batch



@flow(name="make-tiles", validate_parameters=True)
def make_tiles(root: str, params: TileParams, out: str, credentials_block: str | None = None, force: bool = False):
    """Cut every plate of ROOT into tiles; write WebDataset shards, tiles.parquet and
    tile-plates.parquet to ``out``. Ends Failed, naming them, if any plate failed.

    Args:
        root: The corpus root: the folder that holds plates_structured/.
        params: The tiles' size and mode, the train/test split rule, the noise frame and the shards.
        out: Where the shards and tables are written: a folder or an fsspec URL (s3://bucket/prefix,
            gs://…, az://…). No reader ever sees part of a shard or table.
        credentials_block: A Prefect block with the bucket's credentials, as BLOCK-TYPE/NAME
            (s3-bucket/…, aws-credentials/…, gcs-bucket/…, gcp-credentials/…); without it, the
            environment's.
        force: Write to a destination that holds another corpus's tiles (they are replaced).
    """
    quiet_returned_failures()
    logger = get_run_logger()
    started = time.time()
    try:
        root_path = corpus_root(root)
        dest = open_destination(out, credentials_block, root_path, force)
        claim_destination(dest, root_path)
    except ConfigError as exc:  # said once, in one line, before any work
        logger.error("configuration error: %s", exc)
        return Failed(message=str(exc), data=exc)
    corpus = CorpusLayout(root_path)
    store = corpus.tile_store
    if aborted := dest.abort_stale_uploads(started):
        logger.info("aborted %d unfinished uploads under %s that an interrupted run left", aborted, dest.url)
    holder = f"make-tiles on {socket.gethostname()}, pid {os.getpid()}"
    with corpus_lock(root_path, holder):
        plates, failed = hash_plates(root_path, logger)
        todo = [TileJob(p, sha) for p, sha in plates if stored_tiles(store, params, sha) is None]
        logger.info("%s: %d with stored tiles, %d to cut", plural(len(plates), "plate"), len(plates) - len(todo), len(todo))
        failed |= _cut(todo, params, store, logger)
    records = {p.folder: (p, sha, stored_tiles(store, params, sha)) for p, sha in plates if p.folder not in failed}
    try:
        shards = _write_shards(dest, corpus.upload_staging, store, params, records, logger)
        _write_tables(dest, params, records, failed, shards)
    except Exception as exc:  # noqa: BLE001 - a full disk, a bucket gone mid-upload: the tiles stay in the store
        why = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        message = (f"could not write to {dest.url} ({why}); the cut tiles are kept, and the next run writes only "
                   f"the shards that are missing")
        logger.error(message)
        return Failed(message=message)
    tiles = sum(len(r["rows"]) for _, _, r in records.values() if r)
    message = (f"{plural(tiles, 'tile')} of {plural(len(records), 'plate')} in {plural(len(shards), 'shard')} at "
               f"{dest.url}; {len(failed)} failed")
    return plates_state(message, failed, logger)


OWNER = ".plateflow-tiles.json"  # in DEST: the corpus whose tiles it holds


def open_destination(out: str, credentials_block: str | None, root: Path, force: bool = False) -> Location:
    """``out`` opened and checked before any work: ``ConfigError`` in one line when it is inside
    a corpus's plates or state, a file, a bucket that cannot be reached, or the destination of
    another corpus (unless ``force``). Writes nothing."""
    dest = Location(out if is_url(out) else Path(out).expanduser().resolve(), credentials_block)
    if dest.local is not None:
        parts = dest.local.parts
        if PLATES in parts or STATE in parts:
            raise ConfigError(f"--out {dest.url} is inside a corpus's {PLATES if PLATES in parts else STATE}/: a "
                              f"refresh would take the tiles for plates; choose a folder outside it")
        if dest.local.exists() and not dest.local.is_dir():
            raise ConfigError(f"--out {dest.url} is a file, not a folder")
    else:
        bucket = dest.path.split("/", 1)[0]
        try:
            dest.fs.ls(bucket, detail=False)
        except Exception as exc:  # noqa: BLE001 - missing bucket, refused credentials, no endpoint: each its own type
            why = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
            raise ConfigError(f"cannot write to {dest.url}: its bucket {bucket} cannot be reached ({why})") from None
    try:
        owner = json.loads(dest.read_bytes(OWNER) or b"null")
    except (ValueError, OSError):
        owner = None
    if isinstance(owner, dict) and owner.get("corpus") not in (None, str(root)) and not force:
        raise ConfigError(f"--out {dest.url} holds the tiles of another corpus, {owner['corpus']}; writing this "
                          f"one there would replace them: choose another --out, or --force")
    return dest


def claim_destination(dest: Location, root: Path) -> None:
    """Mark ``dest`` as this corpus's, and clear the temp files a killed run left there."""
    if dest.local is not None:
        dest.local.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(dest.local)
    dest.put_bytes_if_changed(OWNER, json.dumps({"corpus": str(root)}).encode())


def _cut(todo: list[TileJob], params: TileParams, store: Path, logger) -> dict[str, str]:
    """The plates' tiles, in batches sized as the refresh sizes them (profiles/dispatch.toml:
    plates and source megabytes per batch, and about four batches per worker); the plates that
    failed, with why."""
    failed = {}

    def apply(job: TileJob, outcome) -> None:
        if outcome.failed:
            failed[outcome.folder] = outcome.error
            logger.warning("%s failed at tiles: %s", outcome.folder, outcome.error)

    if not todo:
        return failed
    policy, workers = dispatch_policy().cpu, default_workers()
    # plateflow/tiles.py's source is part of the tiles' key: its names stay as they are (jobs, not items)
    stage = BatchStage("tiles", "tiles", tiles_batch, tiles_of_plates, {"params": params, "store": store},
                       apply, cost=lambda job: file_size(job.plate.source_path), items_arg="jobs")
    with ThreadPoolTaskRunner(max_workers=workers) as runner:
        run_batches(stage, todo, lambda: runner, Batching(policy.batch_plates, int(policy.batch_megabytes * 2**20),
                                                          workers), logger)
    return failed


def _write_shards(dest: Location, staging: Path, store: Path, params: TileParams, records: dict,
                  logger) -> dict[str, list[str]]:
    """Shard name -> the plate folders it holds; shards whose plates are unchanged are not
    rewritten. DEST/.shards.json records each shard's plates as soon as it is written, so a run
    that was interrupted writes, when run again, only the shards it had not finished."""
    limit = params.shard_megabytes * 2**20
    planned: dict[str, list[tuple[str, str, str]]] = {}  # shard -> [(folder, key, its earlier spelling)]
    by_group: dict[tuple[str, int], list] = {}
    for folder, (plate, sha, record) in records.items():
        if record and record["rows"]:
            by_group.setdefault((record["split"], group_of(sha, params)), []).append((sha, folder))
    for (split, group), members in sorted(by_group.items()):
        part, size = 0, 0
        for sha, folder in sorted(members):
            n = (store / f"{params.key(sha)}.tar").stat().st_size
            if size and size + n > limit:
                part, size = part + 1, 0
            planned.setdefault(shard_name(split, group, part), []).append((folder, params.key(sha),
                                                                           params.earlier_key(sha)))
            size += n
    written = _shard_state(dest, logger)
    present = dest.names()
    rewritten = 0
    for name, members in planned.items():
        keys = [k for _, k, _ in members]
        if written.get(name) in (keys, [e for _, _, e in members]) and name in present:
            written[name] = keys  # the same archives, recorded by an earlier version under the earlier keys
            continue
        with dest.writing(name, staging) as fh:
            write_shard(fh, [store / f"{k}.tar" for k in keys])
        written[name] = keys
        _save_state(dest, written)
        rewritten += 1
    for stale in sorted(set(written) - set(planned)):
        dest.remove(stale)
        del written[stale]
    _save_state(dest, written)
    logger.info("%d shards, %d written, %d unchanged", len(planned), rewritten, len(planned) - rewritten)
    return {name: [f for f, _, _ in members] for name, members in planned.items()}


def _shard_state(dest: Location, logger) -> dict[str, list[str]]:
    """DEST/.shards.json, with only what make-tiles itself writes there: a shard name (never a
    path) and its plates' keys. Anything else is ignored, said once, and never acted on (a
    tampered entry must not make a run delete a file outside DEST)."""
    try:
        data = json.loads(dest.read_bytes(SHARD_STATE) or b"{}")
    except (ValueError, RecursionError):
        logger.warning("%s/%s is not JSON: every shard is written again", dest.url, SHARD_STATE)
        return {}
    if not isinstance(data, dict):
        data = {"": data}
    kept = {k: v for k, v in data.items() if SHARD_NAME.fullmatch(k) and isinstance(v, list)
            and all(isinstance(x, str) for x in v)}
    if len(kept) < len(data):
        logger.warning("%s/%s: ignored %d entries that are not make-tiles shards (%s)", dest.url, SHARD_STATE,
                       len(data) - len(kept), ", ".join(repr(k)[:60] for k in data if k not in kept)[:300])
    return kept


def _save_state(dest: Location, written: dict) -> None:
    dest.put_bytes_if_changed(SHARD_STATE, json.dumps(written, sort_keys=True).encode())


def _write_tables(dest: Location, params: TileParams, records: dict, failed: dict[str, str],
                  shards: dict[str, list[str]]) -> None:
    shard_of = {folder: name for name, folders in shards.items() for folder in folders}
    tiles, plates = [], []
    for folder, (plate, sha, record) in sorted(records.items()):
        rows = record["rows"] if record else []
        tiles += [{**r, "box": list(r["box"]), "shard": shard_of.get(folder)} for r in rows]
        plates.append({"plate_dir": folder, "plate_id": plate.plate_id, "sha256": sha,
                       "split": split_of(sha, params), "tiles": len(rows), "status": Status.SKIPPED if not rows else Status.OK,
                       "reason": record.get("reason") if record else None})
    plates += [{"plate_dir": f, "plate_id": None, "sha256": None, "split": None, "tiles": 0, "status": Status.FAILED,
                "reason": why} for f, why in sorted(failed.items())]
    dest.put_bytes_if_changed("tiles.parquet", parquet_bytes(pa.Table.from_pylist(tiles, schema=TILES_SCHEMA)))
    dest.put_bytes_if_changed("tile-plates.parquet",
                              parquet_bytes(pa.Table.from_pylist(plates, schema=TILE_PLATES_SCHEMA)))
    dest.put_bytes_if_changed("tile-params.json", params.model_dump_json(indent=2).encode())
