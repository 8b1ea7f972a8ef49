"""The one runner every batch stage uses (flows/batches.py), with Prefect's thread runner."""

import logging
from dataclasses import dataclass

import pytest
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.batches import Batching, BatchStage, run_batches
from plateflow.outcomes import PlateOutcome


@dataclass
class Plate:
    folder: str


@dataclass
class Record:
    plate: Plate
    size: int


def work(items, scale, logger=None):
    return [PlateOutcome(name, "computed", value=size * scale) if size >= 0 else
            PlateOutcome(name, "failed", failed_step="double", error="negative size") for name, size in items]


@task(cache_policy=NO_CACHE, task_run_name="double-{name}")
def double_batch(items, scale, name="0"):
    if any(size == 13 for _, size in items):
        raise RuntimeError("the worker died")  # the whole batch is lost, not one plate
    return work(items, scale)


@pytest.mark.usefixtures("prefect_harness")
def test_every_plate_gets_its_outcome_and_a_lost_batch_fails_only_its_plates():
    records = [Record(Plate(f"plate-{i:03d}"), size) for i, size in enumerate([1, 2, -1, 4, 13, 6, 7, 8])]
    applied, seen = {}, []

    @flow
    def run():
        stage = BatchStage("doubling", "double", double_batch, work, {"scale": 2},
                           lambda r, o: applied.__setitem__(r.plate.folder, o),
                           item=lambda r: (r.plate.folder, r.size), cost=lambda r: abs(r.size))
        with ThreadPoolTaskRunner(max_workers=2) as runner:
            run_batches(stage, records, lambda: runner, Batching(2, 10**9, 1, lambda n, f: seen.append((n, f))),
                        logging.getLogger("test"))

    run()
    assert sorted(applied) == [r.plate.folder for r in records]
    assert applied["plate-000"].value == 2 and applied["plate-007"].value == 16
    assert applied["plate-002"].error == "negative size"  # one plate's failure is its own
    lost = [f for f, o in applied.items() if o.error and "batch was lost" in o.error]
    assert lost == ["plate-004", "plate-005"]  # the dead batch's two plates, with the reason
    assert "RuntimeError: the worker died" in applied["plate-004"].error
    assert applied["plate-004"].failed_step == "double"
    assert sorted(seen) == [(2, 0), (2, 0), (2, 1), (2, 2)]  # progress per batch: plates, failed


def test_nothing_to_do_starts_no_runner():
    def runner():
        raise AssertionError("a runner was started for no plates")

    run_batches(BatchStage("x", "x", None, work, {}, None), [], runner, Batching(1, 1), None)


@pytest.mark.usefixtures("prefect_harness")
def test_a_batchs_outcomes_are_let_go_once_applied():
    """A stage of 10^5 plates must not hold every batch's outcomes until its last batch ends:
    when a batch is applied, the outcomes of the batches applied before it are gone."""
    import gc
    import weakref

    records = [Record(Plate(f"plate-{i:03d}"), i) for i in range(12)]
    applied: list[weakref.ref] = []
    alive_before: list[int] = []

    def apply(record, outcome):  # a batch is one plate here
        gc.collect()
        alive_before.append(sum(ref() is not None for ref in applied))
        applied.append(weakref.ref(outcome))

    @flow
    def run():
        stage = BatchStage("doubling", "double", double_batch, work, {"scale": 2}, apply,
                           item=lambda r: (r.plate.folder, r.size))
        with ThreadPoolTaskRunner(max_workers=2) as runner:
            run_batches(stage, records, lambda: runner, Batching(1, 10**9, 1), logging.getLogger("test"))

    run()
    assert len(applied) == 12 and len(alive_before) == 12 and alive_before == [0] * 12
