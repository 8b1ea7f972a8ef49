"""The train-head task: one head trained on cached features and recorded as an experiment
(plateflow/heads.py does the work)."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from plateflow.config import HeadConfig
from plateflow.heads import train_experiment


@task(name="train-head", task_run_name="train-{config.head}-lr{config.lr}", cache_policy=NO_CACHE)
def train_one(root: str, model: str, label: str, config: HeadConfig, labels: dict[str, str],
              features: str = "plates") -> dict:
    """One head trained and recorded as an experiment."""
    return train_experiment(Path(root), model, label, config, labels, get_run_logger(), features=features)
