"""The CPU stage in batches: one Prefect task carries many plates, each plate isolated inside.

A Prefect task run costs milliseconds of API work and a row in Prefect's database, so a task per
plate bounds a refresh of 10^5 plates. ``characterize_plate`` stays the unit of code: per plate
it takes the stored result for its cache key or characterises the source, then writes the
plate's files. ``run_batch`` runs it over a batch: a bad plate fails alone with its message, a
transient error (I/O) retries that plate alone, with backoff.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from plateflow.config import CharacterizeParams
from plateflow.corpus import PlateRef
from plateflow.errors import ImageDecodeError, PlateError, TooManyPixelsError, is_transient
from tasks.characterize import cache_key, characterize_image, load_result, store_result
from tasks.save import save_characterization, save_failure_record

RETRIES = 2  # transient failures of one plate: tried again after 1 s, then 2 s (with jitter)


@dataclass
class PlateOutcome:
    """What became of one plate of a batch: small, so it travels back through Prefect."""

    folder: str
    status: str  # computed | cached | failed
    metadata: dict | None = None
    failed_step: str | None = None
    error: str | None = None


def _retrying(step, what: str, logger):
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


def characterize_plate(plate: PlateRef, sha256: str, params: CharacterizeParams, root: Path,
                       results_dir: Path, logger=None) -> PlateOutcome:
    """One plate: its stored result (or a characterisation of its source), then its files."""
    logger = logger or logging.getLogger(__name__)
    step = "characterize"
    try:
        result = load_result(results_dir, cache_key(sha256, params), logger)
        status = "cached"
        if result is None:
            result = _retrying(lambda: characterize_image(plate.source_path, params),
                               f"{plate.folder}: characterisation", logger)
            store_result(results_dir, result)
            status = "computed"
        step = "save"
        _retrying(lambda: save_characterization(plate, root, result), f"{plate.folder}: saving", logger)
    except Exception as exc:  # noqa: BLE001 - one plate's failure, whatever it is, is that plate's alone
        if not isinstance(exc, (PlateError, OSError)):
            logger.exception("%s: unexpected error in %s", plate.folder, step)
        if isinstance(exc, (ImageDecodeError, TooManyPixelsError)):  # deterministic: kept as the key's result
            try:
                save_failure_record(plate, root, str(exc), cache_key(sha256, params), f"{type(exc).__name__}: {exc}")
            except OSError as write_error:  # a full disk, say: the table still records the failure
                logger.warning("%s: could not write its failure record: %s", plate.folder, write_error)
        return PlateOutcome(plate.folder, "failed", failed_step=step, error=f"{type(exc).__name__}: {exc}")
    return PlateOutcome(plate.folder, status, metadata=result.metadata)


def run_batch(items: list[tuple[PlateRef, str]], params: CharacterizeParams, root: Path,
              logger=None) -> list[PlateOutcome]:
    """``characterize_plate`` for each (plate, sha256) of a batch, one outcome per plate."""
    root = Path(root)
    results_dir = root / ".plateflow" / "results"
    return [characterize_plate(plate, sha, params, root, results_dir, logger) for plate, sha in items]


@task(name="characterize-batch", task_run_name="characterize-{name}", cache_policy=NO_CACHE)
def characterize_batch(items: list[tuple[PlateRef, str]], params: CharacterizeParams, root: str,
                       name: str = "0") -> list[PlateOutcome]:
    """A batch of plates through the CPU stage; see ``run_batch``."""
    outcomes = run_batch(items, params, Path(root), get_run_logger())
    failed = sum(o.status == "failed" for o in outcomes)
    get_run_logger().info("%d plates: %d computed, %d cached, %d failed", len(outcomes),
                          sum(o.status == "computed" for o in outcomes),
                          sum(o.status == "cached" for o in outcomes), failed)
    return outcomes
