"""The fine-tuning micro-job's Prefect task (plateflow/finetune.py:run_job)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from plateflow.finetune import FinetuneRun, run_job
from plateflow.profiles import ModelSpec


@task(name="finetune-job", task_run_name="finetune-job-{job}", cache_policy=NO_CACHE)
def finetune_job(run: FinetuneRun, job: int, spec: ModelSpec, device: str = "cpu",
                 weights_root: str | None = None) -> dict:
    """One micro-job of a fine-tuning run: its steps from the state the previous job saved."""
    return run_job(run, job, spec, device, Path(weights_root) if weights_root else None, get_run_logger())
