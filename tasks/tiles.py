"""The tiles' Prefect task: a batch of plates cut by plateflow/tiles.py."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from plateflow.outcomes import PlateOutcome, summary
from plateflow.tiles import TileJob, TileParams, tiles_of_plates


@task(name="tiles-batch", task_run_name="tiles-{name}", cache_policy=NO_CACHE)
def tiles_batch(jobs: list[TileJob], params: TileParams, store: str, name: str = "0") -> list[PlateOutcome]:
    """A batch of plates cut into tiles."""
    logger = get_run_logger()
    return summary(logger, "tiles", tiles_of_plates(jobs, params, Path(store), logger))
