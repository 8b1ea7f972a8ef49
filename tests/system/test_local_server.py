"""plateflow's local server as the CLI uses it: a killed refresh leaves it to the next one, which
cleans up; idle, it stops by itself."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import REPO
from fixtures.plates import make_plate, paper_plate
from fixtures.processes import wait_until


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _local_server_pid(home: Path) -> int:
    return json.loads((home / "plateflow-local-server.json").read_text())["pid"]


@pytest.mark.slow
def test_a_killed_cli_refresh_leaves_the_local_server_to_the_next_one_which_cleans_up_and_prints_no_traceback(
        tmp_path):
    root = tmp_path / "corpus"
    for i in range(40):
        make_plate(root, f"plate-{i + 1:03d}", paper_plate(seed=i))
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", COLUMNS="300")
    plateflow = str(Path(sys.executable).with_name("plateflow"))
    cmd = [plateflow, "refresh", "--root", str(root), "--batch-plates", "2"]
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "(2 of 20 batches done)" in log.read_text(), 120, "the refresh to be under way", every=0.1)
        server = _local_server_pid(home)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    try:
        assert _alive(server)  # the local server outlives the command: the next one reuses it
        stale = root / "plates_structured" / "plate-001" / ".input_image.json.k1ll3d_9.tmp"
        stale.write_bytes(b"left by a killed writer")
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output
        assert "40 plates: 40 ok, 0 failed\n" in output  # the table's; the run's counts: its last line alone
        assert "removed plates_structured/plate-001/.input_image.json.k1ll3d_9.tmp" in output
        assert "Traceback" not in output and "Error" not in output and "CancelledError" not in output
        assert not [p for p in root.rglob("*.tmp")]
        assert _local_server_pid(home) == server
        stopped = subprocess.run([plateflow, "local-server", "--stop"], env=env, capture_output=True, text=True)
        assert f"stopped the local server (pid {server})" in stopped.stdout, stopped.stdout + stopped.stderr
        wait_until(lambda: not _alive(server), 30, "the local server to stop", every=0.2)
    finally:
        if _alive(server):
            os.kill(server, signal.SIGKILL)


@pytest.mark.slow
def test_the_local_server_stops_by_itself_once_idle(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PLATEFLOW_LOCAL_SERVER_IDLE_MINUTES="0.1")
    script = "from app.local_server import start_local_server; print(start_local_server()['pid'])"
    pid = int(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                             check=True, timeout=180).stdout)
    try:
        assert _alive(pid)
        wait_until(lambda: not _alive(pid), 60, "the idle local server to stop", every=0.5)
        status = subprocess.run([str(Path(sys.executable).with_name("plateflow")), "local-server"], env=env,
                                capture_output=True, text=True)
        assert "no local server is running" in status.stdout
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
