"""The corpus commands: ingest, refresh (with its progress bars), status, report, demo."""

from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.table import Table

from app.cli import (described, app, console, RootOpt, CropFormat, Dispatch, POLICY, MODEL_NAMES, CLASS_NAMES, _policy,
                     CredentialsOpt)
from plateflow.config import CropParams, RefreshConfig
from plateflow.limits import MAX_MEGAPIXELS
from plateflow.status import Status


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
    from plateflow.ingest import ingest as ingest_files, iter_source_files
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
                      + ("refreshes the new plates" if event.payload["plates"] is not None else
                         f"refreshes the corpus ({len(report.added)} new plates are more than an event lists; "
                         f"its unchanged plates cost a few stats each)"))
    else:
        console.print(f"PREFECT_API_URL is unset, so no deployment was told: run `plateflow refresh --root "
                      f"{Path(root).expanduser().resolve()}` (or set PREFECT_API_URL to the server of "
                      f"`plateflow server` and ingest there)")
    if report.stopped:
        raise typer.Exit(1)

@app.command()
def refresh(
    root: RootOpt,
    workers: Annotated[Optional[int], typer.Option(metavar="N", min=1, help=described(RefreshConfig, "workers", f"default: one per core, at most {POLICY.cpu.max_workers if POLICY else 'max_workers of profiles/dispatch.toml'}"))] = None,
    no_viz: Annotated[bool, typer.Option("--no-viz", help="Skip the viz/ PNG files.")] = False,
    max_megapixels: Annotated[float, typer.Option(metavar="MP", help="Plates above this size fail.")] = MAX_MEGAPIXELS,
    models: Annotated[str, typer.Option(metavar="NAMES", help=f"Comma-separated embedding models: {MODEL_NAMES}, or the corpus's fine-tuned encoders (experiments/models.json). Default: none (characterization only).")] = "",
    crop_model: Annotated[Optional[str], typer.Option(metavar="NAME", help=described(RefreshConfig, "crop_model"))] = None,
    crop_format: Annotated[CropFormat, typer.Option(help=described(CropParams, "crop_format"))] = "jpeg",
    min_crop_area: Annotated[float, typer.Option(metavar="FRACTION", help=described(CropParams, "min_area_fraction"))] = 0.0,
    crop_to_class: Annotated[Optional[str], typer.Option(metavar="CLASS", help=described(CropParams, "mask_class"))] = None,
    gpu_class: Annotated[Optional[str], typer.Option(metavar="CLASS", help=described(RefreshConfig, "gpu_class", f"one of {CLASS_NAMES}"))] = None,
    chunk_size: Annotated[Optional[int], typer.Option(metavar="N", help=described(RefreshConfig, "chunk_size", _policy('gpu', 'chunk_size')), min=1)] = None,
    gpu_dispatch: Annotated[Dispatch, typer.Option(help=described(RefreshConfig, "gpu_dispatch"))] = "auto",
    worker_wait_minutes: Annotated[Optional[float], typer.Option(metavar="MINUTES", help=described(RefreshConfig, "worker_wait_minutes", f"on the command line 0; {_policy('gpu', 'worker_wait_minutes')}"), min=0)] = None,
    weights: Annotated[Optional[Path], typer.Option(metavar="DIR", help=described(RefreshConfig, "weights_root"))] = None,
    failed_only: Annotated[bool, typer.Option("--failed-only", help="Retry only the plates whose last status is failed (the retry-failed-plates flow).")] = False,
    verify: Annotated[bool, typer.Option("--verify", help=described(RefreshConfig, "verify"))] = False,
    batch_plates: Annotated[Optional[int], typer.Option(metavar="N", help=described(RefreshConfig, "batch_plates", _policy('cpu', 'batch_plates')), min=1)] = None,
    batch_megabytes: Annotated[Optional[float], typer.Option(metavar="MB", help=described(RefreshConfig, "batch_megabytes", _policy('cpu', 'batch_megabytes')), min=0.001)] = None,
    dask: Annotated[Optional[str], typer.Option(metavar="ADDRESS", help=described(RefreshConfig, "dask"))] = None,
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
    from app.local_server import local_api

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
            crop=CropParams(crop_format=crop_format, min_area_fraction=min_crop_area, mask_class=crop_to_class),
            weights_root=str(weights) if weights else None, gpu_dispatch=gpu_dispatch, verify=verify, dask=dask,
            **dispatch)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        # Said here, before a server starts or a plate is touched: a model typo, and the weights
        # when the GPU step will run here (always without PREFECT_API_URL: the local server has
        # no work pool).
        check_models(cfg, cfg.gpu_class, in_process=cfg.gpu_dispatch == "local" or not os.environ.get("PREFECT_API_URL"),
                     root=root)
        if failed_only:
            _read_tables(root, cfg.models)
        gc.freeze()  # what the imports made lives to the end: the run's collections skip it
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
        _print_status(root, steps=False)  # the run's own counts are in its last line
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

    # Redrawn 4 times a second at a terminal; elsewhere (a nightly job's log) drawn once, at the
    # end: a redraw holds the interpreter from the plates' work for as long as it takes.
    bars = Progress(TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(), Rate(),
                    TimeRemainingColumn(), TextColumn("[red]{task.fields[failed]} failed"), console=console,
                    auto_refresh=console.is_terminal, refresh_per_second=4)
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
    """True if plates.parquet is this run's: written by the flow run of ``state``, or by a
    subflow of it (retry-failed-plates runs a refresh), or found current by it (its summary
    names the table: a refresh that changed nothing leaves the file as it was)."""
    from plateflow.errors import CorpusTableError
    from plateflow.layout import CorpusLayout
    from plateflow.tables import read_corpus_table, table_flow_runs

    try:
        table = read_corpus_table(root)
    except CorpusTableError:
        return False
    run_id = state.state_details.flow_run_id
    current = f"table: {CorpusLayout(root).table} (unchanged)" in (state.message or "")
    return table is not None and (current or (run_id is not None and str(run_id) in table_flow_runs(table)))

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

def _print_status(root: Path, steps: bool = True) -> tuple[bool, int]:
    """Print the corpus table's summary; (whether there is a table, how many embeddings tables
    could not be read). ``steps``: also how each plate's row was made when it last changed
    (computed or cached per step: a table's, not a run's, counts). An unreadable corpus table
    raises ``CorpusTableError``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from plateflow.artifacts import RunCounts, report_url
    from plateflow.layout import CorpusLayout
    from plateflow.tables import read_corpus_table

    table = read_corpus_table(root, ["plate_dir", "status", "failed_step", "error", "characterize_status",
                                     "embed_status", "quality_flags"])  # what it counts (10^5 rows)
    if table is None:
        return False, 0
    unreadable = 0
    failed = table.filter(pc.fill_null(pc.equal(table.column("status"), Status.FAILED), False)).select(
        ["plate_dir", "failed_step", "error"]).to_pylist()
    made = "; as each row was made when it last changed: " + "; ".join(RunCounts.of_table(table).steps()) if steps else ""
    console.print(f"{table.num_rows} plates: {table.num_rows - len(failed)} ok, {len(failed)} failed{made}")
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
    counted = pc.value_counts(pc.list_flatten(table.column("quality_flags"))).to_pylist()
    flags = {c["values"]: c["counts"] for c in counted if c["values"] is not None}
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
    from plateflow.report import build_report

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
    weights: Annotated[Optional[Path], typer.Option(metavar="DIR", help=described(RefreshConfig, "weights_root"))] = None,
) -> None:
    """Build a demo corpus from scikit-image's sample photographs, ingest it and refresh it."""
    from app.demo import write_demo_sources
    from plateflow.layout import CorpusLayout

    root = root.expanduser().resolve()
    sources = write_demo_sources(CorpusLayout(root).demo_sources)
    console.print(f"demo sources: {len(sources)} plates written under {sources[0].parent}")
    ingest(sources, root, max_megapixels=MAX_MEGAPIXELS)
    refresh(root, workers=None, no_viz=False, max_megapixels=MAX_MEGAPIXELS, models=models, crop_model=None,
            crop_format="jpeg", min_crop_area=0.0, crop_to_class=None, gpu_class=None, weights=weights, failed_only=False,
            verify=False, batch_plates=None, batch_megabytes=None)
    console.print(f"open {CorpusLayout(root).plates} to see each plate's JSON and viz/ files")
