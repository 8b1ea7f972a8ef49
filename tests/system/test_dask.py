"""The CPU batches on Dask: a real `dask scheduler` and `dask worker` processes started here."""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.refresh import refresh_corpus
from plateflow.config import RefreshConfig

from fixtures import REPO
from fixtures.plates import make_plate, paper_plate
from fixtures.processes import free_port, wait_until

DASK = str(Path(sys.executable).with_name("dask"))
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


class Cluster:
    """A scheduler and ``n`` single-threaded workers, each its own process (no nanny: a killed
    worker stays dead)."""

    def __init__(self, base: Path, n: int = 2):
        self.address = f"tcp://127.0.0.1:{free_port()}"
        port = self.address.rsplit(":", 1)[1]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.logs = base
        self.scheduler = self._spawn("scheduler", [DASK, "scheduler", "--host", "127.0.0.1", "--port", port,
                                                   "--no-dashboard"], env)
        self.workers = [self._spawn(f"worker-{i}", [DASK, "worker", self.address, "--nthreads", "1",
                                                    "--no-nanny", "--no-dashboard", "--name", f"w{i}"], env)
                        for i in range(n)]
        wait_until(lambda: len(self.info()["workers"]) == n, 120, f"{n} dask workers to join")

    def _spawn(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "w") as log:
            return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def info(self) -> dict:
        from distributed import Client

        with Client(self.address, timeout=30) as client:
            return client.scheduler_info(n_workers=-1)

    def executed(self) -> dict[str, int]:
        """Tasks each live worker has run."""
        from distributed import Client

        with Client(self.address, timeout=30) as client:
            return client.run(lambda dask_worker: dask_worker.state.executed_count)

    def close(self) -> None:
        for proc in [*self.workers, self.scheduler]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in [*self.workers, self.scheduler]:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.close()


def new_corpus(root: Path, n: int, size=(320, 240), bad: tuple[int, ...] = ()) -> Path:
    for i in range(n):
        if i in bad:
            make_plate(root, f"plate-{i + 1:03d}", b"\xff\xd8 not really a jpeg")
        else:
            make_plate(root, f"plate-{i + 1:03d}", paper_plate(*size, seed=i, photo_colour=(7 * i % 256, 90, 160)))
    return root


def tree(root: Path) -> dict[str, bytes]:
    """Every file a refresh wrote under plates_structured/, by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "plates_structured").rglob("*"))
            if p.is_file()}


def rows(root: Path) -> list[dict]:
    return pq.read_table(root / "plates.parquet").to_pylist()


def same_rows(a: Path, b: Path) -> None:
    """plates.parquet of both corpora hold the same rows, but for when each was written."""
    ra, rb = rows(a), rows(b)
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        diff = {k: (x[k], y.get(k)) for k in x if x[k] != y.get(k) and k != "updated_at"}
        assert not diff, (x["plate_dir"], diff)


def test_a_refresh_on_a_dask_cluster_writes_what_an_in_process_one_writes(tmp_path, cluster):
    here = new_corpus(tmp_path / "here", 12, bad=(4,))
    there = new_corpus(tmp_path / "there", 12, bad=(4,))
    in_process = refresh_corpus(str(here), RefreshConfig(batch_plates=2), return_state=True)
    before = sum(cluster.executed().values())
    on_dask = refresh_corpus(str(there), RefreshConfig(batch_plates=2, dask=cluster.address), return_state=True)
    assert in_process.is_failed() and on_dask.is_failed()  # plate-005 is not an image, in both
    assert "plate-005" in on_dask.message and "11 of 12 plates ok" in on_dask.message
    executed = cluster.executed()
    assert sum(executed.values()) - before == 6  # the 6 characterize-batch tasks ran on the workers
    assert all(n > 0 for n in executed.values()), executed  # on both of them
    assert tree(here) == tree(there)
    same_rows(here, there)


def test_a_worker_killed_mid_refresh_loses_no_plate(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        root = new_corpus(tmp_path / "corpus", 24, size=(1600, 1200))
        states = []
        run = threading.Thread(target=lambda: states.append(refresh_corpus(
            str(root), RefreshConfig(batch_plates=2, dask=cluster.address), return_state=True)))
        run.start()
        records = root / "plates_structured"
        wait_until(lambda: len(list(records.glob("*/input_image.json"))) >= 4, 180, "the first batches", every=0.05)
        victim = cluster.workers[0]
        victim.kill()
        victim.wait()
        run.join(300)
        assert not run.is_alive()
        [state] = states
        table = {r["plate_dir"]: r for r in rows(root)}
        failed = {k: r["error"] for k, r in table.items() if r["status"] == "failed"}
        # Its batches ran on the other worker, or their plates failed saying why.
        assert all("batch was lost" in e for e in failed.values()), failed
        assert state.is_completed() == (not failed), state.message
        assert len(cluster.info()["workers"]) == 1
    finally:
        cluster.close()
    again = refresh_corpus(str(root), RefreshConfig(batch_plates=2), return_state=True)
    assert again.is_completed(), again.message
    assert {r["status"] for r in rows(root)} == {"ok"}
    clean = new_corpus(tmp_path / "clean", 24, size=(1600, 1200))
    assert refresh_corpus(str(clean), RefreshConfig(batch_plates=6), return_state=True).is_completed()
    assert tree(clean) == tree(root)


def test_local_n_starts_a_cluster_of_n_worker_processes_for_the_refresh(tmp_path):
    here = new_corpus(tmp_path / "here", 6)
    there = new_corpus(tmp_path / "there", 6)
    assert refresh_corpus(str(here), RefreshConfig(batch_plates=2), return_state=True).is_completed()
    state = refresh_corpus(str(there), RefreshConfig(batch_plates=2, dask="local:2"), return_state=True)
    assert state.is_completed(), state.message
    assert tree(here) == tree(there)
    same_rows(here, there)


def test_a_dask_address_is_checked_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="dask must be a scheduler address"):
        RefreshConfig(dask="my cluster")
    assert RefreshConfig(dask="tcp://10.0.0.5:8786").dask == "tcp://10.0.0.5:8786"
    assert RefreshConfig(dask="local:4").dask == "local:4"
