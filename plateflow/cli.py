"""The plateflow command line: a thin layer over the functions the flows call."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

# Offline-friendly defaults for Prefect's embedded server; a user's own settings win.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

app = typer.Typer(help="Characterise, embed and smart-crop collections of plates with Prefect.",
                  no_args_is_help=True, add_completion=False)
console = Console()

RootOpt = Annotated[Path, typer.Option("--root", "-r", help="Corpus root (holds plates_structured/).")]


@app.command()
def ingest(
    sources: Annotated[list[Path], typer.Argument(help="Image files or folders (searched recursively).")],
    root: RootOpt,
) -> None:
    """Copy images into ROOT in the notebooks' layout; sources are never moved or modified."""
    from rich.progress import Progress

    from plateflow.corpus import ingest as ingest_files, iter_source_files

    total = sum(1 for _ in iter_source_files(sources))
    with Progress(console=console, transient=True) as progress:
        bar = progress.add_task("ingesting", total=total)
        report = ingest_files(sources, root, progress=lambda p: progress.advance(bar))
    for src, plate_id in report.added:
        console.print(f"[green]added[/] {plate_id} <- {src}")
    for src, reason in report.skipped:
        console.print(f"[yellow]skipped[/] {src}: {reason}")
    console.print(f"{len(report.added)} added, {len(report.skipped)} skipped")


@app.command()
def refresh(
    root: RootOpt,
    workers: Annotated[Optional[int], typer.Option(help="Plates processed at once.")] = None,
    no_viz: Annotated[bool, typer.Option("--no-viz", help="Skip the viz/ PNG files.")] = False,
    max_megapixels: Annotated[float, typer.Option(help="Plates above this size fail.")] = 250.0,
) -> None:
    """Run the refresh flow: only plates whose content, parameters or code changed are recomputed.

    With no Prefect server configured (PREFECT_API_URL unset) it runs on Prefect's embedded one.
    Exits 1 when any plate failed; every other plate is still complete.
    """
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.refresh import refresh_corpus
    from plateflow.config import CharacterizeParams, RefreshConfig
    from plateflow.errors import ConfigError

    try:
        params = CharacterizeParams(viz=not no_viz, max_pixels=int(max_megapixels * 1e6))
        cfg = RefreshConfig(root=root, characterize=params, **({"workers": workers} if workers else {}))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    flow_fn = refresh_corpus.with_options(task_runner=ThreadPoolTaskRunner(max_workers=cfg.workers))
    state = flow_fn(root=str(cfg.root), characterize_params=params, return_state=True)
    _print_status(cfg.root)
    console.print(f"flow run {state.name}: {state.message}")
    if not state.is_completed():
        raise typer.Exit(1)


@app.command()
def status(root: RootOpt) -> None:
    """Summarise ROOT/plates.parquet: plates per status and every failure with its reason."""
    if not _print_status(root.expanduser().resolve()):
        console.print(f"no plates.parquet under {root}: run `plateflow refresh --root {root}`")
        raise typer.Exit(1)


def _print_status(root: Path) -> bool:
    from tasks.save import read_corpus_table

    table = read_corpus_table(root)
    if table is None:
        return False
    rows = table.to_pylist()
    failed = [r for r in rows if r["status"] == "failed"]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.get("characterize_status") or "-"] = counts.get(r.get("characterize_status") or "-", 0) + 1
    console.print(f"{len(rows)} plates: {len(rows) - len(failed)} ok, {len(failed)} failed "
                  f"(characterize: {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))})")
    if failed:
        t = Table("plate", "step", "error", title="failed plates")
        for r in failed:
            t.add_row(r["plate_dir"], r["failed_step"] or "", r["error"] or "")
        console.print(t)
    return True


@app.command()
def demo(
    root: Annotated[Path, typer.Option("--root", "-r", help="Where to build the demo corpus.")] = Path("demo-corpus"),
) -> None:
    """Build a demo corpus from scikit-image's sample photographs, ingest it and refresh it."""
    from plateflow.demo import write_demo_sources

    root = root.expanduser().resolve()
    sources = write_demo_sources(root / ".plateflow" / "demo-sources")
    console.print(f"demo sources: {len(sources)} plates written under {sources[0].parent}")
    ingest(sources, root)
    refresh(root, workers=None, no_viz=False, max_megapixels=250.0)
    console.print(f"open {root / 'plates_structured'} to see each plate's JSON and viz/ files")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
