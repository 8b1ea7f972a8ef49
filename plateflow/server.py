"""`plateflow server`: a local Prefect server, plateflow's pools and deployments, and workers,
ready to use from the UI. One foreground command; Ctrl-C stops everything it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def server_env(port: int, host: str, corpus: Path) -> dict[str, str]:
    """The environment of everything `plateflow server` starts. SQLite in PREFECT_HOME unless
    PREFECT_API_DATABASE_CONNECTION_URL names another database (PostgreSQL, say)."""
    return {**os.environ,
            "PREFECT_SERVER_API_PORT": str(port),  # (--port would leave the UI pointing at 4200)
            "PREFECT_SERVER_API_HOST": host,
            "PREFECT_API_URL": f"http://{host}:{port}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PLATEFLOW_HOME": str(REPO),
            "PLATEFLOW_CORPUS": str(corpus)}


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the Prefect server did not answer at {url} within {timeout:.0f} s")


def start(corpus: Path, port: int = 4200, host: str = "127.0.0.1", gpu_class: str | None = None,
          log_dir: Path | None = None, say=print, env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Start the server, create pools, deploy prefect.yaml, start the workers; returns the
    processes (server first). Each runs in its own process group. ``env``: more environment for
    all of them."""
    env = {**server_env(port, host, corpus), **(env or {})}
    procs: list[subprocess.Popen] = []

    def spawn(name: str, cmd: list[str], **extra) -> subprocess.Popen:
        out = open(log_dir / f"{name}.log", "w") if log_dir else None
        try:
            proc = subprocess.Popen(cmd, cwd=REPO, env={**env, **extra}, stdout=out,
                                    stderr=subprocess.STDOUT if out else None, start_new_session=True)
        finally:
            if out is not None:
                out.close()  # the child has its own copy of the descriptor
        procs.append(proc)
        return proc

    try:
        server = spawn("server", [str(BIN / "prefect"), "server", "start"])
        wait_healthy(env["PREFECT_API_URL"], server)
        say(f"Prefect server: {env['PREFECT_API_URL']}")
        for cmd in ([str(BIN / "plateflow"), "pools"], [str(BIN / "prefect"), "--no-prompt", "deploy", "--all"]):
            done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[-3:])} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        say("work pools and deployments are in place (prefect.yaml)")
        from plateflow.hardware import gpu_class as detect
        from plateflow.profiles import load_profiles

        cls = gpu_class or detect(load_profiles())
        for c in dict.fromkeys([cls, "CPU"]):  # refresh-corpus runs on plates-cpu
            spawn(f"worker-{c.lower()}", [str(BIN / "plateflow"), "worker"], PLATEFLOW_GPU_CLASS=c)
            say(f"worker for GPU class {c} started")
    except BaseException:
        stop(procs)
        raise
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in reversed(procs):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
