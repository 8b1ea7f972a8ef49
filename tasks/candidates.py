"""The crop candidates' Prefect task: a batch of plates through plateflow/embed/candidates.py."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from plateflow.config import CropParams
from plateflow.corpus import PlateRef
from plateflow.embed.candidates import candidates_of_plates
from plateflow.outcomes import PlateOutcome


@task(name="candidates-batch", task_run_name="candidates-{name}", cache_policy=NO_CACHE)
def candidates_batch(items: list[tuple[PlateRef, tuple[int, int]]], params: CropParams,
                     name: str = "0") -> list[PlateOutcome]:
    """A batch of plates' crop candidates."""
    return candidates_of_plates(items, params, get_run_logger())
