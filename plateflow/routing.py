"""Where the GPU step runs: in-process, or as runs of the embed-plates deployment of a GPU class.

With a Prefect server that has plateflow's work pools and embed-plates deployments (`plateflow
pools`, `prefect deploy --all`), refresh sends each model's plates, in chunks, as flow runs of
`embed-plates/embed-plates-<class>` to the pool of the requested class (or the best class that
has one); the workers of that pool run them, one per GPU. With no such server (Prefect's
embedded default) the GPU step runs in-process. Chunks report back through a small JSON file in
the corpus (which every worker reads and writes anyway), so results need no shared Prefect
result storage.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from plateflow.errors import ConfigError
from plateflow.pools import PoolDef, pool_definitions
from plateflow.profiles import Profiles

EMBED_FLOW = "embed-plates"
Dispatch = Literal["auto", "local", "pool"]
CRASH_RETRIES = 2  # a chunk whose run crashed (a lost worker) is sent again this many times


def embed_deployment_name(pool: PoolDef) -> str:
    """embed-plates-<slug>: plates-gpu-h100-80gb -> embed-plates-h100-80gb, plates-cpu -> embed-plates-cpu."""
    return f"{EMBED_FLOW}-{pool.name.removeprefix('plates-gpu-').removeprefix('plates-')}"


@dataclass(frozen=True)
class GpuRoute:
    gpu_class: str
    pool: str | None = None        # None: in-process
    deployment: str | None = None  # "embed-plates/embed-plates-<slug>"

    @property
    def local(self) -> bool:
        return self.deployment is None

    def describe(self) -> str:
        return (f"in-process ({self.gpu_class})" if self.local
                else f"{self.deployment} on work pool {self.pool} ({self.gpu_class})")


def _server_inventory() -> tuple[str, set[str], set[str]]:
    """(API URL, work pool names, embed-plates deployment names) of the configured server."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL

    with get_client(sync_client=True) as client:
        pools = {p.name for p in client.read_work_pools()}
        deployments = {d.name for d in client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[EMBED_FLOW])))}
    return PREFECT_API_URL.value() or "Prefect's embedded server", pools, deployments


def choose_route(requested: str | None, dispatch: Dispatch, profiles: Profiles, detected: str) -> GpuRoute:
    """Decide where the GPU step runs, before any work starts.

    local: in-process, on the requested (else detected) class. pool: a deployment run on the
    requested class's pool, or on the best class that has a pool and a deployment; a class with
    neither is an error naming the pools that exist. auto: pool when the server has any
    embed-plates deployment, else local (Prefect's embedded default needs no setup).
    """
    if dispatch == "local":
        return GpuRoute(requested or detected)
    url, pools, deployments = _server_inventory()
    if dispatch == "auto" and not deployments:
        return GpuRoute(requested or detected)
    defined = pool_definitions()
    routable = {cls: p for cls, p in defined.items()
                if p.name in pools and embed_deployment_name(p) in deployments}
    if requested is not None:
        if requested not in routable:
            pool = defined.get(requested)
            wanted = (f"work pool {pool.name} with the {EMBED_FLOW}/{embed_deployment_name(pool)} deployment"
                      if pool else "work pool (none is defined for it in deployments/work-pools.toml)")
            raise ConfigError(
                f"GPU class {requested}: the server at {url} has no {wanted}. "
                f"Work pools there: {', '.join(sorted(pools)) or 'none'}; classes with a pool and a "
                f"deployment: {', '.join(sorted(routable)) or 'none'}. Create the pools with "
                f"`plateflow pools`, deploy with `prefect deploy --all`, or run the GPU step "
                f"in-process with --gpu-dispatch local.")
        cls = requested
    else:
        if not routable:
            raise ConfigError(f"no GPU class has a work pool and an {EMBED_FLOW} deployment on the server "
                              f"at {url} (work pools there: {', '.join(sorted(pools)) or 'none'})")
        cls = max(routable, key=lambda c: (profiles.gpu_class(c).peak_tflops or 0, profiles.gpu_class(c).vram_gb))
    pool = routable[cls]
    return GpuRoute(cls, pool.name, f"{EMBED_FLOW}/{embed_deployment_name(pool)}")


def run_on_pool(route: GpuRoute, model: str, jobs: list, chunk_size: int, weights_root: str | None,
                report_dir: Path, logger, poll_s: float = 2.0,
                worker_wait_s: float | None = None) -> dict[str, str | None]:
    """Send ``jobs`` in chunks as runs of the route's deployment, all at once (the pool's workers
    take them one per GPU), and gather every plate's outcome: None, or why it failed.

    A chunk whose run crashed (its worker was lost) is sent again, up to CRASH_RETRIES times;
    a run that failed fails its chunk's plates with the run's message. When the pool has had no
    online worker for ``worker_wait_s`` seconds (None: wait for ever), the runs no worker has
    taken yet are cancelled and their plates fail saying so; retry-failed-plates redoes them.
    Chunks queued behind busy workers are not affected: only a pool with no worker is.
    """
    from prefect import get_client
    from prefect.client.schemas.objects import WorkerStatus
    from prefect.deployments import run_deployment
    from prefect.states import Cancelled

    report_dir.mkdir(parents=True, exist_ok=True)
    chunks = [jobs[i:i + chunk_size] for i in range(0, len(jobs), chunk_size)]

    def submit(n: int, attempt: int):
        report = report_dir / f"{model}-{n}-{attempt}.json"
        run = run_deployment(route.deployment, timeout=0, as_subflow=True, tags=["plateflow"],
                             flow_run_name=f"embed-{model}-chunk-{n}" + (f"-retry-{attempt}" if attempt else ""),
                             parameters={"model": model, "jobs": [asdict(j) for j in chunks[n]],
                                         "gpu_class": route.gpu_class, "weights_root": weights_root,
                                         "report": str(report)})
        logger.info("%s chunk %d/%d (%d plates): flow run %s on %s", model, n + 1, len(chunks),
                    len(chunks[n]), run.name, route.pool)
        return run.id, report

    outcome: dict[str, str | None] = {}
    with get_client(sync_client=True) as client:
        def online() -> bool:
            return any(w.status == WorkerStatus.ONLINE for w in client.read_workers_for_work_pool(route.pool))

        no_worker_since = None if online() else time.monotonic()
        if no_worker_since is not None:
            logger.warning("work pool %s has no online worker: its runs wait until one starts "
                           "(`plateflow worker` on a %s machine)%s", route.pool, route.gpu_class,
                           f", at most {worker_wait_s:g} s" if worker_wait_s is not None else "")
        pending = {n: (*submit(n, 0), 0) for n in range(len(chunks))}
        while pending:
            time.sleep(poll_s)
            if online():
                no_worker_since = None
            elif no_worker_since is None:
                no_worker_since = time.monotonic()
            gave_up = (worker_wait_s is not None and no_worker_since is not None
                       and time.monotonic() - no_worker_since >= worker_wait_s)
            for n, (run_id, report, attempt) in list(pending.items()):
                state = client.read_flow_run(run_id).state
                if gave_up and state is not None and state.is_scheduled():
                    why = (f"no worker of work pool {route.pool} was online for {worker_wait_s:g} s, so "
                           f"nothing ran this chunk; start one (`plateflow worker` on a {route.gpu_class} "
                           f"machine) or use gpu_dispatch=local, then retry the failed plates")
                    client.set_flow_run_state(run_id, Cancelled(message=why), force=True)
                    logger.error("%s chunk %d: %s", model, n + 1, why)
                    del pending[n]
                    for job in chunks[n]:
                        outcome[job.plate_id] = why
                    continue
                if state is None or not state.is_final():
                    continue
                del pending[n]
                if state.is_completed() and report.is_file():
                    outcome.update(json.loads(report.read_text()))
                elif state.is_crashed() and attempt < CRASH_RETRIES:
                    logger.warning("%s chunk %d: run crashed (%s); sending it again", model, n + 1, state.message)
                    pending[n] = (*submit(n, attempt + 1), attempt + 1)
                else:
                    why = state.message or state.name
                    if state.is_completed():
                        why = f"the run completed but wrote no report at {report}"
                    for job in chunks[n]:
                        outcome[job.plate_id] = f"{route.deployment} run ended {state.name}: {why}"
    return outcome
