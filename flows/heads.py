"""train_head: light heads trained on a model's cached features, each combination of head and
learning rate its own experiment (plateflow/heads.py); its metrics published as artifacts."""

from __future__ import annotations

import itertools

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Failed

from plateflow.artifacts import artifact_key, plural
from plateflow.config import HeadConfig, corpus_root
from plateflow.corpus import corpus_lock
from plateflow.errors import ConfigError
from plateflow.experiments import check as ledger_check
from plateflow.runlog import quiet_returned_failures
from plateflow.heads import require_features
from plateflow.labels import check_labels, read_labels
from plateflow.predictions import predict
from tasks.heads import train_one

_HEAD = HeadConfig().model_dump()  # the defaults, set once (plateflow/config.py: HeadConfig)


@flow(name="train-head", validate_parameters=True)
def train_head(root: str, model: str, label: str, labels_file: str | None = None,
               heads: list[str] = [_HEAD["head"]], lrs: list[float] = [_HEAD["lr"]],  # noqa: B006
               epochs: int = _HEAD["epochs"], seed: int = _HEAD["seed"], hidden: int = _HEAD["hidden"],
               test_every: int | None = _HEAD["test_every"], test_fraction: float | None = _HEAD["test_fraction"],
               features: str = "plates") -> list[str]:
    """Train a classifier head per (head, learning rate) on the cached features of ``model``;
    returns the experiment ids. Publishes a table of their metrics and their confusion matrices.

    Args:
        root: The corpus root: the folder that holds plates_structured/.
        model: The model whose features (ROOT/features/MODEL/) the heads read.
        label: The manifest key that holds each plate's class (or the name of the labels_file's classes).
        labels_file: A CSV of plate_id,label instead of the manifests' key.
        heads: linear and/or mlp: each is trained.
        lrs: Learning rates: each is tried with each head.
        epochs: Passes over the train plates.
        seed: Seeds the initial weights and the minibatch order.
        hidden: Hidden units of the mlp head.
        test_every: Test plates: content hash 0 mod this (the tiles' rule; or test_fraction).
        test_fraction: This share of plates by content hash is test.
        features: plates (ROOT/features/MODEL/) or tiles (ROOT/features/MODEL-tiles/: a head per tile).
    """
    quiet_returned_failures()
    try:
        root_path = corpus_root(root)
        store = require_features(root_path, model, features)
        ledger_check(root_path)  # a damaged ledger is said before training, not after
        labels = read_labels(root_path, label, labels_file)
        check_labels(store, labels, labels_file or f"the manifests' {label!r}")
    except ConfigError as exc:  # said once, in one line, before any task
        get_run_logger().error("configuration error: %s", exc)
        return Failed(message=str(exc), data=exc)
    configs = [HeadConfig(head=h, lr=lr, epochs=epochs, seed=seed, hidden=hidden, test_every=test_every,
                          test_fraction=None if test_every is not None else test_fraction)
               for h, lr in itertools.product(heads, lrs)]
    rows = [train_one(str(root_path), model, label, c, labels, features) for c in configs]
    create_table_artifact(
        key=artifact_key(root_path, "head-experiments"),
        table=[{"experiment": r["id"], "head": r["head"], "lr": r["hyperparameters"]["lr"], "accuracy": r["accuracy"],
                "macro_f1": r["macro_f1"], "train": r["train_size"], "test": r["test_size"],
                "seconds": r["duration_s"]} for r in rows],
        description=f"Heads for {label} on {model} features")
    lines = [f"# {label} on {model}", ""]
    for r in rows:
        lines += [f"## {r['id']}: {r['head']}, lr {r['hyperparameters']['lr']:g}",
                  f"test accuracy {r['accuracy']}, macro-F1 {r['macro_f1']}; per class:",
                  "", "| class | precision | recall | support |", "|---|---|---|---|",
                  *[f"| {c} | {m['precision']:.3f} | {m['recall']:.3f} | {m['support']} |" for c, m in r["per_class"].items()],
                  "", f"confusion matrix: `{root_path / r['confusion_png']}`", ""]
    create_markdown_artifact(markdown="\n".join(lines), key=artifact_key(root_path, "experiment-metrics"))
    return [r["id"] for r in rows]


@flow(name="predict-head", validate_parameters=True)
def predict_head(root: str, experiment: str) -> int:
    """Write pred_<label> and pred_<label>_p into plates.parquet from an experiment's head, for
    every plate with features; later refreshes predict new and changed plates with it.

    Args:
        root: The corpus root.
        experiment: The experiment id (plateflow experiments lists them).
    """
    quiet_returned_failures()
    try:
        root_path = corpus_root(root)
        with corpus_lock(root_path, f"predict-head {experiment}"):
            n, columns = predict(root_path, experiment)
    except ConfigError as exc:  # a damaged checkpoint, store or registry: one line that names it
        get_run_logger().error("configuration error: %s", exc)
        return Failed(message=str(exc), data=exc)
    get_run_logger().info("%s for %s", " and ".join(columns), plural(n, "plate"))
    return n
