"""Segmentation heads on cached patch tokens: a per-token classifier, linear (a 1x1 convolution)
or a small convolution over the token grid (3x3, then 1x1), trained on the tokens of a few
labelled plates (``masks``), scored on held-out plates by the IoU of their stitched masks.

- **Split**: by content hash, as every split in plateflow: ``test_fraction`` of the labelled
  plates are test plates, only ever scored; a share of the rest, also by hash, is validation,
  to choose the best epoch by token mIoU.
- **Training**: standardised tokens (train mean and spread, kept in the head), AdamW,
  cross-entropy weighted by inverse class frequency, unlabelled tokens ignored, windows in a
  seeded order, read from the memory-mapped token files a batch at a time.
- **Scoring**: each test plate's mask stitched at its mask's size (overlap blended, as
  ``predict`` stitches it) against the curator's: per-class IoU, mIoU, pixel accuracy and the
  confusion matrix (pixels).
- **Each run is an experiment**: a row in ROOT/experiments/experiments.db with its checkpoint
  and confusion matrix.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from plateflow import experiments as ledger
from plateflow.atomic import temp_file, write_bytes, write_json
from plateflow.caching import code_version
from plateflow.errors import ConfigError
from plateflow.heads import confusion_png
from plateflow.layout import CorpusLayout
from plateflow.segment.masks import IGNORE, fitted, read_mask, token_targets
from plateflow.segment.stitch import stitch
from plateflow.split import in_validation, split_of

CODE_VERSION = code_version("plateflow.segment.train", "plateflow.segment.masks", "plateflow.segment.stitch",
                            "plateflow.segment.patches")


class SegConfig(BaseModel):
    """A segmentation head's training; every field is recorded with the experiment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    head: Literal["linear", "conv"] = Field("conv", description="linear: a class per token from its vector alone; "
                                                                "conv: a small convolution over the token grid.")
    epochs: int = Field(40, ge=1, le=10_000, description="Passes over the labelled windows.")
    lr: float = Field(3e-3, gt=0, le=10, description="AdamW's learning rate.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW's weight decay.")
    hidden: int = Field(64, ge=1, le=4096, description="Channels of the conv head's hidden layer.")
    batch_size: int = Field(32, ge=1, le=65_536, description="Windows per step.")
    test_fraction: float = Field(0.25, gt=0, lt=1, description="This share of the labelled plates, by content "
                                                               "hash, is held out and scored.")
    validation_fraction: float = Field(0.2, ge=0, lt=1, description="This share of the other labelled plates, by "
                                                                    "hash, chooses the best epoch.")
    seed: int = Field(0, description="Seeds the weights and the order of windows.")


@dataclass
class LabelledPlate:
    folder: str
    sha256: str
    tokens: np.ndarray  # (windows, grid, grid, dim) float16, memory-mapped
    record: dict  # the plate's patch record: size, windows
    mask: np.ndarray  # (h, w) class indices, IGNORE where unlabelled
    split: str  # train, validation or test

    @functools.cached_property
    def targets(self) -> np.ndarray:
        """The class under each token of each window, (windows, grid, grid): computed once."""
        size = (self.record["width"], self.record["height"])
        return np.stack([token_targets(self.mask, w, size, self.record["grid"]) for w in self.record["windows"]])


def assign_splits(plates: list[LabelledPlate], config: SegConfig) -> None:
    for p in plates:
        p.split = ("test" if split_of(p.sha256, test_fraction=config.test_fraction) == "test"
                   else "validation" if in_validation(p.sha256, config.validation_fraction) else "train")
    counts = {s: sum(p.split == s for p in plates) for s in ("train", "validation", "test")}
    if not counts["test"] or not counts["train"]:
        raise ConfigError(f"{len(plates)} labelled plates with patch features: the content-hash split put "
                          f"{counts['train']} in train and {counts['test']} in test; label more plates (or change "
                          f"--test-fraction)")


class SegHead:
    """Builds the torch module lazily (torch is imported only when a head is made)."""

    @staticmethod
    def make(kind: str, dim: int, classes: int, hidden: int, mean=None, std=None):
        import torch
        from torch import nn

        class Head(nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("mean", torch.zeros(dim) if mean is None else torch.as_tensor(mean))
                self.register_buffer("std", torch.ones(dim) if std is None else torch.as_tensor(std))
                self.body = (nn.Conv2d(dim, classes, 1) if kind == "linear" else
                             nn.Sequential(nn.Conv2d(dim, hidden, 3, padding=1), nn.GELU(), nn.Conv2d(hidden, classes, 1)))

            def forward(self, tokens):  # (B, g, g, D) -> (B, classes, g, g)
                x = (tokens.float() - self.mean) / self.std
                return self.body(x.permute(0, 3, 1, 2))

        return Head()

    @staticmethod
    def from_state(ckpt: dict):
        head = SegHead.make(ckpt["head"], ckpt["dim"], len(ckpt["classes"]), ckpt["hidden"])
        head.load_state_dict(ckpt["state_dict"])
        return head.eval()


def window_probabilities(head, tokens: np.ndarray, indices: list[int], device: str = "cpu", batch: int = 64):
    """Softmax class probabilities of the windows ``indices``: (n, classes, grid, grid)."""
    import torch

    out = []
    with torch.inference_mode():
        for start in range(0, len(indices), batch):
            x = torch.from_numpy(np.asarray(tokens[indices[start:start + batch]])).to(device)
            out.append(torch.softmax(head(x), dim=1).cpu().numpy())
    return np.concatenate(out)


def stitch_plate(head, tokens: np.ndarray, record: dict, out_size: tuple[int, int], emit, device: str = "cpu") -> None:
    stitch([tuple(w) for w in record["windows"]], (record["width"], record["height"]),
           lambda idx: window_probabilities(head, tokens, idx, device), out_size, record["overlap"], emit)


def _token_stats(plates: list[LabelledPlate]) -> tuple[np.ndarray, np.ndarray]:
    total, squares, n = 0.0, 0.0, 0
    for p in plates:
        for start in range(0, len(p.tokens), 64):
            block = np.asarray(p.tokens[start:start + 64], np.float64).reshape(-1, p.tokens.shape[-1])
            total = total + block.sum(0)
            squares = squares + np.square(block).sum(0)
            n += len(block)
    mean = total / n
    return mean.astype(np.float32), np.sqrt(np.maximum(squares / n - mean ** 2, 1e-12)).astype(np.float32)


def confusion(truth: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    keep = truth != IGNORE
    return np.bincount(truth[keep].astype(np.int64) * classes + predicted[keep], minlength=classes * classes
                       ).reshape(classes, classes)


def iou_scores(matrix: np.ndarray) -> dict:
    """Per-class IoU and mIoU (over classes present in truth or prediction), pixel accuracy."""
    tp = np.diag(matrix).astype(float)
    union = matrix.sum(0) + matrix.sum(1) - tp
    iou = np.divide(tp, union, out=np.zeros_like(tp), where=union > 0)
    present = union > 0
    return {"iou": iou, "miou": float(iou[present].mean()) if present.any() else 0.0,
            "accuracy": float(tp.sum() / max(1, matrix.sum())), "support": matrix.sum(1)}


def fit(plates: list[LabelledPlate], classes: int, config: SegConfig, device: str, logger):
    import torch

    torch.manual_seed(config.seed)
    train = [p for p in plates if p.split == "train"]
    val = [p for p in plates if p.split == "validation"]
    order = [(i, w) for i, p in enumerate(train) for w in range(len(p.tokens))]
    counts = np.bincount(np.concatenate([p.targets.ravel() for p in train]), minlength=256)[:classes]
    weights = torch.tensor(np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / classes, 0.0), dtype=torch.float32)
    mean, std = _token_stats(train)
    dim = train[0].tokens.shape[-1]
    head = SegHead.make(config.head, dim, classes, config.hidden, mean, std).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights.to(device), ignore_index=IGNORE)
    rng = np.random.default_rng(config.seed)
    best, best_score, best_epoch, history = None, None, 0, []
    for epoch in range(1, config.epochs + 1):
        head.train()
        total = 0.0
        perm = rng.permutation(len(order))
        for b in range(0, len(order), config.batch_size):
            chunk = [order[k] for k in perm[b:b + config.batch_size]]
            x = torch.from_numpy(np.stack([np.asarray(train[i].tokens[w]) for i, w in chunk])).to(device)
            y = torch.from_numpy(np.stack([train[i].targets[w] for i, w in chunk]).astype(np.int64)).to(device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(head(x), y)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(chunk)
        train_loss = total / len(order)
        if val:
            head.eval()
            matrix = np.zeros((classes, classes), np.int64)
            for p in val:
                pred = window_probabilities(head, p.tokens, list(range(len(p.tokens))), device).argmax(1)
                matrix += confusion(p.targets.ravel(), pred.astype(np.int64).ravel(), classes)
            score = (iou_scores(matrix)["miou"], -train_loss)
        else:
            score = (-train_loss,)
        history.append({"epoch": epoch, "train_loss": train_loss, "validation_miou": score[0] if val else None})
        if best_score is None or score > best_score:
            best_score, best_epoch = score, epoch
            best = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
    logger.info("best epoch %d of %d (%s %.3f)", best_epoch, config.epochs,
                "validation token mIoU" if val else "train loss", abs(best_score[0]))
    return best, best_epoch, history, dim


def evaluate(head, plates: list[LabelledPlate], classes: int, device: str = "cpu") -> np.ndarray:
    """Pixel confusion matrix of the plates' stitched masks (at each mask's size) against theirs."""
    matrix = np.zeros((classes, classes), np.int64)
    for p in plates:
        h, w = p.mask.shape
        strips = []
        stitch_plate(head, p.tokens, p.record, (w, h), strips.append, device)
        matrix += confusion(p.mask.ravel(), np.concatenate(strips).ravel().astype(np.int64), classes)
    return matrix


def train_segmentation(root: Path, model: str, patches_version: str, plates: list[LabelledPlate],
                       classes: list[str], masks_name: str, config: SegConfig, patch_params: dict,
                       logger=None, device: str = "cpu") -> dict:
    """Train a head on ``plates`` (their split assigned here), score the test plates, record the
    experiment; its ledger row."""
    import torch

    logger = logger or logging.getLogger(__name__)
    root = Path(root)
    started = time.perf_counter()
    ledger.check(root)
    assign_splits(plates, config)
    state, best_epoch, history, dim = fit(plates, len(classes), config, device, logger)
    ckpt = {"state_dict": state, "head": config.head, "hidden": config.hidden, "dim": dim, "classes": classes,
            "model": model, "patches_version": patches_version, "patch_params": patch_params,
            "config": config.model_dump(), "best_epoch": best_epoch}
    head = SegHead.from_state(ckpt).to(device)
    test = [p for p in plates if p.split == "test"]
    matrix = evaluate(head, test, len(classes), device)
    result = iou_scores(matrix)
    created = datetime.now(timezone.utc)
    digest = hashlib.sha256(f"{model}|{masks_name}|{config.model_dump_json()}|{created.isoformat()}".encode())
    experiment_id = f"{created:%Y%m%d-%H%M%S}-{digest.hexdigest()[:6]}"
    folder = CorpusLayout(root).experiment(experiment_id)
    checkpoint = folder / "checkpoints" / "best_head.pt"
    with temp_file(checkpoint) as (_, tmp):
        torch.save(ckpt, tmp)
    png = folder / "confusion.png"
    write_bytes(png, confusion_png(matrix, classes, f"{masks_name} on {model} patches, {config.head}: test plates "
                                                    f"({len(test)}), pixels"))
    write_json(folder / "history.json", history)
    balance = {s: {c: int(n) for c, n in zip(classes, np.bincount(
        np.concatenate([p.targets.ravel() for p in plates if p.split == s] or [np.zeros(0, np.uint8)]),
        minlength=256)[:len(classes)])} for s in ("train", "validation", "test")}
    row = {"id": experiment_id, "created": created.isoformat(timespec="seconds"), "model": model,
           "feature_kind": "patches", "label": masks_name, "head": f"seg-{config.head}",
           "hyperparameters": {**config.model_dump(), "patches": patch_params}, "code_version": CODE_VERSION,
           "features_version": patches_version, "device": device,
           "train_size": sum(p.split == "train" for p in plates),
           "validation_size": sum(p.split == "validation" for p in plates), "test_size": len(test),
           "classes": classes, "class_balance": balance, "accuracy": result["accuracy"], "macro_f1": None,
           "miou": result["miou"],
           "per_class": {c: {"iou": float(result["iou"][i]), "support": int(result["support"][i])}
                         for i, c in enumerate(classes)},
           "best_epoch": best_epoch, "duration_s": round(time.perf_counter() - started, 3),
           "checkpoint": str(checkpoint.relative_to(root)), "confusion_png": str(png.relative_to(root))}
    ledger.record(root, row)
    logger.info("experiment %s: test mIoU %.3f, pixel accuracy %.3f (%d test plates), %.1f s", experiment_id,
                result["miou"], result["accuracy"], len(test), row["duration_s"])
    return row


def labelled_plates(entries: list[tuple[str, str, np.ndarray, dict, Path]], classes: int) -> list[LabelledPlate]:
    """(folder, sha256, tokens, record, mask file) -> LabelledPlate, each mask read and checked."""
    out = []
    for folder, sha, tokens, record, mask_file in entries:
        mask = fitted(read_mask(mask_file), record["width"], record["height"], mask_file.name, classes)
        out.append(LabelledPlate(folder, sha, tokens, record, mask, "train"))
    return out
