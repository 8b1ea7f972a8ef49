"""The training-data commands: tiles, features, train-head, experiments, predict."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from app.cli import MODEL_NAMES, CredentialsOpt, RootOpt, TileMode, app, console, described
from plateflow.config import HeadConfig
from plateflow.tiles import TileParams


HEAD = HeadConfig().model_dump()  # train-head's defaults, set once (plateflow/config.py: HeadConfig)


@app.command()
def tiles(
    root: RootOpt,
    size: Annotated[str, typer.Option(metavar="WxH", help="Tile size in pixels, width x height (e.g. 512x512).")],
    out: Annotated[str, typer.Option(help="Folder or fsspec URL (s3://bucket/prefix, gs://, az://) for the WebDataset shards and tiles.parquet.")],
    mode: Annotated[TileMode, typer.Option(help=described(TileParams, "mode"))] = "classic",
    grayscale: Annotated[bool, typer.Option("--grayscale", help=described(TileParams, "grayscale"))] = False,
    test_every: Annotated[Optional[int], typer.Option(help=described(TileParams, "test_every"))] = None,
    test_fraction: Annotated[Optional[float], typer.Option(help=described(TileParams, "test_fraction"))] = None,
    shard_megabytes: Annotated[float, typer.Option(help=described(TileParams, "shard_megabytes"))] = 256.0,
    png_level: Annotated[int, typer.Option(help=described(TileParams, "png_compress_level"), min=0, max=9)] = 1,
    credentials_block: CredentialsOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Write to a destination that holds another corpus's tiles (they are replaced).")] = False,
) -> None:
    """Cut every plate into model-input tiles (the make-tiles flow): a stable train/test split
    from each plate's content hash, WebDataset shards, tiles.parquet. Unchanged plates are not
    cut again, and only the shards of changed plates are rewritten."""
    from app.local_server import local_api
    from flows.tiles import make_tiles
    from plateflow.config import corpus_root
    from plateflow.errors import ConfigError

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
    from plateflow.features import build_from_embeddings_table

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
    from app.local_server import local_api
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
    lr: Annotated[str, typer.Option(help=described(HeadConfig, "lr", "comma-separated: each with each head"))] = f"{HEAD['lr']:g}",
    epochs: Annotated[int, typer.Option(help=described(HeadConfig, "epochs"), min=1)] = HEAD["epochs"],
    seed: Annotated[int, typer.Option(help=described(HeadConfig, "seed"))] = HEAD["seed"],
    hidden: Annotated[int, typer.Option(help=described(HeadConfig, "hidden"), min=1)] = HEAD["hidden"],
    test_every: Annotated[Optional[int], typer.Option(help=described(HeadConfig, "test_every"))] = HEAD["test_every"],
    test_fraction: Annotated[float, typer.Option(help=described(HeadConfig, "test_fraction"))] = HEAD["test_fraction"],
    features: Annotated[str, typer.Option("--features", help="plates, or tiles (a head per tile, from `plateflow features --tiles`).")] = "plates",
) -> None:
    """Train light classifier heads on cached features (the train-head flow); each (head, lr) is
    an experiment in ROOT/experiments/experiments.db with its checkpoint and confusion matrix."""
    from app.local_server import local_api
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
        from plateflow.heads import require_features
        from plateflow.labels import check_labels, read_labels

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
    for name in ("model", "label", "head", "lr", "epochs", "train", "test", "accuracy", "macro-F1", "mIoU", "seconds"):
        table.add_column(name)
    for r in rows:
        hp = r["hyperparameters"]
        table.add_row(r["id"], r["model"], r["label"], r["head"], f"{hp['lr']:g}", str(hp["epochs"]),
                      str(r["train_size"]), str(r["test_size"]),
                      "–" if r["accuracy"] is None else f"{r['accuracy']:.3f}",
                      "–" if r["macro_f1"] is None else f"{r['macro_f1']:.3f}",
                      "–" if r.get("miou") is None else f"{r['miou']:.3f}", f"{r['duration_s']:.1f}")
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
    from app.local_server import local_api
    from flows.heads import predict_head
    from plateflow.config import corpus_root
    from plateflow.experiments import experiments as ledger_rows

    from plateflow.errors import ConfigError
    from plateflow.predictions import check_predictable

    try:
        root = corpus_root(root)
        known = ledger_rows(root, experiment)
        if known and known[0]["feature_kind"] == "patches":
            raise typer.BadParameter(f"experiment {experiment} is a segmentation: `plateflow predict-seg --root {root} "
                                     f"--experiment {experiment}` writes its masks", param_hint="--experiment")
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
