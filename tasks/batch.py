"""Plates in batches: one Prefect task carries many plates, each plate isolated inside.

A Prefect task run costs milliseconds of API work and a row in Prefect's database, so a task per
plate bounds a refresh of 10^5 plates. The per-plate functions stay the unit of code
(``characterize_plate``, ``write_candidates``, ``smart_crop_plate``); ``isolated`` runs one of
them for one plate: a bad plate fails alone with its message, a transient error (I/O) retries
that plate alone, with backoff. The tasks are NO_CACHE: the per-plate caches keyed on input
hashes (stored results, outputs in place) decide what is done again, not Prefect's.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from plateflow.config import CharacterizeParams, CropParams
from plateflow.corpus import PlateRef
from plateflow.errors import ImageDecodeError, PlateError, TooManyPixelsError, is_transient
from tasks.characterize import cache_key, characterize_image, load_result, store_result
from tasks.crops import write_candidates
from tasks.save import save_characterization, save_failure_record, smart_crop_plate

RETRIES = 2  # transient failures of one plate: tried again after 1 s, then 2 s (with jitter)
RESULTS = Path(".plateflow") / "results"  # per-plate stored characterisations, under the corpus root


@dataclass
class PlateOutcome:
    """What became of one plate of a batch: small, so it travels back through Prefect (and Dask)."""

    folder: str
    status: str  # computed | cached | failed
    value: Any = None  # the step's result: metadata, crop boxes, smart-crop fields
    failed_step: str | None = None
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.status == "failed"


def _retrying(step: Callable[[], Any], what: str, logger) -> Any:
    """Call ``step()``; a transient error is retried ``RETRIES`` times with backoff and jitter."""
    for attempt in range(RETRIES + 1):
        try:
            return step()
        except Exception as exc:  # noqa: BLE001 - classified: only transient errors come back
            if attempt == RETRIES or not is_transient(exc):
                raise
            delay = 2 ** attempt * (1 + random.uniform(-0.5, 0.5))
            logger.warning("%s: %s; trying again in %.1f s", what, exc, delay)
            time.sleep(delay)


def isolated(folder: str, step: str, fn: Callable[[], Any], logger, status: str = "computed",
             on_error: Callable[[Exception], None] | None = None) -> PlateOutcome:
    """``fn()`` for one plate as an outcome: its value, or the error that failed it at ``step``
    (after ``on_error(exc)``, when given)."""
    try:
        return PlateOutcome(folder, status, value=_retrying(fn, f"{folder}: {step}", logger))
    except Exception as exc:  # noqa: BLE001 - one plate's failure, whatever it is, is that plate's alone
        if not isinstance(exc, (PlateError, OSError)):
            logger.exception("%s: unexpected error in %s", folder, step)
        if on_error is not None:
            on_error(exc)
        return PlateOutcome(folder, "failed", failed_step=step, error=f"{type(exc).__name__}: {exc}")


def characterize_plate(plate: PlateRef, sha256: str, params: CharacterizeParams, root: Path,
                       logger=None) -> PlateOutcome:
    """One plate: its stored result (or a characterisation of its source), then its files."""
    logger = logger or logging.getLogger(__name__)
    key = cache_key(sha256, params)
    results = Path(root) / RESULTS
    result = load_result(results, key, logger)
    status = "cached"
    if result is None:
        outcome = isolated(plate.folder, "characterize", lambda: characterize_image(plate.source_path, params),
                           logger, on_error=lambda exc: _record_bad_input(plate, root, key, exc, logger))
        if outcome.failed:
            return outcome
        result, status = outcome.value, "computed"
        store_result(results, result)

    def save() -> dict:
        save_characterization(plate, root, result)
        return result.metadata

    return isolated(plate.folder, "save", save, logger, status)


def _record_bad_input(plate: PlateRef, root: Path, key: str, exc: Exception, logger) -> None:
    """Deterministic bad input is kept as the key's result: the next refresh does not decode it again."""
    if not isinstance(exc, (ImageDecodeError, TooManyPixelsError)):
        return
    try:
        save_failure_record(plate, root, str(exc), key, f"{type(exc).__name__}: {exc}")
    except OSError as exc:  # a full disk, say: the table still records the failure
        logger.warning("%s: could not write its failure record: %s", plate.folder, exc)


def _summary(logger, what: str, outcomes: list[PlateOutcome]) -> list[PlateOutcome]:
    counts = {s: sum(o.status == s for o in outcomes) for s in ("computed", "cached", "failed")}
    logger.info("%s of %d plates: %d computed, %d cached, %d failed", what, len(outcomes), *counts.values())
    return outcomes


def run_characterize(items: list[tuple[PlateRef, str]], params: CharacterizeParams, root: Path,
                     logger=None) -> list[PlateOutcome]:
    """``characterize_plate`` for each (plate, sha256) of a batch, one outcome per plate."""
    return [characterize_plate(plate, sha, params, Path(root), logger) for plate, sha in items]


@task(name="characterize-batch", task_run_name="characterize-{name}", cache_policy=NO_CACHE)
def characterize_batch(items: list[tuple[PlateRef, str]], params: CharacterizeParams, root: str,
                       name: str = "0") -> list[PlateOutcome]:
    """A batch of plates through the CPU stage: metadata, histograms, preview, working copy."""
    logger = get_run_logger()
    return _summary(logger, "characterisation", run_characterize(items, params, Path(root), logger))


def run_candidates(items: list[tuple[PlateRef, tuple[int, int]]], params: CropParams,
                   logger=None) -> list[PlateOutcome]:
    """Each plate's crop candidates (crop_candidates.json) from its (width, height)."""
    logger = logger or logging.getLogger(__name__)
    return [isolated(p.folder, "candidates", lambda p=p, s=size: write_candidates(p.plate_dir, p.plate_id, s, params),
                     logger) for p, size in items]


@task(name="candidates-batch", task_run_name="candidates-{name}", cache_policy=NO_CACHE)
def candidates_batch(items: list[tuple[PlateRef, tuple[int, int]]], params: CropParams,
                     name: str = "0") -> list[PlateOutcome]:
    """A batch of plates' crop candidates."""
    return run_candidates(items, params, get_run_logger())


@dataclass(frozen=True)
class CropJob:
    """One plate's smart crop: its candidates, the stored vectors of each model, its source hash."""

    plate: PlateRef
    key: str  # the crop's cache key: source, crop parameters, models' embedding keys
    vector_files: dict[str, str]
    boxes: list[list[int]]
    original_size: tuple[int, int]
    sha256: str


def run_smart_crop(jobs: list[CropJob], run_id: str, crop_model: str, params: CropParams,
                   logger=None) -> list[PlateOutcome]:
    """Each plate's best crop and runs/<run_id>/ outputs (or an earlier run's, for the same key)."""
    logger = logger or logging.getLogger(__name__)
    return [isolated(j.plate.folder, "smart_crop", lambda j=j: smart_crop_plate(
        j.plate, run_id, j.key, j.vector_files, j.boxes, crop_model, params, j.original_size, j.sha256), logger)
        for j in jobs]


@task(name="smart-crop-batch", task_run_name="smart-crop-{name}", cache_policy=NO_CACHE)
def smart_crop_batch(jobs: list[CropJob], run_id: str, crop_model: str, params: CropParams,
                     name: str = "0") -> list[PlateOutcome]:
    """A batch of plates' smart crops."""
    logger = get_run_logger()
    return _summary(logger, "smart crop", run_smart_crop(jobs, run_id, crop_model, params, logger))
