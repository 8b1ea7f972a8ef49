"""The local server the CLI starts when no Prefect server is set: one per PREFECT_HOME, in the
background, stopping itself when idle; ``local_api`` points a command at it (or at a running
`plateflow server`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from app.processes import REPO, answering, free_port, plateflow_server_info, prefect_home, terminate, wait_healthy


LOCAL_SERVER = "plateflow-local-server"  # PREFECT_HOME/<this>.json (pid, url), .lock, .log
IDLE_MINUTES = float(os.environ.get("PLATEFLOW_LOCAL_SERVER_IDLE_MINUTES", "60"))


def local_server_info() -> dict | None:
    """{"pid", "url", "prefect"} of the local server of this PREFECT_HOME if it is up and answers, else None."""
    import prefect

    return answering(LOCAL_SERVER, prefect=prefect.__version__)


def start_local_server(timeout: float = 120) -> dict:
    """The local server of this PREFECT_HOME: the running one, or a new one started in the
    background (its own session: it outlives this command, and stops itself after
    ``IDLE_MINUTES`` without a request). One at a time per PREFECT_HOME (a lock file)."""
    import fcntl

    import prefect
    from prefect.settings import get_current_settings

    from plateflow.atomic import dumps_json, write_bytes

    home = prefect_home()
    fd = os.open(home / f"{LOCAL_SERVER}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another command may be starting it right now
        if (info := local_server_info()) is not None:
            return info
        stop_local_server()  # one that no longer answers, or of another Prefect version
        port = free_port()
        env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
               "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
               "PLATEFLOW_LOCAL_SERVER_IDLE_MINUTES": str(IDLE_MINUTES)}
        env.pop("PREFECT_API_URL", None)
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "app.local_server:idle_app", "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "error", "--lifespan", "on"]
        with open(home / f"{LOCAL_SERVER}.log", "ab") as log:
            proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}/api"
        try:
            wait_healthy(url, proc, timeout)
        except BaseException:
            terminate([proc])
            raise
        info = {"pid": proc.pid, "url": url, "prefect": prefect.__version__}
        write_bytes(home / f"{LOCAL_SERVER}.json", dumps_json(info))
        return info
    finally:
        os.close(fd)


def stop_local_server(grace: float = 20) -> int | None:
    """Stop the local server of this PREFECT_HOME, if one runs; its pid, or None."""
    import json

    path = prefect_home() / f"{LOCAL_SERVER}.json"
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
            # Before its first request the server may still be starting (slow on a busy machine).
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
    and None is yielded), else the `plateflow server` running on this PREFECT_HOME, else
    plateflow's local server (``start_local_server``); the URL is yielded. This process's logs and events reach the server before the command ends.

    On the local server a flow run sends no heartbeats: no worker or automation there watches
    for crashed runs, and Prefect's heartbeat thread, which sleeps in 1 s steps, holds every
    flow run's end for up to a second: most of a short run."""
    from prefect.settings import PREFECT_API_URL, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, PREFECT_UI_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield None
        return
    running = plateflow_server_info()  # `plateflow server` of this PREFECT_HOME: its API, not a second server
    url = running["url"] if running else start_local_server()["url"]
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
