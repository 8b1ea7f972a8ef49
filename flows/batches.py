"""One runner for every per-plate batch stage (refresh's characterization, candidates and smart
crop; make-tiles' cutting; patch-features): a stage is described once (``BatchStage``) and ``run_batches``
sends its plates to a task runner in batches, applies each plate's outcome, and handles a
batch whose outcome was lost or whose worker died, for every stage alike. ``hash_plates`` and
``plates_state`` are how the per-plate flows outside the refresh begin and end."""

from __future__ import annotations

import queue
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from prefect.exceptions import MissingResult
from prefect.futures import _register_prefect_done_callback  # what as_completed uses: threads and Dask alike
from prefect.states import Completed, Failed, State
from prefect.task_runners import TaskRunner

from plateflow.artifacts import plural
from plateflow.config import default_workers
from plateflow.corpus import PlateRef, discover_plates
from plateflow.hashindex import SourceIndex
from plateflow.status import Status
from plateflow.outcomes import PlateOutcome, batches


def _same(item: Any) -> Any:
    return item


def _free(_: Any) -> int:
    return 0


@dataclass
class BatchStage:
    """A stage's batches: its ``task`` (``task(items=[...], **args, name="2of8")``), the same
    work in this process (``work(items, **args, logger=...)``: a lost batch is run again here),
    what each record becomes as the task's item, how an outcome is applied to its record, and
    what a record costs (source bytes, for sizing batches). Records have a ``.plate``."""

    name: str  # in the logs and the progress bars: "characterization"
    failed_step: str  # plates.parquet's failed_step for a plate whose batch was lost
    task: Any
    work: Callable[..., list[PlateOutcome]]
    args: dict
    apply: Callable[[Any, PlateOutcome], None]
    item: Callable[[Any], Any] = _same
    cost: Callable[[Any], int] = _free
    items_arg: str = "items"  # the name of the task's (and the work's) first argument


@dataclass
class Batching:
    """How plates are grouped: at most ``plates`` and ``bytes`` of source a batch, and small
    enough that each of ``places`` parallel slots gets about four batches."""

    plates: int
    bytes: int
    places: int = 1
    on_batch: Callable[[int, int], None] = field(default=lambda plates, failed: None)  # progress


def run_batches(stage: BatchStage, records: list, runner: Callable[[], TaskRunner], batching: Batching,
                logger) -> None:
    """``stage`` over ``records`` in batches on ``runner()`` (called only when there is work, so
    a stage with nothing to do starts no cluster). A log line per batch."""
    if not records:
        return
    groups = batches(records, stage.cost, batching.plates, batching.bytes, batching.places)
    names = [f"{i + 1}of{len(groups)}" for i in range(len(groups))]  # the task runs' names end so
    submit = runner().submit
    futures = {submit(stage.task, {stage.items_arg: [stage.item(r) for r in group], **stage.args, "name": name}):
               (name, group) for name, group in zip(names, groups)}
    for done, future in enumerate(completed(list(futures)), start=1):
        name, group = futures.pop(future)  # a batch's outcomes are let go once applied
        outcomes = _outcomes(stage, future, group, logger)
        del future
        for record, outcome in zip(group, outcomes):
            stage.apply(record, outcome)
        failed = sum(o.failed for o in outcomes)
        # The list the task returned is also held by its transaction, which Prefect keeps until
        # the flow run ends: emptied, it lets its plates' outcomes go.
        outcomes.clear()
        logger.info("%s batch %s: %s, %d failed (%d of %d batches done)", stage.name, name,
                    plural(len(group), "plate"), failed, done, len(groups))
        batching.on_batch(len(group), failed)


def completed(futures: list) -> Iterator:
    """``futures`` as each completes, like Prefect's ``as_completed``, but keeping no reference
    to one it has handed out: a stage of 10^5 plates does not hold every batch's outcomes."""
    finished: queue.SimpleQueue = queue.SimpleQueue()
    count = len(futures)
    for future in futures:
        _register_prefect_done_callback(future, finished.put)
    futures.clear()
    for _ in range(count):
        yield finished.get()


def _outcomes(stage: BatchStage, future, group: list, logger) -> list[PlateOutcome]:
    """A batch's outcomes; a batch whose outcome was lost runs again here (the work is
    idempotent); a batch that died (a lost Dask worker, a crash) fails its plates with the
    reason, and the next run redoes them."""
    try:
        outcomes = future.result(raise_on_failure=False)
    except MissingResult:  # finished, but its outcome did not come back (a busy server)
        logger.warning("a %s batch's outcome was lost; running it again here", stage.name)
        return stage.work([stage.item(r) for r in group], **stage.args, logger=logger)
    except Exception as exc:  # noqa: BLE001 - e.g. distributed's KilledWorker: the batch is lost, not the run
        outcomes = exc
    if isinstance(outcomes, list):
        return outcomes
    reason = f"{type(outcomes).__name__}: {outcomes}" if isinstance(outcomes, BaseException) else future.state.message
    return [PlateOutcome(r.plate.folder, Status.FAILED, failed_step=stage.failed_step,
                         error=f"its {stage.name} batch was lost: {reason}") for r in group]


def plates_state(message: str, failed: dict[str, str], logger) -> State:
    """A per-plate flow's end: its message logged; Failed naming each failed plate and why, or Completed."""
    logger.info(message)
    if failed:
        return Failed(message=message + ": " + "; ".join(f"{k}: {v}" for k, v in sorted(failed.items())))
    return Completed(message=message)


def hash_plates(root: Path, logger) -> tuple[list[tuple[PlateRef, str]], dict[str, str]]:
    """Valid plates with their source's sha256, and the plates that failed (folder -> why)."""
    index = SourceIndex(root)
    found = discover_plates(root)
    failed = {p.folder: f"{type(p.error).__name__}: {p.error}" for p in found if not isinstance(p, PlateRef)}
    plates = [p for p in found if isinstance(p, PlateRef)]

    hashed = []
    for plate, value in zip(plates, index.hash_all([p.source_path for p in plates], default_workers())):
        if isinstance(value, OSError):
            failed[plate.folder] = f"{type(value).__name__}: {value}"
        else:
            hashed.append((plate, value))
    try:
        index.save()
    except OSError as exc:
        logger.warning("could not write the source index: %s", exc)
    return hashed, failed
