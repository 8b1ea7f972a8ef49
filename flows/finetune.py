"""finetune: an encoder's last blocks and a head trained on labelled plates in resumable
micro-jobs, each a task run (plateflow/finetune.py); the result is an experiment."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.states import Completed, Failed

from plateflow.config import corpus_root
from plateflow.devices import compute_device
from plateflow.errors import ConfigError
from plateflow.experiments import check as ledger_check
from plateflow.finetune import FinetuneConfig, FinetuneRun, check_model, finish, labelled_items
from plateflow.labels import read_labels
from plateflow.profiles import check_model_name, load_profiles
from plateflow.runlog import quiet_returned_failures
from tasks.finetune import finetune_job


@flow(name="finetune", validate_parameters=True)
def finetune(root: str, model: str, label: str, labels_file: str | None = None,
             config: FinetuneConfig = FinetuneConfig(), weights_root: str | None = None,  # noqa: B008
             name: str | None = None):
    """Fine-tune the last blocks of ``model`` with a classifier head on the labelled plates'
    previews, in micro-jobs that a rerun continues after a crash or a kill; returns the
    experiment id. The fine-tuned encoder becomes a model of the corpus, ``name``, that
    refreshes (``--models``), tile features and segmentation use like any other.

    Args:
        root: The corpus root: the folder that holds plates_structured/.
        model: The encoder, a timm ViT from profiles/models.toml.
        label: The manifest key that holds each plate's class (or the name of the labels_file's classes).
        labels_file: A CSV of plate_id,label instead of the manifests' key.
        config: What trains (the last blocks), the memory budget, epochs, batch, learning rates, the job size.
        weights_root: A folder with one folder of weights per model, named as the model (empty: the Hugging Face cache).
        name: The fine-tuned encoder's model name (empty: MODEL-ft-EXPERIMENT, the experiment's id); an earlier model of that name is replaced.
    """
    quiet_returned_failures()
    logger = get_run_logger()
    try:
        root_path = corpus_root(root)
        spec = load_profiles(root=root_path).model(model)
        ledger_check(root_path)
        check_model(spec)
        if name is not None:
            check_model_name(name)
        labels = read_labels(root_path, label, labels_file)
        items, classes = labelled_items(root_path, labels, config, labels_file or f"the manifests' {label!r}")
    except ConfigError as exc:
        logger.error("configuration error: %s", exc)
        return Failed(message=str(exc), data=exc)
    run = FinetuneRun(root_path, model, label, items, classes, config)
    device = compute_device()
    done = run.done()
    logger.info("fine-tune %s on %s: %d plates, %d jobs (%d done before)", model, label, len(items), run.jobs, done)
    try:
        for job in range(done, run.jobs):
            finetune_job(run, job, spec, device, weights_root)
        row = finish(run, spec, device, Path(weights_root) if weights_root else None, logger, name)
    except ConfigError as exc:
        logger.error("configuration error: %s", exc)
        return Failed(message=str(exc), data=exc)
    return Completed(message=f"experiment {row['id']}: test accuracy {row['accuracy']:.3f} on {row['test_size']} "
                             f"plates, {config.blocks} blocks fine-tuned; the encoder is model "
                             f"{row['registered_model']}", data=row["id"])
