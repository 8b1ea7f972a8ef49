"""`plateflow server`: a local Prefect server, plateflow's pools and deployments, and workers,
ready to use from the UI. One foreground command; Ctrl-C stops everything it started."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

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
    """Stop the workers first and wait for them, then the server (procs[0]): a worker that
    loses its server mid-shutdown prints connection tracebacks."""
    _terminate(procs[1:])
    _terminate(procs[:1])


def _terminate(procs: list[subprocess.Popen], grace: float = 20) -> None:
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """In the child, before exec: be killed when the parent dies, however it dies (kill -9).
    SIGKILL, not SIGTERM: a graceful stop of a busy server can take longer than anyone waits, and
    with its only client gone there is nothing left to flush (SQLite recovers its journal)."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def temporary_server(timeout: float = 120) -> Iterator[str | None]:
    """Prefect's temporary server for one command, when no server is configured (PREFECT_API_URL
    unset); yields its API URL, or None when a server is configured (then nothing is started).

    What Prefect's own ephemeral server does, with three differences: it ends with this process
    however this process ends (a kill -9 would otherwise leave it running for good); its output
    goes to PREFECT_HOME/plateflow-temporary-server.log, not the terminal; and this process's
    logs and events are flushed to it before it is stopped, which it is gracefully, so a clean
    run prints no traceback from it.
    """
    import prefect
    from prefect.settings import (PREFECT_API_URL, PREFECT_HOME, PREFECT_UI_URL, get_current_settings,
                                  temporary_settings)

    if PREFECT_API_URL.value():
        yield None
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    home = Path(PREFECT_HOME.value()).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
           "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
           "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "error", "--lifespan", "on"]
    parent = os.getpid()
    with open(home / "plateflow-temporary-server.log", "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: _die_with_parent(parent), start_new_session=True)
    try:
        wait_healthy(url, proc, timeout)
        # No "View at" links: this server has no UI, and it is gone when the command ends.
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_UI_URL: ""}):
            try:
                yield url
            finally:
                _drain_client()
    finally:
        _terminate([proc])


def _drain_client() -> None:
    """Send this process's buffered logs and events to the server before it stops."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    with contextlib.suppress(RuntimeError):
        APILogWorker.drain_all(timeout=30)
    with contextlib.suppress(RuntimeError):
        EventsWorker.drain_all(timeout=30)
