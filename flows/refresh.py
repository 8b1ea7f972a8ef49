"""refresh_corpus: characterize every plate of a corpus; a refresh only redoes what changed.

The stages, each counted in plates (``Progress``):

1. hash: each source's sha256, from the source index where its stat is unchanged;
2. characterize: plates whose outputs are in place for their cache key are settled here, with no
   task run; the others go through characterize-batch tasks;
3. with models: candidates (candidates-batch tasks), embed <model> (the GPU flow, embed-plates,
   in-process or on a work pool), smart crop (smart-crop-batch tasks);
4. plates.parquet, the embeddings tables, the corpus report and the run's artifacts.

The batch tasks run on this process's threads, or on Dask (``RefreshConfig.dask``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from prefect import flow, get_run_logger
from prefect.exceptions import MissingResult
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from plateflow.artifacts import Progress, RunCounts, plural, publish
from plateflow.atomic import dumps_json, remove_stale_temps, write_bytes_if_changed
from plateflow.config import CharacterizeParams, RefreshConfig, corpus_root
from plateflow.errors import ConfigError
from plateflow.corpus import PlateProblem, PlateRef, corpus_lock, discover_plates, original_path
from plateflow.hardware import gpu_class as detect_gpu_class
from plateflow.hashindex import SourceIndex
from plateflow.layout import SOURCE, CorpusLayout, PlateLayout, natural_key
from plateflow.profiles import load_profiles, quality_profile
from plateflow.runlog import quiet_returned_failures
from plateflow.tables import (CHARACTERIZATION_COLUMNS, failure_signature, failure_signatures, read_corpus_table,
                              read_parquet, write_corpus_table, write_embeddings_table)
from flows.batches import Batching, BatchStage, run_batches
from flows.routing import GpuRoute, choose_route, run_on_pool
from tasks.batch import PlateOutcome, file_size
from tasks.features import update_plate_features
from tasks.heads import apply_predictors
from tasks.candidates import candidates_batch, candidates_of_plates
from tasks.characterize import characterize_batch, characterize_plates, step_key
from tasks.embed.models import require_weights
from tasks.embed.reader import PlateJob
from tasks.embed.writer import embedding_key, load_vectors, store_path, vectors_problem
from tasks.quality import corpus_flags, paper_share, quality_scores
from tasks.report import build_report
from tasks.save import current_record
from tasks.smart_crop import CropJob, crop_key, smart_crop_batch, smart_crop_plates

HASH, CHARACTERISE, CANDIDATES, SMART_CROP = "hash", "characterize", "candidates", "smart crop"


def embed_stage(model: str) -> str:
    return f"embed {model}"


@dataclass
class PlateRecord:
    """One plate through a refresh: its source's hash, its corpus-table row and what each stage
    found (input_image.json fields, crop boxes, vector files)."""

    plate: PlateRef
    sha256: str | None = None
    metadata: dict | None = None
    boxes: list[list[int]] | None = None
    vector_files: dict[str, str] = field(default_factory=dict)
    embedded: bool = False  # some model's vectors were computed by this refresh
    row: dict = field(init=False)

    def __post_init__(self):
        self.row = {"plate_dir": self.plate.folder, "plate_id": self.plate.plate_id,
                    "source_image": self.plate.source_image, "status": "ok",
                    "original_path": original_path(self.plate.manifest)}

    @property
    def ok(self) -> bool:
        return self.row["status"] == "ok"

    @property
    def size(self) -> tuple[int, int]:
        return self.metadata["width"], self.metadata["height"]

    def settle(self, status: str, metadata: dict) -> None:
        self.metadata = metadata
        quality = metadata.get("quality") or {}
        self.row.update({k: metadata[k] for k in CHARACTERIZATION_COLUMNS}, characterize_status=status,
                        quality_flags=quality.get("flags"), pixel_hash=quality.get("pixel_hash"),
                        phash=quality.get("phash"), paper_share=paper_share(quality),
                        quality_scores=quality_scores(quality))

    def fail(self, step: str, error: str, **extra) -> None:
        """Mark the plate failed at ``step``, with the error that says why (and the source's
        hash, when known: a failure with the same hash is known on the next run)."""
        self.row.update(status="failed", failed_step=step, error=error, **extra)
        if self.sha256 is not None:
            self.row.setdefault("sha256", self.sha256)
        self.row.setdefault("characterize_status", "not_run")

    def source_bytes(self) -> int:
        return file_size(self.plate.source_path)


@dataclass
class Refresh:
    """One refresh run: where, with what, and what it has measured so far."""

    root: Path
    corpus: CorpusLayout
    config: RefreshConfig
    partial: bool
    logger: Any
    progress: Progress
    run_id: str
    started: float = field(default_factory=time.perf_counter)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def params(self) -> CharacterizeParams:
        return self.config.effective_characterize()

    @contextlib.contextmanager
    def timed(self, what: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.timings[what] = self.timings.get(what, 0.0) + time.perf_counter() - t


@flow(name="refresh-corpus", validate_parameters=True)
def refresh_corpus(root: str, config: RefreshConfig = RefreshConfig(), plates: list[str] | None = None):
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
    """
    quiet_returned_failures()
    logger = get_run_logger()
    try:
        root_path = corpus_root(root)
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
    profiles = load_profiles()
    check_models(config, config.gpu_class, in_process=False)  # a typo is said before the server is asked
    route = choose_route(config.gpu_class, config.gpu_dispatch, profiles,
                         detected=config.gpu_class or detect_gpu_class(profiles))
    logger.info("GPU step: %s", route.describe())
    check_models(config, route.gpu_class, in_process=route.local)
    return route


def check_models(config: RefreshConfig, gpu_class: str | None, in_process: bool) -> None:
    """``ConfigError`` for a model the profiles do not know, one too big for ``gpu_class``, or,
    when the GPU step runs in this process, one whose weights this machine cannot have (a pool's
    workers load weights of their own). Touches no plate and writes nothing."""
    profiles = load_profiles()
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
    if waited >= 1:
        run.timings["waiting for the corpus"] = waited
    return run


def _touch(marker: Path, logger) -> None:
    try:
        marker.touch()
    except OSError as exc:  # a full disk: the temp files of a lost remote writer wait for a later sweep
        logger.warning("could not write %s: %s", marker.name, exc)


def find_plates(run: Refresh, wanted: list[str] | None) -> tuple[list[PlateRecord], list[PlateProblem]]:
    """The corpus's plate folders (those named in ``wanted`` only, when given): the valid plates
    as records, in folder order, and those whose manifest has a problem."""
    found = discover_plates(run.root)
    if wanted is not None:
        names = set(wanted)
        found = [p for p in found if p.folder in names]
    records = [PlateRecord(p) for p in found if isinstance(p, PlateRef)]
    problems = [p for p in found if isinstance(p, PlateProblem)]
    run.logger.info("%s: %d to process, %d with manifest problems",
                    plural(len(found), "plate folder"), len(records), len(problems))
    stages = [HASH, CHARACTERISE] + ([CANDIDATES, *map(embed_stage, run.config.models), SMART_CROP]
                                     if run.config.models else [])
    for stage in stages:  # all known from the start, so the overall progress never goes back
        run.progress.stage(stage, len(records))
    return records, problems


class PlateRunner:
    """Where the batch tasks run: ``config.workers`` threads here, or Dask (a scheduler's
    address, or ``local:N`` worker processes started for this refresh). Started on first use,
    so a refresh with nothing to compute starts no cluster; stopped with the ``with`` block."""

    def __init__(self, config: RefreshConfig):
        self.config = config
        self._runner: TaskRunner | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "PlateRunner":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def get(self) -> TaskRunner:
        if self._runner is None:
            self._runner = self._stack.enter_context(self._make())
        return self._runner

    def _make(self) -> TaskRunner:
        dask = self.config.dask
        if dask is None:
            return ThreadPoolTaskRunner(max_workers=self.config.workers)
        from prefect_dask import DaskTaskRunner

        if dask.startswith("local:"):
            return DaskTaskRunner(cluster_kwargs={"n_workers": int(dask.removeprefix("local:")),
                                                  "threads_per_worker": 1, "processes": True,
                                                  "dashboard_address": None})
        return DaskTaskRunner(address=dask)

    def places(self) -> int:
        """How many batches run at once: the threads, or the Dask cluster's worker threads."""
        if self.config.dask is None:
            return self.config.workers
        try:
            return max(1, sum(self.get().client.nthreads().values()))
        except Exception:  # noqa: BLE001 - only a hint for sizing batches
            return self.config.workers


def _batching(run: Refresh, runner: PlateRunner, stage: str) -> Batching:
    return Batching(run.config.batch_plates, run.config.batch_bytes, runner.places(),
                    lambda plates, failed: run.progress.advance(stage, plates, failed))


def characterize_stage(run: Refresh, records: list[PlateRecord], runner: PlateRunner) -> None:
    with run.timed("hashing"):
        hash_sources(run, records)
    with run.timed("characterization"):
        todo = settle_current(records, run.root, run.params)
        run.progress.advance(CHARACTERISE, len(records) - len(todo), sum(not r.ok for r in records))
        run.logger.info("%s current, %d to characterize", plural(len(records) - len(todo), "plate"), len(todo))

        def apply(rec: PlateRecord, outcome: PlateOutcome) -> None:
            if outcome.failed:
                rec.fail(outcome.failed_step, outcome.error,
                         characterize_status="failed" if outcome.failed_step == "characterize" else "computed")
            else:
                rec.settle(outcome.status, outcome.value)

        stage = BatchStage(CHARACTERISE, "characterize", characterize_batch, characterize_plates,
                           {"params": run.params, "root": str(run.root)}, apply,
                           item=lambda r: (r.plate, r.sha256), cost=PlateRecord.source_bytes)
        if todo:
            run_batches(stage, todo, runner.get, _batching(run, runner, CHARACTERISE), run.logger)


def hash_sources(run: Refresh, records: list[PlateRecord]) -> None:
    """Each source's sha256, from ROOT/.plateflow/source-index.parquet where its stat is unchanged
    (all read again with ``verify``); a source that cannot be read fails its plate. A refresh of
    the whole corpus drops the entries of sources that are gone."""
    index = SourceIndex(run.root)
    hashes = index.hash_all([r.plate.source_path for r in records], run.config.workers, run.config.verify,
                            lambda done, failed: run.progress.advance(HASH, done, failed))
    for rec, value in zip(records, hashes):
        if isinstance(value, OSError):
            rec.fail("hash", f"{type(value).__name__}: {value}")
        else:
            rec.sha256 = value
    if not run.partial:
        index.forget_missing({index.key(r.plate.source_path) for r in records})
    try:
        index.save()
    except OSError as exc:  # a full disk: the next refresh hashes these sources again, nothing is lost
        run.logger.warning("could not write the source index: %s", exc)


def settle_current(records: list[PlateRecord], root: Path, params: CharacterizeParams) -> list[PlateRecord]:
    """Settle, without a task, every plate whose outputs (or failure record) are in place for
    its cache key; return the plates that have work to do."""
    todo, key = [], step_key(params)
    for rec in records:
        if not rec.ok:
            continue
        record = current_record(rec.plate, root, key(rec.sha256), params.viz, params.working_copy)
        if record is None:
            todo.append(rec)
        elif record.get("loadable") is False:  # bad input, already found bad with these bytes and code
            rec.fail("characterize", record.get("plateflow_error") or record.get("error", ""),
                     characterize_status="failed")
        else:
            rec.settle("cached", record)
    return todo


def gpu_stage(run: Refresh, records: list[PlateRecord], route: GpuRoute, runner: PlateRunner) -> None:
    """Candidates, embeddings (only plates without stored vectors go to the GPU flow), smart crop,
    and the embeddings tables."""
    with run.timed("candidates and embeddings"):
        candidates_stage(run, records, runner)
        for model in run.config.models:
            embed_model(run, [r for r in records if r.ok], model, route)
    with run.timed("smart crop"):
        smart_crop_stage(run, records, runner)
    profiles = load_profiles()
    for model in run.config.models:
        spec = profiles.model(model)
        ok = [r for r in records if r.ok]
        vectors = [load_vectors(r.vector_files[model], len(r.boxes)) for r in ok]
        rows = [(r.plate.plate_id, r.metadata["sha256"], r.boxes, v) for r, v in zip(ok, vectors)]
        run.logger.info("wrote %s", write_embeddings_table(run.root, model, rows, spec.embed_dim,
                                                             partial=run.partial))
        items = [(r.plate.folder, r.plate.plate_id, r.metadata["sha256"], v) for r, v in zip(ok, vectors)]
        version, written = update_plate_features(run.root, model, items, spec.embed_dim,
                                                 embedding_key(spec, run.config.crop), partial=run.partial)
        if written:
            run.logger.info("%s features: version %s, %s (float16, %s)", model, version, plural(len(items), "plate"),
                            run.corpus.features(model))


def candidates_stage(run: Refresh, records: list[PlateRecord], runner: PlateRunner) -> None:
    ok = [r for r in records if r.ok]
    run.progress.stage(CANDIDATES, len(ok))
    crop = run.config.crop

    def apply(rec: PlateRecord, outcome: PlateOutcome) -> None:
        if outcome.failed:
            rec.fail(outcome.failed_step, outcome.error, embed_status="not_run")
        else:
            rec.boxes = outcome.value

    stage = BatchStage(CANDIDATES, "candidates", candidates_batch, candidates_of_plates, {"params": crop}, apply,
                       item=lambda r: (r.plate, r.size))
    if ok:
        run_batches(stage, ok, runner.get, _batching(run, runner, CANDIDATES), run.logger)


def embed_model(run: Refresh, records: list[PlateRecord], model: str, route: GpuRoute) -> None:
    """``model``'s vectors for each plate: stored ones are kept (damaged ones removed and
    computed again), the others are computed by the embed-plates flow, here or on a work pool."""
    spec = load_profiles().model(model)
    stage, jobs = embed_stage(model), {}
    run.progress.stage(stage, len(records))
    for rec in records:
        path = store_path(run.root, spec, rec.metadata["sha256"], run.config.crop)
        rec.vector_files[model] = str(path)
        if path.is_file() and (problem := vectors_problem(path, len(rec.boxes), spec.embed_dim)):
            run.logger.warning("%s: %s; removed, its vectors are computed again", rec.plate.folder, problem)
            path.unlink(missing_ok=True)
        if not path.is_file():
            jobs[rec.plate.folder] = (rec, PlateJob(rec.plate.folder, str(PlateLayout(rec.plate.plate_dir).working_copy),
                                                    rec.size, tuple(map(tuple, rec.boxes)), str(path)))
    run.logger.info("%s: %s cached, %d to embed", model, plural(len(records) - len(jobs), "plate"), len(jobs))
    run.progress.advance(stage, len(records) - len(jobs))
    if not jobs:
        return
    outcome = _embed(run, model, route, [job for _, job in jobs.values()])
    failed = 0
    for folder, (rec, _) in jobs.items():
        error = outcome.get(folder, "no result came back for this plate")
        if error is not None:
            rec.fail("embed", f"RuntimeError: {model}: {error}", embed_status="failed")
            failed += 1
        rec.embedded = True
    run.progress.advance(stage, len(jobs), failed)


def _embed(run: Refresh, model: str, route: GpuRoute, jobs: list[PlateJob]) -> dict[str, str | None]:
    """plate_id -> None or its error, from the embed-plates flow: a subflow here, or pool runs."""
    from flows.embed import embed_plates

    cfg = run.config
    if not route.local:
        wait = None if cfg.worker_wait_minutes is None else 60 * cfg.worker_wait_minutes
        return run_on_pool(route, model, jobs, cfg.chunk_size, cfg.weights_root,
                           run.corpus.dispatch(run.run_id), run.logger, worker_wait_s=wait)
    state = embed_plates(model, route.gpu_class, jobs=jobs, chunk_size=cfg.chunk_size,
                         weights_root=cfg.weights_root, return_state=True)
    if not state.is_completed():
        return {job.plate_id: state.message for job in jobs}
    try:
        return state.result()
    except MissingResult:  # completed, but its outcome did not come back (a busy server): the files say
        run.logger.warning("%s: embed-plates' outcome was lost; reading the vectors it stored", model)
        dim = load_profiles().model(model).embed_dim
        return {job.plate_id: vectors_problem(job.cache_file, len(job.boxes), dim) for job in jobs}


def smart_crop_stage(run: Refresh, records: list[PlateRecord], runner: PlateRunner) -> None:
    cfg, profiles = run.config, load_profiles()
    keys = [f"{m}:{embedding_key(profiles.model(m), cfg.crop)}" for m in cfg.models]
    for rec in records:
        if rec.row.get("embed_status") is None and rec.boxes is not None:
            rec.row["embed_status"] = "computed" if rec.embedded else "cached"
    ok = {r.plate.folder: r for r in records if r.ok}
    run.progress.stage(SMART_CROP, len(ok))
    key = crop_key(cfg.best_crop_model, cfg.crop, keys)
    jobs = [CropJob(r.plate, key(r.metadata["sha256"]), dict(r.vector_files), r.boxes, r.size, r.metadata["sha256"])
            for r in ok.values()]

    def apply(job: CropJob, outcome: PlateOutcome) -> None:
        if outcome.failed:
            ok[job.plate.folder].fail(outcome.failed_step, outcome.error)
        else:
            ok[job.plate.folder].row.update(outcome.value)

    stage = BatchStage(SMART_CROP, "smart_crop", smart_crop_batch, smart_crop_plates,
                       {"run_id": run.run_id, "crop_model": cfg.best_crop_model, "params": cfg.crop}, apply,
                       cost=lambda job: file_size(job.plate.source_path))
    if jobs:
        run_batches(stage, jobs, runner.get, _batching(run, runner, SMART_CROP), run.logger)


def finish(run: Refresh, records: list[PlateRecord], problems: list[PlateProblem]) -> State:
    """Write plates.parquet and the report, publish the artifacts; the run's final state:
    Completed unless a plate newly failed. A plate that failed the same way with the same inputs
    before this run is a known failure, named in the message; it does not fail the run, so a
    scan a curator already knows is bad does not turn every nightly run red."""
    rows = sorted([rec.row for rec in records] + [_problem_row(p) for p in problems],
                  key=lambda r: natural_key(r["plate_dir"]))
    failed = [r for r in rows if r["status"] == "failed"]
    before = failure_signatures(run.root) if failed else {}
    known = {r["plate_dir"] for r in failed if before.get(r["plate_dir"]) == failure_signature(r)}
    counts = RunCounts.of(rows, known, run.config.models)
    t = time.perf_counter()
    profile = quality_profile()
    if not run.partial:  # the whole corpus: its flags here (the summary shows them); else on the merged table
        corpus_flags(rows, profile)
    try:
        table_path = write_corpus_table(run.root, rows, partial=run.partial,
                                        flow_runs=(str(flow_run.id), str(flow_run.root_flow_run_id)),
                                        finalize=(lambda every: corpus_flags(every, profile)) if run.partial else None)
    except OSError as exc:  # a full disk: say so, and what this run found, never the old table's counts
        message = (f"could not write the corpus table: {exc}; it still holds an earlier run's rows. "
                   f"This run: {counts.headline()}" + (f": {_failures(failed)}" if failed else ""))
        run.logger.error(message)
        return Failed(message=message)
    if run.config.models and run.corpus.predictors.is_file():
        try:  # new and changed plates predicted by the registered heads, from their cached features
            apply_predictors(run.root, run.logger)
        except ConfigError as exc:  # a damaged registry, checkpoint or store: named, with its fix
            run.logger.warning("the registered heads did not predict: %s", exc)
        except Exception:  # noqa: BLE001 - the plates' outputs stand; a bug there must not fail the refresh
            run.logger.exception("could not predict with the registered heads")
    try:
        report = build_report(run.root)
    except Exception:  # noqa: BLE001 - the plates' outputs stand; a report bug must not fail the refresh
        run.logger.exception("could not write the corpus report")
        report = None
    run.timings["tables and report"] = time.perf_counter() - t
    run.progress.publish()
    publish(run.root, rows, counts, known, run.timings, report, run.config.models,
            corpus=read_corpus_table(run.root).to_pylist() if run.partial else None)
    for r in failed:  # one line per failed plate, and no more
        is_known = r["plate_dir"] in known
        (run.logger.info if is_known else run.logger.warning)(
            "%s failed at %s (%s): %s", r["plate_dir"], r.get("failed_step"), "known" if is_known else "new", r["error"])
    summary = (f"{counts.headline()}; {'; '.join(counts.steps())}; in {time.perf_counter() - run.started:.1f} s; "
               f"table: {table_path}; report: {report}")
    run.logger.info(summary)
    new = [r for r in failed if r["plate_dir"] not in known]
    old = [r for r in failed if r["plate_dir"] in known]
    message = summary + (f". New failures: {_failures(new)}" if new else "") + (
        f". Known failures (failed the same way before): {_failures(old)}" if old else "")
    return Failed(message=message) if new else Completed(message=message)


def _problem_row(problem: PlateProblem) -> dict:
    return {"plate_dir": problem.folder, "plate_id": problem.plate_id, "status": "failed",
            "failed_step": "manifest", "error": f"{type(problem.error).__name__}: {problem.error}",
            "characterize_status": "not_run"}


def _failures(failed: list[dict]) -> str:
    """Every failed plate with its error; plates that failed alike share one line
    (``plate-001, plate-002: error``), so one cause is not repeated for every plate."""
    by_error: dict[str, list[str]] = {}
    for r in failed:
        by_error.setdefault(r["error"], []).append(r["plate_dir"])
    return "; ".join(f"{', '.join(folders)}: {error}" for error, folders in by_error.items())
