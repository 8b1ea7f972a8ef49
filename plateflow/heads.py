"""Light heads on cached features: a linear or small MLP classifier trained on a model's float16
feature store (plateflow/features.py), with the corpus's hash-based split (plateflow/split.py).

- **Data**: a labelled plate's input is its whole-plate vector and the mean of its views, side by
  side (``plate_inputs``); plates without a label, or without features, are not used. Train and
  test come from the plate's content hash (the tiles' rule); a share of the train plates, also
  by hash, is held out as validation, to choose the best epoch. The test plates are only ever
  scored.
- **Training**: standardised inputs (train mean and spread, kept inside the head), AdamW,
  cross-entropy weighted by inverse class frequency (so a rare class counts), minibatches in a
  seeded order. The best epoch by validation macro-F1, ties broken by validation loss (by train
  loss without validation plates), is the checkpoint.
- **Each training is an experiment**: a row in ROOT/experiments/experiments.db, the checkpoint at
  ROOT/experiments/<id>/checkpoints/best_head.pt and the test confusion matrix as a PNG.
- **Prediction** writes ``pred_<label>`` and ``pred_<label>_p`` into plates.parquet for every
  plate with features; ROOT/experiments/predictors.json keeps the experiment per label, so every
  refresh predicts new and changed plates from their cached features.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from plateflow import experiments as ledger
from plateflow.atomic import temp_file, write_bytes, write_json
from plateflow.caching import code_version
from plateflow.config import HeadConfig
from plateflow.devices import compute_device
from plateflow.errors import ConfigError
from plateflow.layout import CorpusLayout
from plateflow.split import in_validation, split_of
from plateflow.features import FeatureStore, open_store, plate_inputs

CODE_VERSION = code_version("plateflow.heads", "plateflow.labels", "plateflow.features", "plateflow.split")


@dataclass
class Dataset:
    inputs: np.ndarray  # float32 (rows, features)
    targets: np.ndarray  # int64 class index
    classes: list[str]
    split: np.ndarray  # "train", "validation", "test"

    def part(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(row numbers, targets) of one part: rows, not a copy of the inputs."""
        rows = np.flatnonzero(self.split == name)
        return rows, self.targets[rows]

    def balance(self) -> dict[str, dict[str, int]]:
        return {name: {c: int(((self.split == name) & (self.targets == i)).sum()) for i, c in enumerate(self.classes)}
                for name in ("train", "validation", "test")}


def build_dataset(store: FeatureStore, labels: dict[str, str], config: HeadConfig) -> Dataset:
    ids, shas = store.column("plate_id"), store.column("sha256")
    rows = np.array([i for i, p in enumerate(ids) if p in labels], np.int64)
    if len(rows) == 0:
        raise ConfigError(f"no plate with features has a label ({len(labels)} labels, {store.rows} plates with features)")
    names = [labels[ids[i]] for i in rows]
    classes = sorted(set(names))
    if len(classes) < 2:
        raise ConfigError(f"a classifier needs two classes or more; every labelled plate is {classes[0]!r}")
    index = {c: k for k, c in enumerate(classes)}
    split = []
    for i in rows:
        s = split_of(shas[i], config.test_every, config.test_fraction)
        split.append("validation" if s == "train" and in_validation(shas[i], config.validation_fraction) else s)
    inputs = plate_inputs(store.vectors, np.asarray(store.column("views")), rows)
    return Dataset(inputs, np.array([index[n] for n in names], np.int64), classes, np.array(split))


def make_head(kind: str, inputs: int, classes: int, hidden: int, mean, std):
    import torch
    from torch import nn

    class Head(nn.Module):
        """Standardisation (the train set's mean and spread) then the classifier."""

        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
            self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
            self.net = (nn.Linear(inputs, classes) if kind == "linear" else
                        nn.Sequential(nn.Linear(inputs, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, classes)))

        def forward(self, x):
            return self.net((x - self.mean) / self.std)

    return Head()


def head_from_state(kind: str, inputs: int, classes: int, hidden: int, state: dict):
    """A head with trained weights (its standardisation included: the state holds it)."""
    head = make_head(kind, inputs, classes, hidden, np.zeros(inputs), np.ones(inputs))
    head.load_state_dict(state)
    return head


def fit(data: Dataset, config: HeadConfig, device: str, logger) -> tuple[dict, int, list[dict]]:
    """The best epoch's weights, its number and every epoch's losses and validation score."""
    import torch

    torch.manual_seed(config.seed)
    train_rows, y_train = data.part("train")
    if len(train_rows) == 0:
        raise ConfigError("no labelled plate is in the train split")
    mean, std = _mean_std(data.inputs, train_rows)
    head = make_head(config.head, data.inputs.shape[1], len(data.classes), config.hidden, mean, std).to(device)
    counts = np.bincount(y_train, minlength=len(data.classes)).astype(np.float32)
    weight = torch.as_tensor(len(y_train) / (len(counts) * np.maximum(counts, 1)), device=device)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    opt = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    inputs = torch.from_numpy(data.inputs)  # shares the array: minibatches are gathered from it
    if torch.device(device).type != "cpu":
        inputs = inputs.to(device)
    rows_t, yt = torch.from_numpy(train_rows), torch.from_numpy(y_train).to(device)
    val_rows, y_val = data.part("validation")
    xv = inputs[torch.from_numpy(val_rows).to(inputs.device)].to(device)
    order = torch.Generator().manual_seed(config.seed)
    best, best_epoch, best_score, history = None, 0, (-np.inf,), []
    for epoch in range(1, config.epochs + 1):
        head.train()
        total = 0.0
        for idx in torch.randperm(len(rows_t), generator=order).split(config.batch_size):
            batch = inputs[rows_t[idx].to(inputs.device)].to(device, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(head(batch), yt[idx.to(device)])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        train_loss = total / len(rows_t)
        if len(val_rows):
            head.eval()
            with torch.inference_mode():
                logits = head(xv)
                val_loss = float(loss_fn(logits, torch.from_numpy(y_val).to(device)))
            f1 = scores(y_val, logits.argmax(dim=1).cpu().numpy(), len(data.classes))["macro_f1"]
            score = (f1, -val_loss)  # macro-F1 first; the loss breaks ties (a few validation plates tie often)
        else:
            f1 = val_loss = None
            score = (-train_loss,)
        history.append({"epoch": epoch, "train_loss": train_loss, "validation_loss": val_loss,
                        "validation_macro_f1": f1})
        if score > best_score:
            best_score, best_epoch = score, epoch
            best = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
    logger.info("best epoch %d of %d (%s %.3f)", best_epoch, config.epochs,
                "validation macro-F1" if len(val_rows) else "train loss", abs(best_score[0]))
    return best, best_epoch, history


def _mean_std(inputs: np.ndarray, rows: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and spread of ``inputs[rows]``, a chunk at a time (no copy of the rows)."""
    total = np.zeros(inputs.shape[1])
    squares = np.zeros(inputs.shape[1])
    for start in range(0, len(rows), chunk):
        block = inputs[rows[start:start + chunk]].astype(np.float64)
        total += block.sum(axis=0)
        squares += np.square(block).sum(axis=0)
    mean = total / len(rows)
    std = np.sqrt(np.maximum(squares / len(rows) - mean ** 2, 0))
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def predict_classes(head, x, batch: int = 8192) -> np.ndarray:
    return predict_proba(head, x, batch).argmax(axis=1)


def predict_proba(head, x, batch: int = 8192) -> np.ndarray:
    import torch

    head.eval()
    device = next(head.parameters()).device
    out = []
    with torch.inference_mode():
        for start in range(0, len(x), batch):
            chunk = torch.as_tensor(x[start:start + batch], device=device)
            out.append(torch.softmax(head(chunk), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def scores(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix
    (rows: true class, columns: predicted)."""
    confusion = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    tp = np.diag(confusion).astype(float)
    predicted, actual = confusion.sum(axis=0), confusion.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    present = actual > 0
    return {"accuracy": float(tp.sum() / max(1, confusion.sum())),
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
            "precision": precision, "recall": recall, "f1": f1, "support": actual, "confusion": confusion}


def confusion_png(confusion: np.ndarray, classes: list[str], title: str) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    size = 2.5 + 0.45 * len(classes)
    fig = Figure(figsize=(size + 1, size), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    top = confusion.max() if confusion.size else 0
    for (i, j), n in np.ndenumerate(confusion):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if n > top / 2 else "black", fontsize=8)
    fig.colorbar(image, ax=ax, shrink=0.8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _experiment_id(model: str, label: str, config: HeadConfig, created: datetime) -> str:
    digest = hashlib.sha256(f"{model}|{label}|{config.model_dump_json()}|{created.isoformat()}".encode()).hexdigest()
    return f"{created:%Y%m%d-%H%M%S}-{digest[:6]}"


def store_name(model: str, features: str) -> str:
    """The feature store a head reads: the plates' (``<model>``) or the tiles' (``<model>-tiles``)."""
    if features not in ("plates", "tiles"):
        raise ConfigError(f"features {features!r}: plates or tiles")
    return model if features == "plates" else f"{model}-tiles"


def require_features(root: Path, model: str, features: str = "plates"):
    """The feature store a head of ``model`` trains on; ``ConfigError`` saying how to build it
    when there is none."""
    path = CorpusLayout(Path(root)).features(store_name(model, features))
    store = open_store(path)
    if store is None:
        how = (f"`plateflow refresh --root {root} --models {model}` (or `plateflow features --root {root} --model "
               f"{model}`)" if features == "plates" else f"`plateflow features --root {root} --model {model} --tiles DEST`")
        raise ConfigError(f"{path} holds no features: run {how} first")
    return store


def train_experiment(root: Path, model: str, label: str, config: HeadConfig, labels: dict[str, str],
                     logger=None, device: str | None = None, features: str = "plates") -> dict:
    """Train one head on ROOT/features/<model>/ (the tiles': <model>-tiles/, a tile taking its
    plate's label and split) and record it as an experiment; its ledger row."""
    import torch

    logger = logger or logging.getLogger(__name__)
    root = Path(root)
    corpus = CorpusLayout(root)
    started = time.perf_counter()
    store = require_features(root, model, features)
    data = build_dataset(store, labels, config)
    balance = data.balance()
    logger.info("%s on %s: %d classes; plates per class: %s", label, model, len(data.classes),
                "; ".join(f"{s} " + ", ".join(f"{c} {n}" for c, n in b.items()) for s, b in balance.items()))
    device = device or compute_device()
    state, best_epoch, history = fit(data, config, device, logger)
    head = head_from_state(config.head, data.inputs.shape[1], len(data.classes), config.hidden, state)
    test_rows, y_test = data.part("test")
    result = scores(y_test, predict_classes(head, data.inputs[test_rows]), len(data.classes)) if len(test_rows) else None
    created = datetime.now(timezone.utc)
    experiment_id = _experiment_id(model, label, config, created)
    folder = corpus.experiment(experiment_id)
    checkpoint = folder / "checkpoints" / "best_head.pt"
    with temp_file(checkpoint) as (_, tmp):
        torch.save({"state_dict": state, "head": config.head, "hidden": config.hidden, "inputs": data.inputs.shape[1],
                    "classes": data.classes, "model": model, "label": label, "features_version": store.meta["version"],
                    "best_epoch": best_epoch, "config": config.model_dump(), "feature_kind": features}, tmp)
    confusion = result["confusion"] if result else np.zeros((len(data.classes),) * 2, np.int64)
    png = folder / "confusion.png"
    write_bytes(png, confusion_png(confusion, data.classes, f"{label} on {model}, {config.head}, lr {config.lr:g}: "
                                                            f"test plates ({len(y_test)})"))
    write_json(folder / "history.json", history)
    per_class = ({c: {"precision": float(result["precision"][i]), "recall": float(result["recall"][i]),
                      "f1": float(result["f1"][i]), "support": int(result["support"][i])}
                  for i, c in enumerate(data.classes)} if result else {})
    row = {"id": experiment_id, "created": created.isoformat(timespec="seconds"), "model": model,
           "feature_kind": features, "label": label, "head": config.head,
           "hyperparameters": config.model_dump(), "code_version": CODE_VERSION,
           "features_version": store.meta["version"], "device": device,
           "train_size": int((data.split == "train").sum()), "validation_size": int((data.split == "validation").sum()),
           "test_size": int(len(y_test)), "classes": data.classes, "class_balance": balance,
           "accuracy": result["accuracy"] if result else None, "macro_f1": result["macro_f1"] if result else None,
           "per_class": per_class, "best_epoch": best_epoch, "duration_s": round(time.perf_counter() - started, 3),
           "checkpoint": str(checkpoint.relative_to(root)), "confusion_png": str(png.relative_to(root))}
    ledger.record(root, row)
    logger.info("experiment %s: test accuracy %s, macro-F1 %s (%d test plates), %.1f s", experiment_id,
                f"{row['accuracy']:.3f}" if result else "–", f"{row['macro_f1']:.3f}" if result else "–",
                len(y_test), row["duration_s"])
    return row
