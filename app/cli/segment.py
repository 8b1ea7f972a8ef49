"""The segmentation commands: patches, train-seg, predict-seg."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from app.cli import MODEL_NAMES, RootOpt, app, console, described
from plateflow.errors import problem
from plateflow.segment.patches import PatchParams
from plateflow.segment.train import SegConfig

PATCH = PatchParams().model_dump()
SEG = SegConfig().model_dump()
ModelOpt = Annotated[str, typer.Option(help=f"The encoder, from profiles/models.toml: {MODEL_NAMES}.")]
PatchSize = Annotated[int, typer.Option(help=described(PatchParams, "patch_size"), min=32, max=4096)]
Overlap = Annotated[int, typer.Option(help=described(PatchParams, "overlap"), min=0)]


def _patch_params(patch_size: int, overlap: int) -> PatchParams:
    try:
        return PatchParams(patch_size=patch_size, overlap=overlap)
    except ValueError as exc:
        raise typer.BadParameter(problem(exc), param_hint="--overlap") from None


def _run(flow, *args) -> object:
    from app.local_server import local_api

    with local_api():
        state = flow(*args, return_state=True)
    if not state.is_completed():
        console.print(f"[red]{flow.name} failed[/]: {state.message}")
        raise typer.Exit(1)
    console.print(f"flow run {state.name}: {state.message}")
    return state


@app.command()
def patches(
    root: RootOpt,
    model: ModelOpt,
    patch_size: PatchSize = PATCH["patch_size"],
    overlap: Overlap = PATCH["overlap"],
) -> None:
    """Cut every plate into overlapping patches at full resolution and keep each patch's
    encoder tokens in float16 (the patch-features flow): the patch index is
    ROOT/features/MODEL-patches/patches.parquet. Unchanged plates are not read again."""
    from flows.segment import patch_features
    from plateflow.config import corpus_root
    from plateflow.embed.models import require_weights
    from plateflow.errors import ConfigError
    from plateflow.profiles import load_profiles

    params = _patch_params(patch_size, overlap)
    try:
        root = corpus_root(root)
        require_weights(load_profiles(root=root).model(model))
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    _run(patch_features, str(root), model, params)


@app.command("train-seg")
def train_seg(
    root: RootOpt,
    model: ModelOpt,
    masks: Annotated[Path, typer.Option(metavar="DIR", help="Indexed PNGs named <plate_id>.png or <plate folder>.png "
                                                           "(pixel: class index; 255: unlabelled), and classes.txt "
                                                           "(a class name a line).")],
    patch_size: PatchSize = PATCH["patch_size"],
    overlap: Overlap = PATCH["overlap"],
    head: Annotated[Literal["linear", "conv"], typer.Option(help=described(SegConfig, "head"))] = SEG["head"],
    epochs: Annotated[int, typer.Option(help=described(SegConfig, "epochs"), min=1)] = SEG["epochs"],
    lr: Annotated[float, typer.Option(help=described(SegConfig, "lr"))] = SEG["lr"],
    test_fraction: Annotated[float, typer.Option(help=described(SegConfig, "test_fraction"))] = SEG["test_fraction"],
    seed: Annotated[int, typer.Option(help=described(SegConfig, "seed"))] = SEG["seed"],
) -> None:
    """Train a segmentation head on the patch tokens of the plates with a mask (the
    train-segmentation flow), scored by the IoU of the held-out plates' stitched masks; the run
    is an experiment in ROOT/experiments/experiments.db."""
    from flows.segment import train_segmentation
    from plateflow.config import corpus_root
    from plateflow.errors import ConfigError

    params = _patch_params(patch_size, overlap)
    try:
        config = SegConfig(head=head, epochs=epochs, lr=lr, test_fraction=test_fraction, seed=seed)
        root = corpus_root(root)
    except (ValueError, ConfigError) as exc:
        raise typer.BadParameter(problem(exc)) from None
    if not masks.is_dir():
        raise typer.BadParameter(f"{masks} is not a folder of mask PNGs", param_hint="--masks")
    state = _run(train_segmentation, str(root), model, str(masks.resolve()), params, config)
    from app.cli.training import _print_experiments
    from plateflow.experiments import experiments

    row = experiments(root, state.result())[0]
    _print_experiments([row])
    console.print("per class IoU on the held-out plates: " + ", ".join(
        f"{c} {v['iou']:.3f}" for c, v in row["per_class"].items()))


@app.command("predict-seg")
def predict_seg(
    root: RootOpt,
    experiment: Annotated[str, typer.Option(help="The segmentation experiment's id (plateflow experiments lists them).")],
) -> None:
    """Write a segmentation experiment's masks (the predict-segmentation flow): each plate's
    full-resolution mask in its segmentation/ folder, an overlay in viz/, and per-class area
    shares (seg_<class>) in plates.parquet."""
    from flows.segment import predict_segmentation
    from plateflow.config import corpus_root
    from plateflow.errors import ConfigError
    from plateflow.segment.predict import load_segmentation

    try:
        root = corpus_root(root)
        load_segmentation(root, experiment)  # a wrong id or a damaged checkpoint: one line, before any run
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--experiment") from None
    _run(predict_segmentation, str(root), experiment)
