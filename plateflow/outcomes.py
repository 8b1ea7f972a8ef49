"""Plates in batches: one Prefect task carries many plates, each plate isolated inside.

A Prefect task run costs milliseconds of API work and a row in Prefect's database, so a task per
plate bounds a refresh of 10^5 plates. The per-plate functions stay the unit of code
(``characterize_plate``, ``write_candidates``, ``smart_crop_plate``); ``isolated`` runs one of
them for one plate: a bad plate fails alone with its message, a transient error (I/O) retries
that plate alone, with backoff. The tasks are NO_CACHE: the per-plate caches keyed on input
hashes (stored results, outputs in place) decide what is done again, not Prefect's.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

from plateflow.artifacts import plural
from plateflow.errors import PlateError, is_transient
from plateflow.status import Status

RETRIES = 2  # transient failures of one plate: tried again after 1 s, then 2 s (with jitter)


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
        return self.status == Status.FAILED


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


def isolated(folder: str, step: str, fn: Callable[[], Any], logger, status: str = Status.COMPUTED,
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
        return PlateOutcome(folder, Status.FAILED, failed_step=step, error=f"{type(exc).__name__}: {exc}")


def summary(logger, what: str, outcomes: list[PlateOutcome]) -> list[PlateOutcome]:
    counts = {s: sum(o.status == s for o in outcomes) for s in (Status.COMPUTED, Status.CACHED, Status.FAILED)}
    logger.info("%s: %s: %d computed, %d cached, %d failed", what, plural(len(outcomes), "plate"), *counts.values())
    return outcomes


def file_size(path) -> int:
    """A plate's cost in a batch: its source's bytes (0 if it cannot be read: it fails in its batch)."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def batches(items: list, cost: Callable[[Any], int], max_plates: int, max_cost: int,
            places: int = 1) -> list[list]:
    """Consecutive items grouped by expected work (``cost``: source bytes), at most ``max_plates``
    and ``max_cost`` each; with ``places`` > 1 workers, small enough that each gets about four
    batches: a few large plates must not share one batch while the other workers idle."""
    per_batch = max_plates if places <= 1 else max(1, min(max_plates, -(-len(items) // (4 * places))))
    out: list[list] = []
    size = 0
    for item in items:
        c = cost(item)
        if not out or len(out[-1]) >= per_batch or size + c > max_cost:
            out.append([])
            size = 0
        out[-1].append(item)
        size += c
    return out
