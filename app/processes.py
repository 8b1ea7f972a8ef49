"""What the servers plateflow starts share: the repository, this PREFECT_HOME and the info files
of the servers started on it, a free port, stopping process groups, waiting for /health."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


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


SERVER = "plateflow-server"  # PREFECT_HOME/<this>.lock (held while it runs) and .json (pid, url)


def plateflow_server_info() -> dict | None:
    """{"pid", "url"} of the `plateflow server` of this PREFECT_HOME if it runs and answers, else None."""
    return answering(SERVER)


def answering(name: str, **expected) -> dict | None:
    """The info file PREFECT_HOME/<name>.json if its process lives, its fields match ``expected``
    and its server answers /health; else None."""
    import json

    try:
        info = json.loads((prefect_home() / f"{name}.json").read_text())
        os.kill(info["pid"], 0)
        if (all(info.get(k) == v for k, v in expected.items())
                and httpx.get(f"{info['url']}/health", timeout=5).status_code == 200):
            return info
    except (OSError, ValueError, KeyError, TypeError, httpx.HTTPError):
        pass
    return None


def terminate(procs: list[subprocess.Popen], grace: float = 20) -> None:
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_home() -> Path:
    from prefect.settings import PREFECT_HOME

    home = Path(PREFECT_HOME.value()).expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home
