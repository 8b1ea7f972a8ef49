"""refresh_corpus: characterize every plate of a corpus; a refresh only redoes what changed.

The stages, each counted in plates (``Progress``):

1. hash: each source's sha256, from the source index where its stat is unchanged;
2. characterize: plates whose outputs are in place for their cache key are settled here, with no
   task run; the others go through characterize-batch tasks;
3. with models: candidates (candidates-batch tasks), embed <model> (the GPU flow, embed-plates,
   in-process or on a work pool), smart crop (smart-crop-batch tasks);
4. plates.parquet, the embeddings tables, the corpus report and the run's artifacts.

The batch tasks run on this process's threads, or on Dask (``RefreshConfig.dask``). This module
holds the flow, its checks and its end; the run's state is in flows/run.py, the CPU stage in
flows/characterize.py, the model stages in flows/gpu.py.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State

from plateflow.artifacts import TABLE_COLUMNS, Progress, RunCounts, plural, publish
from plateflow.atomic import dumps_json, remove_stale_temps, write_bytes_if_changed
from plateflow.config import RefreshConfig, corpus_root
from plateflow.errors import ConfigError
from plateflow.corpus import PlateProblem, PlateRef, corpus_lock, discover_plates, plate_folder_names
from plateflow.hardware import gpu_class as detect_gpu_class
from plateflow.layout import SOURCE, CorpusLayout, natural_key
from plateflow.profiles import load_profiles, quality_profile
from plateflow.runlog import quiet_returned_failures
from plateflow.corpus_flags import corpus_flags_table, flags_version
from plateflow.tables import (carry_model_columns, failed_plate_folders, failure_signature, failure_signatures,
                              read_corpus_table, read_parquet, write_corpus_table)
from plateflow.flags import PLATE_FLAGS
from plateflow.hashindex import index_key
from plateflow.snapshot import Snapshot, outputs, snapshot_key
from plateflow.characterize.step import step_key
from plateflow.status import Status, Step
from flows.characterize import characterize_stage
from flows.gpu import gpu_stage, snapshot_settings
from flows.run import CANDIDATES, CHARACTERISE, HASH, SMART_CROP, PlateRecord, PlateRunner, Refresh, embed_stage
from flows.routing import GpuRoute, choose_route
from plateflow.predictions import apply_predictors
from plateflow.embed.models import require_weights
from plateflow.report import build_report


@flow(name="refresh-corpus", validate_parameters=True)
def refresh_corpus(root: str, config: RefreshConfig = RefreshConfig(), plates: list[str] | None = None,
                   failed_only: bool = False):
    """Characterize every plate under ROOT/plates_structured; with ``config.models``, also build
    crop candidates, embed them with each model, choose and save the smart crop. Writes
    ROOT/plates.parquet (and ROOT/embeddings/<model>.parquet). ``config``: RefreshConfig
    (plateflow/config.py), written to ROOT/.plateflow/config.json.

    ``plates`` (folder names) limits the run to those plates; the other plates' rows in the
    tables are kept as they are. Sources are hashed only where their stat changed. A plate whose
    outputs are in place for its cache key creates no task run; the others go in batch tasks.
    Ends Failed (every failed plate and its reason in the message) if any plate failed; the
    other plates are complete either way.

    Args:
        root: The corpus root: the folder that holds plates_structured/.
        config: What to compute and how: CPU parameters, models, crop, GPU dispatch, workers,
            batching and Dask (each setting described below).
        plates: Plate folder names to refresh (plate-001, ...); empty for every plate.
        failed_only: Only the plates (of those above, when given) whose last status in
            plates.parquet is failed.
    """
    quiet_returned_failures()
    logger = get_run_logger()
    try:
        root_path = corpus_root(root)
        if failed_only:
            plates = [p for p in failed_plate_folders(root_path) if plates is None or p in plates]
        route = check_config(root_path, config, plates is not None, logger)
    except ConfigError as exc:  # said once, in one line: nothing was touched, there is no traceback to read
        logger.error("configuration error: %s", exc)
        return Failed(message=str(exc), data=exc)
    holder = f"flow run {flow_run.name} ({flow_run.id}) on {socket.gethostname()}, pid {os.getpid()}"
    asked = time.perf_counter()
    with corpus_lock(root_path, holder, on_wait=lambda other: logger.warning(
            "another refresh holds this corpus (%s): waiting for it to finish", other)) as died:
        run = start(root_path, config, plates is not None, logger, waited=time.perf_counter() - asked, died=died)
        records, problems = find_plates(run, plates)
        with PlateRunner(config) as runner:
            characterize_stage(run, records, runner)
            if config.models:
                gpu_stage(run, records, route, runner)
        state = finish(run, records, problems)
        if config.dask is not None or not (route is None or route.local):  # writers on other machines
            _touch(CorpusLayout(root_path).sweep_needed, logger)
        return state


def check_config(root: Path, config: RefreshConfig, partial: bool, logger) -> GpuRoute | None:
    """Configuration errors surface before any work: unreadable tables a partial refresh merges
    into, an unknown model or one too big for the class, a GPU class with no pool on the server."""
    if partial:
        read_corpus_table(root)
        for m in config.models:
            read_parquet(CorpusLayout(root).embeddings_table(m), f"embeddings table of {m}")
    if not config.models:
        return None
    profiles = load_profiles(root=root)
    check_models(config, config.gpu_class, in_process=False, root=root)  # a typo is said before the server is asked
    route = choose_route(config.gpu_class, config.gpu_dispatch, profiles,
                         detected=config.gpu_class or detect_gpu_class(profiles))
    logger.info("GPU step: %s", route.describe())
    check_models(config, route.gpu_class, in_process=route.local, root=root)
    return route


def check_models(config: RefreshConfig, gpu_class: str | None, in_process: bool, root: Path) -> None:
    """``ConfigError`` for a model neither the profiles nor the corpus (its fine-tuned encoders)
    know, one too big for ``gpu_class``, or, when the GPU step runs in this process, one whose
    weights this machine cannot have (a pool's workers load weights of their own). Touches no
    plate and writes nothing."""
    profiles = load_profiles(root=root)
    for m in config.models:
        spec = profiles.model(m)
        if gpu_class is not None:
            profiles.plan(m, gpu_class)
        if in_process:
            require_weights(spec, Path(config.weights_root) if config.weights_root else None)


def start(root: Path, config: RefreshConfig, partial: bool, logger, waited: float, died: str = "") -> Refresh:
    """Under the corpus lock: clear what stopped writers left, record the configuration.

    The sweep walks every folder of the corpus (seconds at 10^4 plates), so it runs only when a
    writer may have died mid-write: the last refresh died holding the lock (``died`` names it),
    or ``sweep-needed`` says an ingest or remote workers have written since the last sweep."""
    corpus = CorpusLayout(root)
    marker = corpus.sweep_needed
    if died or marker.exists():
        if died:
            logger.info("the last refresh (%s) did not finish: looking for what its writers left", died)
        for stale in remove_stale_temps(root, skip=(SOURCE,)):
            logger.info("removed %s, left behind by a writer that stopped", stale.relative_to(root))
        marker.unlink(missing_ok=True)
    try:
        write_bytes_if_changed(corpus.config,
                               dumps_json({"root": str(root), **config.model_dump(mode="json")}))
    except OSError as exc:  # a full disk: each plate's step says so for itself
        logger.warning("could not write the effective configuration: %s", exc)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    run = Refresh(root, corpus, config, partial, logger, Progress(root), run_id)
    if not config.verify:
        params, models = run.params, bool(config.models)
        version, tables = snapshot_settings(root, config) if models else ("", ())
        run.snapshot = Snapshot(root, snapshot_key(step_key(params).version, params.viz, params.working_copy, version),
                                outputs(params.viz, params.working_copy, models, bool(config.crop.mask_class)),
                                tables, models=models)
        for m in config.models:  # a settled plate's rows are kept from these: unreadable, every plate is read
            try:
                pq.read_table(corpus.embeddings_table(m), columns=["plate_id"])
            except FileNotFoundError:
                pass
            except (OSError, KeyError, pa.ArrowException) as exc:
                run.snapshot.drop(f"{corpus.embeddings_table(m)} cannot be read ({type(exc).__name__}: {exc}); "
                                  f"every plate is read this time and it is written anew")
    if waited >= 1:
        run.timings["waiting for the corpus"] = waited
    return run


def _touch(marker: Path, logger) -> None:
    try:
        marker.touch()
    except OSError as exc:  # a full disk: the temp files of a lost remote writer wait for a later sweep
        logger.warning("could not write %s: %s", marker.name, exc)


def find_plates(run: Refresh, wanted: list[str] | None) -> tuple[list[PlateRecord], list[PlateProblem]]:
    """The corpus's plate folders (those named in ``wanted`` only, when given): those the
    snapshot finds unchanged are settled (``run.settled``, no file read); of the others, the
    valid plates as records, in folder order, and those whose manifest has a problem."""
    with run.timed("finding plates"):
        folders = plate_folder_names(run.root)
        if wanted is not None:
            names = set(wanted)
            folders = [f for f in folders if f in names]
        snapshot = run.snapshot
        if snapshot is not None and snapshot.problem:
            run.logger.warning(snapshot.problem)
        run.settled = snapshot.settle(folders) if snapshot is not None else set()
        found = discover_plates(run.root, [f for f in folders if f not in run.settled])
        if run.settled:  # a new folder with a settled plate's id: both are duplicates, read again
            ids = {snapshot.entries[f].plate_id: f for f in run.settled}
            clash = {ids[p.plate_id] for p in found if p.plate_id in ids}
            if clash:
                run.settled -= clash
                found = discover_plates(run.root, [f for f in folders if f not in run.settled])
    records = [PlateRecord(p) for p in found if isinstance(p, PlateRef)]
    problems = [p for p in found if isinstance(p, PlateProblem)]
    run.logger.info("%s: %s, %d to process, %d with manifest problems", plural(len(folders), "plate folder"),
                    f"{len(run.settled)} unchanged since the last refresh (by their files' stat)" if snapshot else
                    "every plate read", len(records), len(problems))
    stages = [HASH, CHARACTERISE] + ([CANDIDATES, *map(embed_stage, run.config.models), SMART_CROP]
                                     if run.config.models else [])
    for stage in stages:  # all known from the start, so the overall progress never goes back
        run.progress.stage(stage, len(records))
    return records, problems


def finish(run: Refresh, records: list[PlateRecord], problems: list[PlateProblem]) -> State:
    """Merge this run's rows into plates.parquet (written only if a row changed), update the
    report and the snapshot, publish the artifacts; the run's final state: Completed unless a
    plate newly failed. A plate that failed the same way with the same inputs before this run
    is a known failure, named in the message; it does not fail the run, so a scan a curator
    already knows is bad does not turn every nightly run red. A settled plate's failure is
    known by definition (nothing of it changed)."""
    rows = sorted([rec.row for rec in records] + [_problem_row(p) for p in problems],
                  key=lambda r: natural_key(r["plate_dir"]))
    before = failure_signatures(run.root) if run.settled or any(r["status"] == Status.FAILED for r in rows) else {}
    settled_failed = [{"plate_dir": f, "status": Status.FAILED, "failed_step": step, "error": error, "sha256": sha,
                       "characterize_status": Status.FAILED}
                      for f, (step, error, sha) in before.items() if f in run.settled]
    failed = [r for r in rows if r["status"] == Status.FAILED]
    known = {r["plate_dir"] for r in failed if before.get(r["plate_dir"]) == failure_signature(r)}
    known |= {r["plate_dir"] for r in settled_failed}
    settled_ok = len(run.settled) - sum(f in run.settled for f in before)  # counted, not made rows
    counts = RunCounts.of(rows + settled_failed, known, run.config.models, settled_ok)
    if not run.config.models:
        carry_model_columns(run.root, rows)
    failed += settled_failed
    t = time.perf_counter()
    profile = quality_profile()
    try:
        written = write_corpus_table(run.root, rows, partial=run.partial, keep=run.settled,
                                     flow_runs=(str(flow_run.id), str(flow_run.root_flow_run_id)),
                                     finalize=lambda table, **changed: corpus_flags_table(table, profile, **changed),
                                     plate_flags=frozenset(PLATE_FLAGS), finalize_version=flags_version(profile))
    except OSError as exc:  # a full disk: say so, and what this run found, never the old table's counts
        message = (f"could not write the corpus table: {exc}; it still holds an earlier run's rows. "
                   f"This run: {counts.headline()}" + (f": {_failures(failed)}" if failed else ""))
        run.logger.error(message)
        return Failed(message=message)
    table_path = run.corpus.table
    _let_go(rows)
    _corpus_wide(run.root, rows)
    if run.config.models and run.corpus.predictors.is_file():
        try:  # new and changed plates predicted by the registered heads, from their cached features
            apply_predictors(run.root, run.logger)
        except ConfigError as exc:  # a damaged registry, checkpoint or store: named, with its fix
            run.logger.warning("the registered heads did not predict: %s", exc)
        except Exception:  # noqa: BLE001 - the plates' outputs stand; a bug there must not fail the refresh
            run.logger.exception("could not predict with the registered heads")
    try:
        # only the pages of changed plates (or plates whose files were written again: a preview)
        computed = {r.plate.folder for r in records if r.row.get("characterize_status") == Status.COMPUTED}
        report = build_report(run.root, touched=computed)
    except Exception:  # noqa: BLE001 - the plates' outputs stand; a report bug must not fail the refresh
        run.logger.exception("could not write the corpus report")
        report = None
    if run.snapshot is not None:  # after the last write to the tables it goes with, as late as can be:
        _record_snapshot(run, records, problems)  # an entry taken within 2 s of a write is not trusted
    run.timings["tables and report"] = time.perf_counter() - t
    run.progress.publish()
    whole = len(rows) != counts.plates or run.partial
    publish(run.root, rows + settled_failed, counts, known, run.timings, report, run.config.models,
            corpus=read_corpus_table(run.root, TABLE_COLUMNS) if whole else None)
    for r in failed:  # one line per failed plate, and no more
        is_known = r["plate_dir"] in known
        (run.logger.info if is_known else run.logger.warning)(
            "%s failed at %s (%s): %s", r["plate_dir"], r.get("failed_step"), "known" if is_known else "new", r["error"])
    summary = (f"{counts.headline()}; {'; '.join(counts.steps())}; in {time.perf_counter() - run.started:.1f} s; "
               f"table: {table_path}{'' if written else ' (unchanged)'}; report: {report}")
    run.logger.info(summary)
    new = [r for r in failed if r["plate_dir"] not in known]
    old = [r for r in failed if r["plate_dir"] in known]
    message = summary + (f". New failures: {_failures(new)}" if new else "") + (
        f". Known failures (failed the same way before): {_failures(old)}" if old else "")
    return Failed(message=message) if new else Completed(message=message)


# What the end of a refresh reads of its rows once plates.parquet holds them: the table artifact's
# columns, and what the summary, the failure lines and the snapshot read.
AFTER_TABLE = frozenset(TABLE_COLUMNS) | {"plate_id", "failed_step", "sha256", "duplicate_of", "run_id"}


def _let_go(rows: list[dict]) -> None:
    """Drop the rows' other columns (in place: the records hold the same dicts), so the report
    is built in the memory they held (~1 KB a plate: 10^5 rows are a tenth of a gigabyte)."""
    for row in rows:
        for k in [k for k in row if k not in AFTER_TABLE]:
            del row[k]


def _corpus_wide(root: Path, rows: list[dict]) -> None:
    """This run's rows get their corpus-wide columns (flags, duplicate_of) as written, for the
    summary: they are decided over the whole table."""
    import pyarrow.compute as pc

    if not rows:
        return
    folders = pa.array([r["plate_dir"] for r in rows], pa.string())
    table = pq.read_table(CorpusLayout(root).table, columns=["plate_dir", "quality_flags", "duplicate_of"])
    table = table.filter(pc.is_in(table.column("plate_dir"), value_set=folders))
    at = {f: i for i, f in enumerate(table.column("plate_dir").to_pylist())}  # columns, not a dict a row
    flags, duplicates = table.column("quality_flags").to_pylist(), table.column("duplicate_of").to_pylist()
    for row in rows:
        i = at.get(row["plate_dir"])
        if i is not None:
            row["quality_flags"], row["duplicate_of"] = flags[i], duplicates[i]


def _record_snapshot(run: Refresh, records: list[PlateRecord], problems: list[PlateProblem]) -> None:
    """The snapshot after the table: each read plate as it is now (a plate whose outcome may
    change by itself, a source that could not be read, is recorded to be read again)."""
    snapshot = run.snapshot
    for rec in records:  # sources named as the source index names them (hash_sources keeps those entries)
        settleable = rec.ok or rec.row.get("failed_step") == Step.CHARACTERIZE
        snapshot.record(rec.plate.folder, rec.plate.plate_id, index_key(run.root, rec.plate.source_path), settleable,
                        rec.row.get("run_id") if rec.ok else None)
    if not run.partial:
        snapshot.forget(set(snapshot.entries) - run.settled - {r.plate.folder for r in records})
    snapshot.forget({p.folder for p in problems})
    try:
        snapshot.save()
    except OSError as exc:  # a full disk: the next refresh reads every plate, nothing is lost
        run.logger.warning("could not write the corpus snapshot: %s", exc)


def _problem_row(problem: PlateProblem) -> dict:
    return {"plate_dir": problem.folder, "plate_id": problem.plate_id, "status": Status.FAILED,
            "failed_step": "manifest", "error": f"{type(problem.error).__name__}: {problem.error}",
            "characterize_status": Status.NOT_RUN}


def _failures(failed: list[dict]) -> str:
    """Every failed plate with its error; plates that failed alike share one line
    (``plate-001, plate-002: error``), so one cause is not repeated for every plate."""
    by_error: dict[str, list[str]] = {}
    for r in failed:
        by_error.setdefault(r["error"], []).append(r["plate_dir"])
    return "; ".join(f"{', '.join(folders)}: {error}" for error, folders in by_error.items())
