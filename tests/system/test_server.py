"""Against a real local Prefect server started here, with real process workers (`plateflow
worker`) on the pools of classes simulated through PLATEFLOW_GPU_CLASS: deployments from
prefect.yaml, GPU work routed to the class's pool, the missing-pool error, retries (the
retry-failed-plates deployment, and a failed refresh retried the way the UI does it), and the
ingest event that triggers a refresh."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fixtures import REPO
from fixtures.plates import make_plate, paper_plate
from fixtures.processes import assert_none_left, free_port, processes_with, wait_until
from app.server import server_env, start

pytestmark = pytest.mark.server
BIN = Path(sys.executable).parent


class LiveServer:
    """What `plateflow server` starts (app/server.py): `prefect server start` on a free port
    with its own PREFECT_HOME (SQLite), the pools, the deployments, and process workers for a
    simulated T4_16GB class and the CPU."""

    def __init__(self, base: Path, tiny_models):
        self.base, self.port = base, free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.corpus = base / "corpus"
        profiles, weights = tiny_models
        self.extra = {"PREFECT_HOME": str(base / "prefect-home"), "PREFECT_SERVER_UI_ENABLED": "false",
                      "PLATEFLOW_PROFILES": str(profiles), "PLATEFLOW_WEIGHTS": str(weights),
                      "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.env = {**server_env(self.port, "127.0.0.1", self.corpus), **self.extra}
        self.procs: list[subprocess.Popen] = []
        self.stack = None

    def start(self):
        self.stack = start(self.corpus, self.port, gpu_class="T4_16GB", log_dir=self.base,
                           say=lambda _: None, env=self.extra, report_port=free_port())
        self.procs = self.stack.procs

    def run(self, cmd: list[str], **env) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, cwd=REPO, env={**self.env, **env}, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{cmd}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
        return done

    def stop(self):
        if self.stack is not None:
            self.stack.stop()


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_models):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = LiveServer(tmp_path_factory.mktemp("live"), tiny_models)
    try:
        server.start()
        with temporary_settings({PREFECT_API_URL: server.url}):
            yield server
    finally:
        server.stop()
    assert_none_left(str(server.base / "prefect-home"))  # the server, the workers and their flow runs


@pytest.fixture
def client(live):
    from prefect import get_client

    with get_client(sync_client=True) as c:
        yield c


def new_corpus(live, name: str, n: int = 3) -> Path:
    root = live.base / name
    for i in range(n):
        make_plate(root, f"plate-{i + 1:03d}", paper_plate(seed=i, photo_colour=(40 * i, 90, 160)))
    return root


def table(root: Path) -> dict[str, dict]:
    return {r["plate_dir"]: r for r in pq.read_table(root / "plates.parquet").to_pylist()}


def wait_for_run(client, run_id, timeout=240):
    return wait_until(lambda: (r := client.read_flow_run(run_id)).state.is_final() and r, timeout,
                      f"flow run {run_id} to finish", every=2)


def children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def run_log(client, run_id, *until: str) -> list[str]:
    """The run's log lines, once its last line and lines holding each of ``until`` have arrived
    (logs come in batches)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    def lines() -> list[str]:
        return [l.message for l in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
                                                    sort=LogSort.TIMESTAMP_ASC, limit=200)]

    wanted = ("Finished in state", *until)
    wait_until(lambda: all(any(w in line for line in lines()) for w in wanted), 60, f"{wanted} in the run's log",
               every=0.5)
    time.sleep(2)  # and whatever the engine logs after its state
    return lines()


def runs_of(client, deployment: str):
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    dep = client.read_deployment_by_name(deployment)
    return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))


def test_prefect_deploy_all_creates_every_deployment_with_its_pool_schedule_and_trigger(live, client):
    refresh = client.read_deployment_by_name("refresh-corpus/refresh-corpus")
    retry = client.read_deployment_by_name("retry-failed-plates/retry-failed-plates")
    embed = client.read_deployment_by_name("embed-plates/embed-plates")
    assert (refresh.work_pool_name, refresh.work_queue_name) == ("plates", "cpu")
    assert refresh.parameters == {"root": str(live.corpus)}
    assert [s.schedule.cron for s in refresh.schedules] == ["0 2 * * *"]
    for d in (retry, embed):
        assert (d.work_pool_name, d.work_queue_name) == ("plates", "cpu")
    for name in ("make-tiles/make-tiles", "train-head/train-head", "predict-head/predict-head",
                 "patch-features/patch-features", "train-segmentation/train-segmentation",
                 "predict-segmentation/predict-segmentation"):
        other = client.read_deployment_by_name(name)  # the tiles and heads run from the UI too
        assert other.work_pool_name == "plates" and other.parameters["root"] == str(live.corpus)
    # One deployment per flow, all on the queue the CPU worker polls: none waits on a GPU this site lacks.
    deployments = client.read_deployments()
    assert sorted(d.name for d in deployments) == ["embed-plates", "make-tiles", "patch-features", "predict-head",
                                                   "predict-segmentation", "refresh-corpus", "retry-failed-plates",
                                                   "train-head", "train-segmentation"]
    wait_until(lambda: all(d.status.value == "READY" for d in client.read_deployments()), 120,
               "every deployment to be Ready")
    automations = client.read_resource_related_automations(f"prefect.deployment.{refresh.id}")
    assert any("plateflow.plates.ingested" in a.trigger.expect for a in automations)
    # The server's scheduler turns the schedule into runs at 02:00 UTC.
    scheduled = wait_until(lambda: [r for r in runs_of(client, "refresh-corpus/refresh-corpus")
                                    if r.state.is_scheduled() and r.expected_start_time.hour == 2
                                    and r.expected_start_time.minute == 0], 120, "scheduled refreshes")
    assert scheduled[0].expected_start_time.utcoffset().total_seconds() == 0


def test_gpu_work_runs_as_a_deployment_run_on_the_class_pool_and_its_worker(live, client, tiny_env):
    from flows.refresh import refresh_corpus
    from plateflow.config import RefreshConfig

    root = new_corpus(live, "routed")
    state = refresh_corpus(str(root), RefreshConfig(models=["tiny_dinov2"], gpu_class="T4_16GB", chunk_size=2),
                           return_state=True)
    assert state.is_completed(), state.message
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    runs = [r for r in runs_of(client, "embed-plates/embed-plates") if str(root) in json.dumps(r.parameters)]
    assert len(runs) == 1  # one run per online worker: the model loads once for all its plates
    run = runs[0]
    assert run.state.is_completed() and (run.work_pool_name, run.work_queue_name) == ("plates", "t4-16gb")
    assert run.infrastructure_pid  # started by the T4 worker, in its own process
    assert run.parameters["gpu_class"] == "T4_16GB" and run.parameters["chunk_size"] == 2
    # The plates went as a file in the corpus, not in the database; a completed run's files are
    # removed once its report is read.
    jobs_file = Path(run.parameters["jobs_file"])
    assert jobs_file.parent.parent == root / ".plateflow" / "dispatch" and not jobs_file.exists()
    assert not Path(run.parameters["report"]).exists() and not jobs_file.parent.exists()
    chunks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    assert sorted(t.name for t in chunks) == ["embed-tiny_dinov2-0", "embed-tiny_dinov2-1"]  # 3 plates, chunks of 2
    assert all(t.state.is_completed() for t in chunks)
    rows = table(root)
    assert {r["embed_status"] for r in rows.values()} == {"computed"}
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert len(list((root / ".plateflow" / "embeddings" / "tiny_dinov2").glob("*.npy"))) == 3


def test_a_class_without_an_online_worker_fails_at_once_naming_its_queue_and_the_command(live, client, tiny_env):
    from flows.refresh import refresh_corpus
    from plateflow.config import RefreshConfig

    root = new_corpus(live, "no-worker", n=1)
    started = time.monotonic()
    state = refresh_corpus(str(root), RefreshConfig(models=["tiny_dinov2"], gpu_class="L4_24GB"), return_state=True)
    assert time.monotonic() - started < 60 and state.is_failed()
    assert "GPU class L4_24GB: no worker is online on work queue plates/l4-24gb" in state.message
    assert "`plateflow worker`" in state.message and "--gpu-dispatch local" in state.message
    assert "T4_16GB" in state.message  # the classes that have a worker
    assert not (root / "plates.parquet").exists()
    assert not (root / "plates_structured" / "plate-001" / "input_image.json").exists()
    assert not [r for r in runs_of(client, "embed-plates/embed-plates") if str(root) in json.dumps(r.parameters)]


def test_auto_routing_picks_the_best_class_that_has_a_worker_never_one_without(live, client, tiny_env):
    """The H100 and H200 queues have more TFLOP/s but no worker here: T4 it is."""
    from flows.routing import choose_route
    from plateflow.profiles import load_profiles

    route = choose_route(None, "auto", load_profiles(), detected="CPU")
    assert (route.gpu_class, route.queue, route.deployment) == ("T4_16GB", "t4-16gb", "embed-plates/embed-plates")


def test_retry_failed_plates_deployment_touches_only_the_failed_plates(live, client):
    from prefect.deployments import run_deployment

    from flows.refresh import refresh_corpus

    root = new_corpus(live, "retry")
    broken = root / "plates_structured" / "plate-002" / "source" / "scan.jpg"
    good = broken.read_bytes()
    broken.write_bytes(b"\xff\xd8 broken")
    assert refresh_corpus(str(root), return_state=True).is_failed()
    before = table(root)
    broken.write_bytes(good)
    run = run_deployment("retry-failed-plates/retry-failed-plates", parameters={"root": str(root)}, timeout=0)
    run = wait_for_run(client, run.id)
    assert run.state.is_completed(), run.state.message
    after = table(root)
    assert after["plate-002"]["status"] == "ok" and after["plate-002"]["characterize_status"] == "computed"
    for plate in ("plate-001", "plate-003"):
        assert after[plate] == before[plate]  # untouched: same row, same updated_at


def test_retrying_a_failed_refresh_run_like_the_ui_reruns_only_the_failed_plate(live, client):
    from prefect.deployments import run_deployment
    from prefect.states import AwaitingRetry

    root = new_corpus(live, "ui-retry")
    broken = root / "plates_structured" / "plate-003" / "source" / "scan.jpg"
    good = broken.read_bytes()
    broken.write_bytes(b"")
    run = run_deployment("refresh-corpus/refresh-corpus", parameters={"root": str(root)}, timeout=0)
    run = wait_for_run(client, run.id)
    assert run.state.is_failed() and "plate-003" in run.state.message
    # The run's log: one line for the failed plate, and no traceback (the state says it all).
    log = run_log(client, run.id, "plate-003 failed at")
    assert [line for line in log if "plate-003" in line and "failed at" in line] == [
        "plate-003 failed at characterize (new): ImageDecodeError: empty file (0 bytes)"], log
    assert not [line for line in log if "Traceback" in line or "Engine execution exited" in line], log
    # The same bad scan the next night: a known failure, the run Completed.
    again = wait_for_run(client, run_deployment("refresh-corpus/refresh-corpus", parameters={"root": str(root)},
                                                timeout=0).id)
    assert again.state.is_completed() and "0 new, 1 known" in again.state.message, again.state.message
    assert "plate-003 failed at characterize (known): ImageDecodeError: empty file (0 bytes)" in run_log(
        client, again.id, "plate-003 failed at")
    wait_until(lambda: not children(live.procs[-1].pid), 120, "the worker's flow-run process to exit", every=0.5)
    broken.write_bytes(good)
    # As a person would, retry once the worker has let go of the run: a retry in the same second
    # can find the worker still holding the run's slot, and Prefect 3.8's process worker then
    # stops ("this borrower is already holding one of this CapacityLimiter's tokens",
    # PrefectHQ/prefect#10632, #16806).
    cpu_worker = live.procs[-1].pid  # server, the T4_16GB worker, the CPU worker
    wait_until(lambda: not children(cpu_worker), 120, "the worker's flow-run process to exit", every=0.5)
    time.sleep(2)  # and the worker to note that it has
    # What the UI's Retry button sends.
    client.set_flow_run_state(run.id, AwaitingRetry(message="Retry from the UI"))
    run = wait_until(lambda: (r := client.read_flow_run(run.id)).state.is_final() and r.run_count > 1 and r,
                     240, "the retried run", every=2)
    assert run.state.is_completed(), run.state.message
    rows = table(root)
    assert "characterization: 1 computed, 2 cached" in run.state.message, run.state.message
    assert rows["plate-003"]["characterize_status"] == "computed" and rows["plate-003"]["status"] == "ok"


def test_ingest_emits_an_event_that_starts_a_refresh_of_the_new_plates(live, client, tmp_path):
    root = new_corpus(live, "ingest", n=1)
    scan = tmp_path / "new-scan.jpg"
    paper_plate(seed=7, photo_colour=(200, 30, 30)).save(scan)
    done = live.run([str(BIN / "plateflow"), "ingest", str(scan), "--root", str(root)])
    assert "plateflow.plates.ingested" in done.stdout

    def triggered():
        return [r for r in runs_of(client, "refresh-corpus/refresh-corpus")
                if r.parameters.get("root") == str(root)]

    run = wait_until(triggered, 120, "the triggered refresh")[0]
    assert run.parameters["plates"] == ["plate-002"]
    run = wait_for_run(client, run.id)
    assert run.state.is_completed(), run.state.message
    assert (root / "plates_structured" / "plate-002" / "input_image.json").is_file()
    assert set(table(root)) == {"plate-002"}  # only the new plate was refreshed

    # An ingest of more plates than a flow-run parameter holds (the server refuses past 512 KiB):
    # the event lists none, and the triggered refresh takes the whole corpus.
    from plateflow.events import emit_plates_ingested

    many = [f"plate-{i:07d}-{'x' * 20}" for i in range(20_000)]
    assert emit_plates_ingested(root, many).payload["plates"] is None
    second = wait_until(lambda: [r for r in triggered() if r.id != run.id], 120, "the second triggered refresh")[0]
    assert second.parameters["plates"] is None
    second = wait_for_run(client, second.id)
    assert second.state.is_completed(), second.state.message
    assert set(table(root)) == {"plate-001", "plate-002"}


def test_a_crashed_gpu_run_is_sent_again_then_its_plates_fail_with_the_reason(live, client, tmp_path, caplog):
    """No worker serves the H100 pool here; each run it gets is marked Crashed (what a lost
    worker leaves) as soon as it appears: the run is sent twice more, then its plates fail."""
    import contextvars
    import logging
    import threading

    from prefect.states import Crashed

    from flows.routing import GpuRoute, run_on_pool
    from plateflow.profiles import dispatch_policy
    from plateflow.embed.reader import PlateJob

    route = GpuRoute("H100_80GB", "plates", "h100-80gb", "embed-plates/embed-plates")
    jobs = [PlateJob(f"plate-{i}", str(tmp_path / f"w{i}.jpg"), (100, 100), ((0, 0, 100, 100),),
                     str(tmp_path / f"v{i}.npy")) for i in range(2)]
    crashed: set = set()
    done = threading.Event()

    def crash_each_new_run():
        from prefect import get_client

        with get_client(sync_client=True) as c:
            while not done.is_set():
                for run in runs_of(c, route.deployment):
                    if run.id not in crashed and not run.state.is_final():
                        c.set_flow_run_state(run.id, Crashed(message="worker lost (injected)"), force=True)
                        crashed.add(run.id)
                time.sleep(0.5)

    # The thread runs in this context: Prefect's settings (the live server's URL) are context variables.
    thread = threading.Thread(target=contextvars.copy_context().run, args=(crash_each_new_run,), daemon=True)
    thread.start()
    try:
        outcome = run_on_pool(route, "tiny_dinov2", jobs, 8, None, tmp_path / "reports",
                              logging.getLogger("test"), poll_s=0.5)
    finally:
        done.set()
        thread.join(10)
    assert len(crashed) == 1 + dispatch_policy().gpu.crash_retries == 3
    assert set(outcome) == {"plate-0", "plate-1"}
    # A run that failed keeps its plates file, for a retry from the UI.
    assert len(json.loads((tmp_path / "reports" / "tiny_dinov2-0-jobs.json").read_text())) == 2
    assert all("ended Crashed" in why and "worker lost" in why for why in outcome.values())
    assert "work queue plates/h100-80gb has no online worker" in caplog.text


def test_a_pool_with_no_online_worker_fails_its_plates_after_the_wait(live, client, tmp_path, caplog):
    """No worker serves the H100 pool here: after ``worker_wait_s`` the runs nobody took are
    cancelled, and their plates fail saying why and what to do."""
    import logging

    from flows.routing import GpuRoute, run_on_pool
    from plateflow.embed.reader import PlateJob

    route = GpuRoute("H100_80GB", "plates", "h100-80gb", "embed-plates/embed-plates")
    jobs = [PlateJob(f"plate-{i}", str(tmp_path / f"w{i}.jpg"), (100, 100), ((0, 0, 100, 100),),
                     str(tmp_path / f"v{i}.npy")) for i in range(2)]
    before = {run.id for run in runs_of(client, route.deployment)}
    started = time.monotonic()
    outcome = run_on_pool(route, "tiny_dinov2", jobs, 1, None, tmp_path / "reports", logging.getLogger("test"),
                          poll_s=0.5, worker_wait_s=2)
    assert 2 <= time.monotonic() - started < 30
    assert set(outcome) == {"plate-0", "plate-1"}
    for why in outcome.values():
        assert "no worker polled work queue plates/h100-80gb for 2 s" in why
        assert "plateflow worker" in why and "retry the failed plates" in why
    ours = [run for run in runs_of(client, route.deployment) if run.id not in before]
    assert len(ours) == 1 and all(run.state.is_cancelled() for run in ours)  # no worker: one run
    assert "at most 2 s" in caplog.text


def test_a_run_already_running_on_the_pool_takes_a_place_so_the_plates_go_as_fewer_runs(live, client, tmp_path,
                                                                                        caplog):
    """The cpu queue has one worker that runs two flow runs at once. With a refresh already running
    there (a run put in Running here), one place is free: the plates go as one run, not two
    that would queue one behind the other, each starting its process and loading the model."""
    import logging

    from prefect.states import Cancelled, Running

    from flows.routing import GpuRoute, run_on_pool
    from plateflow.embed.reader import PlateJob

    caplog.set_level(logging.INFO)
    refresh = client.read_deployment_by_name("refresh-corpus/refresh-corpus")
    busy = client.create_flow_run_from_deployment(refresh.id, parameters={"root": str(tmp_path / "busy")},
                                                  state=Running())
    jobs = []
    for i in range(4):
        paper_plate(seed=i).save(tmp_path / f"w{i}.jpg")
        jobs.append(PlateJob(f"plate-{i}", str(tmp_path / f"w{i}.jpg"), (320, 240),
                             ((0, 0, 320, 240), (80, 60, 240, 180)), str(tmp_path / "store" / f"v{i}.npy")))
    try:
        route = GpuRoute("CPU", "plates", "cpu", "embed-plates/embed-plates")
        outcome = run_on_pool(route, "tiny_dinov2", jobs, 1, None, tmp_path / "reports", logging.getLogger("test"),
                              poll_s=0.5)
    finally:
        client.set_flow_run_state(busy.id, Cancelled(message="test over"), force=True)
    assert outcome == {job.name: None for job in jobs}
    assert all(np.load(job.cache_file).shape == (2, 32) for job in jobs)
    assert "4 plate(s) in 1 run(s) on plates/cpu (1 online worker(s), 2 run(s) each, 1 running)" in caplog.text
    assert not (tmp_path / "reports").exists()  # a completed run leaves no dispatch files


def test_an_interrupted_refresh_cancels_the_runs_it_sent(live, client, tmp_path):
    """Ctrl-C while the runs wait for a worker (none polls the H100 queue): no run is left Scheduled."""
    import logging
    import signal

    from flows.routing import GpuRoute, run_on_pool
    from plateflow.embed.reader import PlateJob

    route = GpuRoute("H100_80GB", "plates", "h100-80gb", "embed-plates/embed-plates")
    jobs = [PlateJob("plate-0", str(tmp_path / "w.jpg"), (100, 100), ((0, 0, 100, 100),), str(tmp_path / "v.npy"))]
    before = {run.id for run in runs_of(client, route.deployment)}

    def interrupt(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 5)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_on_pool(route, "tiny_dinov2", jobs, 1, None, tmp_path / "reports", logging.getLogger("test"), poll_s=0.5)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    ours = [run for run in runs_of(client, route.deployment) if run.id not in before]
    assert len(ours) == 1 and ours[0].state.is_cancelled(), [r.state for r in ours]
    assert ours[0].state.message == "the refresh that sent it stopped"


def test_server_stop_ends_the_workers_before_the_server(tmp_path):
    from app.server import Stack

    log = tmp_path / "order.log"

    def spawn(name: str, linger: float) -> subprocess.Popen:
        script = (f"trap 'sleep {linger}; echo {name} >> {log}; exit 0' TERM; "
                  f"echo ready > {tmp_path / name}; while :; do sleep 0.05; done")
        return subprocess.Popen(["bash", "-c", script], start_new_session=True)

    procs = [spawn("server", 0), spawn("worker-a", 0.5), spawn("worker-b", 0.3)]
    wait_until(lambda: all((tmp_path / n).exists() for n in ("server", "worker-a", "worker-b")), 10, "ready")
    Stack(procs).stop()
    assert all(p.poll() is not None for p in procs)
    assert log.read_text().split() == ["worker-b", "worker-a", "server"]


def test_plateflow_worker_starts_one_worker_per_gpu_each_pinned_to_its_device(live, tmp_path):
    """Two simulated devices on this CPU machine: `plateflow worker --gpus 0,1` puts two workers
    on the class's queue, each with its own CUDA_VISIBLE_DEVICES, and SIGTERM stops both. (Last
    in this module: its H100 workers stay listed as online for a while after they stop.)"""
    import signal

    import httpx

    mark = str(tmp_path)  # in every process it starts: what it leaves behind can be found
    proc = subprocess.Popen([str(BIN / "plateflow"), "worker", "--gpus", "0,1"], cwd=REPO, start_new_session=True,
                            env={**live.env, "PLATEFLOW_GPU_CLASS": "H100_80GB", "PLATEFLOW_TEST_MARK": mark},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def online():
            workers = httpx.post(f"{live.url}/work_pools/plates/workers/filter", json={}, timeout=10).json()
            names = sorted(w["name"] for w in workers if w["status"] == "ONLINE" and "h100-80gb" in w["name"])
            return names if len(names) == 2 else None

        names = wait_until(online, 120, "two workers on the h100-80gb queue")
        assert [n.rsplit("-", 1)[1] for n in names] == ["gpu0", "gpu1"]
        pinned = {}
        for pid in wait_until(lambda: [p for p in processes_with(mark)
                                       if b"worker\x00start" in Path(f"/proc/{p}/cmdline").read_bytes()] or None,
                              30, "the worker processes"):
            env = dict(v.split(b"=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in v)
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[-2].decode()
            pinned[name.rsplit("-", 1)[1]] = env[b"CUDA_VISIBLE_DEVICES"].decode()
        assert pinned == {"gpu0": "0", "gpu1": "1"}
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out[-2000:]
    assert "stopping the workers" in out and "Traceback" not in out
    assert_none_left(mark)
