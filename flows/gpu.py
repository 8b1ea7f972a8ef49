"""The refresh's model stages: crop candidates, each model's vectors (the embed-plates flow,
in-process or on a work pool), the smart crop, and the embeddings tables and features."""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from pathlib import Path

import httpx
from prefect.exceptions import MissingResult

from flows.batches import BatchStage, run_batches
from flows.routing import GpuRoute, run_on_pool
from flows.run import CANDIDATES, SMART_CROP, PlateRecord, PlateRunner, Refresh, batching, embed_stage
from plateflow.artifacts import plural
from plateflow.atomic import write_json
from plateflow.embed.candidates import candidates_of_plates
from plateflow.embed.reader import PlateJob
from plateflow.embed.writer import embedding_key, load_vectors, store_path, vectors_problem
from plateflow.caching import fingerprint
from plateflow.config import RefreshConfig
from plateflow.features import STORE_META, update_plate_features
from plateflow.layout import CorpusLayout, PlateLayout
from plateflow.outcomes import PlateOutcome, file_size
from plateflow.profiles import load_profiles
from plateflow.smart_crop import CropJob, crop_key, smart_crop_plates
from plateflow.status import Status
from plateflow.tables import write_embeddings_table
from tasks.candidates import candidates_batch
from tasks.smart_crop import smart_crop_batch


def gpu_stage(run: Refresh, records: list[PlateRecord], route: GpuRoute, runner: PlateRunner) -> None:
    """Candidates, embeddings (only plates without stored vectors go to the GPU flow), smart crop,
    and the embeddings tables."""
    with run.timed("candidates and embeddings"):
        candidates_stage(run, records, runner)
        for model in run.config.models:
            embed_model(run, [r for r in records if r.ok], model, route)
    with run.timed("smart crop"):
        smart_crop_stage(run, records, runner)
    profiles = load_profiles(root=run.root)
    # The plates the snapshot settled keep their rows; those of plates gone are dropped.
    keep = run.settled
    keep_ids = {run.snapshot.entries[f].plate_id for f in keep} if keep else set()
    for model in run.config.models:
        spec = profiles.model(model)
        ok = [r for r in records if r.ok]
        vectors = [load_vectors(r.vector_files[model], len(r.boxes)) for r in ok]
        rows = [(r.plate.plate_id, r.characterized_sha256, r.boxes, v) for r, v in zip(ok, vectors)]
        table = write_embeddings_table(run.root, model, rows, spec.embed_dim, partial=run.partial, keep=keep_ids)
        if table is not None:
            run.logger.info("wrote %s", table)
        items = [(r.plate.folder, r.plate.plate_id, r.characterized_sha256, v) for r, v in zip(ok, vectors)]
        version, written = update_plate_features(run.root, model, items, spec.embed_dim,
                                                 embedding_key(spec, run.config.crop), partial=run.partial, keep=keep)
        if written:
            run.logger.info("%s features: version %s, %s (float16, %s)", model, version, plural(len(items), "plate"),
                            run.corpus.features(model))


def snapshot_settings(root: Path, config: RefreshConfig) -> tuple[str, tuple[Path, ...]]:
    """For the snapshot of a refresh with models: the version of its model steps' keys (each
    model's embeddings, the smart crop) and the files its settled plates' rows are kept in (the
    embeddings tables, the feature stores, and the registered segmentation of a mask-guided crop)."""
    profiles, corpus = load_profiles(root=root), CorpusLayout(root)
    keys = [f"{m}:{embedding_key(profiles.model(m), config.crop)}" for m in config.models]
    tables = tuple(p for m in config.models for p in (corpus.embeddings_table(m), corpus.features(m) / STORE_META))
    return (fingerprint(*keys, crop_key(config.best_crop_model, config.crop, keys).version),
            tables + ((corpus.segmenter,) if config.crop.mask_class else ()))


def candidates_stage(run: Refresh, records: list[PlateRecord], runner: PlateRunner) -> None:
    ok = [r for r in records if r.ok]
    run.progress.stage(CANDIDATES, len(ok))
    crop = run.config.crop

    def apply(rec: PlateRecord, outcome: PlateOutcome) -> None:
        if outcome.failed:
            rec.fail(outcome.failed_step, outcome.error, embed_status=Status.NOT_RUN)
        else:
            rec.boxes = outcome.value

    stage = BatchStage(CANDIDATES, "candidates", candidates_batch, candidates_of_plates, {"params": crop}, apply,
                       item=lambda r: (r.plate, r.size))
    if ok:
        run_batches(stage, ok, runner.get, batching(run, runner, CANDIDATES), run.logger)


def embed_model(run: Refresh, records: list[PlateRecord], model: str, route: GpuRoute) -> None:
    """``model``'s vectors for each plate: stored ones are kept (damaged ones removed and
    computed again), the others are computed by the embed-plates flow, here or on a work pool."""
    spec = load_profiles(root=run.root).model(model)
    stage, jobs = embed_stage(model), {}
    run.progress.stage(stage, len(records))
    if not records:  # every plate settled by the snapshot (or none ok): nothing to look at
        return
    for rec in records:
        path = store_path(run.root, spec, rec.characterized_sha256, run.config.crop)
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
            rec.fail("embed", f"RuntimeError: {model}: {error}", embed_status=Status.FAILED)
            failed += 1
        rec.embedded = True
    run.progress.advance(stage, len(jobs), failed)


def _embed(run: Refresh, model: str, route: GpuRoute, jobs: list[PlateJob]) -> dict[str, str | None]:
    """folder -> None or its error, from the embed-plates flow: a subflow here, or pool runs."""
    from flows.embed import embed_plates

    cfg = run.config
    if not route.local:
        wait = None if cfg.worker_wait_minutes is None else 60 * cfg.worker_wait_minutes
        return run_on_pool(route, model, jobs, cfg.chunk_size, cfg.weights_root,
                           run.corpus.dispatch(run.run_id), run.logger, worker_wait_s=wait, root=run.root)
    # The plates go as a file, as to a pool: flow-run parameters are stored by the server, which
    # refuses more than 512 KiB of them (about a thousand plates' boxes).
    folder = run.corpus.dispatch(run.run_id)
    jobs_file = folder / f"{model}-jobs.json"
    try:
        write_json(jobs_file, [asdict(j) for j in jobs])
        state = embed_plates(model, route.gpu_class, jobs_file=str(jobs_file), chunk_size=cfg.chunk_size,
                             weights_root=cfg.weights_root, root=str(run.root), return_state=True)
    except (OSError, httpx.HTTPError) as exc:  # a full disk, or the server refused the run: these plates fail, not the refresh
        first = (str(exc).splitlines() or [""])[0][:300]  # the server's answer may quote every parameter
        return {job.name: f"embed-plates did not run: {type(exc).__name__}: {first}" for job in jobs}
    finally:
        jobs_file.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # only when empty
            folder.rmdir()
    if not state.is_completed():
        return {job.name: state.message for job in jobs}
    try:
        return state.result()
    except MissingResult:  # completed, but its outcome did not come back (a busy server): the files say
        run.logger.warning("%s: embed-plates' outcome was lost; reading the vectors it stored", model)
        dim = load_profiles(root=run.root).model(model).embed_dim
        return {job.name: vectors_problem(job.cache_file, len(job.boxes), dim) for job in jobs}


def smart_crop_stage(run: Refresh, records: list[PlateRecord], runner: PlateRunner) -> None:
    cfg, profiles = run.config, load_profiles(root=run.root)
    keys = [f"{m}:{embedding_key(profiles.model(m), cfg.crop)}" for m in cfg.models]
    for rec in records:
        if rec.row.get("embed_status") is None and rec.boxes is not None:
            rec.row["embed_status"] = Status.COMPUTED if rec.embedded else Status.CACHED
    ok = {r.plate.folder: r for r in records if r.ok}
    run.progress.stage(SMART_CROP, len(ok))
    experiment, mask_index = _segmenter(run) if cfg.crop.mask_class else (None, None)
    key = crop_key(cfg.best_crop_model, cfg.crop, keys + ([f"mask:{experiment}"] if experiment else []))
    jobs = []
    for r in ok.values():
        mask = PlateLayout(r.plate.plate_dir).segmentation(experiment) if experiment else None
        mask = str(mask) if mask is not None and mask.is_file() else None
        sha = r.characterized_sha256  # a plate whose mask appears or goes is cropped again
        jobs.append(CropJob(r.plate, key(sha) + ("-mask" if mask else ""), dict(r.vector_files), r.boxes, r.size, sha,
                            mask, mask_index if mask else None))

    def apply(job: CropJob, outcome: PlateOutcome) -> None:
        if outcome.failed:
            ok[job.plate.folder].fail(outcome.failed_step, outcome.error)
        else:
            ok[job.plate.folder].row.update(outcome.value)

    stage = BatchStage(SMART_CROP, "smart_crop", smart_crop_batch, smart_crop_plates,
                       {"run_id": run.run_id, "crop_model": cfg.best_crop_model, "params": cfg.crop}, apply,
                       cost=lambda job: file_size(job.plate.source_path))
    if jobs:
        run_batches(stage, jobs, runner.get, batching(run, runner, SMART_CROP), run.logger)


def _segmenter(run: Refresh) -> tuple[str | None, int | None]:
    """The registered segmentation (experiments/segmentation.json) and the index of the crop's
    mask class in it; (None, None), said once, when there is none or it lacks the class."""
    import json

    path = CorpusLayout(run.root).segmenter
    wanted = run.config.crop.mask_class
    try:
        data = json.loads(path.read_bytes())
        experiment, classes = data["experiment"], list(data["classes"])
    except FileNotFoundError:
        run.logger.warning("--crop-to-class %s: no segmentation is registered (`plateflow predict-seg` registers "
                           "one); every plate gets the similarity crop", wanted)
        return None, None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        run.logger.warning("--crop-to-class %s: %s cannot be read (%s); every plate gets the similarity crop",
                           wanted, path, exc)
        return None, None
    if wanted not in classes:
        run.logger.warning("--crop-to-class %s: segmentation %s has no such class (its classes: %s); every plate "
                           "gets the similarity crop", wanted, experiment, ", ".join(map(str, classes)))
        return None, None
    return str(experiment), classes.index(wanted)

