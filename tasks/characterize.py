"""The characterization's Prefect task: a batch of plates through plateflow/characterize."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from plateflow.characterize.step import characterize_plates
from plateflow.config import CharacterizeParams
from plateflow.corpus import PlateRef
from plateflow.outcomes import PlateOutcome, summary


@task(name="characterize-batch", task_run_name="characterize-{name}", cache_policy=NO_CACHE)
def characterize_batch(items: list[tuple[PlateRef, str]], params: CharacterizeParams, root: str,
                       name: str = "0") -> list[PlateOutcome]:
    """A batch of plates through the CPU stage: metadata, histograms, preview, working copy."""
    logger = get_run_logger()
    return summary(logger, "characterization", characterize_plates(items, params, Path(root), logger))
