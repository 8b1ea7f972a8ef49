"""Where the GPU step runs: in-process, or as runs of the embed-plates deployment of a GPU class.

With a Prefect server that has plateflow's work pools and embed-plates deployments (`plateflow
pools`, `prefect deploy --all`), refresh sends each model's plates as flow runs of
`embed-plates/embed-plates-<class>` to the pool of the requested class (or the best class that
has one), one run per online worker; the workers of that pool run them, one per GPU. With no
such server (Prefect's embedded default) the GPU step runs in-process. A run's plates and its
outcome travel as small JSON files in the corpus (which every worker reads and writes anyway),
so they need no shared Prefect result storage.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from itertools import accumulate
from pathlib import Path

from plateflow.config import Dispatch
from plateflow.errors import ConfigError
from plateflow.pools import EMBED_FLOW, embed_deployment_name, pool_definitions
from plateflow.profiles import Profiles, dispatch_policy



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
                      if pool else "work pool (profiles/gpu_classes.toml does not list the class)")
            raise ConfigError(
                f"GPU class {requested}: the server at {url} has no {wanted}. "
                f"Work pools there: {', '.join(sorted(pools)) or 'none'}; classes with a pool and a "
                f"deployment: {', '.join(sorted(routable)) or 'none'}. Create the pools with "
                f"`plateflow deploy`, or run the GPU step "
                f"in-process with --gpu-dispatch local.")
        cls = requested
    else:
        if not routable:
            raise ConfigError(f"no GPU class has a work pool and an {EMBED_FLOW} deployment on the server "
                              f"at {url} (work pools there: {', '.join(sorted(pools)) or 'none'})")
        cls = max(routable, key=lambda c: (profiles.gpu_class(c).peak_tflops or 0, profiles.gpu_class(c).vram_gb))
    pool = routable[cls]
    return GpuRoute(cls, pool.name, f"{EMBED_FLOW}/{embed_deployment_name(pool)}")


def split_runs(n: int, slots: int, chunk_size: int, max_run_plates: int | None = None) -> list[range]:
    """How ``n`` plates are split into runs for a pool with ``slots`` free places (online workers
    times their flow-run limit, less the runs running there): one run per place, more only where a run would pass
    ``max_run_plates`` (default: the dispatch policy's), and no run smaller than a chunk. Sizes
    differ by one plate at most."""
    if n <= 0:
        return []
    max_run_plates = max_run_plates or dispatch_policy().gpu.max_run_plates
    runs = min(max(1, slots, math.ceil(n / max_run_plates)), math.ceil(n / max(1, chunk_size)))
    bounds = list(accumulate((n // runs + (i < n % runs) for i in range(runs)), initial=0))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def run_on_pool(route: GpuRoute, model: str, jobs: list, chunk_size: int, weights_root: str | None,
                report_dir: Path, logger, poll_s: float | None = None,
                worker_wait_s: float | None = None, max_run_plates: int | None = None) -> dict[str, str | None]:
    """Send ``jobs`` as runs of the route's deployment, all at once, and gather every plate's
    outcome: None, or why it failed.

    The plates are split with ``split_runs``: a run per free place the pool's online workers
    have, not counting runs already running there (each run loads the model once and embeds its
    plates in embed-chunk tasks of ``chunk_size``).
    A run's plates travel as a JSON file beside its report in ``report_dir`` (in the corpus,
    which every worker reads anyway), not as flow-run parameters in the server's database.
    A completed run's files are removed once read (``report_dir`` too, when that empties it);
    a run that failed, crashed or was cancelled keeps its plates file, for a retry from the UI.

    A run that crashed (its worker was lost) is sent again, up to the dispatch policy's
    ``crash_retries`` times (profiles/dispatch.toml, as are the defaults of ``poll_s`` and
    ``max_run_plates``); it skips
    the plates whose vectors the lost run already stored. A run that failed fails its plates
    with the run's message. When the pool has had no online worker for ``worker_wait_s`` seconds
    (None: wait for ever), the runs no worker has taken yet are cancelled and their plates fail
    saying so; retry-failed-plates redoes them. Runs queued behind busy workers are not
    affected: only a pool with no worker is.
    """
    from prefect import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
                                                WorkPoolFilter, WorkPoolFilterName)
    from prefect.client.schemas.objects import StateType, WorkerStatus
    from prefect.deployments import run_deployment
    from prefect.states import Cancelled

    from plateflow.atomic import write_json

    policy = dispatch_policy().gpu
    poll_s = policy.poll_seconds if poll_s is None else poll_s
    report_dir.mkdir(parents=True, exist_ok=True)
    pool = pool_definitions().get(route.gpu_class)
    limit = pool.worker_limit if pool is not None else 1

    with get_client(sync_client=True) as client:
        def online() -> int:
            return sum(w.status == WorkerStatus.ONLINE for w in client.read_workers_for_work_pool(route.pool))

        workers = online()
        # Places taken by runs already running there (this refresh's own run, when it runs on
        # the same pool) are not free: runs sent for them would only queue, each a start more.
        running = client.count_flow_runs(
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[route.pool])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING]))))
        free = max(0, workers * limit - running)
        parts = [jobs[r.start:r.stop] for r in split_runs(len(jobs), free, chunk_size, max_run_plates)]
        logger.info("%s: %d plates in %d run(s) on %s (%d online worker(s), %d run(s) each, %d running)",
                    model, len(jobs), len(parts), route.pool, workers, limit, running)

        def submit(n: int, attempt: int):
            report = report_dir / f"{model}-{n}-{attempt}.json"
            jobs_file = report_dir / f"{model}-{n}-jobs.json"
            if attempt == 0:
                write_json(jobs_file, [asdict(j) for j in parts[n]])
            run = run_deployment(route.deployment, timeout=0, as_subflow=True, tags=["plateflow"],
                                 flow_run_name=f"embed-{model}-run-{n}" + (f"-retry-{attempt}" if attempt else ""),
                                 parameters={"model": model, "jobs_file": str(jobs_file),
                                             "gpu_class": route.gpu_class, "chunk_size": chunk_size,
                                             "weights_root": weights_root, "report": str(report)})
            logger.info("%s run %d/%d (%d plates): flow run %s on %s", model, n + 1, len(parts),
                        len(parts[n]), run.name, route.pool)
            return run.id, report

        outcome: dict[str, str | None] = {}
        no_worker_since = None if workers else time.monotonic()
        if no_worker_since is not None:
            logger.warning("work pool %s has no online worker: its runs wait until one starts "
                           "(`plateflow worker` on a %s machine)%s", route.pool, route.gpu_class,
                           f", at most {worker_wait_s:g} s" if worker_wait_s is not None else "")
        pending = {n: (*submit(n, 0), 0) for n in range(len(parts))}
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
                           f"nothing ran these plates; start one (`plateflow worker` on a {route.gpu_class} "
                           f"machine) or use gpu_dispatch=local, then retry the failed plates")
                    client.set_flow_run_state(run_id, Cancelled(message=why), force=True)
                    logger.error("%s run %d: %s", model, n + 1, why)
                    del pending[n]
                    for job in parts[n]:
                        outcome[job.plate_id] = why
                    continue
                if state is None or not state.is_final():
                    continue
                del pending[n]
                if state.is_completed() and report.is_file():
                    outcome.update(json.loads(report.read_text()))
                    # Done with: a failed or cancelled run keeps its files (its plates, for a
                    # retry from the UI, and what it reported).
                    for name in ["jobs", *range(attempt + 1)]:
                        (report_dir / f"{model}-{n}-{name}.json").unlink(missing_ok=True)
                elif state.is_crashed() and attempt < policy.crash_retries:
                    logger.warning("%s run %d: crashed (%s); sending it again", model, n + 1, state.message)
                    pending[n] = (*submit(n, attempt + 1), attempt + 1)
                else:
                    why = state.message or state.name
                    if state.is_completed():
                        why = f"the run completed but wrote no report at {report}"
                    for job in parts[n]:
                        outcome[job.plate_id] = f"{route.deployment} run ended {state.name}: {why}"
    with contextlib.suppress(OSError):  # only when empty: what a failed run left stays
        report_dir.rmdir()
    return outcome
