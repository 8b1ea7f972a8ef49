"""`plateflow server`: a local Prefect server, plateflow's pools and deployments, and workers,
ready to use from the UI. One foreground command; Ctrl-C stops everything it started."""

from __future__ import annotations

import contextlib
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
    PREFECT_API_DATABASE_CONNECTION_URL names another database (PostgreSQL, say). The report
    server listens on the next port; the refreshes the workers run link to it."""
    return {**os.environ,
            "PLATEFLOW_REPORT_URL": f"http://{host}:{port + 1}",
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
    """Start the server, create the pools and deployments (`plateflow deploy`), start the workers; returns the
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
        spawn("report-server", [str(BIN / "plateflow"), "report", "--root", str(corpus), "--serve", "--host", host,
                          "--port", str(port + 1)])
        say(f"reports: {env['PLATEFLOW_REPORT_URL']}")
        cmd = [str(BIN / "plateflow"), "deploy", "--root", str(corpus)]
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"plateflow deploy failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        say("work pools and deployments are in place (plateflow deploy)")
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LOCAL_SERVER = "plateflow-local-server"  # PREFECT_HOME/<this>.json (pid, url), .lock, .log
IDLE_MINUTES = float(os.environ.get("PLATEFLOW_LOCAL_SERVER_IDLE_MINUTES", "60"))


def _home() -> Path:
    from prefect.settings import PREFECT_HOME

    home = Path(PREFECT_HOME.value()).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def local_server_info() -> dict | None:
    """{"pid", "url", "prefect"} of the local server of this PREFECT_HOME if it is up and answers, else None."""
    import json

    import prefect

    try:
        info = json.loads((_home() / f"{LOCAL_SERVER}.json").read_text())
        os.kill(info["pid"], 0)
        if info.get("prefect") == prefect.__version__ and httpx.get(f"{info['url']}/health", timeout=5).status_code == 200:
            return info
    except (OSError, ValueError, KeyError, TypeError, httpx.HTTPError):
        pass
    return None


def start_local_server(timeout: float = 120) -> dict:
    """The local server of this PREFECT_HOME: the running one, or a new one started in the
    background (its own session: it outlives this command, and stops itself after
    ``IDLE_MINUTES`` without a request). One at a time per PREFECT_HOME (a lock file)."""
    import fcntl

    import prefect
    from prefect.settings import get_current_settings

    from plateflow.atomic import dumps_json, write_bytes

    home = _home()
    fd = os.open(home / f"{LOCAL_SERVER}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another command may be starting it right now
        if (info := local_server_info()) is not None:
            return info
        stop_local_server()  # one that no longer answers, or of another Prefect version
        port = _free_port()
        env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
               "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
               "PLATEFLOW_LOCAL_SERVER_IDLE_MINUTES": str(IDLE_MINUTES)}
        env.pop("PREFECT_API_URL", None)
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "app.server:idle_app", "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "error", "--lifespan", "on"]
        with open(home / f"{LOCAL_SERVER}.log", "ab") as log:
            proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}/api"
        try:
            wait_healthy(url, proc, timeout)
        except BaseException:
            _terminate([proc])
            raise
        info = {"pid": proc.pid, "url": url, "prefect": prefect.__version__}
        write_bytes(home / f"{LOCAL_SERVER}.json", dumps_json(info))
        return info
    finally:
        os.close(fd)


def stop_local_server(grace: float = 20) -> int | None:
    """Stop the local server of this PREFECT_HOME, if one runs; its pid, or None."""
    import json

    path = _home() / f"{LOCAL_SERVER}.json"
    try:
        pid = json.loads(path.read_text())["pid"]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        path.unlink(missing_ok=True)
        return None
    path.unlink(missing_ok=True)
    if b"server:idle_app" not in cmdline:  # the pid was reused by another process (or: ours, before app/ existed)
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        if Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z":
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pid


class _IdleExit:
    """ASGI wrapper: stops its server (SIGTERM to itself) after ``idle_s`` with no request in flight."""

    def __init__(self, app, idle_s: float):
        import threading

        self.app, self.idle_s, self.active, self.last, self.seen = app, idle_s, 0, time.monotonic(), False
        threading.Thread(target=self._watch, daemon=True, name="plateflow-idle").start()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        self.active += 1
        self.seen = True
        try:
            return await self.app(scope, receive, send)
        finally:
            self.active -= 1
            self.last = time.monotonic()

    def _watch(self) -> None:
        while True:
            time.sleep(min(30.0, self.idle_s / 4))
            # Before its first request the server may still be starting (10 s or more on a busy machine).
            idle_s = self.idle_s if self.seen else self.idle_s + 120
            if self.active == 0 and time.monotonic() - self.last > idle_s:
                os.kill(os.getpid(), signal.SIGTERM)
                return


def idle_app():
    """uvicorn factory of the local server: Prefect's API app, stopped when idle."""
    from prefect.server.api.server import create_app

    return _IdleExit(create_app(), 60 * float(os.environ.get("PLATEFLOW_LOCAL_SERVER_IDLE_MINUTES", "60")))


@contextlib.contextmanager
def local_api() -> Iterator[str | None]:
    """The API for one command: the configured server (PREFECT_API_URL; then nothing is started
    and None is yielded), else plateflow's local server (``start_local_server``), whose URL is
    yielded. This process's logs and events reach the server before the command ends.

    On the local server a flow run sends no heartbeats: no worker or automation there watches
    for crashed runs, and Prefect's heartbeat thread, which sleeps in 1 s steps, holds every
    flow run's end for up to a second (0.9 s of an unchanged make-tiles run of 1.2 s here)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, PREFECT_UI_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield None
        return
    url = start_local_server()["url"]
    # No "View at" links: this server has no UI.
    with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_UI_URL: "",
                                     PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        try:
            yield url
        finally:
            _drain_client()


def _drain_client() -> None:
    """Send this process's buffered logs and events to the server before it stops."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    with contextlib.suppress(RuntimeError):
        APILogWorker.drain_all(timeout=30)
    with contextlib.suppress(RuntimeError):
        EventsWorker.drain_all(timeout=30)
