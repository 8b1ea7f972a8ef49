"""The patch tokens' Prefect task: a batch of plates through plateflow/segment/patches.py."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from plateflow.outcomes import PlateOutcome, summary
from plateflow.profiles import ModelSpec
from plateflow.segment.patches import PatchJob, PatchParams, patches_of_plates


@task(name="patches-batch", task_run_name="patches-{name}", cache_policy=NO_CACHE)
def patches_batch(jobs: list[PatchJob], spec: ModelSpec, params: PatchParams, weights_root: str | None = None,
                  name: str = "0") -> list[PlateOutcome]:
    """A batch of plates cut into patches and encoded, the model loaded once."""
    logger = get_run_logger()
    return summary(logger, "patches", patches_of_plates(jobs, spec, params, weights_root=weights_root, logger=logger))
