"""Work pools: one per GPU class of profiles/gpu_classes.toml, made by the pattern in
deployments/work-pools.toml, created idempotently."""

from __future__ import annotations

import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from plateflow.errors import ConfigError
from plateflow.profiles import load_profiles

POOLS_FILE = Path(__file__).resolve().parents[1] / "deployments" / "work-pools.toml"
EMBED_FLOW = "embed-plates"  # the GPU step's flow (flows/embed.py), deployed once per pool


class PoolDef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    gpu_class: str
    description: str = ""
    type: str = "process"
    worker_limit: int = Field(1, ge=1)


def class_slug(gpu_class: str) -> str:
    """H100_80GB -> h100-80gb."""
    return gpu_class.lower().replace("_", "-")


def embed_deployment_name(pool: PoolDef) -> str:
    """The pool's embed-plates deployment: embed-plates-h100-80gb, embed-plates-cpu."""
    return f"{EMBED_FLOW}-{class_slug(pool.gpu_class)}"


def pool_definitions(path: Path = POOLS_FILE) -> dict[str, PoolDef]:
    """The pool of every GPU class, by class: the pattern, with the class's overrides."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read work-pool definitions {path}: {exc}") from None
    classes = load_profiles().classes
    overrides = data.get("classes", {})
    if unknown := sorted(set(overrides) - set(classes)):
        raise ConfigError(f"{path} overrides {', '.join(unknown)}, which profiles/gpu_classes.toml does not list")
    pattern = data.get("pattern", {})
    pools = {}
    for name, cls in classes.items():
        spec = {**pattern, "description": cls.description, **overrides.get(name, {})}
        spec["name"] = spec.get("name", "plates-gpu-{slug}").format(slug=class_slug(name))
        try:
            pools[name] = PoolDef(gpu_class=name, **spec)
        except ValueError as exc:
            raise ConfigError(f"the work pool of {name} in {path}: {exc}") from None
    return pools


def pool_for_class(gpu_class: str, path: Path = POOLS_FILE) -> PoolDef:
    pools = pool_definitions(path)
    if gpu_class not in pools:
        raise ConfigError(f"no work pool for GPU class {gpu_class}: profiles/gpu_classes.toml does not list it")
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
