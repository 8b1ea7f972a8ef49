"""Typed configuration, validated where a flow or command starts. Each stage's parameters live
with the stage (``CharacterizeParams``: plateflow/characterize/params.py; ``TileParams``,
``PatchParams``, ``SegConfig``: theirs) and are imported here for the configs that hold them;
``CropParams`` is shared by the candidates, the embeddings' key and the smart crop."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from plateflow.characterize.params import CharacterizeParams
from plateflow.errors import ConfigError
from plateflow.layout import CorpusLayout
from plateflow.profiles import dispatch_policy


class CropParams(BaseModel):
    """Crop candidates and the smart-crop choice; part of the embedding and crop cache keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    n_candidates: int = Field(15, ge=1, le=256, description="Crop candidates besides the whole plate.")
    scales: tuple[float, ...] = Field(
        (0.8, 0.6, 0.45, 0.3), min_length=1,
        description="Candidate area as a fraction of the largest box of its aspect."
    )
    aspects: tuple[float | Literal["plate"], ...] = Field(
        ("plate", 1.0, 0.75), min_length=1,
        description="Candidate width/height ratios; \"plate\" is the plate's own.")
    positions: tuple[tuple[float, float], ...] = Field(
        ((0.5, 0.5), (0.3, 0.3), (0.7, 0.7), (0.7, 0.3), (0.3, 0.7)), min_length=1,
        description="Candidate centres as fractions of the plate's width and height (kept inside it).")
    min_box_px: int = Field(8, ge=1, description="Candidates narrower or shorter than this (pixels) are dropped.")
    min_area_fraction: float = Field(0.0, ge=0, le=1, description="Smallest allowed crop, as plate area.")
    aspect_range: tuple[float, float] | None = Field(None, description="Allowed width/height of the crop.")
    crop_format: str = Field("jpeg", pattern="^(jpeg|png)$", description="Format of the saved best crop.")
    mask_class: str | None = Field(None, max_length=200, description=(
        "Crop to this class's region of the plate's mask from the registered segmentation (plateflow predict-seg), "
        "for example picture; plates without a mask, or without that class, get the similarity crop."))

    @field_validator("aspects")
    @classmethod
    def _aspects_positive(cls, v: tuple) -> tuple:
        if any(a != "plate" and not a > 0 for a in v):
            raise ValueError(f"aspects must be positive width/height ratios or \"plate\", got {v}")
        return v

    @field_validator("positions")
    @classmethod
    def _positions_inside(cls, v: tuple) -> tuple:
        if any(not (0 <= x <= 1 and 0 <= y <= 1) for x, y in v):
            raise ValueError(f"positions must be fractions of the plate's width and height (0..1), got {v}")
        return v

    def fingerprint(self) -> str:
        data = self.model_dump(exclude={"crop_format", "mask_class"})  # what the candidates' vectors depend on
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def default_workers() -> int:
    """Batches run at once: one per core, at most the dispatch policy's ``max_workers``."""
    return max(1, min(dispatch_policy().cpu.max_workers, os.cpu_count() or 1))


def _cpu(name: str):
    return lambda: getattr(dispatch_policy().cpu, name)


def _gpu(name: str):
    return lambda: getattr(dispatch_policy().gpu, name)


Dispatch = Literal["auto", "local", "pool"]
_DASK = re.compile(r"^(local:[1-9][0-9]*|(tcp|tls|inproc|ucx)://\S+|[\w.-]+:[0-9]+)$")


class RefreshConfig(BaseModel):
    """One refresh's settings, shared by refresh-corpus and retry-failed-plates (flow parameter
    ``config``) and written whole, with the corpus root, to ``.plateflow/config.json``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    characterize: CharacterizeParams = Field(
        default_factory=CharacterizeParams,
        description="The CPU step: histograms, preview, pixel limit, flags (part of its cache key).")
    # The GPU stage: none without models.
    models: list[str] = Field(default_factory=list, description="Embedding models (profiles/models.toml).")
    crop_model: str | None = Field(None, description="The model whose similarity picks the crop (default: the first of the models).")
    crop: CropParams = Field(default_factory=CropParams,
                             description="Crop candidates and the smart-crop choice (part of their cache keys).")
    gpu_class: str | None = Field(None, description="GPU class of the GPU step (default: with a worker online on the server, the best class that has one; else this machine's).")
    weights_root: str | None = Field(None, description="Folder with one folder of weights per model, named as the model (default: the Hugging Face cache).")
    gpu_dispatch: Dispatch = Field("auto", description="auto: to a work queue with an online worker when the server has one, else in-process; local: in-process; pool: a work queue or an error.")
    chunk_size: int = Field(default_factory=_gpu("chunk_size"), ge=1,
                            description="Plates per embed-chunk task of the GPU step, its unit of retry and progress.")
    worker_wait_minutes: float | None = Field(
        default_factory=_gpu("worker_wait_minutes"), gt=0,
        description="How long a work queue may have no online worker before its plates fail (empty: no limit).")
    # The CPU stage.
    workers: int = Field(default_factory=default_workers, ge=1, le=64,
                         description="Batches run at once in this process (threads); also the hashing threads.")
    dask: str | None = Field(None, description="Run the CPU batches on Dask: a scheduler address (tcp://host:8786) or "
                                               "local:N (N worker processes here). Workers need the corpus at the same path.")
    verify: bool = Field(False, description="Hash every source again, not only those whose size, mtime, inode or ctime changed.")
    batch_plates: int = Field(default_factory=_cpu("batch_plates"), ge=1, le=100_000,
                              description="Most plates in one batch task.")
    batch_megabytes: float = Field(default_factory=_cpu("batch_megabytes"), gt=0,
                                   description="Most source megabytes in one batch task.")

    @field_validator("dask")
    @classmethod
    def _dask_address(cls, v: str | None) -> str | None:
        if v is not None and not _DASK.match(v):
            raise ValueError(f"dask must be a scheduler address (tcp://host:8786, host:8786) or local:N, got {v!r}")
        return v

    @field_validator("models")
    @classmethod
    def _models_unique(cls, v: list[str]) -> list[str]:
        v = [m.strip() for m in v if m.strip()]
        if len(set(v)) != len(v):
            raise ValueError(f"models are listed twice: {', '.join(v)}")
        return v

    @model_validator(mode="after")
    def _crop_model_among_models(self) -> "RefreshConfig":
        if self.crop_model is not None and self.crop_model not in self.models:
            raise ValueError(f"crop_model {self.crop_model} is not among models {', '.join(self.models) or '(none)'}")
        return self

    @property
    def best_crop_model(self) -> str | None:
        return self.crop_model or (self.models[0] if self.models else None)

    @property
    def batch_bytes(self) -> int:
        return int(self.batch_megabytes * 2**20)

    def effective_characterize(self) -> CharacterizeParams:
        """The CPU step's parameters: the GPU step reads the working copy, so models need one."""
        if self.models and not self.characterize.working_copy:
            return self.characterize.model_copy(update={"working_copy": True})
        return self.characterize


def corpus_root(root: str | Path) -> Path:
    """ROOT, resolved; ``ConfigError`` unless it holds plates_structured/."""
    path = Path(root).expanduser().resolve()
    if not CorpusLayout(path).plates.is_dir():
        raise ConfigError(f"{path} is not a plate corpus: it has no plates_structured/ folder "
                          "(create one with `plateflow ingest SRC --root ROOT`)")
    return path


class HeadConfig(BaseModel):
    """How one head is trained."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    head: Literal["linear", "mlp"] = Field("linear", description="linear: one layer; mlp: one hidden layer.")
    lr: float = Field(1e-3, gt=0, le=1, description="AdamW learning rate.")
    epochs: int = Field(30, ge=1, le=10_000, description="Passes over the train plates.")
    seed: int = Field(0, description="Seeds the initial weights and the minibatch order.")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay.")
    hidden: int = Field(256, ge=1, le=65536, description="Hidden units of the mlp head.")
    batch_size: int = Field(256, ge=1, description="Plates per step.")
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="Train plates held out, by hash, to pick the best epoch.")
    test_every: int | None = Field(None, ge=2, description="Test plates: hash 0 mod this (the tiles' rule).")
    test_fraction: float | None = Field(0.2, gt=0, lt=1, description="Or: this share of plates, by hash, is test.")

    @model_validator(mode="after")
    def _one_split_rule(self) -> "HeadConfig":
        if self.test_every is not None and self.test_fraction is not None:
            raise ValueError("give test_every or test_fraction, not both")
        return self
