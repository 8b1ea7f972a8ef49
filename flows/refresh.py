"""refresh_corpus: characterise every plate of a corpus; a refresh only redoes what changed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture, as_completed
from prefect.states import Completed, Failed
from prefect.task_runners import ThreadPoolTaskRunner

from plateflow.atomic import write_json
from plateflow.config import CharacterizeParams, RefreshConfig, default_workers
from plateflow.corpus import PlateProblem, PlateRef, discover_plates, state_dir
from plateflow.errors import ImageDecodeError, TooManyPixelsError
from tasks.characterize import characterize, hash_source
from tasks.save import save_failure_record, save_plate, write_corpus_table

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


def _plate_row(run: PlateRun) -> dict:
    row = {"plate_dir": run.plate.folder, "plate_id": run.plate.plate_id,
           "source_image": run.plate.source_image, "status": "ok"}
    for step in ("hash", "characterize", "save"):
        outcome, exc = _step_outcome(run.futures[step])
        if step == "characterize":
            row["characterize_status"] = outcome
        if outcome == "failed":
            row.update(status="failed", failed_step=step, error=f"{type(exc).__name__}: {exc}")
            row.setdefault("characterize_status", "not_run")
            if isinstance(exc, (ImageDecodeError, TooManyPixelsError)):
                save_failure_record(run.plate, run.plate.plate_dir.parents[1], str(exc))
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
def refresh_corpus(root: str, characterize_params: CharacterizeParams = CharacterizeParams()):
    """Characterise every plate under ROOT/plates_structured and write ROOT/plates.parquet.

    Ends Failed (with every failed plate and its reason in the message) if any plate failed;
    the other plates are complete either way.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    cfg = RefreshConfig(root=Path(root), characterize=characterize_params)
    root_path = cfg.root
    write_json(state_dir(root_path) / "config.json", cfg.model_dump(mode="json"))
    found = discover_plates(root_path)
    plates = [p for p in found if isinstance(p, PlateRef)]
    problems = [p for p in found if isinstance(p, PlateProblem)]
    logger.info("%d plate folders: %d to process, %d with manifest problems",
                len(found), len(plates), len(problems))

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

    rows = [_plate_row(run) for run in runs] + [_problem_row(p) for p in problems]
    rows.sort(key=lambda r: r["plate_dir"])
    table_path = write_corpus_table(root_path, rows)
    failed = [r for r in rows if r["status"] == "failed"]
    counts = {s: sum(r.get("characterize_status") == s for r in rows)
              for s in ("computed", "cached")}
    summary = (f"{len(rows) - len(failed)} of {len(rows)} plates ok "
               f"({counts['computed']} computed, {counts['cached']} cached), {len(failed)} failed "
               f"in {time.perf_counter() - started:.1f} s; table: {table_path}")
    logger.info(summary)
    if failed:
        details = "; ".join(f"{r['plate_dir']}: {r['error']}" for r in failed)
        return Failed(message=f"{summary}. Failed plates: {details}")
    return Completed(message=summary)
