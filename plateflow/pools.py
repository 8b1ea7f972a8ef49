"""The work pool: one pool (deployments/work-pools.toml), with one work queue per GPU class of
profiles/gpu_classes.toml made by one pattern, created idempotently.

Every deployment sits on the CPU class's queue, which the CPU worker polls; the GPU step's runs
are sent to the queue of their class (``work_queue_name``), which only that class's workers poll.
A worker is named ``plateflow-<queue>-<host>-<pid>`` so a refresh can count a class's online
workers."""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from plateflow.errors import ConfigError
from plateflow.profiles import load_profiles

POOLS_FILE = Path(__file__).resolve().parents[1] / "deployments" / "work-pools.toml"
EMBED_FLOW = "embed-plates"  # the GPU step's flow (flows/embed.py), one deployment
EMBED_DEPLOYMENT = f"{EMBED_FLOW}/{EMBED_FLOW}"
HOME_CLASS = "CPU"  # whose queue the deployments sit on


class QueueDef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    gpu_class: str
    description: str = ""
    worker_limit: int = Field(1, ge=1)


class PoolDef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "plates"
    type: str = "process"
    queues: dict[str, QueueDef]  # by GPU class

    def queue(self, gpu_class: str) -> QueueDef:
        if gpu_class not in self.queues:
            raise ConfigError(f"no work queue for GPU class {gpu_class}: profiles/gpu_classes.toml does not list "
                              f"it (classes: {', '.join(self.queues)})")
        return self.queues[gpu_class]

    @property
    def home(self) -> QueueDef:
        return self.queues[HOME_CLASS]


def class_slug(gpu_class: str) -> str:
    """H100_80GB -> h100-80gb."""
    return gpu_class.lower().replace("_", "-")


def worker_prefix(queue: QueueDef) -> str:
    """The start of the names of the workers that poll ``queue``."""
    return f"plateflow-{queue.name}-"


def worker_name(queue: QueueDef, pid: int) -> str:
    return f"{worker_prefix(queue)}{socket.gethostname()}-{pid}"


def work_pool(path: Path = POOLS_FILE) -> PoolDef:
    """The pool and the queue of every GPU class: the pattern, with the class's overrides."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read the work-pool definition {path}: {exc}") from None
    classes = load_profiles().classes
    overrides = data.get("classes", {})
    if unknown := sorted(set(overrides) - set(classes)):
        raise ConfigError(f"{path} overrides {', '.join(unknown)}, which profiles/gpu_classes.toml does not list")
    pattern = data.get("pattern", {})
    queues = {}
    for name, cls in classes.items():
        spec = {**pattern, "description": cls.description, **overrides.get(name, {})}
        spec["name"] = spec.get("name", "{slug}").format(slug=class_slug(name))
        try:
            queues[name] = QueueDef(gpu_class=name, **spec)
        except ValueError as exc:
            raise ConfigError(f"the work queue of {name} in {path}: {exc}") from None
    if len({q.name for q in queues.values()}) < len(queues):
        raise ConfigError(f"{path}: two GPU classes get one queue name; put {{slug}} in [pattern] name")
    try:
        return PoolDef(**data.get("pool", {}), queues=queues)
    except ValueError as exc:
        raise ConfigError(f"[pool] in {path}: {exc}") from None


def ensure_pools(path: Path = POOLS_FILE) -> list[tuple[str, str]]:
    """Create the pool and its queues, or update their descriptions to match; returns (what, action)."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    pool = work_pool(path)
    done = []
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool.name)
            done.append((f"work pool {pool.name}", "unchanged"))
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=pool.name, type=pool.type, description="plateflow: one queue per GPU class",
                base_job_template=ProcessWorker.get_default_base_job_template()))
            done.append((f"work pool {pool.name}", "created"))
        existing = {q.name: q for q in client.read_work_queues(work_pool_name=pool.name)}
        for queue in pool.queues.values():
            what = f"work queue {pool.name}/{queue.name}"
            if queue.name not in existing:
                client.create_work_queue(queue.name, description=queue.description, work_pool_name=pool.name)
                done.append((what, "created"))
            elif existing[queue.name].description != queue.description:
                client.update_work_queue(existing[queue.name].id, description=queue.description)
                done.append((what, "updated"))
            else:
                done.append((what, "unchanged"))
    return done
