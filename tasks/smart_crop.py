"""The smart crop's Prefect task: a batch of plates through plateflow/smart_crop.py."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from plateflow.config import CropParams
from plateflow.outcomes import PlateOutcome, summary
from plateflow.smart_crop import CropJob, smart_crop_plates


@task(name="smart-crop-batch", task_run_name="smart-crop-{name}", cache_policy=NO_CACHE)
def smart_crop_batch(items: list[CropJob], run_id: str, crop_model: str, params: CropParams,
                     name: str = "0") -> list[PlateOutcome]:
    """A batch of plates' smart crops."""
    logger = get_run_logger()
    return summary(logger, "smart crop", smart_crop_plates(items, run_id, crop_model, params, logger))
