"""Where the GPU step runs: in-process, or as runs of the embed-plates deployment sent to the
work queue of a GPU class.

With a Prefect server that has plateflow's work pool and the embed-plates deployment (`plateflow
deploy`), refresh sends each model's plates as flow runs of `embed-plates/embed-plates` to the
queue of the requested class (or of the best class with an online worker), one run per online
worker; the workers polling that queue run them, one per GPU. A queue no worker polls gets no
run: ``auto`` then runs the GPU step in-process and says so, a requested class is an error that
names the command starting a worker. With no such server (Prefect's embedded default) the GPU
step runs in-process. A run's plates and its outcome travel as small JSON files in the corpus
(which every worker reads and writes anyway), so they need no shared Prefect result storage.
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
from plateflow.pools import EMBED_DEPLOYMENT, QueueDef, work_pool, worker_prefix
from plateflow.profiles import Profiles, dispatch_policy


@dataclass(frozen=True)
class GpuRoute:
    gpu_class: str
    pool: str | None = None        # None: in-process
    queue: str | None = None       # the class's work queue in ``pool``
    deployment: str | None = None  # "embed-plates/embed-plates"
    why: str = ""                  # why in-process, when a server could have taken it

    @property
    def local(self) -> bool:
        return self.deployment is None

    def describe(self) -> str:
        if self.local:
            return f"in-process ({self.gpu_class})" + (f": {self.why}" if self.why else "")
        return f"{self.deployment} runs on work queue {self.pool}/{self.queue} ({self.gpu_class})"


def online_workers(client, pool: str, queue: QueueDef) -> int:
    """Workers online on ``pool`` that poll ``queue`` (named by ``plateflow worker``); 1 when
    only a worker of another name polls it (the queue is Ready), else 0."""
    from prefect.client.schemas.objects import WorkerStatus, WorkQueueStatus
    from prefect.exceptions import ObjectNotFound

    prefix = worker_prefix(queue)
    named = sum(w.status == WorkerStatus.ONLINE and w.name.startswith(prefix)
                for w in client.read_workers_for_work_pool(pool))
    if named:
        return named
    try:
        return int(client.read_work_queue_by_name(queue.name, work_pool_name=pool).status == WorkQueueStatus.READY)
    except ObjectNotFound:
        return 0


def _server_inventory() -> tuple[str, bool, dict[str, int]]:
    """(API URL, whether the embed-plates deployment is there, online workers by GPU class)."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    pool = work_pool()
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(EMBED_DEPLOYMENT)
        except ObjectNotFound:
            return PREFECT_API_URL.value() or "Prefect's embedded server", False, {}
        try:
            client.read_work_pool(pool.name)
        except ObjectNotFound:
            return PREFECT_API_URL.value(), True, {}
        online = {cls: online_workers(client, pool.name, q) for cls, q in pool.queues.items()}
    return PREFECT_API_URL.value(), True, {cls: n for cls, n in online.items() if n}


def choose_route(requested: str | None, dispatch: Dispatch, profiles: Profiles, detected: str) -> GpuRoute:
    """Decide where the GPU step runs, before any work starts.

    local: in-process, on the requested (else detected) class. Otherwise only a class whose
    work queue has an online worker gets runs: the requested class, or else the best class
    with one. A requested class without a worker is an error naming its queue and the command
    that starts one; with no class online, auto runs in-process (``why`` says so) and pool is
    an error. auto with no embed-plates deployment on the server runs in-process.
    """
    if dispatch == "local":
        return GpuRoute(requested or detected)
    url, deployed, online = _server_inventory()
    if not deployed:
        if dispatch == "auto":
            return GpuRoute(requested or detected)
        raise ConfigError(f"the server at {url} has no {EMBED_DEPLOYMENT} deployment: create it with "
                          f"`plateflow deploy`, or run the GPU step in-process with --gpu-dispatch local")
    pool = work_pool()
    if requested is not None:
        if requested not in online:
            queue = pool.queue(requested)
            raise ConfigError(
                f"GPU class {requested}: no worker is online on work queue {pool.name}/{queue.name} at {url}; "
                f"start one on a {requested} machine with `plateflow worker` (PLATEFLOW_GPU_CLASS={requested} "
                f"to name the class), or run the GPU step here with --gpu-dispatch local. Classes with an "
                f"online worker: {', '.join(sorted(online)) or 'none'}")
        cls = requested
    elif not online:
        if dispatch == "pool":
            raise ConfigError(f"no worker is online on any work queue of pool {pool.name} at {url}: start one "
                              f"with `plateflow worker`, or use --gpu-dispatch local")
        return GpuRoute(detected, why=f"no worker is online on work pool {pool.name} at {url}")
    else:
        cls = max(online, key=lambda c: (profiles.gpu_class(c).peak_tflops or 0, profiles.gpu_class(c).vram_gb))
    return GpuRoute(cls, pool.name, pool.queue(cls).name, EMBED_DEPLOYMENT)


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
                worker_wait_s: float | None = None, max_run_plates: int | None = None,
                root: Path | None = None) -> dict[str, str | None]:
    """Send ``jobs`` as runs of the route's deployment to its class's work queue, all at once,
    and gather every plate's outcome: None, or why it failed.

    The plates are split with ``split_runs``: a run per free place the queue's online workers
    have, not counting runs already running there (each run loads the model once and embeds its
    plates in embed-chunk tasks of ``chunk_size``).
    A run's plates travel as a JSON file beside its report in ``report_dir`` (in the corpus,
    which every worker reads anyway), not as flow-run parameters in the server's database.
    A completed run's files are removed once read (``report_dir`` too, when that empties it);
    a run that failed, crashed or was cancelled keeps its plates file, for a retry from the UI.

    A run that crashed (its worker was lost) is sent again, up to the dispatch policy's
    ``crash_retries`` times (profiles/dispatch.toml, as are the defaults of ``poll_s`` and
    ``max_run_plates``); it skips the plates whose vectors the lost run already stored. A run
    that failed fails its plates with the run's message. When the queue has had no online
    worker for ``worker_wait_s`` seconds (None: wait for ever), the runs no worker has taken yet
    are cancelled and their plates fail saying so; retry-failed-plates redoes them. If this
    refresh stops (Ctrl-C, an error), the runs it sent that have not finished are cancelled.
    ``root``: the corpus, where the workers find a model of the corpus's own.
    """
    from prefect import get_client

    report_dir.mkdir(parents=True, exist_ok=True)
    with get_client(sync_client=True) as client:
        runs = PoolRuns(client, route, model, chunk_size, weights_root, report_dir, logger, worker_wait_s, root)
        try:
            runs.send(jobs, max_run_plates)
            runs.wait(dispatch_policy().gpu.poll_seconds if poll_s is None else poll_s)
        except BaseException:  # Ctrl-C, a lost server: no run of ours is left waiting for a worker
            runs.cancel_pending()
            raise
    with contextlib.suppress(OSError):  # only when empty: what a failed run left stays
        report_dir.rmdir()
    return runs.outcome


class PoolRuns:
    """One model's runs on a work queue (``run_on_pool``): sent, watched, resent, collected."""

    def __init__(self, client, route: GpuRoute, model: str, chunk_size: int, weights_root: str | None,
                 report_dir: Path, logger, worker_wait_s: float | None, root: Path | None = None):
        self.client, self.route, self.model, self.logger = client, route, model, logger
        self.chunk_size, self.weights_root, self.report_dir = chunk_size, weights_root, report_dir
        self.worker_wait_s, self.root = worker_wait_s, root
        self.queue = work_pool().queue(route.gpu_class)
        self.where = f"{route.pool}/{route.queue}"
        self.parts: list[list] = []
        self.pending: dict[int, tuple] = {}  # run n -> (flow run id, report path, attempt)
        self.outcome: dict[str, str | None] = {}
        self.no_worker_since: float | None = None

    def send(self, jobs: list, max_run_plates: int | None) -> None:
        """Split the plates over the queue's free places and send a run for each part."""
        from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
                                                    FlowRunFilterWorkQueueName, WorkPoolFilter, WorkPoolFilterName)
        from prefect.client.schemas.objects import StateType

        workers = online_workers(self.client, self.route.pool, self.queue)
        # Places taken by runs already running there (this refresh's own run, when it runs on
        # the same queue) are not free: runs sent for them would only queue, each a start more.
        running = self.client.count_flow_runs(
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[self.route.pool])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])),
                                          work_queue_name=FlowRunFilterWorkQueueName(any_=[self.route.queue])))
        free = max(0, workers * self.queue.worker_limit - running)
        self.parts = [jobs[r.start:r.stop] for r in split_runs(len(jobs), free, self.chunk_size, max_run_plates)]
        self.logger.info("%s: %d plate(s) in %d run(s) on %s (%d online worker(s), %d run(s) each, %d running)",
                         self.model, len(jobs), len(self.parts), self.where, workers, self.queue.worker_limit, running)
        if not workers:
            self.no_worker_since = time.monotonic()
            self.logger.warning("work queue %s has no online worker: its runs wait until one starts "
                                "(`plateflow worker` on a %s machine)%s", self.where, self.route.gpu_class,
                                f", at most {self.worker_wait_s:g} s" if self.worker_wait_s is not None else "")
        for n in range(len(self.parts)):
            self.pending[n] = (*self._submit(n, 0), 0)

    def _submit(self, n: int, attempt: int) -> tuple:
        from prefect.deployments import run_deployment

        from plateflow.atomic import write_json

        report = self.report_dir / f"{self.model}-{n}-{attempt}.json"
        jobs_file = self.report_dir / f"{self.model}-{n}-jobs.json"
        if attempt == 0:
            write_json(jobs_file, [asdict(j) for j in self.parts[n]])
        run = run_deployment(self.route.deployment, timeout=0, as_subflow=True, tags=["plateflow"],
                             work_queue_name=self.route.queue,
                             flow_run_name=f"embed-{self.model}-run-{n}" + (f"-retry-{attempt}" if attempt else ""),
                             parameters={"model": self.model, "jobs_file": str(jobs_file),
                                         "gpu_class": self.route.gpu_class, "chunk_size": self.chunk_size,
                                         "weights_root": self.weights_root, "report": str(report),
                                         **({"root": str(self.root)} if self.root else {})})
        self.logger.info("%s run %d/%d (%d plate(s)): flow run %s on %s", self.model, n + 1, len(self.parts),
                         len(self.parts[n]), run.name, self.where)
        return run.id, report

    def wait(self, poll_s: float) -> None:
        """Watch the runs until each has ended (or was given up): every ``poll_s`` seconds."""
        while self.pending:
            time.sleep(poll_s)
            gave_up = self._no_worker_for_too_long()
            for n, (run_id, report, attempt) in list(self.pending.items()):
                state = self.client.read_flow_run(run_id).state
                if gave_up and state is not None and state.is_scheduled():
                    self._give_up(n, run_id)
                elif state is not None and state.is_final():
                    del self.pending[n]
                    self._ended(n, state, report, attempt)

    def _no_worker_for_too_long(self) -> bool:
        if online_workers(self.client, self.route.pool, self.queue):
            self.no_worker_since = None
        elif self.no_worker_since is None:
            self.no_worker_since = time.monotonic()
        return (self.worker_wait_s is not None and self.no_worker_since is not None
                and time.monotonic() - self.no_worker_since >= self.worker_wait_s)

    def _give_up(self, n: int, run_id) -> None:
        """A run no worker took in time: cancelled, its plates failed saying why."""
        from prefect.states import Cancelled

        why = (f"no worker polled work queue {self.where} for {self.worker_wait_s:g} s, so nothing "
               f"ran these plates; start one (`plateflow worker` on a {self.route.gpu_class} "
               f"machine) or use gpu_dispatch=local, then retry the failed plates")
        self.client.set_flow_run_state(run_id, Cancelled(message=why), force=True)
        self.logger.error("%s run %d: %s", self.model, n + 1, why)
        del self.pending[n]
        for job in self.parts[n]:
            self.outcome[job.name] = why

    def _ended(self, n: int, state, report: Path, attempt: int) -> None:
        """A run's end: its report read, or sent again after a crash, or its plates failed."""
        if state.is_completed() and report.is_file():
            self.outcome.update(json.loads(report.read_text()))
            # Done with: a failed or cancelled run keeps its files (its plates, for a retry from
            # the UI, and what it reported).
            for name in ["jobs", *range(attempt + 1)]:
                (self.report_dir / f"{self.model}-{n}-{name}.json").unlink(missing_ok=True)
        elif state.is_crashed() and attempt < dispatch_policy().gpu.crash_retries:
            self.logger.warning("%s run %d: crashed (%s); sending it again", self.model, n + 1, state.message)
            self.pending[n] = (*self._submit(n, attempt + 1), attempt + 1)
        else:
            why = state.message or state.name
            if state.is_completed():
                why = f"the run completed but wrote no report at {report}"
            for job in self.parts[n]:
                self.outcome[job.name] = f"{self.route.deployment} run ended {state.name}: {why}"

    def cancel_pending(self) -> None:
        """Cancel the runs not yet ended; a run a worker has taken is stopped by that worker."""
        from prefect.states import Cancelled, Cancelling

        for run_id, _, _ in self.pending.values():
            with contextlib.suppress(Exception):
                scheduled = self.client.read_flow_run(run_id).state.is_scheduled()
                self.client.set_flow_run_state(run_id, (Cancelled if scheduled else Cancelling)(
                    message="the refresh that sent it stopped"), force=True)
