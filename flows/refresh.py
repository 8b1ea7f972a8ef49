"""refresh_corpus: characterise every plate of a corpus; a refresh only redoes what changed."""

from __future__ import annotations

import hashlib
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner

from plateflow.artifacts import Progress, publish
from plateflow.atomic import dumps_json, remove_stale_temps, write_bytes_if_changed
from plateflow.caching import forget_failure
from plateflow.config import CharacterizeParams, CropParams, RefreshConfig, default_workers
from plateflow.corpus import PlateProblem, PlateRef, corpus_lock, discover_plates, natural_key, state_dir
from plateflow.errors import ConfigError, ImageDecodeError, TooManyPixelsError
from plateflow.hardware import gpu_class as detect_gpu_class
from plateflow.profiles import load_profiles
from plateflow.routing import Dispatch, GpuRoute, choose_route, run_on_pool
from tasks.characterize import characterize, hash_source
from tasks.crops import WORKING_COPY, crop_candidates
from tasks.embeddings import PlateJob, embedding_key, load_vectors, require_weights, store_path, vectors_problem
from tasks.report import build_report
from tasks.save import (embeddings_table_path, read_corpus_table, read_parquet, save_failure_record, save_plate,
                        save_smart_crop, write_corpus_table, write_embeddings_table)

# Columns of plates.parquet copied from a plate's input_image.json record.
_TABLE_FIELDS = (
    "sha256", "image_format", "mode", "file_size_bytes", "width", "height", "megapixels",
    "aspect_ratio", "mean_rgb", "luminance_mean", "luminance_std", "entropy", "background_ratio",
    "grayscale_like", "very_large", "extreme_aspect", "frames", "exif_orientation",
)


@dataclass
class PlateRun:
    plate: PlateRef
    futures: dict[str, PrefectFuture] = field(default_factory=dict)


def _step_outcome(future: PrefectFuture) -> tuple[str, BaseException | None]:
    """('computed' | 'cached' | 'failed' | 'not_run', exception)."""
    future.wait()
    state = future.state
    if state.is_completed():
        return ("cached" if state.name == "Cached" else "computed"), None
    if state.is_failed() or state.is_crashed():
        exc = state.result(raise_on_failure=False)
        return "failed", exc if isinstance(exc, BaseException) else RuntimeError(state.message)
    return "not_run", None


def _plate_row(run: PlateRun, logger) -> dict:
    row = {"plate_dir": run.plate.folder, "plate_id": run.plate.plate_id,
           "source_image": run.plate.source_image, "status": "ok"}
    for step in ("hash", "characterize", "save"):
        outcome, exc = _step_outcome(run.futures[step])
        if step == "characterize":
            row["characterize_status"] = outcome
        if outcome == "failed":
            _fail(row, step, exc)
            row.setdefault("characterize_status", "not_run")
            if isinstance(exc, (ImageDecodeError, TooManyPixelsError)):
                try:
                    save_failure_record(run.plate, run.plate.plate_dir.parents[1], str(exc))
                except OSError as write_error:  # a full disk, say: the table still records the failure
                    logger.warning("%s: could not write its failure record: %s", run.plate.folder, write_error)
            return row
    result = run.futures["characterize"].result()
    row.update({k: result.metadata[k] for k in _TABLE_FIELDS})
    return row


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
        char_task = characterize.with_options(result_storage=state_dir(root_path) / "results")
        runs: list[PlateRun] = []
        for plate in plates:
            run = PlateRun(plate)
            run.futures["hash"] = hash_source.submit(plate.source_path, plate.plate_id)
            run.futures["characterize"] = char_task.submit(
                plate.source_path, run.futures["hash"], cfg.characterize, plate.plate_id)
            run.futures["save"] = save_plate.submit(plate, root_path, run.futures["characterize"])
            runs.append(run)

        by_future = {run.futures["save"]: run for run in runs}
        for done, future in enumerate(as_completed(list(by_future)), start=1):
            run = by_future[future]
            saved, _ = _step_outcome(future)
            outcome, _ = _step_outcome(run.futures["characterize"])
            logger.info("[%d/%d] %s %s", done, len(runs), run.plate.plate_id,
                        outcome if saved != "failed" and outcome != "failed" else "FAILED")
            progress.advance()
        timings["characterisation"] = time.perf_counter() - started

        rows = [_plate_row(run, logger) for run in runs] + [_problem_row(p) for p in problems]
        for run in runs:
            if run.futures["characterize"].state.is_failed():
                forget_failure(run.futures["characterize"].state, state_dir(root_path) / "results")
        if models:
            run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
            _embed_and_crop(root_path, runs, {r["plate_dir"]: r for r in rows}, models, crop_model,
                            crop_params, route, weights_root, run_id, chunk_size, partial, progress, timings,
                            worker_wait_minutes)
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


def _embed_and_crop(root: Path, runs: list[PlateRun], rows: dict[str, dict], models: list[str],
                    crop_model: str, crop_params: CropParams, route: GpuRoute,
                    weights_root: str | None, run_id: str, chunk_size: int, partial: bool,
                    progress: Progress, timings: dict[str, float],
                    worker_wait_minutes: float | None = None) -> None:
    """Candidates, embeddings (only plates without cached vectors go to the GPU flow), smart crop."""
    from flows.embed import embed_plates

    started = time.perf_counter()
    logger = get_run_logger()
    profiles = load_profiles()
    ok = [run for run in runs if rows[run.plate.folder]["status"] == "ok"]
    boxes_f, info = {}, {}
    for run in ok:
        meta = run.futures["characterize"].result().metadata
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
