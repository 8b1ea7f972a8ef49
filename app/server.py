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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import httpx

from plateflow.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def server_env(port: int, host: str, corpus: Path, report_port: int | None = None) -> dict[str, str]:
    """The environment of everything `plateflow server` starts. SQLite in PREFECT_HOME unless
    PREFECT_API_DATABASE_CONNECTION_URL names another database (PostgreSQL, say). The refreshes
    the workers run link to the report server (``report_port``, by default the next port)."""
    return {**os.environ,
            "PLATEFLOW_REPORT_URL": f"http://{host}:{report_port or port + 1}",
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


def wait_workers(url: str, classes: list[str], procs: list[subprocess.Popen], timeout: float = 180) -> None:
    """Until a worker polls the queue of each of ``classes`` (so a refresh started once the
    server says it is ready finds them); RuntimeError if one exits or none comes in time."""
    from plateflow.pools import work_pool, worker_prefix

    pool = work_pool()
    prefixes = {c: worker_prefix(pool.queue(c)) for c in classes}
    deadline = time.monotonic() + timeout
    while True:
        if (dead := [p for p in procs if p.poll() is not None]):
            raise RuntimeError(f"{' '.join(map(str, dead[0].args[:3]))} exited with code {dead[0].returncode}")
        try:
            workers = httpx.post(f"{url}/work_pools/{pool.name}/workers/filter", json={}, timeout=10).json()
            online = {w["name"] for w in workers if w.get("status") == "ONLINE"}
        except (httpx.HTTPError, ValueError, TypeError, KeyError):
            online = set()
        waiting = [c for c, prefix in prefixes.items() if not any(n.startswith(prefix) for n in online)]
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no worker for GPU class {', '.join(waiting)} came online within {timeout:.0f} s")
        time.sleep(1)


class PortError(ConfigError):
    """A port to listen on is taken or not a port; the message says which and what to do."""


def check_port(host: str, port: int, what: str) -> None:
    """``PortError`` unless ``host:port`` can be listened on now (as uvicorn would: SO_REUSEADDR)."""
    if not 0 < port < 65536:
        raise PortError(f"{what} port {port} is not a port (1-65535)")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        raise PortError(f"cannot listen on {host}:{port} for the {what}: {exc.strerror or exc}; "
                        f"choose another with --port") from None


def report_server(corpus: Path, host: str, port: int, say=print):
    """The report server of ``corpus`` on ``port``, or on a free port when that one is taken or
    past 65535 (said); started on a thread."""
    from app.reports import ReportServer

    try:
        if port >= 65536:
            raise OSError(f"port {port} is past 65535")
        server = ReportServer([corpus], host, port)
    except OSError as exc:
        server = ReportServer([corpus], host, 0)
        say(f"reports: port {port} is not free ({getattr(exc, 'strerror', None) or exc}), "
            f"so they are served on port {server.httpd.server_address[1]}")
    return server.start()


SERVER = "plateflow-server"  # PREFECT_HOME/<this>.lock (held while it runs) and .json (pid, url)


def claim_home(say=print) -> int:
    """Make `plateflow server` the only server of this PREFECT_HOME: ``ConfigError`` when
    another `plateflow server` holds it; the local server of an earlier refresh is stopped (two
    servers on one SQLite database lock each other out). Returns the lock's descriptor, held
    until the process ends."""
    import fcntl
    import json

    home = _home()
    fd = os.open(home / f"{SERVER}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            other = json.loads((home / f"{SERVER}.json").read_text())
            who = f" (pid {other['pid']}, {other['url']})"
        except (OSError, ValueError, KeyError, TypeError):
            who = ""
        raise ConfigError(f"another plateflow server{who} runs on PREFECT_HOME {home}: use it, or stop it "
                          f"(Ctrl-C) first; a second one would share its database") from None
    pid = stop_local_server()
    if pid:
        say(f"stopped the local server (pid {pid}) an earlier command started on {home}: this server replaces it")
    return fd


def plateflow_server_info() -> dict | None:
    """{"pid", "url"} of the `plateflow server` of this PREFECT_HOME if it runs and answers, else None."""
    return _answering(SERVER)


def _answering(name: str, **expected) -> dict | None:
    """The info file PREFECT_HOME/<name>.json if its process lives, its fields match ``expected``
    and its server answers /health; else None."""
    import json

    try:
        info = json.loads((_home() / f"{name}.json").read_text())
        os.kill(info["pid"], 0)
        if (all(info.get(k) == v for k, v in expected.items())
                and httpx.get(f"{info['url']}/health", timeout=5).status_code == 200):
            return info
    except (OSError, ValueError, KeyError, TypeError, httpx.HTTPError):
        pass
    return None


@dataclass
class Stack:
    """What `plateflow server` runs: the processes (the Prefect server first, then the
    workers), the report server on a thread, and the file that tells other commands of its
    PREFECT_HOME where its API is."""

    procs: list[subprocess.Popen] = field(default_factory=list)
    reports: Any = None
    info: Path | None = None

    def stop(self) -> None:
        """Stop the workers first and wait for them, then the server: a worker that loses its
        server mid-shutdown prints connection tracebacks. Then the report server."""
        _terminate(self.procs[1:])
        _terminate(self.procs[:1])
        if self.reports is not None:
            self.reports.stop()
            self.reports = None
        if self.info is not None:
            self.info.unlink(missing_ok=True)


def start(corpus: Path, port: int = 4200, host: str = "127.0.0.1", gpu_class: str | None = None,
          log_dir: Path | None = None, say=print, env: dict[str, str] | None = None,
          report_port: int | None = None) -> Stack:
    """Check the ports, start the server and the report server, create the pool and the
    deployments (`plateflow deploy`), start the workers. Each process runs in its own process
    group; if any part fails to start, what was started is stopped before the error is raised.
    ``env``: more environment for all of them (its PREFECT_HOME is the server's)."""
    from plateflow.atomic import dumps_json, write_bytes

    check_port(host, port, "Prefect server")
    stack = Stack(reports=report_server(corpus, host, report_port or port + 1, say))
    env = {**server_env(port, host, corpus, stack.reports.httpd.server_address[1]), **(env or {})}
    home = Path(env["PREFECT_HOME"]).expanduser() if env.get("PREFECT_HOME") else _home()
    procs = stack.procs

    def spawn(name: str, cmd: list[str], **extra) -> subprocess.Popen:
        out = open(log_dir / f"{name}.log", "w") if log_dir else None
        try:
            proc = subprocess.Popen(cmd, cwd=REPO, env={**env, **extra}, stdout=out,
                                    stderr=subprocess.STDOUT if out else None,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            if out is not None:
                out.close()  # the child has its own copy of the descriptor
        procs.append(proc)
        return proc

    try:
        server = spawn("server", [str(BIN / "prefect"), "server", "start"])
        wait_healthy(env["PREFECT_API_URL"], server)
        stack.info = home / f"{SERVER}.json"
        write_bytes(stack.info, dumps_json({"pid": os.getpid(), "url": env["PREFECT_API_URL"]}))
        say(f"Prefect server: {env['PREFECT_API_URL']}")
        say(f"reports: {env['PLATEFLOW_REPORT_URL']}")
        cmd = [str(BIN / "plateflow"), "deploy", "--root", str(corpus)]
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"plateflow deploy failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        say("work pool, queues and deployments are in place (plateflow deploy)")
        from plateflow.hardware import gpu_class as detect
        from plateflow.profiles import load_profiles

        cls = gpu_class or detect(load_profiles())
        classes = list(dict.fromkeys([cls, "CPU"]))  # the deployments run on the CPU queue
        for c in classes:
            spawn(f"worker-{c.lower()}", [str(BIN / "plateflow"), "worker"], PLATEFLOW_GPU_CLASS=c)
        wait_workers(env["PREFECT_API_URL"], classes, procs)
        say(f"workers online for GPU class{'es' if len(classes) > 1 else ''} {', '.join(classes)}")
    except BaseException:
        stack.stop()
        raise
    return stack


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
    import prefect

    return _answering(LOCAL_SERVER, prefect=prefect.__version__)


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
