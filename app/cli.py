"""The plateflow command line: a thin layer over the functions the flows call."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Iterator, Literal, Optional

import typer
from rich.console import Console
from rich.table import Table

from plateflow.limits import MAX_MEGAPIXELS

# Offline-friendly defaults for Prefect's embedded server; a user's own settings win.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

app = typer.Typer(help="Characterize, embed and smart-crop collections of plates with Prefect.",
                  no_args_is_help=True, add_completion=False, rich_markup_mode=None)
console = Console(soft_wrap=True)  # paths stay on one line, easy to copy

RootOpt = Annotated[Path, typer.Option("--root", "-r", metavar="DIR", help="Corpus root (holds plates_structured/).")]


CropFormat = Literal["jpeg", "png"]
Dispatch = Literal["auto", "local", "pool"]
TileMode = Literal["classic", "noise-framed"]


def _profile_facts() -> tuple[object | None, str, str]:
    """(dispatch policy, model names, GPU class names) for the help texts; a broken profile
    still lets --help print (the command then says what is wrong)."""
    from plateflow.errors import ConfigError
    from plateflow.profiles import dispatch_policy, load_profiles

    try:
        profiles = load_profiles()
        return dispatch_policy(), ", ".join(profiles.models), ", ".join(profiles.classes)
    except ConfigError:
        return None, "see profiles/models.toml", "see profiles/gpu_classes.toml"


POLICY, MODEL_NAMES, CLASS_NAMES = _profile_facts()


def _policy(section: str, key: str, unit: str = "") -> str:
    value = getattr(getattr(POLICY, section), key) if POLICY is not None else None
    return f"default: {value:g}{unit}, from profiles/dispatch.toml" if value is not None else "default: profiles/dispatch.toml"


CredentialsOpt = Annotated[Optional[str], typer.Option(
    help="Prefect block with the bucket's credentials, as <block-type>/<name> (s3-bucket/scans, aws-credentials/lab, "
         "gcs-bucket/scans, gcp-credentials/lab); without it, the environment's credentials.")]


@app.command()
def ingest(
    sources: Annotated[list[str], typer.Argument(metavar="SOURCES...", help="Image files or folders (searched recursively), or fsspec URLs: s3://bucket/prefix, gs://, az://, file://.")],
    root: RootOpt,
    max_megapixels: Annotated[float, typer.Option(help="Images above this size are skipped (refresh's limit).")] = MAX_MEGAPIXELS,
    credentials_block: CredentialsOpt = None,
) -> None:
    """Copy images into ROOT in the notebooks' layout; sources are never moved, modified or
    deleted, in a folder or a bucket. Files that are not images, have more pixels than the
    limit, or cannot be read are listed as skipped, with the reason."""
    from rich.progress import Progress

    from plateflow.buckets import is_url
    from plateflow.corpus import ingest as ingest_files, iter_source_files
    from plateflow.errors import ConfigError

    sources = [s if is_url(s) else Path(s) for s in sources]
    if missing := [str(s) for s in sources if isinstance(s, Path) and not os.path.lexists(s)]:
        raise typer.BadParameter(f"{', '.join(missing)}: no such file or folder; nothing was ingested",
                                 param_hint="SOURCES")
    # A folder's files are counted first; a bucket's listing is not paid twice.
    total = None if any(isinstance(s, str) for s in sources) else sum(1 for _ in iter_source_files(sources, corpus=Path(root).expanduser().resolve()))
    try:
        with Progress(console=console, transient=True) as progress:
            bar = progress.add_task("ingesting", total=total)
            report = ingest_files(sources, root, progress=lambda p: progress.advance(bar),
                                  max_pixels=int(max_megapixels * 1e6), credentials_block=credentials_block)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    for src, plate_id in report.added:
        console.print(f"[green]added[/] {plate_id} <- {src}")
    for src, reason in report.skipped:
        console.print(f"[yellow]skipped[/] {src}: {reason}")
    console.print(f"{len(report.added)} added, {len(report.skipped)} skipped")
    if report.stopped:
        console.print(f"[red]{report.stopped}[/]")
    if not report.added:
        if report.stopped:
            raise typer.Exit(1)
        return
    if os.environ.get("PREFECT_API_URL"):
        from plateflow.events import emit_plates_ingested

        event = emit_plates_ingested(root, [plate_id for _, plate_id in report.added])
        console.print(f"emitted {event.event} ({event.id}): the refresh-corpus deployment's trigger "
                      f"refreshes the new plates")
    else:
        console.print(f"PREFECT_API_URL is unset, so no deployment was told: run `plateflow refresh --root "
                      f"{Path(root).expanduser().resolve()}` (or set PREFECT_API_URL to the server of "
                      f"`plateflow server` and ingest there)")
    if report.stopped:
        raise typer.Exit(1)


@app.command()
def refresh(
    root: RootOpt,
    workers: Annotated[Optional[int], typer.Option(metavar="N", min=1, help=f"Batches run at once (default: one per core, at most {POLICY.cpu.max_workers if POLICY else 'max_workers of profiles/dispatch.toml'}).")] = None,
    no_viz: Annotated[bool, typer.Option("--no-viz", help="Skip the viz/ PNG files.")] = False,
    max_megapixels: Annotated[float, typer.Option(metavar="MP", help="Plates above this size fail.")] = MAX_MEGAPIXELS,
    models: Annotated[str, typer.Option(metavar="NAMES", help=f"Comma-separated embedding models: {MODEL_NAMES}. Default: none (characterization only).")] = "",
    crop_model: Annotated[Optional[str], typer.Option(metavar="NAME", help="The model whose similarity picks the crop (default: the first of --models).")] = None,
    crop_format: Annotated[CropFormat, typer.Option(help="Format of the saved best crop.")] = "jpeg",
    min_crop_area: Annotated[float, typer.Option(metavar="FRACTION", help="Smallest crop, as a fraction of the plate area.")] = 0.0,
    gpu_class: Annotated[Optional[str], typer.Option(metavar="CLASS", help=f"GPU class of the GPU step: {CLASS_NAMES} (default: with a worker online on the server, the best class that has one; else this machine's).")] = None,
    chunk_size: Annotated[Optional[int], typer.Option(metavar="N", help=f"Plates per embed-chunk task of the GPU step, its unit of retry and progress ({_policy('gpu', 'chunk_size')}).", min=1)] = None,
    gpu_dispatch: Annotated[Dispatch, typer.Option(help="auto: to a work queue with an online worker when the server has one, else in-process; local: in-process; pool: a work queue or an error.")] = "auto",
    worker_wait_minutes: Annotated[Optional[float], typer.Option(metavar="MINUTES", help=f"How long a work queue may have no online worker before its plates fail; 0: no limit ({_policy('gpu', 'worker_wait_minutes')}).", min=0)] = None,
    weights: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Folder with one folder of weights per model, named as the model (default: the Hugging Face cache).")] = None,
    failed_only: Annotated[bool, typer.Option("--failed-only", help="Retry only the plates whose last status is failed (the retry-failed-plates flow).")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Hash every source again, not only those whose size, mtime, inode or ctime changed.")] = False,
    batch_plates: Annotated[Optional[int], typer.Option(metavar="N", help=f"Most plates in one batch task ({_policy('cpu', 'batch_plates')}).", min=1)] = None,
    batch_megabytes: Annotated[Optional[float], typer.Option(metavar="MB", help=f"Most source megabytes in one batch task ({_policy('cpu', 'batch_megabytes')}).", min=0.001)] = None,
    dask: Annotated[Optional[str], typer.Option(metavar="ADDRESS", help="Run the CPU batches on Dask: a scheduler address (tcp://host:8786) or local:N (N worker processes here). Workers need the corpus at the same path.")] = None,
) -> None:
    """Run the refresh flow: only plates whose content, parameters or code changed are recomputed.

    With PREFECT_API_URL unset it runs on plateflow's local server, started in the background on
    first use and reused (`plateflow local-server --stop`). Exits 0 when every plate is ok or
    failed before in the same way (a known failure), 1 when a plate newly failed (every other
    plate is still complete), 2 on a configuration error.
    """
    from flows.refresh import check_models, refresh_corpus
    from plateflow.layout import CorpusLayout
    from flows.retry import retry_failed_plates
    from plateflow.config import CharacterizeParams, CropParams, RefreshConfig, corpus_root
    from plateflow.errors import ConfigError
    from app.server import local_api

    try:
        root = corpus_root(root)
        given = {"workers": workers, "chunk_size": chunk_size, "batch_plates": batch_plates,
                 "batch_megabytes": batch_megabytes, "worker_wait_minutes": worker_wait_minutes}
        dispatch = {k: v for k, v in given.items() if v is not None}  # the rest: profiles/dispatch.toml
        if worker_wait_minutes == 0:
            dispatch["worker_wait_minutes"] = None  # no limit
        cfg = RefreshConfig(
            characterize=CharacterizeParams(viz=not no_viz, max_pixels=int(max_megapixels * 1e6)),
            models=models.split(","), crop_model=crop_model, gpu_class=gpu_class,
            crop=CropParams(crop_format=crop_format, min_area_fraction=min_crop_area),
            weights_root=str(weights) if weights else None, gpu_dispatch=gpu_dispatch, verify=verify, dask=dask,
            **dispatch)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        # Said here, before a server starts or a plate is touched: a model typo, and the weights
        # when the GPU step will run here (always without PREFECT_API_URL: the local server has
        # no work pool).
        check_models(cfg, cfg.gpu_class, in_process=cfg.gpu_dispatch == "local" or not os.environ.get("PREFECT_API_URL"))
        if failed_only:
            _read_tables(root, cfg.models)
        with local_api(), progress_bars():
            if failed_only:
                state = retry_failed_plates(str(root), cfg, return_state=True)
            else:
                state = refresh_corpus(str(root), cfg, return_state=True)
    except ValueError as exc:  # parameters that do not validate, an unreadable table
        console.print(f"[red]configuration error:[/] {exc}")
        raise typer.Exit(2) from None
    failure = state.result(raise_on_failure=False) if state.is_failed() else None
    if isinstance(failure, ConfigError):  # raised by the flow before any work: nothing to summarise
        console.print(f"[red]configuration error:[/] {failure}")
        raise typer.Exit(2)
    if _table_of_run(root, state):
        _print_status(root)
    else:
        console.print(f"[red]{CorpusLayout(root).table} was not written by this run[/]: its counts are "
                      f"an earlier run's and are not shown")
    console.print(f"flow run {state.name}: {state.message}")
    if not state.is_completed():
        raise typer.Exit(1)


@contextlib.contextmanager
def progress_bars() -> Iterator[None]:
    """A progress bar per stage of the refresh (done / total, rate, ETA, failures so far),
    drawn from the flow's progress (plateflow.artifacts.listeners)."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeRemainingColumn)
    from rich.text import Text

    from plateflow import artifacts

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:,.0f} plates/s" if task.speed else "", style="progress.data.speed")

    bars = Progress(TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(), Rate(),
                    TimeRemainingColumn(), TextColumn("[red]{task.fields[failed]} failed"), console=console)
    tasks: dict[str, int] = {}

    def show(stage: str, done: int, total: int, failed: int) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total, failed=0)
        bars.update(tasks[stage], completed=done, total=total, failed=failed)

    artifacts.listeners.append(show)
    try:
        with bars:
            yield
    finally:
        artifacts.listeners.remove(show)


def _read_tables(root: Path, models: list[str]) -> None:
    """Read the corpus table and the models' embeddings tables; ``CorpusTableError`` if one is unreadable."""
    from plateflow.layout import CorpusLayout
    from plateflow.tables import read_corpus_table, read_parquet

    read_corpus_table(root)
    for m in models:
        read_parquet(CorpusLayout(root).embeddings_table(m), f"embeddings table of {m}")


def _table_of_run(root: Path, state) -> bool:
    """True if plates.parquet was written by the flow run of ``state``, or by a subflow of it
    (retry-failed-plates runs a refresh)."""
    from plateflow.errors import CorpusTableError
    from plateflow.tables import read_corpus_table, table_flow_runs

    try:
        table = read_corpus_table(root)
    except CorpusTableError:
        return False
    run_id = state.state_details.flow_run_id
    return table is not None and run_id is not None and str(run_id) in table_flow_runs(table)


@app.command()
def hardware() -> None:
    """Print the detected device, its GPU class and each model's batch size and dtype as JSON."""
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
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the worker command, do not start it.")] = False,
) -> None:
    """Start a Prefect worker on the work queue of this machine's GPU class (PLATEFLOW_GPU_CLASS
    overrides detection), running at most the queue's worker_limit flow runs at once."""
    from plateflow.hardware import gpu_class
    from plateflow.pools import work_pool, worker_name
    from plateflow.profiles import load_profiles

    cls = gpu_class(load_profiles())
    pool = work_pool()
    queue = pool.queue(cls)
    prefect_cli = Path(sys.executable).with_name("prefect")
    cmd = [str(prefect_cli), "worker", "start", "--pool", pool.name, "--work-queue", queue.name, "--type", pool.type,
           "--limit", str(queue.worker_limit), "--name", worker_name(queue, os.getpid())]
    console.print(f"GPU class {cls}: {' '.join(cmd)}")
    if not dry_run:
        os.execv(cmd[0], cmd)


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
    from app.server import local_server_info, stop_local_server

    if stop:
        pid = stop_local_server()
        console.print(f"stopped the local server (pid {pid})" if pid else "no local server was running")
        return
    info = local_server_info()
    console.print(f"local server: {info['url']} (pid {info['pid']})" if info else "no local server is running")


@app.command()
def status(root: RootOpt) -> None:
    """Summarise ROOT/plates.parquet: plates per status and every failure with its reason."""
    from plateflow.config import corpus_root
    from plateflow.errors import ConfigError, CorpusTableError

    try:
        root = corpus_root(root)
        printed, unreadable = _print_status(root)
    except CorpusTableError as exc:
        console.print(f"[red]unreadable table:[/] {exc}")
        raise typer.Exit(2) from None
    except ConfigError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    if unreadable:
        raise typer.Exit(2)
    if not printed:
        console.print(f"no plates.parquet in {root} yet: run `plateflow refresh --root {root}`")
        raise typer.Exit(1)


def _print_status(root: Path) -> tuple[bool, int]:
    """Print the corpus table's summary; (whether there is a table, how many embeddings tables
    could not be read). An unreadable corpus table raises ``CorpusTableError``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from collections import Counter

    from plateflow.artifacts import RunCounts, report_url
    from plateflow.layout import CorpusLayout
    from plateflow.tables import read_corpus_table

    table = read_corpus_table(root)
    if table is None:
        return False, 0
    rows = table.to_pylist()
    unreadable = 0
    failed = [r for r in rows if r["status"] == "failed"]

    counts = RunCounts.of(rows, set(), ["any"] if any(r.get("embed_status") for r in rows) else [])
    console.print(f"{len(rows)} plates: {len(rows) - len(failed)} ok, {len(failed)} failed; "
                  + "; ".join(counts.steps()))
    for path in CorpusLayout(root).embeddings_tables():
        try:
            ids = pq.read_table(path, columns=["plate_id"]).column("plate_id")
            dim = pq.read_schema(path).field("vector").type.list_size
        except (OSError, KeyError, pa.ArrowException) as exc:
            console.print(f"[red]{path.relative_to(root)}: unreadable[/] ({type(exc).__name__}: {exc}); a "
                          f"refresh with --models {path.stem} rebuilds it")
            unreadable += 1
            continue
        console.print(f"{path.relative_to(root)}: {pc.count_distinct(ids).as_py()} plates, "
                      + (f"{len(ids)} vectors of {dim} floats" if len(ids) else "no vectors"))
    flags = Counter(f for r in rows for f in (r.get("quality_flags") or ()))
    console.print("quality flags: " + (", ".join(f"{f} {n}" for f, n in sorted(flags.items())) if flags else "none"))
    report = CorpusLayout(root).report
    if report.is_file():
        url = report_url(root)
        console.print(f"report: {url or report}" + ("" if url else f" (to open it from a browser: `plateflow report "
                                                                  f"--root {root} --serve`)"))
    if failed:
        t = Table("plate", "step", "error", title="failed plates")
        for r in failed:
            t.add_row(r["plate_dir"], r["failed_step"] or "", r["error"] or "")
        console.print(t)
    return True, unreadable


@app.command()
def tiles(
    root: RootOpt,
    size: Annotated[str, typer.Option(metavar="WxH", help="Tile size in pixels, width x height (e.g. 512x512).")],
    out: Annotated[str, typer.Option(help="Folder or fsspec URL (s3://bucket/prefix, gs://, az://) for the WebDataset shards and tiles.parquet.")],
    mode: Annotated[TileMode, typer.Option(help="classic: whole tiles only; noise-framed: edge tiles filled with paper noise.")] = "classic",
    grayscale: Annotated[bool, typer.Option("--grayscale", help="L tiles instead of RGB.")] = False,
    test_every: Annotated[Optional[int], typer.Option(help="A plate is test when its content hash is 0 mod K.")] = None,
    test_fraction: Annotated[Optional[float], typer.Option(help="Or: this fraction of plates, by content hash, is test.")] = None,
    shard_megabytes: Annotated[float, typer.Option(help="Most megabytes in one shard.")] = 256.0,
    png_level: Annotated[int, typer.Option(help="PNG compression: 1-3 ISA-L (1 fastest), 4-9 zlib (smaller, slower), 0 stored.", min=0, max=9)] = 1,
    credentials_block: CredentialsOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Write to a destination that holds another corpus's tiles (they are replaced).")] = False,
) -> None:
    """Cut every plate into model-input tiles (the make-tiles flow): a stable train/test split
    from each plate's content hash, WebDataset shards, tiles.parquet. Unchanged plates are not
    cut again, and only the shards of changed plates are rewritten."""
    from app.server import local_api
    from flows.tiles import make_tiles
    from plateflow.config import corpus_root
    from plateflow.errors import ConfigError
    from tasks.tiles import TileParams

    import re

    if not (m := re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", size)):
        raise typer.BadParameter(f"{size!r}: give the tile size as WIDTHxHEIGHT in pixels, e.g. 512x512",
                                 param_hint="--size")
    try:
        w, h = m.groups()
        params = TileParams(width=int(w), height=int(h), mode=mode, grayscale=grayscale, test_every=test_every,
                            test_fraction=test_fraction, shard_megabytes=shard_megabytes, png_compress_level=png_level)
        root = corpus_root(root)
    except (ValueError, ConfigError) as exc:
        raise typer.BadParameter(str(exc)) from None
    from flows.tiles import open_destination

    with local_api():
        try:  # the destination is the user's to fix, before any work (a credentials block needs the server)
            open_destination(out, credentials_block, root, force)
        except ConfigError as exc:
            raise typer.BadParameter(str(exc), param_hint="--out") from None
        state = make_tiles(str(root), params, out, credentials_block, force, return_state=True)
    console.print(f"flow run {state.name}: {state.message}")
    if not state.is_completed():
        raise typer.Exit(1)


@app.command()
def features(
    root: RootOpt,
    model: Annotated[str, typer.Option(metavar="NAME", help=f"The model whose vectors to gather: {MODEL_NAMES}.")],
    tiles: Annotated[Optional[str], typer.Option(help="Embed the tiles make-tiles wrote here (a folder or bucket URL) instead: ROOT/features/<model>-tiles/.")] = None,
    credentials_block: CredentialsOpt = None,
    gpu_class: Annotated[Optional[str], typer.Option(help="GPU class for the tiles' embedding (default: detected).")] = None,
    weights: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Folder with one folder of weights per model, named as the model (default: the Hugging Face cache).")] = None,
) -> None:
    """Build ROOT/features/<model>/ (float16, memory-mappable) from the embeddings an earlier
    refresh stored, without recomputing any (refreshes keep it in step afterwards); with
    --tiles, embed the tiles (each stored once) into ROOT/features/<model>-tiles/."""
    from plateflow.config import corpus_root
    from plateflow.corpus import corpus_lock
    from plateflow.errors import ConfigError
    from plateflow.layout import CorpusLayout
    from tasks.features import build_from_embeddings_table

    try:
        root = corpus_root(root)
        if tiles is None:
            with corpus_lock(root, f"plateflow features {model}"):
                version, written, plates = build_from_embeddings_table(root, model)
            console.print(f"{plates} plates in {CorpusLayout(root).features(model)} "
                          f"(version {version}{'' if written else ', unchanged'})")
            return
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    from app.server import local_api
    from flows.features import tile_features

    with local_api():
        state = tile_features(str(root), model, tiles, credentials_block, gpu_class,
                              weights_root=str(weights) if weights else None, return_state=True)
    if not state.is_completed():
        console.print(f"[red]tile-features failed[/]: {state.message}")
        raise typer.Exit(1)
    console.print(f"{state.result()} tiles in {CorpusLayout(root).features(model + '-tiles')}")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give numbers separated by commas, e.g. 1e-3,1e-2") from None


@app.command("train-head")
def train_head(
    root: RootOpt,
    model: Annotated[str, typer.Option(metavar="NAME", help=f"The model whose cached features to train on: {MODEL_NAMES}.")],
    label: Annotated[str, typer.Option(help="The manifest key with each plate's class (or the classes' name with --labels).")],
    labels: Annotated[Optional[Path], typer.Option(help="A CSV of plate_id,label instead of the manifests' key.")] = None,
    head: Annotated[str, typer.Option(help="linear, mlp, or both: linear,mlp (each is its own experiment).")] = "linear",
    lr: Annotated[str, typer.Option(help="Learning rate(s), comma-separated: each with each head.")] = "1e-3",
    epochs: Annotated[int, typer.Option(help="Passes over the train plates.", min=1)] = 30,
    seed: Annotated[int, typer.Option(help="Seeds the weights and the minibatch order.")] = 0,
    hidden: Annotated[int, typer.Option(help="Hidden units of the mlp head.", min=1)] = 256,
    test_every: Annotated[Optional[int], typer.Option(help="Test plates: content hash 0 mod K (the tiles' rule).")] = None,
    test_fraction: Annotated[float, typer.Option(help="Or: this share of plates by content hash is test.")] = 0.2,
    features: Annotated[str, typer.Option("--features", help="plates, or tiles (a head per tile, from `plateflow features --tiles`).")] = "plates",
) -> None:
    """Train light classifier heads on cached features (the train-head flow); each (head, lr) is
    an experiment in ROOT/experiments/experiments.db with its checkpoint and confusion matrix."""
    from app.server import local_api
    from flows.heads import train_head as train_flow
    from plateflow.config import corpus_root
    from plateflow.errors import ConfigError
    from plateflow.experiments import experiments as ledger_rows

    if features not in ("plates", "tiles"):
        raise typer.BadParameter(f"--features {features!r}: plates or tiles")
    heads = [h.strip() for h in head.split(",") if h.strip()]
    if not heads or any(h not in ("linear", "mlp") for h in heads):
        raise typer.BadParameter(f"--head {head!r}: linear, mlp or linear,mlp")
    try:
        root = corpus_root(root)
        from tasks.heads import check_labels, read_labels, require_features

        store = require_features(root, model, features)  # said before any run, in one line
        from plateflow.experiments import check as ledger_check

        ledger_check(root)
        if labels is not None:  # a bad labels file is a parameter error, before any run
            check_labels(store, read_labels(root, label, labels), str(labels))
    except (ConfigError, OSError) as exc:
        raise typer.BadParameter(str(exc)) from None
    with local_api():
        state = train_flow(str(root), model, label, str(labels) if labels else None, heads, _floats(lr), epochs, seed,
                           hidden, test_every, None if test_every else test_fraction, features, return_state=True)
    if not state.is_completed():
        console.print(f"[red]train-head failed[/]: {state.message}")
        raise typer.Exit(1)
    ids = set(state.result())
    _print_experiments([r for r in ledger_rows(root) if r["id"] in ids], balance=True)


def _print_experiments(rows: list[dict], balance: bool = False) -> None:
    table = Table()
    table.add_column("id", no_wrap=True)  # copied into `plateflow predict --experiment`
    for name in ("model", "label", "head", "lr", "epochs", "train", "test", "accuracy", "macro-F1", "seconds"):
        table.add_column(name)
    for r in rows:
        hp = r["hyperparameters"]
        table.add_row(r["id"], r["model"], r["label"], r["head"], f"{hp['lr']:g}", str(hp["epochs"]),
                      str(r["train_size"]), str(r["test_size"]),
                      "–" if r["accuracy"] is None else f"{r['accuracy']:.3f}",
                      "–" if r["macro_f1"] is None else f"{r['macro_f1']:.3f}", f"{r['duration_s']:.1f}")
    console.print(table)
    if balance and rows:
        for split, counts in rows[0]["class_balance"].items():
            console.print(f"{split}: " + ", ".join(f"{c} {n}" for c, n in counts.items()))


@app.command()
def experiments(root: RootOpt) -> None:
    """List the head trainings of ROOT/experiments/experiments.db."""
    from plateflow.config import corpus_root
    from plateflow.experiments import experiments as ledger_rows

    from plateflow.errors import ConfigError

    try:
        rows = ledger_rows(corpus_root(root))
    except ConfigError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    if not rows:
        console.print("no experiments yet: `plateflow train-head` trains one")
        return
    _print_experiments(rows)


@app.command()
def predict(
    root: RootOpt,
    experiment: Annotated[str, typer.Option(help="The experiment id (plateflow experiments lists them).")],
) -> None:
    """Write pred_<label> and pred_<label>_p into plates.parquet from an experiment's head, for
    every plate with features; later refreshes predict new and changed plates with it."""
    from app.server import local_api
    from flows.heads import predict_head
    from plateflow.config import corpus_root
    from plateflow.experiments import experiments as ledger_rows

    from plateflow.errors import ConfigError
    from tasks.heads import check_predictable

    try:
        root = corpus_root(root)
        known = ledger_rows(root, experiment)
        if known:
            check_predictable(root, experiment)  # a damaged checkpoint or store: one line, before any run
    except ConfigError as exc:
        console.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    if not known:
        raise typer.BadParameter(f"no experiment {experiment!r} in {root}: `plateflow experiments --root {root}` lists them")
    with local_api():
        state = predict_head(str(root), experiment, return_state=True)
    if not state.is_completed():
        console.print(f"[red]predict failed[/]: {state.message}")
        raise typer.Exit(1)
    console.print(f"predicted {state.result()} plates with {experiment}")


@app.command()
def report(
    root: RootOpt,
    serve: Annotated[bool, typer.Option("--serve", help="Serve it over HTTP until Ctrl-C (the Prefect UI links to it there).")] = False,
    host: Annotated[str, typer.Option(help="Interface to serve on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to serve on.")] = 4201,
) -> None:
    """Build ROOT/reports/ from plates.parquet (a refresh builds it too); with --serve, serve it."""
    from app.reports import ReportServer
    from plateflow.config import corpus_root
    from plateflow.errors import ConfigError, CorpusTableError
    from tasks.report import build_report

    try:
        root = corpus_root(root)
        path = build_report(root)
    except (ConfigError, CorpusTableError) as exc:
        if not serve:
            console.print(f"[red]{exc}[/]")
            raise typer.Exit(2) from None
        console.print(f"[yellow]{exc}[/]: serving what a refresh of it will write")  # `plateflow server`'s new corpus
        root, path = root.expanduser().resolve(), None
    if path is None and not serve:
        console.print(f"[red]{root} has no plates.parquet yet[/]: run `plateflow refresh --root {root}` first")
        raise typer.Exit(2)
    console.print(f"report: {path}" if path else "no report yet: the next refresh writes it")
    if serve:
        try:
            server = ReportServer([root], host, port)
        except OSError as exc:
            console.print(f"[red]cannot serve on {host}:{port}: {exc.strerror or exc}[/]; choose another with --port")
            raise typer.Exit(2) from None
        console.print(f"serving {server.report_url(root)} (Ctrl-C to stop)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()


@app.command()
def demo(
    root: Annotated[Path, typer.Option("--root", "-r", help="Where to build the demo corpus.")] = Path("demo-corpus"),
    models: Annotated[str, typer.Option(metavar="NAMES", help=f"Also embed and smart-crop with these models (comma-separated: {MODEL_NAMES}); needs their weights.")] = "",
    weights: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Folder with one folder of weights per model, named as the model (default: the Hugging Face cache).")] = None,
) -> None:
    """Build a demo corpus from scikit-image's sample photographs, ingest it and refresh it."""
    from app.demo import write_demo_sources
    from plateflow.layout import CorpusLayout

    root = root.expanduser().resolve()
    sources = write_demo_sources(CorpusLayout(root).demo_sources)
    console.print(f"demo sources: {len(sources)} plates written under {sources[0].parent}")
    ingest(sources, root, max_megapixels=MAX_MEGAPIXELS)
    refresh(root, workers=None, no_viz=False, max_megapixels=MAX_MEGAPIXELS, models=models, crop_model=None,
            crop_format="jpeg", min_crop_area=0.0, gpu_class=None, weights=weights, failed_only=False,
            verify=False, batch_plates=None, batch_megabytes=None)
    console.print(f"open {CorpusLayout(root).plates} to see each plate's JSON and viz/ files")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
