"""The fine-tuning command."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from app.cli import MODEL_NAMES, RootOpt, app, console, described
from plateflow.errors import problem
from plateflow.finetune import FinetuneConfig

FT = FinetuneConfig().model_dump()


@app.command()
def finetune(
    root: RootOpt,
    model: Annotated[str, typer.Option(help=f"The encoder, a timm ViT from profiles/models.toml: {MODEL_NAMES}.")],
    label: Annotated[str, typer.Option(help="The manifest key with each plate's class (or the labels file's name for it).")],
    labels: Annotated[Optional[Path], typer.Option(metavar="CSV", help="plate_id,label lines instead of the manifests' key.")] = None,
    blocks: Annotated[int, typer.Option(help=described(FinetuneConfig, "blocks"), min=0)] = FT["blocks"],
    vram_gb: Annotated[float, typer.Option(help=described(FinetuneConfig, "vram_gb"))] = FT["vram_gb"],
    epochs: Annotated[int, typer.Option(help=described(FinetuneConfig, "epochs"), min=1)] = FT["epochs"],
    batch_size: Annotated[int, typer.Option(help=described(FinetuneConfig, "batch_size"), min=1)] = FT["batch_size"],
    lr: Annotated[float, typer.Option(help=described(FinetuneConfig, "lr"))] = FT["lr"],
    steps_per_job: Annotated[int, typer.Option(help=described(FinetuneConfig, "steps_per_job"), min=1)] = FT["steps_per_job"],
    name: Annotated[Optional[str], typer.Option(help="The fine-tuned encoder's model name for --models "
                                                     "(default: MODEL-ft-EXPERIMENT); replaces one of that name.")] = None,
) -> None:
    """Fine-tune an encoder's last blocks and a classifier head on the labelled plates' previews
    (the finetune flow), in micro-jobs: run the same command again after a crash or a kill and
    it continues. The result is an experiment in ROOT/experiments/experiments.db, and the encoder
    a model of the corpus that `plateflow refresh --models NAME` and the other commands use."""
    from app.cli.training import _print_experiments
    from app.local_server import local_api
    from flows.finetune import finetune as finetune_flow
    from plateflow.config import corpus_root
    from plateflow.errors import ConfigError
    from plateflow.experiments import experiments

    from plateflow.finetune import check_model, labelled_items
    from plateflow.labels import read_labels
    from plateflow.profiles import check_model_name, load_profiles

    try:  # the model, the labels and the plates are checked before any run, in one line
        config = FinetuneConfig(blocks=blocks, vram_gb=vram_gb, epochs=epochs, batch_size=batch_size, lr=lr,
                                steps_per_job=steps_per_job)
        root = corpus_root(root)
        check_model(load_profiles(root=root).model(model))
        if name is not None:
            check_model_name(name)
        labelled_items(root, read_labels(root, label, labels), config, str(labels) if labels else
                       f"the manifests' {label!r}")
    except (ValueError, ConfigError) as exc:
        raise typer.BadParameter(problem(exc)) from None
    with local_api():
        state = finetune_flow(str(root), model, label, str(labels) if labels else None, config, name=name,
                              return_state=True)
    if not state.is_completed():
        console.print(f"[red]finetune failed[/]: {state.message}")
        raise typer.Exit(1)
    row = experiments(root, state.result())[0]
    _print_experiments([row])
    console.print(f"the fine-tuned encoder is model [bold]{row['registered_model']}[/]: "
                  f"plateflow refresh --root {root} --models {row['registered_model']}")
