"""`plateflow server`: a local Prefect server, plateflow's pools and deployments, and workers,
ready to use from the UI. One foreground command; Ctrl-C stops everything it started."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from app.local_server import stop_local_server
from app.processes import BIN, REPO, SERVER, prefect_home, terminate, wait_healthy
from plateflow.errors import ConfigError


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


def claim_home(say=print) -> int:
    """Make `plateflow server` the only server of this PREFECT_HOME: ``ConfigError`` when
    another `plateflow server` holds it; the local server of an earlier refresh is stopped (two
    servers on one SQLite database lock each other out). Returns the lock's descriptor, held
    until the process ends."""
    import fcntl
    import json

    home = prefect_home()
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
        terminate(self.procs[1:])
        terminate(self.procs[:1])
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
    home = Path(env["PREFECT_HOME"]).expanduser() if env.get("PREFECT_HOME") else prefect_home()
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
