"""The commands that run plateflow as a service: hardware, pools, deploy, worker, server, local-server."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from app.cli import app, console, RootOpt, CLASS_NAMES


@app.command()
def hardware() -> None:
    """Print the detected device, its GPU class, how the class embeds (readers, compile) and
    each model's batch size and dtype as JSON."""
    import json

    from plateflow.hardware import hardware_report
    from plateflow.pools import work_pool
    from plateflow.profiles import load_profiles

    report = hardware_report(load_profiles())
    pool = work_pool()
    print(json.dumps({**report, "pool": pool.name, "queue": pool.queue(report["gpu_class"]).name}, indent=2))

@app.command()
def pools() -> None:
    """Create the work pool and its queues (one per GPU class of profiles/gpu_classes.toml,
    named by deployments/work-pools.toml) on the configured Prefect server (PREFECT_API_URL),
    or update them to match; running it again changes nothing. `plateflow deploy` does this too."""
    from plateflow.pools import ensure_pools

    for name, action in ensure_pools():
        console.print(f"{action:9s} {name}")

@app.command()
def deploy(
    root: Annotated[Optional[Path], typer.Option("--root", "-r", help="Default corpus root of refresh-corpus and retry-failed-plates (else $PLATEFLOW_CORPUS).")] = None,
) -> None:
    """Create the work pools and every deployment on the configured Prefect server
    (PREFECT_API_URL): refresh-corpus and retry-failed-plates from prefect.yaml, and one
    embed-plates-<class> per GPU class of profiles/gpu_classes.toml. Running it again
    updates them to match."""
    from app.deploy import deploy_all

    try:
        deploy_all(root.expanduser().resolve() if root else None, say=console.print)
    except RuntimeError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None

@app.command()
def worker(
    gpus: Annotated[Optional[str], typer.Option(metavar="IDS", help="Devices to start a worker on, one each, "
                                                "pinned with CUDA_VISIBLE_DEVICES (e.g. 0,1); default: every visible "
                                                "GPU, or one worker on a machine without one.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the worker commands, do not start them.")] = False,
) -> None:
    """Start Prefect workers on the work queue of this machine's GPU class (PLATEFLOW_GPU_CLASS
    overrides detection): one per GPU, each pinned to its device and running at most the
    queue's worker_limit flow runs at once, so the GPU step's runs spread over every GPU.
    Ctrl-C (or SIGTERM) stops them all."""
    from plateflow.devices import visible_gpus
    from plateflow.hardware import detect_devices, gpu_class
    from plateflow.pools import work_pool, worker_name
    from plateflow.profiles import load_profiles

    devices = detect_devices()
    cls = gpu_class(load_profiles(), devices[0])
    if gpus is None:
        ids = [str(i) for i, d in enumerate(devices) if d.cuda] or [None]
    else:
        ids = [g.strip() for g in gpus.split(",") if g.strip()]
        if not ids or not all(g.isdigit() for g in ids) or len(set(ids)) != len(ids):
            raise typer.BadParameter(f"{gpus!r}: device indices, comma-separated (e.g. 0,1)", param_hint="--gpus")
        known = sum(d.cuda for d in devices)
        if known and any(int(g) >= known for g in ids):
            raise typer.BadParameter(f"{gpus!r}: this machine has {known} GPUs (0 to {known - 1})", param_hint="--gpus")
    pool = work_pool()
    queue = pool.queue(cls)
    prefect_cli = Path(sys.executable).with_name("prefect")
    commands = []
    pins = visible_gpus()  # this process's GPU i is CUDA_VISIBLE_DEVICES=pins[i] in a child
    for k, device in enumerate(ids):
        name = worker_name(queue, os.getpid()) + (f"-gpu{device}" if device is not None else "")
        commands.append((pins[int(device)] if device is not None and int(device) < len(pins) else device,
                         [str(prefect_cli), "worker", "start", "--pool", pool.name, "--work-queue", queue.name,
                          "--type", pool.type, "--limit", str(queue.worker_limit), "--name", name]))
    for device, cmd in commands:
        pin = f"CUDA_VISIBLE_DEVICES={device} " if device is not None else ""
        console.print(f"GPU class {cls}: {pin}{' '.join(cmd)}")
    if dry_run:
        return
    if len(commands) == 1 and commands[0][0] is None:
        os.execv(commands[0][1][0], commands[0][1])
    _supervise(commands)


def _supervise(commands: list[tuple[str | None, list[str]]]) -> None:
    """Run one worker per device until one exits or this process is told to stop; then stop them all."""
    import signal as _signal
    import subprocess

    from app.processes import terminate

    def on_term(*_):
        raise KeyboardInterrupt

    _signal.signal(_signal.SIGTERM, on_term)
    procs = []
    try:
        for device, cmd in commands:
            env = {**os.environ} | ({"CUDA_VISIBLE_DEVICES": device} if device is not None else {})
            procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        failed = next(p for p in procs if p.poll() is not None)
        console.print(f"[red]the worker {failed.args[-1]} exited with code {failed.returncode}; stopping the others[/]")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        console.print("stopping the workers")
    finally:
        terminate(procs)


@app.command()
def server(
    root: RootOpt,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port of the API and UI.")] = 4200,
    report_port: Annotated[Optional[int], typer.Option(min=1, max=65535, help="Port of the report server (default: the next port, or a free one when that is taken).")] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    gpu_class: Annotated[Optional[str], typer.Option(metavar="CLASS", help=f"Class of this machine's worker: {CLASS_NAMES} (default: detected).")] = None,
) -> None:
    """Start a local Prefect server (SQLite in PREFECT_HOME; PREFECT_API_DATABASE_CONNECTION_URL
    selects PostgreSQL), a report server, the work pool and deployments (`plateflow deploy`)
    with ROOT as the default corpus, and workers for this machine's class and the CPU. One per
    PREFECT_HOME: the local server an earlier refresh started is stopped first, and other
    plateflow commands on this PREFECT_HOME use this server. Ctrl-C stops it all."""
    import signal as _signal

    from app import server as srv
    from plateflow.errors import ConfigError

    def on_term(*_):
        raise KeyboardInterrupt

    _signal.signal(_signal.SIGTERM, on_term)  # stop the children on `kill` too
    stack = srv.Stack()
    try:
        srv.claim_home(say=console.print)
        stack = srv.start(root.expanduser().resolve(), port, host, gpu_class, say=console.print,
                          report_port=report_port)
        procs = stack.procs
        console.print(f"plateflow server ready: http://{host}:{port} (deployments refresh-corpus, "
                      f"retry-failed-plates, embed-plates, ...); Ctrl-C to stop")
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        failed = next(p for p in procs if p.poll() is not None)
        console.print(f"[red]{' '.join(map(str, failed.args[:3]))} exited with code {failed.returncode}; "
                      f"stopping[/]")
        raise typer.Exit(1)
    except ConfigError as exc:  # a busy port, another server on this PREFECT_HOME: nothing was left running
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    except RuntimeError as exc:  # the Prefect server or deploy failed to start: what had started is stopped
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()

@app.command("local-server")
def local_server(
    stop: Annotated[bool, typer.Option("--stop", help="Stop it.")] = False,
) -> None:
    """The local Prefect server `plateflow refresh` uses when PREFECT_API_URL is unset: started in
    the background by the first refresh, reused by the next ones, stopped by itself after
    PLATEFLOW_LOCAL_SERVER_IDLE_MINUTES (60) without a request, or by `--stop`. One per PREFECT_HOME."""
    from app.local_server import local_server_info, stop_local_server

    if stop:
        pid = stop_local_server()
        console.print(f"stopped the local server (pid {pid})" if pid else "no local server was running")
        return
    info = local_server_info()
    console.print(f"local server: {info['url']} (pid {info['pid']})" if info else "no local server is running")
