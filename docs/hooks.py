"""MkDocs hooks: pages generated from the code and the data at every build, so they cannot drift.

- ``reference/cli.md``: every command's ``--help``, from the application itself (``app.cli``);
- ``performance.md``: a table per benchmark, from ``benchmarks/results/*.json``;
- screenshots: a page's ``<!-- screenshots: DIR -->`` becomes the PNGs the browser tests left in
  ``test-output/DIR/`` (the report and the Prefect UI as a browser showed them), or a line
  saying how to make them when the tests have not run here.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

from mkdocs.structure.files import File

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def cli_reference() -> str:
    import click
    import typer

    os.environ["COLUMNS"] = "100"  # the width the help is wrapped at
    from app.cli import app

    group = typer.main.get_command(app)
    ctx = click.Context(group, info_name="plateflow")
    out = ["# CLI reference", "",
           "Generated from the command line itself at every docs build: what `plateflow COMMAND --help` prints.", "",
           "```text", group.get_help(ctx), "```", ""]
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        sub = click.Context(cmd, info_name=f"plateflow {name}", parent=None)
        out += [f"## plateflow {name}", "", "```text", cmd.get_help(sub), "```", ""]
    return "\n".join(out)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (dict, list)):
        return f"`{json.dumps(value)[:60]}`"
    return str(value)


def _rows(figures: dict, prefix: str = "") -> list[str]:
    """A row per figure; a figure that is a table of its own (a dict) gives a row per entry."""
    rows = []
    for key, value in figures.items():
        if isinstance(value, dict) and all(not isinstance(v, dict) for v in value.values()):
            rows.append(f"| {prefix}{key} | " + ", ".join(f"{k}: {_cell(v)}" for k, v in value.items()) + " |")
        elif isinstance(value, dict):
            rows += _rows(value, f"{prefix}{key} / ")
        elif not isinstance(value, list):
            rows.append(f"| {prefix}{key} | {_cell(value)} |")
    return rows


def _numbers(figures: dict, prefix: str = "") -> dict[str, float]:
    """Every number among a result's figures, by its path: what a bar chart can show."""
    out = {}
    for key, value in figures.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key} / "))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out


def plot(data: dict) -> bytes | None:
    """A bar chart (matplotlib) of a result's timings (the figures in seconds), or None."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    import io

    seconds = {k: v for k, v in _numbers(data.get("figures", {})).items() if k.endswith("_s") or "seconds" in k}
    if len(seconds) < 2:
        return None
    names = list(seconds)[::-1]
    fig = Figure(figsize=(7, 0.35 * len(names) + 1.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.barh(names, [seconds[n] for n in names], color="#3b6ea5")
    ax.set_xlabel("seconds")
    ax.set_title(f"{data.get('benchmark')}: {data.get('date', '')}", fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


PLOTS: dict[str, bytes] = {}


def performance() -> str:
    out = ["# Performance", "",
           "Each benchmark in `benchmarks/` writes its figures to `benchmarks/results/<benchmark>.json` "
           "(the machine, the versions, the command and the date with them); this page is rendered from "
           "those files at every docs build. Earlier versions' figures: `HISTORY.md`.", ""]
    results = sorted((REPO / "benchmarks" / "results").glob("*.json"))
    for path in results:
        data = json.loads(path.read_text())
        figures = data.get("figures", {})
        name = data.get("benchmark", path.stem)
        out += [f"## {name}" + (f" ({figures['plates']:,} plates)" if path.stem != name and "plates" in figures else ""), "",
                f"`{data.get('command', '')}`, {data.get('date', '')}, on {data.get('machine', {}).get('platform', '?')} "
                f"({data.get('machine', {}).get('cpus', '?')} CPUs).", "",
                "| figure | value |", "|---|---|"]
        out += _rows(figures)
        out.append("")
        png = plot(data)
        if png is not None:
            PLOTS[f"assets/performance/{path.stem}.png"] = png
            out += [f"![{path.stem}: its timings](assets/performance/{path.stem}.png)", ""]
    benchmarks = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem not in ("results",))
    missing = [b for b in benchmarks if not any((REPO / "benchmarks" / "results").glob(f"{b}*.json"))]
    if missing:
        out += ["## Not yet published as data", "",
                "These benchmarks print their tables but do not yet write a results file: "
                + ", ".join(f"`benchmarks/{b}.py`" for b in missing) + ". Their last published figures are in `HISTORY.md`.", ""]
    return "\n".join(out)


def models_table() -> str:
    """The models of profiles/models.toml: name, weights on the hub, input size, vector size, and
    the batch size per GPU class."""
    import tomllib

    models = tomllib.loads((REPO / "profiles" / "models.toml").read_text())
    classes = list(next(iter(models.values()))["batch"])
    out = ["| model | weights (hub id) | backend | input | vector | " + " | ".join(classes) + " |",
           "|---|---|---|---|---|" + "---|" * len(classes)]
    for name, m in models.items():
        out.append(f"| `{name}` | `{m['hub_id']}` | {m['backend']} | {m['input_size']} px | {m['embed_dim']} | "
                   + " | ".join(str(m["batch"].get(c, "—")) for c in classes) + " |")
    return "\n".join(out)


def gpu_classes_table() -> str:
    """The GPU classes of profiles/gpu_classes.toml: each a work queue of the pool `plates`."""
    import tomllib

    classes = tomllib.loads((REPO / "profiles" / "gpu_classes.toml").read_text())["classes"]
    out = ["| class | queue | what it is | dtype | readers | compiled |", "|---|---|---|---|---|---|"]
    for name, c in classes.items():
        out.append(f"| `{name}` | `{name.lower().replace('_', '-')}` | {c.get('description', '')} | "
                   f"{c.get('dtype', '')} | {c.get('readers', 'device')} | {c.get('compile') or 'no'} |")
    return "\n".join(out)


SHOTS = re.compile(r"<!-- screenshots: ([\w-]+) -->")


def on_files(files, config):
    for uri, content in (("reference/cli.md", cli_reference()), ("performance.md", performance())):
        files.append(File.generated(config, uri, content=content))
    for uri, png in PLOTS.items():
        files.append(File.generated(config, uri, content=png))
    for folder in sorted({m for page in Path(config["docs_dir"]).rglob("*.md") for m in SHOTS.findall(page.read_text())}):
        for png in sorted((REPO / "test-output" / folder).glob("*.png")):
            files.append(File.generated(config, f"assets/screenshots/{folder}/{png.name}", abs_src_path=str(png)))
    return files


def on_page_markdown(markdown, page, config, files):
    def shots(match) -> str:
        folder = match.group(1)
        pngs = sorted((REPO / "test-output" / folder).glob("*.png"))
        if not pngs:
            return (f"*Screenshots: the browser tests write them to `test-output/{folder}/`; run "
                    f"`uv run pytest -m browser` and build the docs again to see them here.*")
        depth = "../" * page.file.src_uri.count("/")
        return "\n\n".join(f"![{p.stem.replace('-', ' ')}]({depth}assets/screenshots/{folder}/{p.name})" for p in pngs)

    return (SHOTS.sub(shots, markdown).replace("<!-- models -->", models_table())
            .replace("<!-- gpu-classes -->", gpu_classes_table()))
