"""Work pools per GPU class, from deployments/work-pools.toml, created idempotently."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from plateflow.errors import ConfigError

POOLS_FILE = Path(__file__).resolve().parents[1] / "deployments" / "work-pools.toml"


class PoolDef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    gpu_class: str
    description: str = ""
    type: str = "process"
    worker_limit: int = Field(1, ge=1)


def pool_definitions(path: Path = POOLS_FILE) -> dict[str, PoolDef]:
    """Pool definitions by GPU class."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read work-pool definitions {path}: {exc}") from None
    pools = [PoolDef(name=name, **spec) for name, spec in data.get("pools", {}).items()]
    return {p.gpu_class: p for p in pools}


def pool_for_class(gpu_class: str, path: Path = POOLS_FILE) -> PoolDef:
    pools = pool_definitions(path)
    if gpu_class not in pools:
        raise ConfigError(f"no work pool is defined for GPU class {gpu_class} in {path}")
    return pools[gpu_class]


def ensure_pools(path: Path = POOLS_FILE) -> list[tuple[str, str]]:
    """Create each defined pool, or update its description to match; returns (name, action)."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    done = []
    with get_client(sync_client=True) as client:
        for pool in pool_definitions(path).values():
            try:
                existing = client.read_work_pool(pool.name)
            except ObjectNotFound:
                client.create_work_pool(WorkPoolCreate(
                    name=pool.name, type=pool.type, description=pool.description,
                    base_job_template=ProcessWorker.get_default_base_job_template()))
                done.append((pool.name, "created"))
                continue
            if existing.description != pool.description:
                client.update_work_pool(pool.name, WorkPoolUpdate(description=pool.description))
                done.append((pool.name, "updated"))
            else:
                done.append((pool.name, "unchanged"))
    return done
