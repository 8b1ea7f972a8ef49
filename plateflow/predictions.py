"""Predictions from a trained head: a checkpoint loaded as weights only, pred_<label> and
pred_<label>_p written into plates.parquet, and the registry of heads a refresh applies to new
and changed plates (experiments/predictors.json)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np

from plateflow import experiments as ledger
from plateflow.atomic import write_json, write_parquet
from plateflow.errors import ConfigError
from plateflow.layout import CorpusLayout
from plateflow.features import open_store, plate_inputs
from plateflow.heads import head_from_state, predict_proba, require_features, store_name


def _load_head(root: Path, experiment_id: str):
    import torch

    rows = ledger.experiments(root, experiment_id)
    if not rows:
        raise ConfigError(f"no experiment {experiment_id!r} in {CorpusLayout(Path(root)).experiments_db} "
                          f"(`plateflow experiments --root {root}` lists them)")
    path = Path(root) / rows[0]["checkpoint"]
    again = f"train it again with `plateflow train-head --root {root} --model {rows[0]['model']} --label {rows[0]['label']}`"
    try:  # weights only: a checkpoint is never code
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        return head_from_state(ckpt["head"], ckpt["inputs"], len(ckpt["classes"]), ckpt["hidden"],
                               ckpt["state_dict"]), ckpt
    except FileNotFoundError:
        raise ConfigError(f"the checkpoint {path} of experiment {experiment_id} is missing; {again}") from None
    except Exception as exc:  # noqa: BLE001 - torch's unpickler, zip reader and state loading each raise their own
        # torch's own text advises loading untrusted files as code; ours names the damage instead.
        raise ConfigError(f"the checkpoint {path} of experiment {experiment_id} is damaged (torch could not read "
                          f"it as plateflow's weights: {type(exc).__name__}); {again}") from None


def check_predictable(root: Path, experiment_id: str) -> None:
    """``ConfigError`` naming what is damaged when ``experiment_id`` cannot predict: its
    checkpoint, the feature store it reads, or the head registry."""
    _, ckpt = _load_head(root, experiment_id)
    require_features(root, ckpt["model"], ckpt.get("feature_kind", "plates"))
    _predictors(root)


def prediction_columns(label: str) -> tuple[str, str]:
    name = re.sub(r"[^A-Za-z0-9_]", "_", label)
    return f"pred_{name}", f"pred_{name}_p"


def predict(root: Path, experiment_id: str, register: bool = True) -> tuple[int, tuple[str, str]]:
    """Write pred_<label> (the class) and pred_<label>_p (its probability) into plates.parquet
    for every plate with features of the experiment's model; the other plates get nulls.
    ``register``: refreshes keep predicting new and changed plates with this experiment."""
    import pyarrow as pa

    from plateflow.tables import read_corpus_table

    root = Path(root)
    corpus = CorpusLayout(root)
    head, ckpt = _load_head(root, experiment_id)
    features = ckpt.get("feature_kind", "plates")
    store = open_store(corpus.features(store_name(ckpt["model"], features)))
    if store is None:
        raise ConfigError(f"{corpus.features(store_name(ckpt['model'], features))} holds no features")
    table = read_corpus_table(root)
    if table is None:
        raise ConfigError(f"{corpus.table} does not exist: run `plateflow refresh --root {root}` first")
    proba = predict_proba(head, plate_inputs(store.vectors, np.asarray(store.column("views"))))
    per_plate: dict[str, list] = {}
    for d, p in zip(store.column("plate_dir"), proba):  # a plate's tiles vote with their mean probability
        per_plate.setdefault(d, []).append(p)
    by_folder = {d: (ckpt["classes"][int(np.mean(ps, axis=0).argmax())], float(np.mean(ps, axis=0).max()))
                 for d, ps in per_plate.items()}
    label_col, p_col = prediction_columns(ckpt["label"])
    folders = table.column("plate_dir").to_pylist()
    for name in (label_col, p_col):
        if name in table.column_names:
            table = table.drop_columns([name])
    table = table.append_column(pa.field(label_col, pa.string()),
                                pa.array([by_folder.get(d, (None, None))[0] for d in folders], pa.string()))
    table = table.append_column(pa.field(p_col, pa.float32()),
                                pa.array([by_folder.get(d, (None, None))[1] for d in folders], pa.float32()))
    write_parquet(corpus.table, table)
    if register:
        predictors = _predictors(root)
        predictors[ckpt["label"]] = {"experiment": experiment_id, "features_version": store.meta["version"]}
        write_json(corpus.predictors, predictors)
    return len(by_folder), (label_col, p_col)


def _predictors(root: Path) -> dict:
    """ROOT/experiments/predictors.json: label -> {"experiment", "features_version"};
    ``ConfigError`` naming it when it is damaged."""
    path = CorpusLayout(Path(root)).predictors
    try:
        data = json.loads(path.read_bytes())
        if not isinstance(data, dict) or not all(isinstance(v, dict) and isinstance(v.get("experiment"), str)
                                                 and isinstance(v.get("features_version"), str) for v in data.values()):
            raise ValueError("not a label -> {experiment, features_version} object")
        return data
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError) as exc:
        raise ConfigError(f"the head registry {path} is damaged ({exc}); register each head again with "
                          f"`plateflow predict --root {root} --experiment ID` after removing it") from None


def apply_predictors(root: Path, logger=None) -> list[str]:
    """After a refresh: the registered experiments predict again where the feature store changed
    since they last did, or plates.parquet lost their columns (a new plate, a changed one).
    Nothing is read but predictors.json and two small files when nothing changed."""
    import pyarrow.parquet as pq

    logger = logger or logging.getLogger(__name__)
    done = []
    corpus = CorpusLayout(Path(root))
    for label, entry in _predictors(root).items():
        rows = ledger.experiments(root, entry["experiment"])
        if not rows:
            logger.warning("predictor for %s: experiment %s is not in the ledger; skipped", label, entry["experiment"])
            continue
        try:
            meta = json.loads((corpus.features(store_name(rows[0]["model"], rows[0]["feature_kind"])) / "meta.json")
                              .read_bytes())
        except (OSError, ValueError):
            continue
        columns = pq.read_schema(corpus.table).names
        if meta["version"] == entry["features_version"] and prediction_columns(label)[0] in columns:
            continue
        n, cols = predict(root, entry["experiment"])
        logger.info("predicted %s for %d plates with experiment %s (%s)", label, n, entry["experiment"], ", ".join(cols))
        done.append(label)
    return done
