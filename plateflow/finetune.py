"""Fine-tuning an encoder's last blocks with a classifier head, in resumable micro-jobs.

- **Data**: each labelled plate's preview (viz/input_preview.png), letterboxed to the model's
  input, flipped at random; train and test plates by content hash (plateflow/split.py).
- **What trains**: the last ``blocks`` transformer blocks and the final norm (``blocks=0``: the
  frozen encoder, only the head), and a linear head on the pooled features.
- **Micro-jobs**: training is ``steps_per_job`` optimiser steps a job. After each job the
  trainable weights, the head and the optimiser's state are saved (ROOT/experiments/
  finetune-<run>/state.pt, atomically) with a record of the job (its loss, seconds and peak
  memory: CUDA's allocator peak on a GPU, the process's peak RSS on the CPU) in jobs.json, so
  a run killed at any point loses at most the job under way and the same command continues.
  Every step's batch and flips come from (seed, step), so a resumed run takes the same steps
  as one that was never interrupted.
- **Memory**: on a GPU the micro-batch is the largest power of two whose forward and backward
  pass stays within ``vram_gb`` (measured, not guessed), and gradients are accumulated to keep
  the effective batch ``batch_size``.
- **Result**: an experiment row in experiments.db (test accuracy, per class) with the
  checkpoint (the trained blocks and head) and the whole fine-tuned encoder as
  ``encoder/model.safetensors``, a weights folder timm loads like any other.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from plateflow import experiments as ledger
from plateflow.atomic import temp_file, write_bytes, write_json
from plateflow.caching import code_version, fingerprint
from plateflow.errors import ConfigError
from plateflow.heads import confusion_png, scores
from plateflow.layout import PREVIEW, CorpusLayout
from plateflow.profiles import ModelSpec, register_model
from plateflow.split import split_of
from plateflow.tables import read_corpus_table

CODE_VERSION = code_version("plateflow.finetune")


class FinetuneConfig(BaseModel):
    """A fine-tuning run; all of it but ``vram_gb`` names the run (the same settings resume it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    blocks: int = Field(4, ge=0, le=64, description="The encoder's last blocks that train (0: the frozen encoder).")
    vram_gb: float = Field(4.0, gt=0, description="GPU memory the training may use; the micro-batch is chosen "
                                                  "to fit it, gradients accumulate to the full batch.")
    epochs: int = Field(10, ge=1, le=10_000, description="Passes over the train plates.")
    batch_size: int = Field(32, ge=1, le=4096, description="Plates per optimiser step (the effective batch).")
    lr: float = Field(1e-4, gt=0, le=1, description="AdamW's learning rate for the encoder's blocks.")
    head_lr: float = Field(1e-3, gt=0, le=1, description="AdamW's learning rate for the head.")
    weight_decay: float = Field(0.05, ge=0, description="AdamW's weight decay.")
    steps_per_job: int = Field(20, ge=1, description="Optimiser steps a micro-job; a kill loses at most one job.")
    test_fraction: float = Field(0.25, gt=0, lt=1, description="This share of plates, by content hash, is test.")
    seed: int = Field(0, description="Seeds the head, the batches and the flips.")

    def run_name(self) -> dict:
        return self.model_dump(exclude={"vram_gb"})


@dataclass(frozen=True)
class Item:
    folder: str
    sha256: str
    preview: Path
    label: int
    split: str


def check_model(spec: ModelSpec) -> None:
    if spec.backend != "timm":
        raise ConfigError(f"model {spec.name}: fine-tuning takes a timm ViT (dinov2_*, dinov3_*, siglip_*), not a "
                          f"{spec.backend} model")


def labelled_items(root: Path, labels: dict[str, str], config: FinetuneConfig,
                   where: str = "the labels") -> tuple[list[Item], list[str]]:
    """Each labelled plate that is ok in plates.parquet and has a preview, with its split;
    ``ConfigError`` when the labels (from ``where``) give nothing to train or to score."""
    if not labels:
        raise ConfigError(f"no plate has a label in {where}")
    table = read_corpus_table(root)
    if table is None:
        raise ConfigError(f"{CorpusLayout(root).table} does not exist: run `plateflow refresh --root {root}` first")
    classes = sorted({labels[i] for i in labels})
    corpus = CorpusLayout(root)
    items = []
    for row in table.select(["plate_dir", "plate_id", "sha256", "status"]).to_pylist():
        if row["status"] == "ok" and row["plate_id"] in labels and row["sha256"]:
            preview = corpus.plate(row["plate_dir"]).viz(PREVIEW)
            if preview.is_file():
                items.append(Item(row["plate_dir"], row["sha256"], preview, classes.index(labels[row["plate_id"]]),
                                  split_of(row["sha256"], test_fraction=config.test_fraction)))
    train = [i for i in items if i.split == "train"]
    if len({i.label for i in train}) < 2 or not any(i.split == "test" for i in items):
        raise ConfigError(f"{len(items)} labelled plates with previews ({len(train)} train): fine-tuning needs two "
                          f"classes among the train plates and a test plate; label more plates")
    return items, classes


def view(path: Path, size: int, fill: tuple[int, int, int], flip: bool) -> np.ndarray:
    """The preview letterboxed to ``size`` (never cropped), (size, size, 3) uint8."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    scale = size / max(rgb.size)
    if scale != 1:
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BILINEAR)
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(rgb, ((size - rgb.width) // 2, (size - rgb.height) // 2))
    out = np.asarray(canvas)
    return out[:, ::-1] if flip else out


class Tuner:
    """The encoder with its last blocks trainable and a head; torch is imported when one is made."""

    def __init__(self, spec: ModelSpec, blocks: int, classes: int, device: str, weights_root: Path | None = None,
                 seed: int = 0):
        import torch

        from plateflow.embed.models import load_model

        check_model(spec)
        self.torch, self.device = torch, torch.device(device)
        loaded = load_model(spec, weights_root)
        self.spec, self.mean, self.std = spec, loaded.mean, loaded.std
        self.net = loaded.net.to(self.device)
        for p in self.net.parameters():
            p.requires_grad = False
        if blocks > len(self.net.blocks):
            raise ConfigError(f"model {spec.name} has {len(self.net.blocks)} blocks; --blocks {blocks} is more")
        self.trained = [f"blocks.{len(self.net.blocks) - k - 1}." for k in range(blocks)]
        if blocks:
            self.trained += ["norm.", "fc_norm."]
        for name, p in self.net.named_parameters():
            p.requires_grad = any(name.startswith(t) for t in self.trained)
        torch.manual_seed(seed)
        self.head = torch.nn.Linear(self.net.num_features, classes).to(self.device)
        self._mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)

    def trainable(self) -> dict:
        return {n: p for n, p in self.net.named_parameters() if p.requires_grad}

    def optimizer(self, config: FinetuneConfig):
        groups = [{"params": list(self.head.parameters()), "lr": config.head_lr}]
        if self.trainable():
            groups.append({"params": list(self.trainable().values()), "lr": config.lr})
        return self.torch.optim.AdamW(groups, weight_decay=config.weight_decay)

    def logits(self, pixels: np.ndarray):
        x = self.torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device).permute(0, 3, 1, 2).float().div_(255)
        return self.head(self.net((x - self._mean) / self._std))

    def state(self) -> dict:
        return {"trainable": {n: p.detach().cpu().clone() for n, p in self.trainable().items()},
                "head": {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()}}

    def load(self, state: dict) -> None:
        params = self.trainable()
        with self.torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value)
        self.head.load_state_dict(state["head"])


def micro_batch(tuner: Tuner, config: FinetuneConfig, size: int, optimizer) -> int:
    """The micro-batch: on a GPU the largest power of two (up to the batch) whose forward and
    backward pass peaks within ``vram_gb``, measured, with room kept for the optimizer's moments
    where its first step has not made them yet; on the CPU the whole batch."""
    torch = tuner.torch
    if tuner.device.type != "cuda":
        return config.batch_size
    # AdamW's two moments per trained value, made at the first step: counted before they exist.
    moments = 0 if optimizer.state else 2 * sum(p.numel() * p.element_size()
                                                for group in optimizer.param_groups for p in group["params"])
    budget = config.vram_gb * 2**30 - moments
    b = 2 ** int(math.log2(config.batch_size))
    while b >= 1:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(tuner.device)
        try:
            tuner.logits(np.zeros((b, size, size, 3), np.uint8)).sum().backward()
            peak = torch.cuda.max_memory_allocated(tuner.device)
        except torch.cuda.OutOfMemoryError:
            peak = math.inf
        tuner.net.zero_grad(set_to_none=True)
        tuner.head.zero_grad(set_to_none=True)
        if peak <= budget:
            return b
        b //= 2
    raise ConfigError(f"one plate's forward and backward pass needs more than --vram-gb {config.vram_gb:g} on "
                      f"{torch.cuda.get_device_name(tuner.device)}; train fewer --blocks or give more memory")


def steps_total(items: list[Item], config: FinetuneConfig) -> int:
    train = sum(i.split == "train" for i in items)
    return max(1, math.ceil(train * config.epochs / config.batch_size))


def step_batch(seed: int, step: int, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The train rows and flips of ``step``: from (seed, step) alone, so a resumed run repeats them."""
    rng = np.random.default_rng([seed, step])
    return rng.choice(n, size, replace=n < size), rng.random(size) < 0.5


@dataclass
class FinetuneRun:
    """One fine-tuning run's folder and what it trains on."""

    root: Path
    model: str
    label: str
    items: list[Item]
    classes: list[str]
    config: FinetuneConfig

    @property
    def key(self) -> str:
        return fingerprint(self.model, self.label, json.dumps(self.config.run_name(), sort_keys=True), CODE_VERSION,
                           *(f"{i.folder}:{i.sha256}:{i.label}" for i in self.items))

    @property
    def folder(self) -> Path:
        return CorpusLayout(self.root).experiments / f"finetune-{self.key}"

    @property
    def jobs(self) -> int:
        return math.ceil(steps_total(self.items, self.config) / self.config.steps_per_job)

    def records(self) -> list[dict]:
        try:
            return json.loads((self.folder / "jobs.json").read_bytes())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.folder / 'jobs.json'} is damaged ({exc}); remove {self.folder} to start the "
                              f"run again") from None

    def done(self) -> int:
        """Jobs finished: the state's count (the records may lag it by the job a kill interrupted)."""
        state = self.folder / "state.pt"
        if not state.is_file():
            return 0
        import torch

        try:
            return int(torch.load(state, map_location="cpu", weights_only=True)["jobs_done"])
        except Exception as exc:  # noqa: BLE001 - torch's readers each raise their own
            raise ConfigError(f"{state} is damaged ({type(exc).__name__}); remove {self.folder} to start the run "
                              f"again") from None


def run_job(run: FinetuneRun, job: int, spec: ModelSpec, device: str = "cpu", weights_root: Path | None = None,
            logger=None) -> dict:
    """Micro-job ``job``: load the state the previous job left, take its steps, save the state and
    record the job. A job already done is not run again."""
    import torch

    logger = logger or logging.getLogger(__name__)
    if job < run.done():
        return next((r for r in run.records() if r["job"] == job), {"job": job})
    started = time.perf_counter()
    config, size = run.config, spec.input_size
    tuner = Tuner(spec, config.blocks, len(run.classes), device, weights_root, config.seed)
    opt = tuner.optimizer(config)
    state_file = run.folder / "state.pt"
    if job > 0:
        state = torch.load(state_file, map_location=device, weights_only=True)
        tuner.load(state)
        opt.load_state_dict(state["optimizer"])
    micro = micro_batch(tuner, config, size, opt)
    if tuner.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(tuner.device)
    train = [i for i in run.items if i.split == "train"]
    fill = tuple(int(round(m * 255)) for m in tuner.mean)
    total = steps_total(run.items, config)
    losses = []
    tuner.net.train()
    for step in range(job * config.steps_per_job, min((job + 1) * config.steps_per_job, total)):
        rows, flips = step_batch(config.seed, step, len(train), config.batch_size)
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for start in range(0, len(rows), micro):
            part = slice(start, start + micro)
            pixels = np.stack([view(train[r].preview, size, fill, f) for r, f in zip(rows[part], flips[part])])
            target = torch.tensor([train[r].label for r in rows[part]], device=tuner.device)
            loss = torch.nn.functional.cross_entropy(tuner.logits(pixels), target) * (len(target) / len(rows))
            loss.backward()
            loss_sum += float(loss.detach())
        opt.step()
        losses.append(loss_sum)
    peak = (torch.cuda.max_memory_allocated(tuner.device), "cuda allocated") if tuner.device.type == "cuda" else \
        (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS")
    record = {"job": job, "steps": len(losses), "loss": float(np.mean(losses)) if losses else None,
              "micro_batch": micro, "peak_bytes": int(peak[0]), "peak": peak[1],
              "seconds": round(time.perf_counter() - started, 3)}
    with temp_file(state_file) as (_, tmp):
        torch.save({**tuner.state(), "optimizer": opt.state_dict(), "jobs_done": job + 1}, tmp)
    write_json(run.folder / "jobs.json", [r for r in run.records() if r["job"] != job] + [record])
    logger.info("fine-tune job %d of %d: %d steps, loss %.4f, micro-batch %d, peak %.0f MB (%s)", job + 1, run.jobs,
                record["steps"], record["loss"] or 0, micro, peak[0] / 2**20, peak[1])
    return record


def finish(run: FinetuneRun, spec: ModelSpec, device: str = "cpu", weights_root: Path | None = None,
           logger=None, name: str | None = None) -> dict:
    """Score the fine-tuned encoder and head on the test plates, record the experiment and
    register the encoder as the corpus's model ``name`` (default ``<model>-ft-<experiment id>``)
    for refreshes, features and heads; the experiment's row."""
    import torch
    from safetensors.torch import save_file

    logger = logger or logging.getLogger(__name__)
    config = run.config
    tuner = Tuner(spec, config.blocks, len(run.classes), device, weights_root, config.seed)
    tuner.load(torch.load(run.folder / "state.pt", map_location=device, weights_only=True))
    tuner.net.eval()
    fill = tuple(int(round(m * 255)) for m in tuner.mean)
    test = [i for i in run.items if i.split == "test"]
    predicted = []
    with torch.inference_mode():
        for start in range(0, len(test), 32):
            pixels = np.stack([view(i.preview, spec.input_size, fill, False) for i in test[start:start + 32]])
            predicted.append(tuner.logits(pixels).argmax(1).cpu().numpy())
    truth = np.array([i.label for i in test])
    result = scores(truth, np.concatenate(predicted), len(run.classes))
    created = datetime.now(timezone.utc)
    experiment_id = f"{created:%Y%m%d-%H%M%S}-{run.key[:6]}"
    folder = CorpusLayout(run.root).experiment(experiment_id)
    checkpoint = folder / "checkpoints" / "finetuned.pt"
    with temp_file(checkpoint) as (_, tmp):
        torch.save({**tuner.state(), "model": run.model, "label": run.label, "classes": run.classes,
                    "config": config.model_dump(), "blocks": config.blocks}, tmp)
    with temp_file(folder / "encoder" / "model.safetensors") as (_, tmp):
        save_file({k: v.detach().cpu().contiguous() for k, v in tuner.net.state_dict().items()}, str(tmp))
    png = folder / "confusion.png"
    write_bytes(png, confusion_png(result["confusion"], run.classes, f"{run.label} on {run.model} fine-tuned "
                                                                     f"({config.blocks} blocks): test plates"))
    jobs = run.records()
    train = [i for i in run.items if i.split == "train"]
    row = {"id": experiment_id, "created": created.isoformat(timespec="seconds"), "model": run.model,
           "feature_kind": "finetune", "label": run.label, "head": f"finetune-{config.blocks}",
           "hyperparameters": {**config.model_dump(), "jobs": len(jobs),
                               "peak_bytes": max((j["peak_bytes"] for j in jobs), default=None)},
           "code_version": CODE_VERSION, "features_version": run.key, "device": str(device),
           "train_size": len(train), "validation_size": 0, "test_size": len(test), "classes": run.classes,
           "class_balance": {s: {c: sum(i.split == s and i.label == k for i in run.items)
                                 for k, c in enumerate(run.classes)} for s in ("train", "test")},
           "accuracy": result["accuracy"], "macro_f1": result["macro_f1"],
           "per_class": {c: {"precision": float(result["precision"][k]), "recall": float(result["recall"][k]),
                             "f1": float(result["f1"][k]), "support": int(result["support"][k])}
                         for k, c in enumerate(run.classes)},
           "best_epoch": config.epochs, "duration_s": round(sum(j.get("seconds", 0) for j in jobs), 3),
           "checkpoint": str(checkpoint.relative_to(run.root)), "confusion_png": str(png.relative_to(run.root)),
           "registered_model": name or f"{run.model}-ft-{experiment_id}"}
    register_model(run.root, row["registered_model"], run.model, folder / "encoder")
    ledger.record(run.root, row)
    logger.info("experiment %s: fine-tuned %d blocks of %s, test accuracy %.3f (%d test plates); its encoder is "
                "the corpus's model %s (`plateflow refresh --models %s`)", experiment_id, config.blocks, run.model,
                result["accuracy"], len(test), row["registered_model"], row["registered_model"])
    return row


def train_all(root: Path, model: str, label: str, labels: dict[str, str], config: FinetuneConfig,
              spec: ModelSpec, device: str = "cpu", weights_root: Path | None = None, logger=None) -> FinetuneRun:
    """Every job of the run that is not done yet, in this process (the flow runs each as a task)."""
    items, classes = labelled_items(Path(root), labels, config)
    run = FinetuneRun(Path(root), model, label, items, classes, config)
    for job in range(run.done(), run.jobs):
        run_job(run, job, spec, device, weights_root, logger)
    return run
