"""refresh_corpus: characterise every plate of a corpus; a refresh only redoes what changed."""

from __future__ import annotations

import hashlib
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.exceptions import MissingResult
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner

from plateflow.artifacts import Progress, publish
from plateflow.atomic import dumps_json, remove_stale_temps, write_bytes_if_changed
from plateflow.config import CharacterizeParams, CropParams, RefreshConfig, default_workers
from plateflow.corpus import PlateProblem, PlateRef, corpus_lock, discover_plates, natural_key, state_dir
from plateflow.errors import ConfigError
from plateflow.hashindex import SourceIndex
from plateflow.hardware import gpu_class as detect_gpu_class
from plateflow.profiles import load_profiles
from plateflow.routing import Dispatch, GpuRoute, choose_route, run_on_pool
from tasks.batch import PlateOutcome, characterize_batch, run_batch
from tasks.characterize import cache_key
from tasks.crops import WORKING_COPY, crop_candidates
from tasks.embeddings import PlateJob, embedding_key, load_vectors, require_weights, store_path, vectors_problem
from tasks.report import build_report
from tasks.save import (current_record, embeddings_table_path, read_corpus_table, read_parquet, save_smart_crop,
                        write_corpus_table, write_embeddings_table)

# Columns of plates.parquet copied from a plate's input_image.json record.
_TABLE_FIELDS = (
    "sha256", "image_format", "mode", "file_size_bytes", "width", "height", "megapixels",
    "aspect_ratio", "mean_rgb", "luminance_mean", "luminance_std", "entropy", "background_ratio",
    "grayscale_like", "very_large", "extreme_aspect", "frames", "exif_orientation",
)


@dataclass
class PlateRecord:
    """One plate through a refresh: its source's hash, its corpus-table row and, once
    characterised (or found current), its input_image.json fields."""

    plate: PlateRef
    sha256: str | None = None
    metadata: dict | None = None
    row: dict = field(init=False)

    def __post_init__(self):
        self.row = {"plate_dir": self.plate.folder, "plate_id": self.plate.plate_id,
                    "source_image": self.plate.source_image, "status": "ok"}

    @property
    def ok(self) -> bool:
        return self.row["status"] == "ok"

    def settle(self, status: str, metadata: dict) -> None:
        self.metadata = metadata
        self.row.update({k: metadata[k] for k in _TABLE_FIELDS}, characterize_status=status)

    def fail(self, step: str, error: str, **extra) -> None:
        """Mark the plate failed at ``step``, with the error that says why."""
        self.row.update(status="failed", failed_step=step, error=error, **extra)
        self.row.setdefault("characterize_status", "not_run")


def _step_outcome(future: PrefectFuture) -> tuple[str, BaseException | None]:
    """('computed' | 'failed' | 'not_run', exception) of a per-plate task of the GPU stage."""
    future.wait()
    state = future.state
    if state.is_completed():
        return "computed", None
    if state.is_failed() or state.is_crashed():
        exc = state.result(raise_on_failure=False)
        return "failed", exc if isinstance(exc, BaseException) else RuntimeError(state.message)
    return "not_run", None


def hash_sources(records: list[PlateRecord], root: Path, verify: bool, workers: int, logger,
                  whole_corpus: bool = True) -> None:
    """Each source's sha256, from ROOT/.plateflow/source-index.parquet where its stat is unchanged
    (all read again with ``verify``); a source that cannot be read fails its plate. A refresh of
    the whole corpus drops the entries of sources that are gone."""
    index = SourceIndex(root)

    def one(rec: PlateRecord) -> None:
        path = rec.plate.source_path
        for attempt in range(3):
            try:
                rec.sha256 = index.rehash(path)
                return
            except OSError as exc:
                if attempt == 2:
                    rec.fail("hash", f"{type(exc).__name__}: {exc}")
                    logger.warning("%s: cannot read its source: %s", rec.plate.folder, exc)
                else:
                    time.sleep(2 ** attempt)

    to_read = []
    for rec in records:  # a stat each: most sources are unchanged, and threads would cost more
        try:
            rec.sha256 = None if verify else index.known(rec.plate.source_path)
        except OSError:
            rec.sha256 = None
        if rec.sha256 is None:
            to_read.append(rec)
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="plateflow-hash") as pool:
        list(pool.map(one, to_read))
    if whole_corpus:
        index.forget_missing({index.key(r.plate.source_path) for r in records})
    try:
        index.save()
    except OSError as exc:  # a full disk: the next refresh hashes these sources again, nothing is lost
        logger.warning("could not write the source index: %s", exc)


def settle_current(records: list[PlateRecord], root: Path, params: CharacterizeParams) -> list[PlateRecord]:
    """Settle, without a task, every plate whose outputs (or failure record) are in place for
    its cache key; return the plates that have work to do."""
    todo = []
    for rec in records:
        if not rec.ok:
            continue
        record = current_record(rec.plate, root, cache_key(rec.sha256, params), params.viz, params.working_copy)
        if record is None:
            todo.append(rec)
        elif record.get("loadable") is False:  # bad input, already found bad with these bytes and code
            rec.fail("characterize", record.get("plateflow_error") or record.get("error", ""),
                     characterize_status="cached")
        else:
            rec.settle("cached", record)
    return todo


def batches(records: list[PlateRecord], max_plates: int, max_bytes: int) -> list[list[PlateRecord]]:
    """Consecutive plates grouped by expected work (source bytes), at most ``max_plates`` each."""
    out: list[list[PlateRecord]] = []
    size = 0
    for rec in records:
        try:
            cost = rec.plate.source_path.stat().st_size
        except OSError:
            cost = 0
        if not out or len(out[-1]) >= max_plates or (size + cost > max_bytes and out[-1]):
            out.append([])
            size = 0
        out[-1].append(rec)
        size += cost
    return out


def characterize_plates(todo: list[PlateRecord], params: CharacterizeParams, root: Path, max_plates: int,
                        max_bytes: int, progress: Progress, logger) -> None:
    """The plates with work, in characterize-batch tasks; a log line per batch and per failure."""
    groups = batches(todo, max_plates, max_bytes)
    futures = {characterize_batch.submit([(r.plate, r.sha256) for r in group], params, str(root),
                                         name=f"{i + 1}of{len(groups)}"): group
               for i, group in enumerate(groups)}
    for done, future in enumerate(as_completed(list(futures)), start=1):
        group = futures[future]
        try:
            outcomes = future.result(raise_on_failure=False)
        except MissingResult:  # finished, but its outcome did not come back (a busy server): idempotent, so
            logger.warning("batch %d/%d: its outcome was lost; running it again here", done, len(groups))
            outcomes = run_batch([(r.plate, r.sha256) for r in group], params, root, logger)
        if not isinstance(outcomes, list):  # the task itself died (a lost worker): its plates fail
            outcomes = [PlateOutcome(r.plate.folder, "failed", failed_step="characterize",
                                     error=f"the batch failed: {future.state.message}") for r in group]
        for rec, outcome in zip(group, outcomes):
            if outcome.status == "failed":
                rec.fail(outcome.failed_step, outcome.error,
                         characterize_status="failed" if outcome.failed_step == "characterize" else "computed")
                logger.warning("%s failed at %s: %s", rec.plate.folder, outcome.failed_step, outcome.error)
            else:
                rec.settle(outcome.status, outcome.metadata)
        logger.info("batch %d/%d: %d plates, %d failed", done, len(groups), len(group),
                    sum(o.status == "failed" for o in outcomes))
        progress.advance(len(group))


def _problem_row(problem: PlateProblem) -> dict:
    return {"plate_dir": problem.folder, "plate_id": problem.plate_id, "status": "failed",
            "failed_step": "manifest", "error": f"{type(problem.error).__name__}: {problem.error}",
            "characterize_status": "not_run"}


@flow(
    name="refresh-corpus",
    task_runner=ThreadPoolTaskRunner(max_workers=default_workers()),
    validate_parameters=True,
)
def refresh_corpus(
    root: str,
    characterize_params: CharacterizeParams = CharacterizeParams(),
    models: list[str] = [],
    crop_model: str | None = None,
    crop_params: CropParams = CropParams(),
    gpu_class: str | None = None,
    weights_root: str | None = None,
    plates: list[str] | None = None,
    gpu_dispatch: Dispatch = "auto",
    chunk_size: int = 512,
    worker_wait_minutes: float | None = 30.0,
    verify: bool = False,
    batch_plates: int = 64,
    batch_megabytes: float = 256.0,
):
    """Characterise every plate under ROOT/plates_structured; with ``models``, also build crop
    candidates, embed them with each model, choose and save the smart crop. Writes
    ROOT/plates.parquet (and ROOT/embeddings/<model>.parquet).

    ``plates`` (folder names) limits the run to those plates; the other plates' rows in the
    tables are kept as they are. ``gpu_dispatch``: where the GPU step runs (plateflow/routing.py):
    ``auto`` sends it as runs of the class's embed-plates deployment (one per online worker of
    its pool) when the server has such deployments, else runs it in-process; either way the
    plates go through embed-chunk tasks of ``chunk_size`` plates (the unit of retry). If that
    pool has no online worker for ``worker_wait_minutes`` (None: no limit), the plates no worker
    took fail saying so. Ends Failed (with every failed plate and its reason in the message) if
    any plate failed; the other plates are complete either way.

    Sources are hashed only where their stat changed (``verify``: all of them). A plate whose
    outputs are in place for its cache key creates no task run; the others go through
    characterize-batch tasks of at most ``batch_plates`` plates and ``batch_megabytes`` of source.
    """
    logger = get_run_logger()
    if plates is not None:  # a refresh of some plates merges into the tables: they must be readable
        read_corpus_table(Path(root).expanduser())
        for m in models:
            read_parquet(embeddings_table_path(Path(root).expanduser(), m), f"embeddings table of {m}")
    if models:
        # Configuration errors surface before any work: unknown model, a model too big for the class.
        # So does a GPU class with no work pool on the server.
        profiles = load_profiles()
        route = choose_route(gpu_class, gpu_dispatch, profiles,
                             detected=gpu_class or detect_gpu_class(profiles))
        logger.info("GPU step: %s", route.describe())
        for m in models:
            profiles.plan(m, route.gpu_class)
            if route.local:  # a pool's workers load weights of their own
                require_weights(profiles.model(m), Path(weights_root) if weights_root else None)
        crop_model = crop_model or models[0]
        if crop_model not in models:
            raise ConfigError(f"--crop-model {crop_model} is not among --models {', '.join(models)}")
        characterize_params = characterize_params.model_copy(update={"working_copy": True})
    cfg = RefreshConfig(root=Path(root), characterize=characterize_params)
    root_path = cfg.root
    # One refresh of a corpus at a time: each writes the whole corpus table.
    holder = f"flow run {flow_run.name} ({flow_run.id}) on {socket.gethostname()}, pid {os.getpid()}"
    asked = time.perf_counter()
    with corpus_lock(root_path, holder, on_wait=lambda other: logger.warning(
            "another refresh holds this corpus (%s): waiting for it to finish", other)):
        started = time.perf_counter()  # the summary's time is the work's, not the wait's
        waited = started - asked
        for stale in remove_stale_temps(root_path, skip=("source",)):
            logger.info("removed %s, left behind by a writer that stopped", stale.relative_to(root_path))
        try:
            write_bytes_if_changed(state_dir(root_path) / "config.json", dumps_json(cfg.model_dump(mode="json")))
        except OSError as exc:  # a full disk: each plate's step says so for itself
            logger.warning("could not write the effective configuration: %s", exc)
        found = discover_plates(root_path)
        if plates is not None:
            wanted = set(plates)
            found = [p for p in found if p.folder in wanted]
        partial = plates is not None
        plates = [p for p in found if isinstance(p, PlateRef)]
        problems = [p for p in found if isinstance(p, PlateProblem)]
        logger.info("%d plate folders: %d to process, %d with manifest problems",
                    len(found), len(plates), len(problems))

        timings: dict[str, float] = {"waiting for the corpus": waited} if waited >= 1 else {}
        progress = Progress(root_path, len(plates) * (2 + len(models)) if models else len(plates))
        records = [PlateRecord(plate) for plate in plates]
        hash_sources(records, root_path, verify, cfg.workers, logger, whole_corpus=not partial)
        todo = settle_current(records, root_path, cfg.characterize)
        progress.advance(len(records) - len(todo))
        logger.info("%d plates current, %d to characterise", len(records) - len(todo), len(todo))
        characterize_plates(todo, cfg.characterize, root_path, batch_plates, int(batch_megabytes * 2**20),
                            progress, logger)
        timings["characterisation"] = time.perf_counter() - started

        rows = [rec.row for rec in records] + [_problem_row(p) for p in problems]
        if models:
            run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
            _embed_and_crop(root_path, records, models, crop_model, crop_params, route, weights_root, run_id,
                            chunk_size, partial, progress, timings, worker_wait_minutes)
        rows.sort(key=lambda r: natural_key(r["plate_dir"]))
        t = time.perf_counter()
        failed = [r for r in rows if r["status"] == "failed"]
        try:
            table_path = write_corpus_table(root_path, rows, partial=partial, flow_runs=(str(flow_run.id), str(flow_run.root_flow_run_id)))
        except OSError as exc:  # a full disk: say so, and what this run found, never the old table's counts
            message = (f"could not write the corpus table: {exc}; it still holds an earlier run's rows. "
                       f"This run: {len(rows) - len(failed)} of {len(rows)} plates ok, {len(failed)} failed"
                       + (f": {_failures(failed)}" if failed else ""))
            logger.error(message)
            return Failed(message=message)
        try:
            report = build_report(root_path)
        except Exception:  # the plates' outputs stand; a report bug must not fail the refresh
            logger.exception("could not write the corpus report")
            report = None
        timings["tables and report"] = time.perf_counter() - t
        progress.advance(progress.total, force=True)
        # The table and summary cover the whole corpus, also after a refresh of some plates.
        table_rows = read_corpus_table(root_path).to_pylist() if partial else rows
        publish(root_path, table_rows, timings, report, models)
        counts = {s: sum(r.get("characterize_status") == s for r in rows)
                  for s in ("computed", "cached")}
        embedded = ""
        if models:
            e = {k: sum(r.get("embed_status") == k for r in rows) for k in ("computed", "cached")}
            embedded = f"; embeddings {e['computed']} computed, {e['cached']} cached"
        summary = (f"{len(rows) - len(failed)} of {len(rows)} plates ok "
                   f"(characterisation {counts['computed']} computed, {counts['cached']} cached{embedded}), "
                   f"{len(failed)} failed "
                   f"in {time.perf_counter() - started:.1f} s; table: {table_path}; report: {report}")
        logger.info(summary)
        if failed:
            return Failed(message=f"{summary}. Failed plates: {_failures(failed)}")
        return Completed(message=summary)


def _embed_and_crop(root: Path, records: list[PlateRecord], models: list[str],
                    crop_model: str, crop_params: CropParams, route: GpuRoute,
                    weights_root: str | None, run_id: str, chunk_size: int, partial: bool,
                    progress: Progress, timings: dict[str, float],
                    worker_wait_minutes: float | None = None) -> None:
    """Candidates, embeddings (only plates without cached vectors go to the GPU flow), smart crop."""
    from flows.embed import embed_plates

    started = time.perf_counter()
    logger = get_run_logger()
    profiles = load_profiles()
    rows = {rec.plate.folder: rec.row for rec in records}
    ok = [rec for rec in records if rec.ok]
    boxes_f, info = {}, {}
    for run in ok:
        meta = run.metadata
        info[run.plate.folder] = (meta["sha256"], (meta["width"], meta["height"]))
        boxes_f[run.plate.folder] = crop_candidates.submit(
            run.plate.plate_dir, run.plate.plate_id, info[run.plate.folder][1], crop_params)
    boxes = {}
    for run in ok:
        outcome, exc = _step_outcome(boxes_f[run.plate.folder])
        if outcome == "failed":
            _fail(rows[run.plate.folder], "candidates", exc, embed_status="not_run")
        else:
            boxes[run.plate.folder] = boxes_f[run.plate.folder].result()
    ok = [run for run in ok if run.plate.folder in boxes]

    files: dict[str, dict[str, str]] = {run.plate.folder: {} for run in ok}
    computed: set[str] = set()
    for model in models:
        spec = profiles.model(model)
        jobs = []
        for run in ok:
            sha, size = info[run.plate.folder]
            path = store_path(root, spec, sha, crop_params)
            files[run.plate.folder][model] = str(path)
            if path.is_file() and (problem := vectors_problem(path, len(boxes[run.plate.folder]), spec.embed_dim)):
                logger.warning("%s: %s; removed, its vectors are computed again", run.plate.folder, problem)
                path.unlink(missing_ok=True)
            if not path.is_file():
                jobs.append(PlateJob(run.plate.folder, str(run.plate.plate_dir / WORKING_COPY), size,
                                     tuple(map(tuple, boxes[run.plate.folder])), str(path)))
        logger.info("%s: %d plates cached, %d to embed", model, len(ok) - len(jobs), len(jobs))
        progress.advance(len(ok) - len(jobs))
        if not jobs:
            continue
        if route.local:
            state = embed_plates(model, route.gpu_class, jobs=jobs, chunk_size=chunk_size,
                                 weights_root=weights_root, return_state=True)
            outcome = (state.result() if state.is_completed()
                       else {job.plate_id: state.message for job in jobs})
        else:
            outcome = run_on_pool(route, model, jobs, chunk_size, weights_root,
                                  state_dir(root) / "dispatch" / run_id, logger,
                                  worker_wait_s=None if worker_wait_minutes is None else 60 * worker_wait_minutes)
        for job in jobs:
            error = outcome.get(job.plate_id, "no result came back for this plate")
            if error is not None:
                _fail(rows[job.plate_id], "embed", RuntimeError(f"{model}: {error}"), embed_status="failed")
            computed.add(job.plate_id)
        progress.advance(len(jobs))

    timings["candidates and embeddings"] = time.perf_counter() - started
    started = time.perf_counter()
    ok = [run for run in ok if rows[run.plate.folder]["status"] == "ok"]
    crops = {}
    for run in ok:
        sha, size = info[run.plate.folder]
        key = hashlib.sha256("|".join(
            [sha, crop_model, crop_params.model_dump_json()]
            + [f"{m}:{embedding_key(profiles.model(m), crop_params)}" for m in models]).encode()).hexdigest()[:20]
        crops[run.plate.folder] = save_smart_crop.submit(
            run.plate, run_id, key, files[run.plate.folder], boxes[run.plate.folder], crop_model,
            crop_params, size, sha)
    for run in ok:
        row = rows[run.plate.folder]
        outcome, exc = _step_outcome(crops[run.plate.folder])
        row["embed_status"] = "computed" if run.plate.folder in computed else "cached"
        if outcome == "failed":
            _fail(row, "smart_crop", exc)
        else:
            row.update(crops[run.plate.folder].result())
        progress.advance()
    timings["smart crop"] = time.perf_counter() - started
    for model in models:
        table_rows = [(run.plate.plate_id, info[run.plate.folder][0], boxes[run.plate.folder],
                       load_vectors(files[run.plate.folder][model], len(boxes[run.plate.folder]))) for run in ok
                      if rows[run.plate.folder]["status"] == "ok"]
        logger.info("wrote %s", write_embeddings_table(root, model, table_rows, profiles.model(model).embed_dim,
                                                         partial=partial))


def _failures(failed: list[dict]) -> str:
    """Every failed plate with its error; plates that failed alike share one line
    (``plate-001, plate-002: error``), so one cause is not repeated for every plate."""
    by_error: dict[str, list[str]] = {}
    for r in failed:
        by_error.setdefault(r["error"], []).append(r["plate_dir"])
    return "; ".join(f"{', '.join(folders)}: {error}" for error, folders in by_error.items())


def _fail(row: dict, step: str, exc: BaseException | None, embed_status: str | None = None) -> None:
    """Mark a plate's corpus-table row failed at ``step``, with the error that says why."""
    row.update(status="failed", failed_step=step, error=f"{type(exc).__name__}: {exc}")
    if embed_status is not None:
        row["embed_status"] = embed_status
